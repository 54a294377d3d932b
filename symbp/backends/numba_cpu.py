"""The Numba CPU backends: ``cpu`` (serial njit) and ``parallel`` (njit with prange).

A Program becomes one Python module of readable source (``fn.source``), imported from a
content-hashed file so Numba caches the machine code on disk (``symbp.cache``).  The
lowering, one rule per head:

    MatMul         np.dot(A, B, out): BLAS, operands such as X.T transposed for free
    Elementwise    one loop nest; maps read only by sums (Total, AxisSum) are never
                   stored, their sums accumulate (in float64) in the same loop
    AxisSum/Total  float64 accumulator loops
    Softmax, LogSoftmax, SoftmaxCrossEntropy   row loops with max-shift and log-sum-exp;
                   softmax-CE and the backward softmax of the same logits share one loop
    scalar heads   one line each

Forward, backward (and, in ``build_step``, the optimizer update) run in one compiled call
on buffers that are kept between calls of the same batch size.  Every constant is
printed in the target dtype (``DT(0.5)``): a bare ``0.5`` would silently turn float32
code into float64 code.  The kernel is compiled eagerly for one signature per dtype, so
a call with other types can never trigger a recompilation (it is converted or refused
first).
"""

from __future__ import annotations

import numba  # noqa: F401  (fail at import when Numba is missing: the target is unavailable)
import numpy as np
import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from .. import cache, optim
from ..api import bind_inputs
from ..errors import InputError, SymbpError
from ..functions import Activation
from ..ir import Program, _names_in, is_constant
from ..matrix import (
    AxisSum,
    Elementwise,
    LogSoftmax,
    Softmax,
    SoftmaxCrossEntropy,
    Total,
    is_matrix,
)
from ..passes import optimize
from . import Kernel, identifiers

# --- the table: one stable njit scalar routine per `helper` name ---------------------------
# Each is written in forms that are fast in njit: libm's tanh costs ~3 exp calls here.
HELPERS = {
    "sigmoid": '''
def _sigmoid(x):
    # 1/(1 + e^-x) for x >= 0, e^x/(1 + e^x) below: exp never overflows
    if x >= 0:
        return DT(1) / (DT(1) + math.exp(-x))
    e = math.exp(x)
    return e / (DT(1) + e)
''',
    "tanh": '''
def _tanh(x):
    # tanh|x| = (1 - e)/(1 + e), e = exp(-2|x|): one exp; expm1 near 0 keeps relative precision
    a = abs(x)
    if a < DT(0.5):
        t = math.expm1(DT(-2) * a)
        r = -t / (t + DT(2))
    else:
        e = math.exp(DT(-2) * a)
        r = (DT(1) - e) / (DT(1) + e)
    return r if x >= 0 else -r
''',
    "relu": '''
def _relu(x):
    return x if x > 0 else DT(0) * x
''',
    "leaky_relu": '''
def _leaky_relu(x, a):
    return x if x > 0 else a * x
''',
    "softplus": '''
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|): finite for every x
    return (x if x > 0 else DT(0)) + math.log1p(math.exp(-abs(x)))
''',
    "elu": '''
def _elu(x, a):
    return x if x > 0 else a * math.expm1(x)
''',
}

_MATH = {"exp": "math.exp", "log": "math.log", "sqrt": "math.sqrt", "erf": "math.erf",
         "sin": "math.sin", "cos": "math.cos", "erfc": "math.erfc", "log1p": "math.log1p",
         "expm1": "math.expm1", "atan": "math.atan", "asinh": "math.asinh"}


class NumbaPrinter(PythonCodePrinter):
    """Scalar expressions for njit code: typed constants, helpers, no float64 leaks.

    ``names`` maps SymPy symbols to the text they print as (a local, ``X[_i, _j]``,
    ``DT(N)`` for a size); ``used`` collects the helper names printed.
    """

    def __init__(self, names: dict):
        super().__init__({"fully_qualified_modules": True, "allow_unknown_functions": False})
        self.names = names
        self.used: set[str] = set()

    def _print_Symbol(self, e):
        if e in self.names:
            return self.names[e]
        raise SymbpError(f"the Numba printer met an unbound symbol {e}")

    # numbers: always in the target dtype
    def _const(self, e):
        return f"DT({float(e)!r})"

    def _print_Integer(self, e):
        return f"DT({int(e)})"

    def _print_Rational(self, e):
        return self._const(e)

    def _print_Float(self, e):
        return self._const(e)

    def _print_NumberSymbol(self, e):
        return self._const(e.evalf(17))

    _print_Exp1 = _print_Pi = _print_NumberSymbol

    def _print_Pow(self, e, rational=False):
        b, p = e.args
        if b.is_number:  # sqrt(2), 2**(1/2): a constant
            return self._const(e.evalf(17))
        base = self.parenthesize(b, 100)
        if p.is_Integer and 0 < abs(int(p)) <= 8:  # x**3 -> x*x*x: exact and no pow call
            prod = "*".join([base] * abs(int(p)))
            return f"({prod})" if p > 0 else f"(DT(1)/({prod}))"
        if p == sp.Rational(1, 2):
            return f"math.sqrt({self._print(b)})"
        if p == -sp.Rational(1, 2):
            return f"(DT(1)/math.sqrt({self._print(b)}))"
        return f"math.pow({self._print(b)}, {self._print(p)})"

    def _print_Max(self, e):
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"max({out}, {self._print(a)})"
        return out

    def _print_Min(self, e):
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"min({out}, {self._print(a)})"
        return out

    def _print_Abs(self, e):
        return f"abs({self._print(e.args[0])})"

    def _print_Heaviside(self, e):
        x = self._print(e.args[0])
        h0 = e.args[1] if len(e.args) > 1 else sp.Rational(1, 2)
        if h0 == 0:  # step(0) = 0, as relu'(0) = 0
            return f"(DT(1) if {x} > 0 else DT(0))"
        return f"(DT(1) if {x} > 0 else ({self._print(h0)} if {x} == 0 else DT(0)))"

    def _print_Piecewise(self, e):
        out = None
        for val, cond in reversed(e.args):
            v = self._print(val)
            if out is None and cond == sp.true:
                out = v
            else:
                out = f"({v} if {self._print(cond)} else {out if out is not None else 'DT(0)'})"
        return out

    def _print_Relational(self, e):
        return f"{self._print(e.lhs)} {e.rel_op} {self._print(e.rhs)}"

    def _print_BooleanTrue(self, e):
        return "True"

    def _print_BooleanFalse(self, e):
        return "False"

    def _print_Function(self, e):
        # SymPy's dispatch skips base classes of a Function subclass: route ours here
        if isinstance(e, Activation):
            return self._print_Activation(e)
        name = type(e).__name__
        if name in _MATH:
            return f"{_MATH[name]}({', '.join(self._print(a) for a in e.args)})"
        raise SymbpError(
            f"the Numba backends cannot print {e}: give {name} a `helper` or a `formula`"
        )

    def _print_tanh(self, e):
        return self._helper("tanh", e.args)

    def _print_Activation(self, e: Activation):
        if e.helper in HELPERS:
            return self._helper(e.helper, e.args)
        return self._print(e.expand_formula())

    def _helper(self, name, args):
        self.used.add(name)
        return f"_{name}({', '.join(self._print(a) for a in args)})"


# names the kernel's module uses: a user symbol called `np` or `max` must not shadow them
_RESERVED = {"math", "np", "njit", "prange", "DT", "ACC", "range", "max", "min", "abs",
             "float", "int", "True", "False", "None"}


def _safe(ids: dict) -> dict:
    taken = set(ids.values()) | _RESERVED
    out = {}
    for n, s in ids.items():
        if s in _RESERVED:
            k = 1
            while f"{s}_{k}" in taken:
                k += 1
            s = f"{s}_{k}"
            taken.add(s)
        out[n] = s
    return out


def _idx(d) -> str:
    """A size as integer Python: 128, N, 2*N."""
    return str(sp.sympify(d))


def _cost(expr) -> int:
    """Rough per-entry cost of a map body: a transcendental ~10, arithmetic ~1."""
    n = 0
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.Function, Activation)):
            n += 10
        elif isinstance(node, (sp.Add, sp.Mul, sp.Pow)):
            n += 1
    return n


# prange pays for itself above about this much work per loop (2 cores, OpenMP barriers)
PAR_MIN_WORK = 20_000


class _Gen:
    """Prints one kernel for a Program: a def with one block per assignment."""

    def __init__(self, p: Program, dtype, target: str, update=None):
        self.p = p
        self.dt = np.dtype(dtype)
        self.parallel = target == "parallel"
        self.update = update  # an optimizer: print a training step
        names = list(p.inputs) + list(p.dims) + [a.name for a in p.body]
        self.ids = _safe(identifiers(names))
        self.users: dict = {}
        for a in p.body:
            for n in _names_in(a.expr):
                self.users.setdefault(n, []).append(a)
        self.outputs = set(o for o in p.outputs if not is_constant(o))
        self.lines: list[str] = []
        self.used: set[str] = set()
        self.done: set = set()
        self.buffers: list = []  # matrix names the kernel writes: passed in preallocated
        self.scalar_params = [w for w in p.wrt if not is_matrix(w)] if update else []

    # --- printing helpers -----------------------------------------------------------------
    def printer(self, extra=None) -> NumbaPrinter:
        names = {n: self.ids[n] for n in self.ids if not is_matrix(n)}
        names.update({d: f"DT({self.ids[d]})" for d in self.p.dims})  # sizes are int64
        names.update(extra or {})
        pr = NumbaPrinter(names)
        return pr

    def expr(self, e, extra=None) -> str:
        pr = self.printer(extra)
        out = pr.doprint(e)
        self.used |= pr.used
        return out

    def emit(self, line, depth=1):
        self.lines.append("    " * depth + line)

    def head(self, a):
        text = f"{a.name} = {a.expr}"
        if len(text) > 90:
            text = text[:87] + "..."
        self.emit(f"# {text}   [{type(a.expr).__name__}]")

    def buffer(self, name):
        if name not in self.buffers:
            self.buffers.append(name)
        return self.ids[name]

    def loop(self, var, n, work, depth, serial=False):
        """A loop header: prange over rows in 'parallel' where the work pays."""
        par = self.parallel and not serial and work >= PAR_MIN_WORK
        return f"for {var} in {'prange' if par else 'range'}({_idx(n)}):"

    def est(self, n) -> int:
        # a symbolic batch size counts as 128 rows for the prange decision
        n = sp.sympify(n)
        return int(n) if n.is_Integer else 128

    # --- the walk ---------------------------------------------------------------------
    def run(self):
        for a in self.p.body:
            if a.name in self.done:
                continue
            e = a.expr
            if isinstance(e, sp.MatMul):
                self.matmul(a)
            elif isinstance(e, Elementwise):
                self.map(a)
            elif isinstance(e, (AxisSum, Total)):
                self.reduction(a)
            elif isinstance(e, sp.Transpose):
                self.transpose(a)
            elif isinstance(e, (Softmax, LogSoftmax, SoftmaxCrossEntropy)):
                self.rows(a)
            elif is_matrix(a.name):
                raise SymbpError(f"the Numba backends cannot lower {a.name} = {e}")
            else:
                self.head(a)
                self.emit(f"{self.ids[a.name]} = {self.expr(e)}")
            self.done.add(a.name)

    def operand(self, x) -> str:
        if isinstance(x, sp.Transpose):
            return f"{self.ids[x.arg]}.T"
        return self.ids[x]

    def matmul(self, a):
        self.head(a)
        A, B = a.expr.args
        self.emit(f"np.dot({self.operand(A)}, {self.operand(B)}, {self.buffer(a.name)})")

    def transpose(self, a):
        self.head(a)
        r, c = a.name.shape
        y, x = self.buffer(a.name), self.ids[a.expr.arg]
        self.emit(self.loop("_i", r, 0, 1))
        self.emit(f"for _j in range({_idx(c)}):", 2)
        self.emit(f"{y}[_i, _j] = {x}[_j, _i]", 3)

    def load(self, x, shape) -> str:
        """How entry (i, j) of a map's operand reads: broadcasting rows, columns, scalars."""
        if not is_matrix(x):
            return f"DT({self.ids[x]})" if x in self.p.dims else self.ids[x]
        r, c = x.shape
        i = "_i" if not (r == 1 and shape[0] != 1) else "0"
        j = "_j" if not (c == 1 and shape[1] != 1) else "0"
        return f"{self.ids[x]}[{i}, {j}]"

    def map(self, a):
        """One loop nest for a map, with the sums that read it fused in."""
        e = a.expr
        R, C = e.shape
        users = self.users.get(a.name, [])
        sums = [u for u in users if isinstance(u.expr, (AxisSum, Total))]
        store = a.name in self.outputs or any(u not in sums for u in users)
        self.head(a)
        for s in sums:
            self.head(s)
        loads = {v: sp.Symbol(f"_ld{k}") for k, v in enumerate(e.lam.variables)}
        extra = {loads[v]: self.load(x, e.shape) for v, x in zip(e.lam.variables, e.operands)}
        body = e.lam.expr.xreplace(loads)
        temps, (value,) = sp.cse([body], symbols=sp.numbered_symbols("_x"), optimizations=None)
        extra.update({t: str(t) for t, _ in temps})
        axis0 = [s for s in sums if isinstance(s.expr, AxisSum) and s.expr.axis == 0]
        axis1 = [s for s in sums if isinstance(s.expr, AxisSum) and s.expr.axis == 1]
        totals = [s for s in sums if isinstance(s.expr, Total)]
        acc = {s.name: f"_acc_{self.ids[s.name]}" for s in sums}
        for s in axis0:
            self.emit(f"{acc[s.name]} = np.zeros({_idx(C)}, ACC)")
        for s in totals:
            self.emit(f"{acc[s.name]} = ACC(0.0)")
        work = self.est(R) * self.est(C) * max(_cost(body), 1)
        # prange over rows would race on the column sums: keep those loops serial
        self.emit(self.loop("_i", R, work, 1, serial=bool(axis0)))
        for s in axis1:
            self.emit(f"{acc[s.name]} = ACC(0.0)", 2)
        self.emit(f"for _j in range({_idx(C)}):", 2)
        for t, v in temps:
            self.emit(f"{t} = {self.expr(v, extra)}", 3)
        val = self.expr(value, extra)
        y = self.buffer(a.name) if store else None
        if sums:
            self.emit(f"_v = {val}", 3)
            val = "_v"
        if store:
            self.emit(f"{y}[_i, _j] = {val}", 3)
        for s in sums:
            k = "[_j]" if s in axis0 else ""
            self.emit(f"{acc[s.name]}{k} += {val}", 3)
        for s in axis1:
            self.emit(f"{self.buffer(s.name)}[_i, 0] = DT({acc[s.name]})", 2)
        for s in axis0:
            self.emit(f"for _j in range({_idx(C)}):")
            self.emit(f"{self.buffer(s.name)}[0, _j] = DT({acc[s.name]}[_j])", 2)
        for s in totals:
            self.emit(f"{self.ids[s.name]} = DT({acc[s.name]})")
        self.done.update(s.name for s in sums)

    def reduction(self, a):
        """A sum of a value that is not a map (a product, an input): float64 loops."""
        self.head(a)
        M = a.expr.args[0]
        R, C = M.shape
        x, acc = self.ids[M], f"_acc_{self.ids[a.name]}"
        if isinstance(a.expr, Total):
            self.emit(f"{acc} = ACC(0.0)")
            self.emit(f"for _i in range({_idx(R)}):")
            self.emit(f"for _j in range({_idx(C)}):", 2)
            self.emit(f"{acc} += {x}[_i, _j]", 3)
            self.emit(f"{self.ids[a.name]} = DT({acc})")
        elif a.expr.axis == 0:
            y = self.buffer(a.name)
            self.emit(f"{acc} = np.zeros({_idx(C)}, ACC)")
            self.emit(f"for _i in range({_idx(R)}):")
            self.emit(f"for _j in range({_idx(C)}):", 2)
            self.emit(f"{acc}[_j] += {x}[_i, _j]", 3)
            self.emit(f"for _j in range({_idx(C)}):")
            self.emit(f"{y}[0, _j] = DT({acc}[_j])", 2)
        else:
            y = self.buffer(a.name)
            self.emit(self.loop("_i", R, self.est(R) * self.est(C), 1))
            self.emit(f"{acc} = ACC(0.0)", 2)
            self.emit(f"for _j in range({_idx(C)}):", 2)
            self.emit(f"{acc} += {x}[_i, _j]", 3)
            self.emit(f"{y}[_i, 0] = DT({acc})", 2)

    def rows(self, a):
        """Softmax, log-softmax and softmax-CE: per row, shift by the max, sum exps in float64.

        A softmax of the logits of a softmax-CE (the backward pass asks for it) is computed
        in the CE's loop: one exp per entry for both."""
        e = a.expr
        Z = e.args[0]
        R, C = Z.shape
        z = self.ids[Z]
        sm = None
        if isinstance(e, SoftmaxCrossEntropy):
            sm = next((u for u in self.users.get(Z, []) if isinstance(u.expr, Softmax)
                       and u.name not in self.done), None)
        self.head(a)
        if sm is not None:
            self.head(sm)
        work = self.est(R) * self.est(C) * 12
        if isinstance(e, SoftmaxCrossEntropy):
            self.emit("_acc_loss = ACC(0.0)")
        self.emit(self.loop("_i", R, work, 1))
        self.emit(f"_m = {z}[_i, 0]", 2)
        self.emit(f"for _j in range(1, {_idx(C)}):", 2)
        self.emit(f"_m = max(_m, {z}[_i, _j])", 3)
        self.emit("_acc_s = ACC(0.0)", 2)
        y = None
        if isinstance(e, Softmax):
            y = self.buffer(a.name)
        elif sm is not None:
            y = self.buffer(sm.name)
        if isinstance(e, SoftmaxCrossEntropy):
            t = self.ids[e.args[1]]
            self.emit("_acc_tz = ACC(0.0)", 2)
        self.emit(f"for _j in range({_idx(C)}):", 2)
        self.emit(f"_ez = math.exp({z}[_i, _j] - _m)", 3)
        if y is not None:
            self.emit(f"{y}[_i, _j] = _ez", 3)
        self.emit("_acc_s += _ez", 3)
        if isinstance(e, SoftmaxCrossEntropy):
            self.emit(f"_acc_tz += {t}[_i, _j] * {z}[_i, _j]", 3)
            self.emit("_acc_loss += _m + math.log(_acc_s) - _acc_tz", 2)
        if y is not None:
            self.emit("_s = DT(_acc_s)", 2)
            self.emit(f"for _j in range({_idx(C)}):", 2)
            self.emit(f"{y}[_i, _j] = {y}[_i, _j] / _s", 3)
        if isinstance(e, LogSoftmax):
            y = self.buffer(a.name)
            self.emit("_lse = _m + DT(math.log(_acc_s))", 2)
            self.emit(f"for _j in range({_idx(C)}):", 2)
            self.emit(f"{y}[_i, _j] = {z}[_i, _j] - _lse", 3)
        if isinstance(e, SoftmaxCrossEntropy):
            self.emit(f"{self.ids[a.name]} = DT(_acc_loss / {_idx(R)})")
        if sm is not None:
            self.done.add(sm.name)

    # --- the optimizer update, fused after the gradient ------------------------------------
    def step(self, opt):
        self.emit("# the optimizer update: every read of the parameters is above this line")
        for w, g in zip(self.p.wrt, self.p.outputs[1:]):
            wi = self.ids[w]
            if is_matrix(w):
                r, c = w.shape
                gi = self.operand(g) if g in self.ids else None
                gx = f"{gi}[_i, _j]" if gi else "DT(0)"
                self.emit(self.loop("_i", r, self.est(r) * self.est(c) * 4, 1))
                self.emit(f"for _j in range({_idx(c)}):", 2)
                ref, d = f"{wi}[_i, _j]", 3
                m, v = f"_m_{wi}[_i, _j]", f"_v_{wi}[_i, _j]"
            else:
                gx = self.ids[g] if g in self.ids else self.expr(g)
                ref, d = f"_ref_{wi}[0]", 1
                m, v = f"_m_{wi}[0]", f"_v_{wi}[0]"
            if isinstance(opt, optim.SGD):
                self.emit(f"{ref} -= _lr * {gx}", d)
            elif isinstance(opt, optim.Momentum):  # m <- beta m + g; w <- w - lr m
                self.emit(f"{m} = {m} * _beta + {gx}", d)
                self.emit(f"{ref} -= _lr * {m}", d)
            elif isinstance(opt, optim.Adam):  # bias corrections bc1, bc2 come per step
                self.emit(f"_g = {gx}", d)
                self.emit(f"{m} = {m} * _beta1 + _omb1 * _g", d)
                self.emit(f"{v} = {v} * _beta2 + _omb2 * _g * _g", d)
                self.emit(f"{ref} -= _lr * ({m} / _bc1) / (math.sqrt({v} / _bc2) + _eps)", d)
            else:
                raise SymbpError(f"unknown optimizer {opt!r}: use SGD, Momentum or Adam")


def hyper_names(opt) -> tuple[str, ...]:
    if isinstance(opt, optim.SGD):
        return ("_lr",)
    if isinstance(opt, optim.Momentum):
        return ("_lr", "_beta")
    if isinstance(opt, optim.Adam):
        return ("_lr", "_beta1", "_omb1", "_beta2", "_omb2", "_eps", "_bc1", "_bc2")
    raise SymbpError(f"unknown optimizer {opt!r}: use SGD, Momentum or Adam")


def hyper_values(opt, t: int) -> tuple[float, ...]:
    """The update's constants for step ``t`` (1-based), computed in float64 like optim."""
    if isinstance(opt, optim.SGD):
        return (opt.lr,)
    if isinstance(opt, optim.Momentum):
        return (opt.lr, opt.beta)
    return (opt.lr, opt.beta1, 1 - opt.beta1, opt.beta2, 1 - opt.beta2, opt.eps,
            1 - opt.beta1**t, 1 - opt.beta2**t)


_HEADER = '''\
# symbp generated kernel: target {target}, {dtype}.  Regenerated from the Program; do not edit.
import math

import numpy as np
from numba import njit, prange  # noqa: F401

DT = np.{dtype}  # every constant is typed: a bare 0.5 would turn {dtype} code into float64
ACC = np.float64  # sums accumulate in float64
'''


def _array_type(dt, ndim):
    return f"{dt}[{', '.join([':'] * (ndim - 1) + ['::1'])}]"


def generate(p: Program, dtype, target: str, opt=None, boundscheck=False, cache_=True):
    """The module source and the kernel's calling convention for Program ``p``."""
    dt = np.dtype(dtype).name
    g = _Gen(p, dtype, target, update=opt)
    g.run()
    if opt is not None:
        g.step(opt)
    ids = g.ids
    scalar_out = [o for o in p.outputs if o in ids and not is_matrix(o)
                  and o not in p.inputs]
    g.emit(f"return ({''.join(ids[o] + ', ' for o in scalar_out)})")
    # parameters: inputs, sizes, buffers, then (a step) optimizer state and constants
    params, types = [], []
    for x in p.inputs:
        if x in g.scalar_params:
            params.append(f"_ref_{ids[x]}")
            types.append(_array_type(dt, 1))
        else:
            params.append(ids[x])
            types.append(_array_type(dt, 2) if is_matrix(x) else dt)
    params += [ids[d] for d in p.dims]
    types += ["int64"] * len(p.dims)
    params += [ids[b] for b in g.buffers]
    types += [_array_type(dt, 2)] * len(g.buffers)
    state = []
    if opt is not None:
        for buf in opt.buffers:
            for w in p.wrt:
                state.append((buf, w))
                params.append(f"_{buf}_{ids[w]}")
                types.append(_array_type(dt, 2 if is_matrix(w) else 1))
        params += list(hyper_names(opt))
        types += [dt] * len(hyper_names(opt))
    name = "train_step" if opt is not None else ("loss_and_grad" if p.wrt else "forward")
    flags = ['error_model="numpy"', f"cache={bool(cache_)}"]
    if target == "parallel":
        flags.append("parallel=True")
    if boundscheck:
        flags.append("boundscheck=True")
    sig = f'"({", ".join(types)},)"'
    lines = [_HEADER.format(target=target, dtype=dt)]
    for h in sorted(g.used):
        lines.append(f"\n@njit({', '.join(flags[:2] + flags[3:])})" + HELPERS[h])
    lines.append(f"\n@njit({sig}, {', '.join(flags)})")
    lines.append(f"def {name}({', '.join(params)}):")
    for w in g.scalar_params:  # a scalar parameter arrives as a 1-element view
        lines.append(f"    {ids[w]} = _ref_{ids[w]}[0]")
    lines += g.lines
    source = "\n".join(lines) + "\n"
    layout = {"name": name, "buffers": list(g.buffers), "scalar_out": scalar_out,
              "state": state}
    return source, layout


# --- the callables ------------------------------------------------------------------------


def _shape_fn(shape, dims):
    """A function of the dims' values giving a buffer's shape (sizes may be 2*N)."""
    parts = []
    for d in shape:
        d = sp.sympify(d)
        parts.append(int(d) if d.is_Integer else d)

    def f(vals):
        env = dict(zip(dims, vals))
        return tuple(x if isinstance(x, int) else int(x.xreplace(env)) for x in parts)

    return f


class _Buffers:
    """Preallocated arrays per batch size (a few sizes kept: the last batch is smaller)."""

    def __init__(self, names, dims, dtype, keep=4):
        self.names, self.dtype, self.keep = list(names), dtype, keep
        self.shapes = [_shape_fn(n.shape, dims) for n in self.names]
        self.sets: dict = {}

    def get(self, dim_vals: tuple) -> list:
        bufs = self.sets.get(dim_vals)
        if bufs is None:
            if len(self.sets) >= self.keep:
                self.sets.pop(next(iter(self.sets)))
            bufs = [np.empty(s(dim_vals), self.dtype) for s in self.shapes]
            self.sets[dim_vals] = bufs
        return bufs


def _compile(p, dtype, target, opt, options):
    unknown = set(options) - {"boundscheck", "cache"}
    if unknown:
        raise SymbpError(
            f"unknown option(s) {', '.join(sorted(unknown))} for target {target!r}: "
            "the Numba backends take boundscheck=True/False and cache=True/False"
        )
    p = optimize(p)
    source, layout = generate(p, dtype, target, opt, options.get("boundscheck", False),
                              options.get("cache", True))
    module = cache.load(source)
    return p, source, layout, getattr(module, layout["name"])


class _Outputs:
    """Assembles (value, *grads) from the kernel's scalars and buffers."""

    def __init__(self, p: Program, layout, dtype):
        self.dtype = np.dtype(dtype)
        self.plan = []
        bufs = layout["buffers"]
        for o in p.outputs:
            if o in layout["scalar_out"]:
                self.plan.append(("ret", layout["scalar_out"].index(o)))
            elif o in bufs:
                self.plan.append(("buf", bufs.index(o)))
            elif o in p.inputs:
                self.plan.append(("in", p.inputs.index(o)))
            else:  # a constant: a gradient that is identically zero
                self.plan.append(("const", o))


def build(program: Program, dtype=np.float64, target: str = "cpu", **options) -> Kernel:
    """Compile ``program``: ``fn(*inputs, *dims)`` returns ``(value, *grads)``.

    Options: ``boundscheck=True`` (IndexError instead of silent out-of-bounds reads, for
    tests), ``cache=False`` (do not keep machine code on disk).  Intermediate buffers are
    kept per batch size; returned arrays are fresh for every call.
    """
    dt = np.dtype(dtype)
    p, source, layout, kern = _compile(program, dt, target, None, options)
    outs = _Outputs(p, layout, dt)
    n_in, n_dims = len(p.inputs), len(p.dims)
    out_idx = {i for kind, i in outs.plan if kind == "buf"}
    keep = [b for k, b in enumerate(layout["buffers"]) if k not in out_idx]
    scratch = _Buffers(keep, p.dims, dt)
    fresh = _Buffers(layout["buffers"], p.dims, dt)
    order = [(k in out_idx, keep.index(b) if k not in out_idx else k)
             for k, b in enumerate(layout["buffers"])]
    shapes = [_shape_fn(o.shape, p.dims) if is_matrix(o) else None for o in p.outputs]

    def fn(*args):
        dims = tuple(int(d) for d in args[n_in:n_in + n_dims])
        kept = scratch.get(dims)
        bufs = [np.empty(fresh.shapes[i](dims), dt) if is_out else kept[i]
                for is_out, i in order]
        ret = kern(*args[:n_in], *dims, *bufs)
        result = []
        for (kind, i), shape in zip(outs.plan, shapes):
            if kind == "ret":
                result.append(dt.type(ret[i]))
            elif kind == "buf":
                result.append(bufs[i])
            elif kind == "in":
                result.append(np.array(args[i], dtype=dt))
            elif shape is not None:
                result.append(np.full(shape(dims), float(i), dt))
            else:
                result.append(dt.type(float(i)))
        return tuple(result)

    fn.source = source
    fn.kernel = kern
    return Kernel(fn=fn, source=source)


class FusedStep:
    """A training step compiled into one call: ``loss = step(params, **data)``.

    Forward, backward and the optimizer update run in one Numba call; ``params`` (arrays
    of the step's dtype, C-contiguous; scalar parameters as 0-d arrays) are updated in
    place; ``state`` holds the optimizer buffers like ``symbp.optim.init_state``.
    """

    def __init__(self, program: Program, optimizer, dtype, target, options):
        self.optimizer, self.dtype, self.target = optimizer, np.dtype(dtype), target
        p, self.source, layout, self.kernel = _compile(program, self.dtype, target,
                                                       optimizer, options)
        self.program = p
        self.state = None
        self._wrt = {w.name for w in p.wrt}
        self._spec = [(s.name, s.name in self._wrt, is_matrix(s)) for s in p.inputs]
        self._bufs = _Buffers(layout["buffers"], p.dims, self.dtype)
        self._state_keys = layout["state"]
        self._dims: dict = {}  # input shapes -> dims, validated once per shape combination
        self._dt = self.dtype.type

    @property
    def fn(self):
        return self

    def __call__(self, params: dict, **data) -> float:
        if self.state is None:
            self.state = optim.init_state(self.optimizer, params)
        xs = []
        try:
            for name, is_param, is_mat in self._spec:
                x = params[name] if is_param else data[name]
                xs.append(x if is_mat or is_param else self._dt(x))
            key = tuple([x.shape for x in xs])
        except (KeyError, AttributeError, TypeError, ValueError):
            key = None
        dims = self._dims.get(key) if key is not None else None
        if dims is None or len(params) + len(data) != len(self._spec):
            xs, dims = self._bind(params, data)
            if key is not None:
                self._dims[key] = dims
        st = self.state
        st["t"] += 1
        sv = [st[b][w.name] for b, w in self._state_keys]
        args = [x.reshape(1) if (is_p and not is_m) else x
                for x, (_, is_p, is_m) in zip(xs, self._spec)]
        sv = [s.reshape(1) if s.ndim == 0 else s for s in sv]
        hyper = [self._dt(h) for h in hyper_values(self.optimizer, st["t"])]
        try:
            ret = self.kernel(*args, *dims, *self._bufs.get(dims), *sv, *hyper)
        except TypeError:
            st["t"] -= 1
            self._check_params(params)
            xs, dims = self._bind(params, data)  # converts data arrays (documented)
            st["t"] += 1
            args = [x.reshape(1) if (is_p and not is_m) else x
                    for x, (_, is_p, is_m) in zip(xs, self._spec)]
            ret = self.kernel(*args, *dims, *self._bufs.get(dims), *sv, *hyper)
        return float(ret[0])

    def _bind(self, params, data):
        both = dict(data)
        for k, v in params.items():
            if k in both:
                raise InputError(f"{k} is given both as a parameter and as data")
            both[k] = v
        self._check_params(params)
        args = bind_inputs(self.program, both, self.dtype)
        n = len(self.program.inputs)
        xs = [params[name] if is_p else a for a, (name, is_p, _) in zip(args[:n], self._spec)]
        return xs, tuple(args[n:])

    def _check_params(self, params):
        for name in self._wrt:
            w = params.get(name)
            if w is None:
                raise InputError(f"parameter {name} is missing from params")
            if not (isinstance(w, np.ndarray) and w.dtype == self.dtype
                    and w.flags.c_contiguous and w.flags.writeable):
                raise InputError(
                    f"parameter {name} must be a writeable C-contiguous {self.dtype} array "
                    f"(a 0-d array for a scalar) to be updated in place; got "
                    f"{type(w).__name__} {getattr(w, 'dtype', '')}: convert it once with "
                    f"np.ascontiguousarray(w, dtype=np.{self.dtype})"
                )


def build_step(program: Program, optimizer, dtype=np.float64, target: str = "cpu",
               **options) -> FusedStep:
    """A training step of the gradient ``program`` with ``optimizer`` fused in.

    Used by ``sb.compile_step`` for the 'cpu' and 'parallel' targets.
    """
    if not program.wrt:
        raise SymbpError("build_step needs a gradient Program (sb.gradient_program(f, params))")
    return FusedStep(program, optimizer, dtype, target, options)
