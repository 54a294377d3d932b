"""Printing names and formulas for people: LaTeX and plain Unicode.

Two printers share one vocabulary.  Names are split into a base and subscripts
(``W1`` -> W₁, ``W1_00`` -> W_{1,00}, ``alpha`` -> α); an ``Elementwise`` map prints
as the formula of its entries with ⊙ between matrix factors (``Δ ⊙ H ⊙ (1 − H)``);
a bias row broadcast down the batch prints as ``𝟏b``; ``AxisSum(G, 0)`` as ``𝟏ᵀG``.
Display names (``∂⁺L/∂y``, ``Δ₁``) are symbols whose printed form is looked up in a
table, so the formulas stay real SymPy expressions that can be evaluated.
"""

from __future__ import annotations

import re

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from ..functions import RowTable
from ..matrix import AxisSum, Elementwise, is_matrix

_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
    "lambda", "mu", "nu", "xi", "pi", "rho", "sigma", "tau", "phi", "chi", "psi", "omega",
    "Gamma", "Delta", "Theta", "Lambda", "Xi", "Pi", "Sigma", "Phi", "Psi", "Omega",
}
_SUB = str.maketrans("0123456789+-=()aehijklmnoprstuvx",
                     "₀₁₂₃₄₅₆₇₈₉₊₋₌₍₎ₐₑₕᵢⱼₖₗₘₙₒₚᵣₛₜᵤᵥₓ")
_SUP = str.maketrans("0123456789+-=()n", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁼⁽⁾ⁿ")


def _greek_unicode(name: str) -> str:
    from sympy.printing.pretty.pretty_symbology import greek_unicode

    return greek_unicode.get(name, name)


def split_name(name: str) -> tuple[str, list[str]]:
    """``W1_00`` -> ('W', ['1', '00']); ``w_1_2`` -> ('w', ['1', '2']); ``x`` -> ('x', [])."""
    m = re.fullmatch(r"([A-Za-z]+?)(\d*)((?:_[A-Za-z0-9]+)*)", name)
    if not m:
        return name, []
    base, num, rest = m.groups()
    if base not in _GREEK and re.fullmatch(r"[A-Za-z]+", base) and len(base) > 1 and num == "" \
            and not rest:
        return name, []
    subs = ([num] if num else []) + [p for p in rest.split("_") if p]
    return base, subs


def name_latex(name: str) -> str:
    """LaTeX of a symbol name, subscripts separated by commas: ``W1_00`` -> ``W_{1,00}``."""
    base, subs = split_name(name)
    b = "\\" + base if base in _GREEK else (base if len(base) == 1 else r"\mathrm{%s}" % base)
    if not re.fullmatch(r"\\?[A-Za-z]+", b.replace(r"\mathrm{", "").rstrip("}")):
        b = r"\mathrm{%s}" % re.sub(r"([_#$%&{}])", r"\\\1", base)
    return b + ("_{%s}" % ",".join(subs) if subs else "")


def name_text(name: str) -> str:
    """Unicode of a symbol name: ``W1`` -> W₁, ``W1_00`` -> W₁,₀₀, ``alpha`` -> α."""
    base, subs = split_name(name)
    b = _greek_unicode(base) if base in _GREEK else base
    if not subs:
        return b
    sub = ",".join(subs)
    if all(c in "0123456789,ijklmn" for c in sub):
        return b + sub.translate(_SUB)
    return f"{b}_{sub}"


class Names:
    """The printed form of display symbols: ``{symbol: (latex, text)}``."""

    def __init__(self):
        self.table: dict = {}

    def set(self, sym, tex: str, text: str):
        self.table[sym] = (tex, text)

    def tex(self, sym) -> str:
        return self.table[sym][0] if sym in self.table else name_latex(sym.name)

    def text(self, sym) -> str:
        return self.table[sym][1] if sym in self.table else name_text(sym.name)


class _Entry(sp.Symbol):
    """An operand of a map body: prints as its operand, remembers order and matrix-ness."""

    def __new__(cls, k, tex, text, matrix):
        obj = super().__new__(cls, f"_op{k}_{abs(hash((tex, text)))}", real=True)
        obj.k, obj.tex, obj.text, obj.matrix = k, tex, text, matrix
        return obj


def _order(f) -> int:
    ks = [s.k for s in f.atoms(_Entry)]
    return min(ks) if ks else -1


def _summed_axes(e):
    """Nested sums over axes of one array, as (sorted axes, the summed array)."""
    axes = []
    while isinstance(e, AxisSum) and len(e.shape) != 2:
        axes.append(e.axis)
        e = e.args[0]
    return sorted(axes), e


def _is_mat_factor(f) -> bool:
    return any(s.matrix for s in f.atoms(_Entry))


class _Shared:
    """Printing rules common to the LaTeX and the Unicode printer."""

    names: Names

    def map_body(self, e: Elementwise):
        """The map's body with each operand replaced by an ``_Entry`` that prints as it."""
        flat = len(e.shape) != 2  # arrays of other ranks broadcast without 𝟏 factors
        R, C = e.shape[:2] if not flat else (None, None)
        subs = {}
        for k, (v, a) in enumerate(zip(e.lam.variables, e.operands)):
            s = self._print(a)
            if is_matrix(a) and not flat:
                r, c = a.shape
                if r == 1 and R != 1 and not (c == 1 and C == 1):  # a row broadcast down
                    s = self.ones() + (s if _is_atom_name(a) else self.paren(s))
                elif c == 1 and C != 1 and r != 1:  # a column broadcast across
                    s = (s if _is_atom_name(a) else self.paren(s)) + self.ones_t()
            if is_matrix(a):
                if self.needs_parens(a) or (isinstance(a, sp.MatMul) and e.lam.expr.is_Mul):
                    s = self.paren(s)
            elif isinstance(a, (sp.Add, sp.Mul)) and e.lam.expr != v:
                s = self.paren(s)
            subs[v] = _Entry(k, s, s, is_matrix(a))
        return e.lam.expr.xreplace(subs)

    def _operand(self, a) -> str:
        s = self._print(a)
        return self.paren(s) if self.needs_parens(a) else s

    def needs_parens(self, a) -> bool:
        return isinstance(a, (sp.MatAdd, Elementwise)) and not _is_plain_map(a)

    def hadamard(self, e, sep):
        """``c · A ⊙ B ⊙ (1 − B)`` for a product of ≥ 2 matrix factors, in operand order."""
        coef, rest = e.as_coeff_Mul()
        factors = sp.Mul.make_args(rest)
        mats = sorted([f for f in factors if _is_mat_factor(f)],
                      key=lambda f: (_order(f), not isinstance(f, _Entry)))
        scal = [f for f in factors if not _is_mat_factor(f)]
        if len(mats) < 2:
            return None
        parts = [self.parenthesize(f, 45) if isinstance(f, sp.Add) else self._print(f)
                 for f in mats]
        out = sep.join(parts)
        front = sp.Mul(coef, *scal)
        if front == 1:
            return out
        if front == -1:
            return "-" + out
        return self.scalar_front(front, out)


    def add_terms(self, e):
        """Terms in reading order: products before lone names, subtractions last, operands
        in their order (``w x + b``, ``Y − T``, ``1 − H``)."""
        def key(t):
            neg = t.could_extract_minus_sign()
            u = -t if neg else t
            prod = isinstance(u, sp.Mul) and sum(not f.is_number for f in u.args) >= 2
            return (neg, bool(t.is_number), not prod, _order(t), sp.default_sort_key(u))

        terms = sorted(sp.Add.make_args(e), key=key)
        out = []
        for i, t in enumerate(terms):
            neg = t.could_extract_minus_sign()
            body = self._print(-t if neg else t)
            if isinstance(-t if neg else t, sp.Add):
                body = self.paren(body)
            out.append(("-" if neg else "") + body if i == 0 else
                       (" - " if neg else " + ") + body)
        return "".join(out)

    def _print(self, e, **kw):
        # our rules win over an object's own ``_latex``/``_sympystr`` hook (Elementwise,
        # AxisSum, Indexed print differently here); everything else as SymPy prints it
        for cls in type(e).__mro__:
            name = "_print_" + cls.__name__
            for own in (type(self), _Shared):
                if name in own.__dict__:
                    return own.__dict__[name](self, e, **kw)
        return super()._print(e, **kw)

    def _print_Add(self, e, order=None):
        return self.add_terms(e)


def _is_atom_name(a) -> bool:
    return isinstance(a, (sp.Symbol, sp.MatrixSymbol))


def _is_plain_map(a) -> bool:
    # a map whose body is a single function application prints without brackets: σ(Z)
    return isinstance(a, Elementwise) and a.lam.expr.is_Function


class TexPrinter(_Shared, LatexPrinter):
    """LaTeX with display names, ⊙ for Hadamard products and ᵀ for transposes."""

    def __init__(self, names: Names | None = None):
        super().__init__({"mul_symbol": None, "order": "old"})
        self.names = names or Names()

    def ones(self):
        return r"\mathbf{1}"

    def ones_t(self):
        return r"\mathbf{1}^{\top}"

    def paren(self, s):
        return r"\left(%s\right)" % s

    def scalar_front(self, front, out):
        return r"%s\, %s" % (self.parenthesize(front, 45) if isinstance(front, sp.Add)
                             else self._print(front), out)

    def _print_Symbol(self, e, style="plain"):
        if isinstance(e, _Entry):
            return e.tex
        return self.names.tex(e)

    def _print_MatrixSymbol(self, e):
        return self.names.tex(e)

    def _print_Dummy(self, e):
        return self.names.tex(e) if e in self.names.table else super()._print_Dummy(e)

    def _print_Mul(self, e):
        return self.hadamard(e, r" \odot ") or super()._print_Mul(e)

    def _print_Pow(self, e):
        if _is_mat_factor(e.base) and e.exp.is_Integer and e.exp > 1:
            return r"%s^{\circ %s}" % (self.parenthesize(e.base, 1000), e.exp)
        return super()._print_Pow(e)

    def _print_Elementwise(self, e):
        return self._print(self.map_body(e))

    def _print_Transpose(self, e):
        a = self._print(e.arg)
        return r"%s^{\top}" % (a if _is_atom_name(e.arg) else self.paren(a))

    def _print_MatMul(self, e):
        return r" ".join(self.parenthesize(a, 1000) if isinstance(a, (sp.MatAdd, Elementwise))
                         and not _is_plain_map(a) else self._print(a) for a in e.args)

    def _print_AxisSum(self, e):
        if len(e.shape) != 2:  # Σ over the axes of an array: the bias of a convolution
            axes, X = _summed_axes(e)
            word = "axis" if len(axes) == 1 else "axes"
            return r"\sum_{\text{%s } %s} %s" % (word, ",".join(map(str, axes)), self._operand(X))
        M = self._print(e.args[0])
        M = self.paren(M) if self.needs_parens(e.args[0]) else M
        return r"\mathbf{1}^{\top} %s" % M if e.axis == 0 else r"%s\,\mathbf{1}" % M

    def _print_Total(self, e):
        M = self._print(e.args[0])
        M = self.paren(M) if self.needs_parens(e.args[0]) or isinstance(e.args[0], sp.MatMul) \
            else M
        return r"\textstyle\sum %s" % M

    def _print_Softmax(self, e):
        return r"\operatorname{softmax}\left(%s\right)" % self._print(e.args[0])

    def _print_LogSoftmax(self, e):
        return r"\log\operatorname{softmax}\left(%s\right)" % self._print(e.args[0])

    def _print_SoftmaxCrossEntropy(self, e):
        Y = getattr(self, "softmax_names", {}).get(e.args[0])
        Z, T = (self._print(a) for a in e.args)
        n = self._print(e.args[0].shape[0])
        if Y is not None:
            return r"-\frac{1}{%s}\textstyle\sum %s \odot \log %s" % (n, T, self._print(Y))
        return r"\operatorname{CE}\left(\operatorname{softmax}(%s), %s\right)" % (Z, T)

    def _print_Heaviside(self, e):
        return r"\left[%s > 0\right]" % self._print(e.args[0])

    def _print_Sum(self, e):
        # Σ over named indices, ranges left to the shapes: Σ_n X_{nk} Δ_{nl}
        idx = ",".join(self._print(lim[0]) for lim in e.limits)
        body = self._print(e.function)
        if isinstance(e.function, sp.Add):
            body = self.paren(body)
        return r"\sum_{%s} %s" % (idx, body)

    def _print_Indexed(self, e):
        base = self._print(e.base.label)
        # X_{nc,i+u-1,j+v-1}: commas once an index is more than a letter
        sep = "" if all(i.is_Symbol or i.is_Integer for i in e.indices) else ","
        idx = sep.join(self._print(i) for i in e.indices)
        return r"{%s}_{%s}" % (base, idx) if "_" in base else r"%s_{%s}" % (base, idx)

    def _print_MatrixElement(self, e):
        base = self._print(e.parent)
        idx = "".join(self._print(i) for i in e.indices)
        if "_{" in base and base.endswith("}"):
            return base[:-1] + "," + idx + "}"
        return "%s_{%s}" % (base, idx)


class TextPrinter(_Shared, StrPrinter):
    """Plain Unicode: σ(z), ∂⁺L/∂y · y·(1 − y), H₁ᵀΔ₂, Δ ⊙ H."""

    _FUNC = RowTable("text")  # each function row's own name; SymPy's print as called

    def __init__(self, names: Names | None = None):
        super().__init__({"order": "old"})
        self.names = names or Names()

    def doprint(self, e):
        return re.sub(r"(?<![0-9]e)-", "−", super().doprint(e))  # a real minus, not 1e-5

    def ones(self):
        return "𝟏"

    def ones_t(self):
        return "𝟏ᵀ"

    def paren(self, s):
        return f"({s})"

    def scalar_front(self, front, out):
        f = self.parenthesize(front, 45) if isinstance(front, sp.Add) else self._print(front)
        return f"{f}·{out}"

    def _print_Symbol(self, e):
        if isinstance(e, _Entry):
            return e.text
        return self.names.text(e)

    _print_MatrixSymbol = _print_Symbol
    _print_Dummy = _print_Symbol

    def _print_Mul(self, e):
        out = self.hadamard(e, " ⊙ ")
        if out is not None:
            return out
        return super()._print_Mul(e).replace("*", "·")

    def _print_Pow(self, e, rational=False):
        if e.exp.is_Integer and e.exp > 1:
            base = self.parenthesize(e.base, 1000) if not e.base.is_Atom else self._print(e.base)
            if _is_mat_factor(e.base):
                return f"{base}^∘{str(e.exp).translate(_SUP)}"
            return base + str(e.exp).translate(_SUP)
        return super()._print_Pow(e, rational).replace("**", "^")

    def _print_Function(self, e):
        name = self._FUNC.get(type(e).__name__, type(e).__name__)
        return f"{name}({', '.join(self._print(a) for a in e.args)})"

    def _print_Heaviside(self, e):
        return f"[{self._print(e.args[0])} > 0]"

    def _print_Iverson(self, e):
        return f"[{self._print(e.args[0])}]"

    def _print_Indexed(self, e):
        return f"{self._print(e.base.label)}[{','.join(self._print(i) for i in e.indices)}]"

    def _print_Sum(self, e):
        # one Σ per index, as written by hand: Σₙ Σᵢ Σⱼ (Σ_c: c has no subscript letter)
        sums = []
        for lim in e.limits:
            v = self._print(lim[0])
            sub = v.translate(_SUB)
            sums.append(f"Σ{sub}" if all(ch != x for ch, x in zip(sub, v)) else f"Σ_{v}")
        body = self._print(e.function)
        if isinstance(e.function, sp.Add):
            body = self.paren(body)
        return f"{' '.join(sums)} {body}"

    def _print_Relational(self, e):
        op = {"<=": "≤", ">=": "≥", "!=": "≠"}.get(e.rel_op, e.rel_op)
        return f"{self._print(e.lhs)} {op} {self._print(e.rhs)}"

    def _print_Elementwise(self, e):
        return self._print(self.map_body(e))

    def _print_Transpose(self, e):
        a = self._print(e.arg)
        return f"{a if _is_atom_name(e.arg) else self.paren(a)}ᵀ"

    def _print_MatMul(self, e):
        parts = [self.paren(self._print(a)) if isinstance(a, (sp.MatAdd, Elementwise))
                 and not _is_plain_map(a) else self._print(a) for a in e.args]
        return " ".join(parts)

    def _print_AxisSum(self, e):
        if len(e.shape) != 2:
            axes, X = _summed_axes(e)
            word = "axis" if len(axes) == 1 else "axes"
            return f"Σ[{word} {','.join(map(str, axes))}] {self._operand(X)}"
        M = self._print(e.args[0])
        M = self.paren(M) if self.needs_parens(e.args[0]) else M
        return f"𝟏ᵀ{M}" if e.axis == 0 else f"{M}𝟏"

    def _print_Total(self, e):
        M = self._print(e.args[0])
        return f"Σ{self.paren(M) if not e.args[0].is_Atom else M}"

    def _print_Softmax(self, e):
        return f"softmax({self._print(e.args[0])})"

    def _print_LogSoftmax(self, e):
        return f"log softmax({self._print(e.args[0])})"

    def _print_SoftmaxCrossEntropy(self, e):
        Y = getattr(self, "softmax_names", {}).get(e.args[0])
        Z, T = (self._print(a) for a in e.args)
        n = self._print(e.args[0].shape[0])
        if Y is not None:
            return f"−(1/{n}) Σ {T} ⊙ log {self._print(Y)}"
        return f"CE(softmax({Z}), {T})"

    def _print_MatrixElement(self, e):
        return f"{self._print(e.parent)}[{', '.join(map(str, e.indices))}]"

    def _print_Piecewise(self, e):
        parts = [f"{self._print(x)} if {self._print(c)}" for x, c in e.args[:-1]]
        return "{" + "; ".join(parts + [f"{self._print(e.args[-1][0])} otherwise"]) + "}"


def tex(e, names: Names | None = None, **attrs) -> str:
    """LaTeX of ``e`` with display ``names``."""
    p = TexPrinter(names)
    p.__dict__.update(attrs)
    return p.doprint(e)


def text(e, names: Names | None = None, **attrs) -> str:
    """Plain Unicode of ``e`` with display ``names``."""
    p = TextPrinter(names)
    p.__dict__.update(attrs)
    return p.doprint(e)


__all__ = ["Names", "TexPrinter", "TextPrinter", "name_latex", "name_text", "split_name",
           "tex", "text"]
