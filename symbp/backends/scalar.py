"""The scalar printer the Numba backends share: one SymPy expression -> one line of njit or
CUDA device code in a single dtype.

``numba_cpu.NumbaPrinter`` and ``numba_cuda.CudaPrinter`` subclass ``ScalarPrinter`` and
keep only what differs between the two targets: how a typed constant reads, their table
of helper routines, and a few heads.  The NumPy reference backend does not use this
module: the tests compare the Numba backends against an independent printing (of the same
rows' rules, which tests/test_functions.py checks against their formulas).

The rules, one per head:

    numbers            typed in the target dtype, ``DT(0.5)`` / ``float32(0.5)``: a bare
                       ``0.5`` is a float64 and would promote float32 code
    x**n, |n| <= 8     a product (x*x*x): exact, and no pow call
    x**(±1/2)          math.sqrt
    Max, Min           nested ``_max``/``_min`` (NaN-propagating, as numpy.maximum)
    Heaviside, sign    conditional expressions with typed branches, NaN passed through
    Piecewise          nested conditional expressions; NaN where no condition holds
    symbp functions    ``_name(...)``, a routine printed from the row's ``rule`` (its
                       ``formula`` where it has none) by this same printer

NaN in, NaN out, wherever NumPy gives NaN: every comparison with a NaN is False, so each
``a if cond else b`` here sends a NaN down a branch that returns it.  Python's (and
Numba's) ``max(a, b)`` does not: it keeps ``a`` when ``b`` is NaN, which made
``max(-100, log(p))`` a finite loss for a NaN or out-of-range p.

``Routines`` is a backend's table of the routines its code calls: ``_max``/``_min``, the
backend's own (the CPU's fast tanh), and one per function row.  A row's routine is printed
from the row when first asked for, so a row defined after this module loaded compiles too;
a routine evaluates each argument once, and Numba inlines it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from ..functions import ROWS, Activation, code, parameters

# The routines Max and Min print as, written with the dtype's name as ``{DT}``.
FIXED = {
    # NaN if either is: `a > b` is False for a NaN on either side, `a != a` catches a NaN a
    "max": """
def _max(a, b):
    return a if a > b or a != a else b
""",
    "min": """
def _min(a, b):
    return a if a < b or a != a else b
""",
}


class Routines(Mapping):
    """Name -> source of every routine one backend's code may call.

    ``printer(names)`` makes that backend's scalar printer for a routine's body (``names``:
    symbol -> the text it prints as); ``decorator`` and ``dt`` spell its routines'
    decorator and dtype; ``own`` adds routines written for this backend alone, or
    replaces a row's printed one.
    """

    def __init__(self, printer: Callable, decorator: str, dt: str, own: dict | None = None):
        self.printer, self.decorator, self.dt = printer, decorator, dt
        self.own = {k: decorator + src.replace("{DT}", dt) for k, src in FIXED.items()}
        self.own.update(own or {})
        self._printed: dict = {}  # row class -> (source, names of the routines it calls)

    def replace(self, own: dict) -> Routines:
        """This table with ``own``'s routines in place of those of the same names."""
        return Routines(self.printer, self.decorator, self.dt, {**self.own, **own})

    def __getitem__(self, name: str) -> str:
        return self.own[name] if name in self.own else self._row(ROWS[name])[0]

    def __iter__(self):
        return iter(list(self.own) + [n for n in ROWS if n not in self.own])

    def __len__(self):
        return len(set(self.own) | set(ROWS))

    def needs(self, name: str) -> set[str]:
        """The routines ``name`` calls, directly or not: all must be in the module."""
        return set() if name in self.own else self._row(ROWS[name])[1]

    def _row(self, row) -> tuple[str, set[str]]:
        if row not in self._printed:
            self._printed[row] = self._print_row(row)
        return self._printed[row]

    def _print_row(self, row) -> tuple[str, set[str]]:
        # def _f(x, a): with the rule's repeated subexpressions computed once, one a line
        xs = [sp.Symbol(n, real=True) for n in parameters(row)]
        steps, (value,) = sp.cse(code(row)(*xs), sp.numbered_symbols("_t"))
        pr = self.printer({s: s.name for s in xs + [t for t, _ in steps]})
        lines = [f"def _{row.__name__}({', '.join(s.name for s in xs)}):"]
        lines += [f"    {t} = {pr.doprint(e)}" for t, e in steps]
        lines.append(f"    return {pr.doprint(value)}")
        needs = set(pr.used)
        for n in pr.used:
            needs |= self.needs(n)
        return self.decorator + "\n" + "\n".join(lines) + "\n", needs


class ScalarPrinter(PythonCodePrinter):
    """Scalar expressions in one dtype, for the Numba backends.

    ``dt`` is the name the code calls to make a constant of the target dtype (``DT``,
    ``float32``); ``used`` collects the names of the routines printed, with every routine
    they call (a set the caller may share between printers).  A subclass sets ``helpers``
    (its ``Routines``) and ``otherwise`` (the value of a Piecewise where no condition holds).
    """

    helpers: Routines
    otherwise = "math.nan"  # as NumPy's select(..., default=nan): no condition held

    def __init__(self, dt: str, used: set | None = None):
        super().__init__({"fully_qualified_modules": True, "allow_unknown_functions": False})
        self.dt = dt
        self.used: set[str] = set() if used is None else used

    # --- numbers: always in the target dtype ------------------------------------------------
    def _typed(self, text: str) -> str:
        """The constant spelled ``text`` (Python syntax) in the target dtype."""
        return f"{self.dt}({text})"

    def _print_Infinity(self, e):
        return self._num(math.inf)

    def _print_NegativeInfinity(self, e):
        return self._num(-math.inf)

    def _print_sign(self, e):
        # sign' appears when differentiating Abs; SymPy's own rule prints a float64 0.0.
        # Neither x > 0 nor x < 0: x is ±0 or NaN, and is its own sign
        x = self._print(e.args[0])
        one, zero = self._typed("1"), self._typed("0")
        return f"({one} if {x} > {zero} else (-{one} if {x} < {zero} else {x}))"

    def _num(self, value: float) -> str:
        if math.isfinite(value):
            return self._typed(repr(value))
        return self._typed(("-" if value < 0 else "") + f"math.{abs(value)!r}")  # math.inf

    def _print_Integer(self, e):
        return self._typed(str(int(e)))

    def _print_Rational(self, e):
        return self._num(float(e))

    def _print_Float(self, e):
        return self._num(float(e))

    def _print_NumberSymbol(self, e):
        return self._num(float(e.evalf(20)))

    # SymPy's code printers have their own (float64) rules for these constants
    _print_Pi = _print_Exp1 = _print_EulerGamma = _print_NumberSymbol

    # --- powers: products and square roots, no pow call where avoidable -------------------
    def _print_Pow(self, e, rational=False):
        b, p = e.args
        if b == sp.E:  # an unevaluated e**x
            return f"math.exp({self._print(p)})"
        if p.is_Integer and 0 < abs(int(p)) <= 8:  # x**3 -> x*x*x: exact and no pow call
            return self._int_pow(self.parenthesize(b, 100), int(p))
        if p == sp.S.Half:
            return f"math.sqrt({self._print(b)})"
        if p == -sp.S.Half:
            return self._recip(f"math.sqrt({self._print(b)})")
        return f"math.pow({self._print(b)}, {self._print(p)})"

    def _int_pow(self, base: str, n: int) -> str:
        """base**n for a small integer n, base printed (and parenthesized if compound)."""
        prod = "*".join([base] * abs(n))
        prod = prod if abs(n) == 1 else f"({prod})"  # it may stand in a denominator
        return prod if n > 0 else self._recip(prod)

    def _recip(self, den: str) -> str:
        """1/den with a typed 1."""
        return f"{self._typed('1')}/{den}"

    # --- piecewise heads: max/min and conditional expressions ------------------------------
    def _print_Max(self, e):
        return self._fold("max", e.args)

    def _print_Min(self, e):
        return self._fold("min", e.args)

    def _fold(self, name: str, args) -> str:
        """_max(_max(a, b), c): the NaN-propagating helper over any number of arguments."""
        self.used.add(name)
        out = self._print(args[0])
        for a in args[1:]:
            out = f"_{name}({out}, {self._print(a)})"
        return out

    def _print_Abs(self, e):
        return f"abs({self._print(e.args[0])})"

    def _zero_cmp(self) -> str:
        """The zero a step compares its argument with."""
        return self._typed("0")

    def _print_Heaviside(self, e):
        x = self._print(e.args[0])
        h0 = e.args[1] if len(e.args) > 1 else sp.S.Half
        one, zero, z = self._typed("1"), self._typed("0"), self._zero_cmp()
        # the last branch is reached by NaN only, and returns it (numpy.heaviside does)
        if h0 == 0:  # step(0) = 0: relu'(0) = 0, as in PyTorch
            return f"({one} if {x} > {z} else ({zero} if {x} <= {z} else {x}))"
        if h0 == 1:
            return f"({one} if {x} >= {z} else ({zero} if {x} < {z} else {x}))"
        return (f"({one} if {x} > {z} else ({self._print(h0)} if {x} == {z} else "
                f"({zero} if {x} < {z} else {x})))")

    def _print_Piecewise(self, e):
        # (v1 if c1 else (v2 if c2 else ...)); without a final True condition: `otherwise`
        *pairs, (last, cond) = e.args
        if cond == sp.true:
            out = self._print(last)
        else:
            out = self._typed(self.otherwise)
            pairs.append((last, cond))
        for value, c in reversed(pairs):
            out = f"({self._print(value)} if {self._print(c)} else {out})"
        return out

    # --- functions: symbp's through their routines, others through SymPy's rules ----------
    def _print_Function(self, e):
        # SymPy's dispatch skips base classes of a Function subclass, so symbp's functions
        # are recognised here rather than by a _print_Activation method.
        if not isinstance(e, Activation):
            return self._print_other(e)
        return self._helper(type(e).__name__, e.args)

    def _print_other(self, e):
        """A function that is not symbp's: SymPy's Python rule (math.erf, ...)."""
        return super()._print_Function(e)

    def _helper(self, name: str, args) -> str:
        self.used |= {name} | self.helpers.needs(name)
        return f"_{name}({', '.join(self._print(a) for a in args)})"


# --- an optimizer's rule, printed (symbp.optim.Rule) ---------------------------------------
# A rule is data: hyperparameter and buffer names, per-step scalars, and ordered assignments
# per parameter entry.  Its names get the prefix _opt_ in a kernel, so none can meet the
# kernel's own (_i, _m, _s, ...) or a program's.  Every backend prints it with these two.


def rule_names(rule) -> dict:
    names = {sp.Symbol(h): f"_opt_{h}" for h in rule.hyper}
    names.update({s: f"_opt_{s}" for s, _ in rule.per_step})
    entry = {rule.w} | {sp.Symbol(b) for b in rule.state}
    names.update({x: f"_opt_{x}" for x, _ in rule.update if x not in entry})  # temporaries
    return names


def entry_lines(rule, assigns, refs, gx, expr) -> list[str]:
    """One entry's update: ``refs`` names the entries of w and the buffers (``W[_i, _j]``),
    ``gx`` the gradient's; a buffer written and then read is read back from its array,
    as the rule says."""
    names = {**rule_names(rule), **refs}
    out = []
    if sum(rule.g in e.free_symbols for _, e in assigns) > 1:  # load g once
        out.append(f"_opt_g = {gx}")
        gx = "_opt_g"
    names[rule.g] = gx
    for x, e in assigns:
        # x ← x − d reads as x -= d (one term d: x − d rounds as written)
        d = e - x if x in refs else None
        if d is not None and not isinstance(d, sp.Add) and x not in d.free_symbols:
            op, d = ("-=", -d) if d.could_extract_minus_sign() else ("+=", d)
            out.append(f"{names[x]} {op} {expr(d, names)}")
        else:
            out.append(f"{names[x]} = {expr(e, names)}")
    return out
