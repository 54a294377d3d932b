"""Matrix formulas of a network's gradient: the δ-rule and its index form.

For a network on ``MatrixSymbol``s the ordered derivatives of the pre-activations are the
textbook deltas, and every parameter gradient is a product with one of them:

    Δ₂ = (Y ⊙ (T𝟏)𝟏ᵀ − T)/N   ∂L/∂W₂ = H₁ᵀΔ₂      ∂L/∂b₂ = 𝟏ᵀΔ₂
    Δ₁ = (Δ₂W₂ᵀ) ⊙ σ′(Z₁)     σ′(Z₁) = H₁ ⊙ (1 − H₁)
    ∂L/∂W₁ = XᵀΔ₁             ∂L/∂W₁[k,l] = Σₙ X[n,k] Δ₁[n,l]

(softmax + cross-entropy: T𝟏 are the row sums of the targets, so Δ₂ is the textbook
(Y − T)/N exactly when every row of T sums to 1, as one-hot and probability rows do.)

The formulas are read off ``derive`` (so they are the gradient Program's own rules), with
the adjoints of the activations folded into the deltas.  Every formula's shape is
recomputed from its factors and checked against its left-hand side.  The index form is
written entry by entry from the matrix formula (a product is a sum over the shared index,
a map acts entry by entry, 𝟏ᵀG sums a column), so no KroneckerDelta or Piecewise appears.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from ..errors import ShapeError, SymbpError
from ..heads import rule
from ..matrix import is_matrix, same_dim
from . import tex as T
from .derive import Derivation, derive


class Iverson(sp.Function):
    """[condition]: 1 where the condition holds, else 0 (prints as a bracket)."""

    nargs = 1

    def _latex(self, printer):
        return r"\left[%s\right]" % printer._print(self.args[0])


@dataclass
class FormulaRow:
    """``lhs = expr`` with its checked ``shape`` and its index form ``index_lhs = index``."""

    lhs: sp.Basic
    expr: sp.Basic
    shape: tuple
    index_lhs: sp.Basic | None = None
    index: sp.Basic | None = None
    kind: str = "delta"


class Formulas:
    """The δ-rule of a matrix network; print with ``latex()``, ``text()``, ``markdown()``."""

    def __init__(self, derivation: Derivation, rows: list[FormulaRow]):
        self.derivation = derivation
        self.rows = rows
        self.names = derivation.names

    def _p(self, e, style):
        sm = self.derivation.softmax_names
        return T.tex(e, self.names, softmax_names=sm) if style == "tex" else \
            T.text(e, self.names, softmax_names=sm)

    def lines(self, style="tex", index=False) -> list[tuple[str, str, str]]:
        out = []
        for r in self.rows:
            if index:
                if r.index is None:
                    continue
                out.append((self._p(r.index_lhs, style), self._p(r.index, style), ""))
            else:
                shape = (r"\times " if style == "tex" else "×").join(
                    self._p(sp.sympify(d), style) for d in r.shape)
                out.append((self._p(r.lhs, style), self._p(r.expr, style), shape))
        return out

    def latex(self, index: bool = True) -> str:
        """An ``align*`` with the δ-rule (and its index form, unless ``index=False``)."""
        body = [r"&\text{matrix form} \\"]
        body += [r"%s &= %s && \in \mathbb{R}^{%s} \\" % ln for ln in self.lines("tex")]
        if index:
            body.append(r"&\text{index form} \\")
            body += [r"%s &= %s \\" % ln[:2] for ln in self.lines("tex", index=True)]
        body[-1] = body[-1][: -len(r" \\")]
        return "\\begin{align*}\n" + "\n".join(body) + "\n\\end{align*}"

    def text(self, index: bool = True) -> str:
        """Plain Unicode, one formula a line, shapes on the right."""
        rows = self.lines("text")
        w = max(len(f"{a} = {b}") for a, b, _ in rows)
        out = ["Matrix form"] + [f"  {f'{a} = {b}'.ljust(w)}   {c}" for a, b, c in rows]
        if index:
            out.append("Index form")
            out += [f"  {a} = {b}" for a, b, _ in self.lines("text", index=True)]
        return "\n".join(out)

    def markdown(self) -> str:
        rows = ["| formula | shape |", "|---|---|"]
        rows += [f"| ${a} = {b}$ | ${c}$ |" for a, b, c in self.lines("tex")]
        idx = [f"- ${a} = {b}$" for a, b, _ in self.lines("tex", index=True)]
        return "\n".join(rows + ["", "Index form:", ""] + idx) + "\n"

    def __str__(self):
        return self.text()

    def _repr_latex_(self):
        return "$$\n" + self.latex() + "\n$$"

    def _repr_markdown_(self):
        return self.markdown()


def matrix_formulas(f, wrt) -> Formulas:
    """The δ-rule (named deltas, checked shapes) and index form of ∂f/∂wrt for a matrix net."""
    d = derive(f, wrt, symbolic_activations=True)
    if not d.matrix:
        raise SymbpError(
            "matrix_formulas needs a network on MatrixSymbols (X, W₁, b₁, ...); for scalar "
            "expressions print derive(f, wrt) instead"
        )
    plain = derive(f, wrt)  # own-value local derivatives, for the index form
    deltas = {r.sym: r for r in d.backward}
    inline: dict = {}  # ∂⁺L/∂H -> its formula: only the deltas keep a name
    inline_plain: dict = {}
    for r, rp in zip(d.backward, plain.backward):
        a = d.adjoint[r.sym]
        if not a.name.startswith("__D_"):
            inline[a] = r.expr.xreplace(inline)
            inline_plain[plain.adjoint[rp.sym]] = rp.expr.xreplace(inline_plain)
    rows = []
    ix = _Indexer(d.names)
    for r, rp in zip(d.backward + d.gradients, plain.backward + plain.gradients):
        a = d.adjoint[r.sym]
        if r.kind == "backward" and not a.name.startswith("__D_"):
            continue
        expr = r.expr.xreplace(inline)
        shape = _checked_shape(a, expr)
        lhs_i, rhs_i = ix.row(plain.adjoint[rp.sym], rp.expr.xreplace(inline_plain))
        rows.append(FormulaRow(a, expr, shape, lhs_i, rhs_i, r.kind))
        for s in d.defs:  # σ′(Z₁) = H₁ ⊙ (1 − H₁), right after the delta that uses it
            if s in _names(expr) and not any(x.lhs == s for x in rows):
                rows.append(FormulaRow(s, d.defs[s], _checked_shape(s, d.defs[s]),
                                       kind="activation"))
    del deltas
    return Formulas(d, rows)


def _names(e):
    from ..ir import _names_in

    return _names_in(e)


def _checked_shape(lhs, expr) -> tuple:
    if not is_matrix(expr):
        if is_matrix(lhs):
            raise ShapeError(f"{lhs} is {lhs.shape} but its formula {expr} is a scalar")
        return (1, 1)
    shape = tuple(expr.shape)
    if not all(same_dim(a, b) for a, b in zip(shape, lhs.shape)):
        raise ShapeError(f"{lhs} is {tuple(lhs.shape)} but its formula {expr} is {shape}")
    return shape


class _NoEntry(SymbpError):
    pass


class _Indexer:
    """Entry-by-entry forms of matrix formulas: (A B)[i,j] = Σₖ A[i,k] B[k,j]."""

    def __init__(self, names: T.Names):
        self.names = names
        self.bases: dict = {}

    def base(self, M):
        if M not in self.bases:
            s = sp.Symbol(f"__ix_{M.name}")
            self.names.set(s, self.names.tex(M), self.names.text(M))
            self.bases[M] = sp.IndexedBase(s)
        return self.bases[M]

    def at(self, M, *index):
        # an axis of size 1 takes no index where it is broadcast: b[l] of a row 1×L, b[f]
        # of a 1×F×1×1 bias; an image's own single channel keeps its c (X[n,c,i,j])
        keep = len(M.shape) != 2
        idx = [k for k, d in zip(index, M.shape)
               if d != 1 or (keep and self.sizes.get(k) == 1)]
        return self.base(M)[tuple(idx)] if idx else self.base(M).label

    def row(self, lhs, expr):
        if not is_matrix(lhs):
            return None, None
        self.used, self.sizes = set(), {}
        if len(lhs.shape) == 2:
            index = (self.letter(lhs.shape[0], ("k", "i")),
                     self.letter(lhs.shape[1], ("l", "j", "c")))
        else:  # images: a head names its axes ((f, c, u, v) of a kernel's gradient)
            h = rule(expr)
            want = (h.extra.get("letters") if h is not None else None) or ("n", "c", "r", "q")
            if len(want) != len(lhs.shape):
                want = ("m", "p", "q", "r", "s")[:len(lhs.shape)]
            index = tuple(self.letter(d, (w,)) for d, w in zip(lhs.shape, want))
        try:
            return self.at(lhs, *index), self.entry(expr, *index)
        except _NoEntry:  # a head with no index form (a reshape): the matrix form only
            return None, None

    def letter(self, dim, prefer=("m", "p", "q", "r", "s")):
        # n runs over the batch (a symbolic size), other sizes take k, l, m, ...
        d = sp.sympify(dim)
        choices = (("n",) if d.free_symbols else ()) + tuple(prefer) + ("m", "p", "q", "r", "s")
        for c in choices:
            if c not in self.used:
                self.used.add(c)
                self.sizes[sp.Symbol(c, integer=True)] = d
                return sp.Symbol(c, integer=True)
        raise SymbpError("index form: ran out of index letters")

    def entry(self, e, *index):
        """Entry ``index`` of ``e`` ((i, j) of a matrix, (n, c, i, j) of images): a name's
        entry, or its head's ``entry`` rule."""
        if isinstance(e, sp.MatrixSymbol):
            return self.at(e, *index)
        h = rule(e)
        if h is None or h.entry is None:
            raise _NoEntry(f"index form: no entry rule for {type(e).__name__}")
        return h.entry(self, e, *index)

    @staticmethod
    def no_piecewise(e):
        return _no_piecewise(e)


def _no_piecewise(e):
    """Piecewise derivatives (leaky ReLU's 1 or α) as Iverson brackets: 1·[z > 0] + α·[z ≤ 0]."""
    def iv(pw):
        out, seen = sp.Integer(0), sp.true
        for val, cond in pw.args:
            c = sp.And(seen, cond) if seen is not sp.true else cond
            out += val * (Iverson(c) if c is not sp.true else 1)
            seen = sp.And(seen, sp.Not(cond))
        return out
    return e.replace(lambda x: isinstance(x, sp.Piecewise), iv)
