"""Step-by-step derivations: the forward table, the ordered derivatives, the gradients.

``derive(f, wrt)`` reads the gradient Program and prints it the way a lecture does:

    forward    z = w x + b,   y = σ(z),   L = ½(y − t)²
    backward   ∂⁺L/∂y = y − t,   ∂⁺L/∂z = ∂⁺L/∂y · y(1 − y)
    gradients  ∂L/∂w = ∂⁺L/∂z · x,   ∂L/∂b = ∂⁺L/∂z

Only the program's *interesting* values get a name: the loss, every activation (a function
application, softmax, a loss head), the argument of an activation (its pre-activation z)
and every value used more than once.  Arithmetic used once is folded into its user, so the
table reads like a textbook and its size stays linear in the size of the network: shared
values are names, never re-expanded.

Each backward row is a sum over the named value's users of ``upstream × local``; the local
derivative is written in terms of the user's own value where that is shorter (σ′ = y(1 − y),
tanh′ = 1 − y²).  With numbers (``at``), every value and every ordered derivative comes from
evaluating the gradient Program itself (NumPy reference backend); scalar rows are checked
against their printed formula on the spot, matrix rows by ``Derivation.check()``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from ..api import gradient_program, wrt_tuple
from ..errors import SymbpError
from ..heads import rule
from ..ir import Program, _names_in, is_constant, make_map
from ..matrix import (
    Elementwise,
    LogSoftmax,
    Softmax,
    SoftmaxCrossEntropy,
    array_symbol,
    is_matrix,
    placeholders,
)
from ..vjp import OWN, broadcast, local_factor, vjp
from . import tex as T


@dataclass
class Row:
    """One line of a derivation.

    ``sym`` is the display symbol of the value (forward rows) or of the value whose
    ordered derivative this row computes (backward and gradient rows); ``expr`` is the
    right-hand side (forward: the formula; backward: Σ upstream × local, as one SymPy
    expression), ``terms`` the summands one by one (a scalar term is a pair
    ``(upstream, local)``, a matrix term one expression).  ``value`` is the forward value
    and ``grad`` the value of ∂⁺L/∂sym, when the derivation has numbers.
    """

    kind: str
    sym: sp.Basic
    expr: sp.Basic
    terms: list = field(default_factory=list)
    prog: sp.Basic | None = None
    value: object = None
    grad: object = None
    note: str = ""


class Derivation:
    """A derivation: ``forward``, ``backward`` and ``gradients`` rows, printable.

    ``latex()`` gives an ``align*`` environment, ``markdown()`` a table per part with
    inline math, ``text()`` plain Unicode; Jupyter shows it through ``_repr_latex_``.
    """

    def __init__(self, program: Program, names: T.Names, forward, backward, gradients,
                 adjoint: dict, at=None, matrix=False, softmax_names=None, defs=None):
        self.program = program
        self.names = names
        self.forward: list[Row] = forward
        self.backward: list[Row] = backward
        self.gradients: list[Row] = gradients
        self.adjoint = adjoint  # display symbol -> its ∂⁺L/∂ symbol
        self.at = at
        self.matrix = matrix
        self.softmax_names = softmax_names or {}
        self.defs = defs or {}  # display symbol -> (expr) for named local factors
        self.values: dict = {}  # display symbol (value or adjoint) -> number, when at
        self.note = ""  # one line saying where the numbers stop being finite, when they do

    # --- printing -------------------------------------------------------------------------
    def _tex(self, e) -> str:
        return T.tex(e, self.names, softmax_names=self.softmax_names)

    def _text(self, e) -> str:
        return T.text(e, self.names, softmax_names=self.softmax_names)

    def _term(self, t, style) -> str:
        pr = self._tex if style == "tex" else self._text
        if not isinstance(t, tuple):
            return pr(t)
        up, local = t
        dot = r" \cdot " if style == "tex" else " · "
        if up == 1:
            return pr(local)
        if local == 1:
            return pr(up)
        loc = pr(local)
        if isinstance(local, sp.Add):
            loc = (r"\left(%s\right)" if style == "tex" else "(%s)") % loc
        return pr(up) + dot + loc

    def rhs(self, row: Row, style="tex") -> str:
        """The right-hand side of a row: the formula, or Σ upstream × local."""
        if row.kind == "forward":
            return self._tex(row.expr) if style == "tex" else self._text(row.expr)
        parts = [self._term(t, style) for t in row.terms] or ["0"]
        return " + ".join(parts)

    def lhs(self, row: Row, style="tex") -> str:
        if row.kind == "forward":
            return self.names.tex(row.sym) if style == "tex" else self.names.text(row.sym)
        a = self.adjoint[row.sym]
        return self.names.tex(a) if style == "tex" else self.names.text(a)

    def _num(self, v, style) -> str:
        return format_value(v, style)

    def latex(self) -> str:
        """The derivation as a LaTeX ``align*`` environment."""
        lines = [r"\begin{align*}"]
        for title, rows in self._parts():
            lines.append(r"&\text{%s} \\" % title)
            for r in rows:
                line = r"%s &= %s" % (self.lhs(r), self.rhs(r))
                if self.matrix and is_matrix(r.sym):
                    line += r" && \in \mathbb{R}^{%s}" % _shape_tex(r.sym.shape, self.names)
                if r.value is not None or r.grad is not None:
                    line += " && " + self._numbers(r, "tex")
                lines.append(line + r" \\")
        lines[-1] = lines[-1][: -len(r" \\")]
        lines.append(r"\end{align*}")
        if self.note:
            lines.insert(0, "% " + self.note)
        return "\n".join(lines)

    def _numbers(self, r: Row, style) -> str:
        out = []
        if r.kind == "forward" and r.value is not None:
            out.append(self._num(r.value, style))
        if r.grad is not None:
            if r.kind == "forward":
                a = self.adjoint.get(r.sym)
                name = (self.names.tex(a) if style == "tex" else self.names.text(a)) if a else ""
                if a is not None:
                    out.append(f"{name} = {self._num(r.grad, style)}")
            else:
                out.append(self._num(r.grad, style))
        sep = r",\quad " if style == "tex" else ",  "
        return ("= " if style != "md" else "") + sep.join(o for o in out if o)

    def _parts(self):
        return [(t, rows) for t, rows in (("forward pass", self.forward),
                                           ("backward pass (ordered derivatives)", self.backward),
                                           ("gradients", self.gradients)) if rows]

    def markdown(self) -> str:
        """The derivation as Markdown: one table per part, formulas as inline math."""
        out = []
        has = any(r.value is not None or r.grad is not None for _, rs in self._parts() for r in rs)
        for title, rows in self._parts():
            out.append(f"**{title.capitalize()}**\n")
            out.append("| | = |" + (" value | ∂⁺L/∂· |" if has else ""))
            out.append("|---|---|" + ("---|---|" if has else ""))
            for r in rows:
                cells = [f"${self.lhs(r)}$", f"${self.rhs(r)}$"]
                if has:
                    fwd = r.kind == "forward" and r.value is not None
                    v = format_value(r.value, "text") if fwd else ""
                    g = format_value(r.grad, "text") if r.grad is not None else ""
                    cells += [v, g]
                out.append("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |")
            out.append("")
        if self.note:
            out.append(f"*{self.note}*")
        return "\n".join(out).rstrip() + "\n"

    def text(self) -> str:
        """The derivation as plain Unicode text, one row per line."""
        out = []
        for title, rows in self._parts():
            out.append(title.capitalize())
            body = [(f"{self.lhs(r, 'text')} = {self.rhs(r, 'text')}", r) for r in rows]
            width = max(len(b) for b, _ in body)
            for b, r in body:
                line = "  " + b
                if self.matrix and is_matrix(r.sym):
                    line = "  " + b.ljust(width) + "   ∈ ℝ^" + _shape_text(r.sym.shape, self.names)
                if r.value is not None or r.grad is not None:
                    line = line.ljust(width + 2) + "   " + self._numbers(r, "text")
                out.append(line.rstrip())
        if self.note:
            out.append(self.note)
        return "\n".join(out)

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        # short enough for a REPL line: what is derived, then the gradient rows
        wrt = ", ".join(self.names.text(r.sym) for r in self.gradients)
        head = f"<Derivation of {self._loss_text()} with respect to {wrt}"
        lines = [f"  {self.lhs(r, 'text')} = {self.rhs(r, 'text')}"
                 + (f" = {self._num(r.grad, 'text')}" if r.grad is not None else "")
                 for r in self.gradients]
        return "\n".join([head + ":"] + lines) + ">"

    def _loss_text(self) -> str:
        last = self.forward[-1] if self.forward else None
        return f"{self.lhs(last, 'text')} = {self.rhs(last, 'text')}" if last else "f"

    def _repr_pretty_(self, p, cycle) -> None:
        # IPython's terminal: the whole derivation, as print(d) shows it
        p.text(repr(self) if cycle else self.text())

    def _repr_html_(self) -> str:
        """A table per part, formulas in \\( \\) for MathJax or KaTeX (Jupyter renders them)."""
        import html

        has = any(r.value is not None or r.grad is not None for _, rs in self._parts()
                  for r in rs)
        out = ['<div class="symbp-derivation">']
        for title, rows in self._parts():
            out.append(f"<p><b>{html.escape(title.capitalize())}</b></p>")
            out.append('<table style="text-align:left">')
            if has:
                out.append("<tr><th></th><th></th><th>value</th><th>∂⁺L/∂·</th></tr>")
            for r in rows:
                cells = [rf"\({self.lhs(r)}\)", rf"\(= {self.rhs(r)}\)"]
                if has:
                    fwd = r.kind == "forward" and r.value is not None
                    cells += [format_value(r.value, "text") if fwd else "",
                              format_value(r.grad, "text") if r.grad is not None else ""]
                out.append("<tr>" + "".join(f'<td style="text-align:left">{html.escape(c)}'
                                            "</td>" for c in cells) + "</tr>")
            out.append("</table>")
        if self.note:
            out.append(f"<p><i>{html.escape(self.note)}</i></p>")
        out.append("</div>")
        return "\n".join(out)

    def _repr_latex_(self) -> str:
        return "$$\n" + self.latex() + "\n$$"

    def _repr_markdown_(self) -> str:
        return self.markdown()

    # --- rows as data ---------------------------------------------------------------------
    @property
    def rows(self) -> list[Row]:
        return self.forward + self.backward + self.gradients

    def gradient(self, w) -> object:
        """The numeric gradient of ``w`` (a symbol or its name), when derived with numbers."""
        for r in self.gradients:
            if r.sym == w or getattr(r.sym, "name", None) == w:
                return r.grad
        raise KeyError(w)

    def check(self, rtol: float = 1e-9, atol: float = 1e-12) -> float:
        """Evaluate every printed formula, forward and backward, with the derivation's
        numbers and compare it with the gradient Program's value; returns the largest error."""
        if self.at is None:
            raise SymbpError("check() needs numbers: derive(f, wrt, at={...})")
        worst = 0.0
        # a forward row is checked against its own value, a backward row against its adjoint
        for r in self.forward + self.backward + self.gradients:
            got = evaluate(r.expr, self.values, self.program.dims, self.at_dims)
            want = np.asarray(r.value if r.kind == "forward" else r.grad, dtype=float)
            got = np.broadcast_to(np.asarray(got, dtype=float), want.shape)
            # where the program gives ±∞ or NaN (at x = 0 of log x) the formula must not be
            # finite either; SymPy's 1/0 is ∞ without a sign (NaN here), so only that is asked
            fin = np.isfinite(want)
            off = fin != np.isfinite(got)
            err = float(np.max(np.abs(got[fin] - want[fin]), initial=0.0))
            scale = max(float(np.max(np.abs(want[fin]), initial=0.0)), 1.0)
            if off.any() or err > atol + rtol * scale:
                raise SymbpError(
                    f"derivation row {self.lhs(r, 'text')} = {self.rhs(r, 'text')} gives "
                    f"{got} but the gradient program gives {want}"
                )
            worst = max(worst, err / scale)
        return worst


def format_value(v, style="text", digits: int = 4, max_entries: int = 24) -> str:
    """A number to 4 significant digits; a small matrix in full, a large one by shape."""
    if v is None:
        return ""
    a = np.asarray(v, dtype=float)
    if a.ndim == 0:
        return _g(float(a), digits, style)
    if a.ndim > 2 and a.size <= 2 * max_entries:
        # images N×C×H×W: one H×W matrix per (n, c), in order (2 channels of 4×4 in full)
        blocks = [format_value(m, style, digits, max_entries)
                  for m in a.reshape(-1, *a.shape[-2:])]
        return "[" + ", ".join(blocks) + "]" if style != "tex" else \
            r"\left[%s\right]" % r",\ ".join(blocks)
    if a.size > max_entries:
        with np.errstate(all="ignore"):
            mean = _g(a.mean(), 4, style)
        return f"[{'×'.join(map(str, a.shape))} array, mean {mean}]" if style != "tex" else \
            r"\left[%s,\ \text{mean } %s\right]" % (r"\times ".join(map(str, a.shape)), mean)
    if style == "tex":
        rows = [" & ".join(_g(x, digits, style) for x in row) for row in a]
        return r"\begin{bmatrix}%s\end{bmatrix}" % r" \\ ".join(rows)
    return "[" + "; ".join(" ".join(_g(x, digits, style) for x in row) for row in a) + "]"


def _g(x: float, digits: int = 4, style: str = "text") -> str:
    # log(0) = −∞ and √(−1) = NaN are answers, printed as a mathematician writes them
    if np.isnan(x):
        return r"\text{NaN}" if style == "tex" else "NaN"
    if np.isinf(x):
        if style == "tex":
            return r"\infty" if x > 0 else r"-\infty"
        return "∞" if x > 0 else "−∞"
    s = f"{x:.{digits}g}"
    return "0" if s == "-0" else s


def _shape_tex(shape, names) -> str:
    return r"\times ".join(T.tex(sp.sympify(d), names) for d in shape)


def _shape_text(shape, names) -> str:
    return "×".join(T.text(sp.sympify(d), names) for d in shape)


# --- which values get a name ----------------------------------------------------------------


def _is_function_head(e) -> bool:
    """An activation-like head: a function application, softmax, a loss head."""
    h = rule(e)
    f = h.function if h is not None else False
    return bool(f(e) if callable(f) else f)


def _layers(fwd, named, fn):
    """Activation depth of each named function node: 1 + the depth of those it reads."""
    depth, layer = {}, {}
    for a in fwd:
        d = max((depth.get(n, 0) for n in _names_in(a.expr)), default=0)
        if a.name in fn:
            d += 1
            layer[a.name] = d
        depth[a.name] = d
    return layer


class _Builder:
    def __init__(self, p: Program, loss_label: str, symbolic_sigma: bool = False):
        self.p = p
        self.fwd = p.body[: p.meta["forward"]]
        self.loss = p.outputs[0]
        self.matrix = any(is_matrix(s) for s in p.inputs) or any(is_matrix(a.name)
                                                                for a in self.fwd)
        self.names = T.Names()
        self.taken = {s.name for s in p.inputs} | {d.name for d in p.dims}
        self.loss_label = loss_label
        self.symbolic_sigma = symbolic_sigma
        self.defs: dict = {}
        self.dims = set(p.dims)

    # names ---------------------------------------------------------------------------------
    def label(self, want: str) -> str:
        label = want
        while label in self.taken:
            label = label + "'" if "_" not in label else label.replace("_", "'_", 1)
        self.taken.add(label)
        return label

    def symbol(self, label: str, shape=None):
        internal = f"__{label}"
        s = array_symbol(internal, shape) if shape is not None else sp.Symbol(internal,
                                                                                  real=True)
        base = label.replace("'", "")
        primes = label.count("'")
        self.names.set(s, T.name_latex(base) + "'" * primes if "_" not in label else
                       _prime_tex(label), T.name_text(base) + "′" * primes)
        return s

    def adjoint_symbol(self, v, label_tex: str, label_text: str, delta: str | None):
        shape = tuple(v.shape) if is_matrix(v) else None
        if delta is not None:
            s = array_symbol(f"__D_{v.name}", shape)
            self.names.set(s, T.name_latex(delta), T.name_text(delta))
            return s
        s = array_symbol(f"__d_{v.name}", shape) if shape else sp.Symbol(
            f"__d_{v.name}", real=True)
        L = self.names.tex(self.loss_sym)
        self.names.set(s, r"\frac{\partial^{+} %s}{\partial %s}" % (L, label_tex),
                       f"∂⁺{self.names.text(self.loss_sym)}/∂{label_text}")
        return s

    # forward -------------------------------------------------------------------------------
    def build_forward(self):
        fwd, loss = self.fwd, self.loss
        uses: Counter = Counter()
        user: dict = {}
        for a in fwd:
            for n in _names_in(a.expr):
                uses[n] += 1
                user[n] = a
        fn = {a.name for a in fwd if _is_function_head(a.expr)}
        named = set()
        for a in fwd:
            u = user.get(a.name)
            if (a.name == loss or uses[a.name] != 1 or a.name in fn
                    or (u is not None and u.name in fn)):
                named.add(a.name)
        layer = _layers(fwd, named, fn - {loss} | ({loss} if loss in fn else set()))
        acts = [a.name for a in fwd if a.name in fn and a.name != loss]
        # a loss head with a named argument (softmax + cross-entropy) closes one more layer
        head = loss in fn and any(n in named and n not in fn for n in _names_in(self._expr(loss)))
        by_layer = Counter(layer[n] for n in acts)
        top = max(layer.values(), default=0)
        if head:
            by_layer[top] += 0 if loss not in layer else 1
        plain = len(acts) + head <= 1  # one activation: z and y, no subscripts
        wide = max(by_layer.values(), default=1) > 1  # several units a layer: z_{l,j}
        upper = self.matrix
        self.label_of: dict = {}
        soft = [n for n in acts if isinstance(self._expr(n), Softmax)]

        def sub(k, j):
            return "" if plain else (f"_{k}_{j}" if wide else f"_{k}")

        seen: Counter = Counter()
        for n in acts:
            e = self._expr(n)
            if isinstance(e, Softmax) and len(soft) == 1:
                self.label_of[n] = "Y"
                continue
            seen[layer[n]] += 1
            letter = "H" if upper else ("y" if plain else "h")
            self.label_of[n] = letter + sub(layer[n], seen[layer[n]])
        # pre-activations: the argument of an activation (or of the loss head) is z
        for a in fwd:
            if a.name not in fn:
                continue
            for n in _names_in(a.expr):
                if n in named and n not in fn and n not in self.label_of and n != loss \
                        and uses[n] == 1:
                    if a.name in self.label_of:
                        base = self.label_of[a.name]
                        s = base[1:] if base[0] in "yhH" else ""
                    else:  # the loss head's argument: one layer past the last activation
                        s = sub(layer.get(loss, top + 1), seen[layer.get(loss, top + 1)] + 1)
                    self.label_of[n] = ("Z" if upper else "z") + s
        others = [a.name for a in fwd if a.name in named and a.name not in self.label_of
                  and a.name != loss]
        for i, n in enumerate(others, 1):
            self.label_of[n] = ("U" if upper else "u") + (f"_{i}" if len(others) > 1 else "")
        self.label_of[loss] = self.loss_label

        self.disp: dict = {}  # program name -> display symbol or folded expression
        self.group: dict = {}  # display symbol -> its formula
        self.prog_of: dict = {}  # display symbol -> program name
        self.order: list = []  # named display symbols in evaluation order
        self.softmax_names: dict = {}
        rows = []
        for a in fwd:
            e = a.expr.xreplace(self.disp) if self.disp else a.expr
            if a.name not in named:
                self.disp[a.name] = e
                continue
            shape = tuple(a.name.shape) if is_matrix(a.name) else None
            s = self.symbol(self.label(self.label_of[a.name]), shape)
            if a.name == loss:
                self.loss_sym = s
            if isinstance(e, SoftmaxCrossEntropy):  # show Y = softmax(Z), then L = CE(Y, T)
                Z = e.args[0]
                Y = self.symbol(self.label("Y" if "Y" not in self.taken else "P"),
                                tuple(Z.shape))
                self.softmax_names[Z] = Y
                self.group[Y] = Softmax(Z)
                rows.append(Row("forward", Y, Softmax(Z), note="softmax"))
            self.disp[a.name] = s
            self.group[s] = e
            self.prog_of[s] = a.name
            self.order.append(s)
            rows.append(Row("forward", s, e, prog=a.name))
        self.forward_rows = rows
        adj = self.p.meta["adjoint"]
        self.dep = {self.disp[n] for n in adj if n in self.disp} | set(self.p.wrt)
        return rows

    def _expr(self, n):
        for a in self.fwd:
            if a.name == n:
                return a.expr
        raise KeyError(n)

    # backward ------------------------------------------------------------------------------
    def build_backward(self):
        self.adjoint: dict = {}
        L = self.loss_sym
        for s in self.order:
            if s == L:
                continue
            label = self.names.text(s)
            delta = None
            if self.matrix and label.startswith("Z"):
                delta = "Delta" + _subscript_of(s, self)
            self.adjoint[s] = self.adjoint_symbol(s, self.names.tex(s), label, delta)
        for w in self.p.wrt:
            shape = tuple(w.shape) if is_matrix(w) else None
            g = array_symbol(f"__grad_{w.name}", shape) if shape else sp.Symbol(
                f"__grad_{w.name}", real=True)
            Ltex, Ltext = self.names.tex(L), self.names.text(L)
            self.names.set(g, r"\frac{\partial %s}{\partial %s}" % (Ltex, self.names.tex(w)),
                           f"∂{Ltext}/∂{self.names.text(w)}")
            self.adjoint[w] = g
        contrib: dict = {}
        back = []
        for s in reversed(self.order):
            if s not in self.dep:
                continue
            if s != L:
                terms = contrib.get(s, [])
                back.append(Row("backward", s, _sum_terms(terms, s), terms, prog=self.prog_of[s]))
            up = sp.Integer(1) if s == L else self.adjoint[s]
            for leaf, t in self.local(s, up):
                contrib.setdefault(leaf, []).append(t)
        grads = []
        for w in self.p.wrt:
            terms = contrib.get(w, [])
            grads.append(Row("gradient", w, _sum_terms(terms, w), terms, prog=w))
        return back, grads

    def local(self, s, up):
        """(leaf, term) pairs: what the named value ``s`` sends to each value it reads."""
        e = self.group[s]
        if not self.matrix:  # (upstream, local) pairs: σ' in the node's own value, y(1 − y)
            return [(x, (up, d)) for x, d in vjp(e, s, sp.Integer(1), self.dep.__contains__)]
        acc: dict = {}
        _vjp(e, up, acc, self, own=s)
        return [(x, t) for x, ts in acc.items() for t in ts]


def _prime_tex(label: str) -> str:
    base, sub = label.split("_", 1)
    b = T.name_latex(base.replace("'", ""))
    return b + "'" * base.count("'") + "_{%s}" % sub.replace("_", ",")


def _subscript_of(s, b: _Builder) -> str:
    label = s.name[2:].replace("'", "")
    _, subs = T.split_name(label)
    return ("_" + "_".join(subs)) if subs else ""


def _sum_terms(terms, target):
    vals = []
    for t in terms:
        if isinstance(t, tuple):
            vals.append(t[0] * t[1])
        else:
            vals.append(t)
    if not vals:
        return sp.ZeroMatrix(*target.shape) if is_matrix(target) else sp.Integer(0)
    if len(vals) == 1:
        return vals[0]
    if is_matrix(target):
        v = placeholders(len(vals))
        return make_map(sp.Lambda(v, sp.Add(*v)), tuple(target.shape), vals)
    return sp.Add(*vals)


# --- the matrix chain rule, on display formulas -----------------------------------------------


def _depends(e, b: _Builder) -> bool:
    return any(x in b.dep for x in _names_in(e))


def _vjp(e, G, acc: dict, b: _Builder, own=None):
    """Send upstream ``G`` through display formula ``e`` down to its named leaves, by the
    rules of symbp/vjp.py; the display refinements are the ``local`` factor below."""
    if isinstance(e, (sp.Symbol, sp.MatrixSymbol)):
        if e in b.dep:
            acc.setdefault(e, []).append(broadcast(G, e.shape) if is_matrix(e) else G)
        return
    if not _depends(e, b):
        return
    local = None
    if isinstance(e, Elementwise):
        scale = sp.Integer(1)
        if not is_matrix(G) and not (set(_names_in(G)) - b.dims):
            scale, G = G, sp.Integer(1)  # a size such as 1/(NC) joins the formula

        def local(m, d):
            d = d * scale
            body = m.lam.expr
            if b.symbolic_sigma and own is not None and body.is_Function and d != 1 \
                    and len(m.operands) == 1:  # Ḡ ⊙ σ′(Z), σ′(Z) a named factor
                return OWN, (OWN,), (_activation_derivative(body, m, own, d, OWN, b),)
            return local_factor(m, d, own)
    # softmax(Z) reads better than exp(log_softmax(Z)): no own value for LogSoftmax
    y = None if isinstance(e, LogSoftmax) else own
    soft = {Softmax(Z): Y for Z, Y in b.softmax_names.items()}
    for x, c in vjp(e, y, G, lambda x: _depends(x, b), local):
        _vjp(x, c.xreplace(soft) if soft else c, acc, b)


def _activation_derivative(body, e, own, d, yv, b: _Builder):
    """A named local factor σ′(Z₁), defined as H₁ ⊙ (1 − H₁) (its own-value form)."""
    f = type(body)
    arg = e.operands[0]
    s = array_symbol(f"__dact_{own.name}", e.shape)
    fname = getattr(f, "latex_name", None) or "\\" + f.__name__
    if fname.startswith("\\") and not fname[1:].isalpha():
        fname = r"\operatorname{%s}" % f.__name__
    b.names.set(s, r"%s'\left(%s\right)" % (fname, T.tex(arg, b.names)),
                f"{T.TextPrinter._FUNC.get(f.__name__, f.__name__)}′({T.text(arg, b.names)})")
    b.defs[s] = make_map(sp.Lambda((*e.lam.variables, yv), d), e.shape, [arg, own])
    return s


# --- numbers ------------------------------------------------------------------------------------


def _bind(p: Program, at) -> dict:
    by_name = {}
    for k, v in at.items():
        by_name[k if isinstance(k, str) else getattr(k, "name", str(k))] = v
    missing = [s.name for s in p.inputs if s.name not in by_name]
    if missing:
        raise SymbpError(
            f"derive(..., at=...) needs a number for every input: missing {', '.join(missing)}"
        )
    extra = [k for k in by_name if k not in {s.name for s in p.inputs}]
    if extra:
        raise SymbpError(f"derive(..., at=...): {', '.join(extra)} is not an input of f")
    return by_name


def run_program(p: Program, at) -> dict:
    """Every value the gradient Program computes, by name, with the NumPy reference backend."""
    from ..api import bind_inputs
    from ..backends import backend

    by_name = _bind(p, at)
    names = [a.name for a in p.body]
    allp = Program(p.inputs, p.dims, p.body, tuple(names), p.wrt, dict(p.meta))
    fn = backend("numpy").build(allp, dtype=np.float64)
    args = bind_inputs(allp, by_name, np.float64)
    with np.errstate(all="ignore"):  # log(0) = −∞ is an answer: the table shows it
        out = fn.fn(*args)
    values = dict(zip(names, out))
    for s, x in zip(p.inputs, args):
        values[s] = x
    for d, n in zip(p.dims, args[len(p.inputs):]):
        values[d] = n
    return values


def _value_of(x, values):
    if isinstance(x, (sp.Symbol, sp.MatrixSymbol)):
        return values[x]
    return float(x)


def evaluate(e, values: dict, dims=(), dim_values=None):
    """The number of a display formula, given numbers for its symbols (small formulas)."""
    if not is_matrix(e) and not any(is_matrix(x) for x in _names_in(e)) and not _has_matrix(e):
        sub = {k: sp.Float(float(v)) for k, v in values.items()
               if isinstance(k, sp.Symbol) and np.ndim(v) == 0}
        return real_number(sp.N(e.xreplace(sub)))
    from ..api import compile_forward

    # sizes become numbers first: a map of sizes alone (every entry 1/(2N)) binds no array
    dims = {k: int(v) for k, v in values.items() if isinstance(k, sp.Symbol) and not
            isinstance(v, np.ndarray) and k.name in _size_names(e)}
    e = e.xreplace(dims) if dims else e
    names = _names_in(e)
    arrays = {x.name: values[x] for x in values if isinstance(x, (sp.Symbol, sp.MatrixSymbol))
              and x.name in {n.name for n in names}}
    fwd = compile_forward(e)
    with np.errstate(all="ignore"):  # ±∞ and NaN are shown in the table, not warned about
        return fwd(**{s.name: arrays[s.name] for s in fwd.program.inputs})


def real_number(v) -> float:
    """A SymPy number as a float: ±∞ stays; ∞ without a sign (``zoo``, as in 1/0), NaN and
    a non-real number (√−1) are NaN, as the NumPy reference gives them."""
    z = complex(v)
    return z.real if z.imag == 0 else float("nan")


def _size_names(e) -> set:
    out = set()
    for x in _names_in(e):
        for d in getattr(x, "shape", ()):
            out |= {s.name for s in sp.sympify(d).free_symbols}
    if isinstance(e, Elementwise) or is_matrix(e):
        for d in e.shape:
            out |= {s.name for s in sp.sympify(d).free_symbols}
    return out


def _has_matrix(e) -> bool:
    stack = [e]
    while stack:
        x = stack.pop()
        if is_matrix(x):
            return True
        if isinstance(x, sp.Basic):
            stack.extend(x.args)
    return False


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    ez = np.exp(z)
    return ez / ez.sum(axis=1, keepdims=True)


# --- the entry point ------------------------------------------------------------------------------


def derive(f, wrt, at=None, *, loss: str = "L", symbolic_activations: bool = False) -> Derivation:
    """The step-by-step derivation of ∂f/∂wrt: forward table, ordered derivatives, gradients.

    ``f`` is a scalar SymPy expression (scalars or matrix expressions), ``wrt`` a symbol or
    a sequence.  ``at`` maps every input (symbol or name) to a number or array; then each
    row carries its forward value and its gradient value, computed by the gradient Program.
    ``loss`` names the output in the printed formulas (``L``; ``p`` for ``p = x + y``).
    ``symbolic_activations`` writes an activation's local derivative as a named factor
    σ′(Z₁) (defined as H₁ ⊙ (1 − H₁)) instead of inlining it.

    >>> w, x, b, t = sympy.symbols("w x b t")
    >>> print(derive((sigmoid(w*x + b) - t)**2/2, [w, b]).text())    # doctest: +SKIP
    """
    items, _ = wrt_tuple(wrt)
    p = gradient_program(f, items)
    bld = _Builder(p, loss, symbolic_activations)
    forward = bld.build_forward()
    backward, gradients = bld.build_backward()
    d = Derivation(p, bld.names, forward, backward, gradients, bld.adjoint, at,
                   bld.matrix, bld.softmax_names, bld.defs)
    d.group, d.dep = bld.group, bld.dep
    if at is not None:
        _attach_numbers(d, bld, at)
    return d


def _attach_numbers(d: Derivation, bld: _Builder, at):
    p = d.program
    values = run_program(p, at)
    adj = p.meta["adjoint"]
    num: dict = {}
    for s in p.inputs:
        num[s] = values[s]
    for dim in p.dims:
        num[dim] = values[dim]
    for r in d.forward:
        if r.prog is None:  # Y = softmax(Z), shown for softmax + cross-entropy
            Z = r.expr.args[0]
            r.value = _softmax(np.asarray(num[Z], dtype=float))
        else:
            r.value = values[r.prog]
        num[r.sym] = r.value
        if r.prog is not None and r.prog in adj:
            r.grad = _value_of(adj[r.prog], values)
            if r.sym in d.adjoint:
                num[d.adjoint[r.sym]] = r.grad
    for s, D in d.defs.items():
        num[s] = evaluate(D, num)
    for r in d.backward:
        r.grad = _value_of(adj[r.prog], values)
    for r in d.gradients:
        a = adj.get(r.prog, 0)
        r.grad = _value_of(a, values) if not (is_constant(a) and is_matrix(r.prog)) else \
            np.zeros(tuple(int(values[x]) if not sp.sympify(x).is_number else int(x)
                           for x in r.prog.shape))
        num[d.adjoint[r.sym]] = r.grad
    d.values = num
    d.at_dims = None
    d.note = _undefined_note(d, at)
    if not d.matrix:  # scalar rows are cheap to check on the spot
        d.check()


def _undefined_note(d: Derivation, at) -> str:
    """One line naming the first row whose numbers are not finite: where f (or its
    derivative) is undefined or infinite, as log x at 0 or √x at −1."""
    def bad(v):
        a = np.asarray(v, dtype=float)
        return a[~np.isfinite(a)] if a.size else a

    point = ", ".join(f"{d.names.text(k) if isinstance(k, sp.Basic) else k} = "
                      f"{format_value(v, 'text')}" for k, v in at.items()
                      if np.ndim(v) == 0)
    where = f"at {point}" if point else "at these numbers"
    for r in d.rows:
        v = r.value if r.kind == "forward" else r.grad
        if v is None or not bad(v).size:
            continue
        x = bad(v)
        if np.isnan(x).all():
            what, how = "not a real number (NaN)", "undefined"
        elif np.isinf(x).all() and (x == x[0]).all():
            what, how = format_value(x[0], "text"), "infinite"
        else:
            what, how = "not finite (±∞ or NaN)", "undefined or infinite"
        row = f"{d.lhs(r, 'text')} = {d.rhs(r, 'text')}"
        part = "the function" if r.kind == "forward" else "its derivative"
        return f"note: {where}, {row} is {what}: {part} is {how} there"
    return ""
