"""The Numba CPU backends: ``cpu`` (serial njit) and ``parallel`` (njit with prange).

A Program becomes one Python module of readable source (``fn.source``), imported from a
content-hashed file so Numba caches the machine code on disk (``symbp.cache``).  Each
head's lowering is its ``cpu`` rule in symbp/heads, printed through ``_Gen``'s helpers:

    MatMul         _gemm(A, B, out, 1, 0) (symbp.backends.blas): BLAS, operands such as
                   X.T transposed for free
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

import os
import time

# OpenMP threads that spin while they wait steal both cores from BLAS on a busy 2-core
# machine (a parallel W1 step took 2-30 ms instead of 0.3): let idle threads sleep.  Set
# before Numba starts its OpenMP pool; a value the user chose is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numba  # noqa: E402, F401  (fail at import when Numba is missing: target unavailable)
import numpy as np  # noqa: E402
import sympy as sp  # noqa: E402

from .. import cache, optim
from ..api import bind_inputs
from ..errors import InputError, SymbpError
from ..functions import Activation
from ..heads import require, rule
from ..ir import Program, _names_in, is_constant
from ..matrix import Constant, is_matrix
from ..passes import optimize
from . import Kernel, identifiers
from .scalar import ScalarPrinter, helpers

# --- the table: one stable njit scalar routine per `helper` name ---------------------------
# The routines both Numba backends share (scalar.HELPERS), plus the CPU's own tanh: libm's
# tanh costs ~3 exp calls here.
HELPERS = helpers("", "DT", {
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
})

# float32 overrides.  tanh: Eigen's rational approximation (clamped to ±7.9, odd degree-13
# numerator over degree-6 denominator, within 4e-7 relative of tanh in float32): no call
# and no branch, so the map loop vectorises: 4096 entries in ~5 µs instead of ~40 µs.
HELPERS_F32 = {
    "tanh": '''
def _tanh(x):
    # Eigen's float tanh: p(x)/q(x) on [-7.9, 7.9]; x itself below 4e-4
    x = DT(7.90531110763549805) if x > DT(7.90531110763549805) else x  # NaN stays NaN
    x = DT(-7.90531110763549805) if x < DT(-7.90531110763549805) else x
    x2 = x * x
    p = DT(-2.76076847742355e-16)
    p = p * x2 + DT(2.00018790482477e-13)
    p = p * x2 + DT(-8.60467152213735e-11)
    p = p * x2 + DT(5.12229709037114e-08)
    p = p * x2 + DT(1.48572235717979e-05)
    p = p * x2 + DT(6.37261928875436e-04)
    p = p * x2 + DT(4.89352455891786e-03)
    q = DT(1.19825839466702e-06)
    q = q * x2 + DT(1.18534705686654e-04)
    q = q * x2 + DT(2.26843463243900e-03)
    q = q * x2 + DT(4.89352518554385e-03)
    return x if abs(x) < DT(0.0004) else p * x / q
''',
}

class NumbaPrinter(ScalarPrinter):
    """Scalar expressions for njit code: typed constants ``DT(...)``, helpers, no float64
    leaks (the shared rules: ``scalar.ScalarPrinter``).

    ``names`` maps SymPy symbols to the text they print as (a local, ``X[_i, _j]``,
    ``DT(N)`` for a size); ``used`` collects the helper names printed.
    """

    helpers = HELPERS

    def __init__(self, names: dict):
        super().__init__("DT")
        self.names = names

    def _print_Symbol(self, e):
        if e in self.names:
            return self.names[e]
        raise SymbpError(f"the Numba printer met an unbound symbol {e}")

    def _zero_cmp(self):
        return "0"  # an int literal: x > 0 compares without converting x

    def _print_Pow(self, e, rational=False):
        if e.args[0].is_number:  # sqrt(2), 2**(1/2): a constant
            return self._num(float(e.evalf(17)))
        return super()._print_Pow(e, rational)

    # fully parenthesized powers and reciprocals, (DT(1)/(x)): the disk cache keys on
    # the source text, so the spelling stays what it was before the shared printer
    def _int_pow(self, base, n):
        prod = f"({'*'.join([base] * abs(n))})"
        return prod if n > 0 else self._recip(prod)

    def _recip(self, den):
        return f"({self._typed('1')}/{den})"

    def _print_Relational(self, e):
        return f"{self._print(e.lhs)} {e.rel_op} {self._print(e.rhs)}"

    def _print_other(self, e):
        # SymPy's printer already spells math.exp, math.erf, ...: what reaches here is unknown
        name = type(e).__name__
        raise SymbpError(
            f"the Numba backends cannot print {e}: give {name} a `helper` or a `formula`"
        )

    def _print_tanh(self, e):
        return self._helper("tanh", e.args)  # the fast, vectorisable _tanh of the table


# the kernel module's own globals: a user symbol called `np` must not shadow them (Python's
# builtins and keywords, `max`, `range`, `None`, ..., are avoided by `identifiers` itself)
_RESERVED = {"math", "np", "njit", "prange", "DT", "ACC"}


def _idx(d, ids) -> str:
    """A size as integer Python: 128, N, 2*N (a size named like a global, `np`, is `np_2`)."""
    d = sp.sympify(d)
    return str(d.xreplace({s: sp.Symbol(ids[s]) for s in d.free_symbols if s in ids}))


# piecewise-linear heads: a compare and a select, as cheap as arithmetic in a vector loop
_CHEAP = {"relu", "leaky_relu", "prelu", "Heaviside", "Abs", "Max", "Min", "sign"}


def _cost(expr, dtype=np.float64) -> int:
    """Rough per-entry cost of a map body, in units of one vectorised arithmetic op
    (~0.25 ns here): arithmetic and piecewise-linear heads 1, a transcendental 20 (a libm
    exp in a loop is ~5 ns per entry), float32 tanh 4 (a rational function that
    vectorises: ~0.9 ns per entry)."""
    f32 = np.dtype(dtype) == np.float32
    n = 0
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.Function, Activation)):
            name = type(node).__name__
            n += 1 if name in _CHEAP else 4 if (f32 and name == "tanh") else 20
        elif isinstance(node, (sp.Add, sp.Mul, sp.Pow)):
            n += 1
    return n


# prange pays above about this much work per loop (in _cost units).  Measured here, 2
# cores: an OpenMP fork/join costs ~20 µs; a relu map of 131k entries ran 20 µs serial
# and 32 µs in prange, of 524k entries 206 µs against 96; an exp map broke even at 8k
# entries (46 against 44 µs), a float32 tanh map at ~50k (65k: 60 against 51 µs).  So
# about 75 µs of serial work.
PAR_MIN_WORK = 300_000
# products whose fixed sizes multiply to at most this are loops, not BLAS calls
SMALL_PRODUCT = 16


class _Gen:
    """Prints one kernel for a Program: a def with one block per assignment."""

    def __init__(self, p: Program, dtype, target: str, update=None):
        self.p = p
        self.dt = np.dtype(dtype)
        self.parallel = target == "parallel"
        self.update = update  # an optimizer: print a training step
        names = list(p.inputs) + list(p.dims) + [a.name for a in p.body]
        self.ids = identifiers(names, _RESERVED)
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
        # the float64 array _f64: a step's optimizer constants, then the fixed accumulators
        self.f64_base = len(hyper_values(update)) if update is not None else 0
        self.acc64: list[int] = []
        self.into = self.fusable_updates(update)  # gradient name -> its MatMul
        self.imports: dict = {}  # (module, name) -> its alias in the kernel module

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

    def use(self, module: str, name: str) -> str:
        """A routine a head calls (a njit kernel of a symbp module): imported at the top of
        the generated module as ``_name``, so symbp.cache hashes its module into the key."""
        return self.imports.setdefault((module, name), f"_{name}")

    def buffer(self, name):
        if name not in self.buffers:
            self.buffers.append(name)
        return self.ids[name]

    def acc_vector(self, acc, n):
        """A zeroed float64 accumulator of length n: a slice of the kernel's float64 array
        ``_f64`` where n is fixed (np.zeros costs an allocation per call and ~0.3 s of
        compile time), a fresh array where n is a size such as N."""
        n = sp.sympify(n)
        if not n.is_Integer:
            self.emit(f"{acc} = np.zeros({self.idx(n)}, ACC)")
            return
        at = self.f64_base + sum(self.acc64)
        self.acc64.append(int(n))
        self.emit(f"{acc} = _f64[{at}:{at + int(n)}]")
        self.emit(f"for _j in range({int(n)}):")
        self.emit(f"{acc}[_j] = ACC(0.0)", 2)

    def pays(self, work) -> bool:
        """Whether ``work`` (in _cost units) is worth threads: 'parallel', and enough of it."""
        return self.parallel and work >= PAR_MIN_WORK

    def loop(self, var, n, work, depth, serial=False):
        """A loop header: prange over rows in 'parallel' where the work pays."""
        par = not serial and self.pays(work)
        return f"for {var} in {'prange' if par else 'range'}({self.idx(n)}):"

    def idx(self, d) -> str:
        return _idx(d, self.ids)

    def cost(self, body) -> int:
        return _cost(body, self.dt)

    def est(self, n) -> int:
        # a symbolic batch size counts as 128 rows for the prange decision
        n = sp.sympify(n)
        return int(n) if n.is_Integer else 128

    # --- the walk ---------------------------------------------------------------------
    def run(self):
        for a in self.p.body:
            if a.name in self.done or a.name in self.into:
                continue
            rule(a.expr).cpu(self, a)  # the head's own lowering (symbp/heads)
            self.done.add(a.name)

    def operand(self, x) -> str:
        if isinstance(x, sp.Transpose):
            return f"{self.ids[x.arg]}.T"
        return self.ids[x]

    @staticmethod
    def blas_product(A, B) -> bool:
        """A product worth a BLAS call (~1 µs): its fixed sizes multiply to more than
        SMALL_PRODUCT (a size such as N counts as 1)."""
        fixed = 1
        for d in (*A.shape, B.shape[1]):
            d = sp.sympify(d)
            fixed *= int(d) if d.is_Integer else 1
        return fixed > SMALL_PRODUCT

    @staticmethod
    def index_vars(rank: int) -> list[str]:
        """Loop variables over an array's axes: _i, _j for a matrix, _i0, _i1, ... else."""
        return ["_i", "_j"] if rank == 2 else [f"_i{k}" for k in range(rank)]

    def load(self, x, shape) -> str:
        """How an entry of a map's operand reads: broadcasting rows, columns, scalars (an
        axis of size 1 is read at 0)."""
        if not is_matrix(x):
            return f"DT({self.ids[x]})" if x in self.p.dims else self.ids[x]
        at = [v if not (d == 1 and full != 1) else "0"
              for v, d, full in zip(self.index_vars(len(shape)), x.shape, shape)]
        return f"{self.ids[x]}[{', '.join(at)}]"

    def nest(self, shape, work, serial=False) -> int:
        """Loops over every axis of ``shape`` (prange over the first where it pays); the
        depth of the innermost body."""
        for k, (v, n) in enumerate(zip(self.index_vars(len(shape)), shape)):
            if k == 0:
                self.emit(self.loop(v, n, work, 1, serial=serial))
            else:
                self.emit(f"for {v} in range({self.idx(n)}):", k + 1)
        return len(shape) + 1




    # --- the optimizer update, fused after the gradient ------------------------------------
    def fusable_updates(self, opt) -> dict:
        """Gradients that are one BLAS product read by nothing else: an SGD or momentum
        step adds the product straight into the parameter (or its velocity) with gemm's
        alpha and beta, so the gradient is never stored and read back.  Only where the
        product reads no parameter: the updates then cannot see each other's writes."""
        if not isinstance(opt, (optim.SGD, optim.Momentum)):
            return {}
        defs = {a.name: a.expr for a in self.p.body}
        params = set(self.p.wrt)
        grads = self.p.outputs[1:]
        out = {}
        for w, g in zip(self.p.wrt, grads):
            e = defs.get(g)
            if not (is_matrix(w) and isinstance(e, sp.MatMul) and len(e.args) == 2
                    and self.blas_product(*e.args)) or g in self.users or grads.count(g) > 1:
                continue
            if any((x.arg if isinstance(x, sp.Transpose) else x) in params for x in e.args):
                continue
            out[g] = e
        return out

    def step(self, opt):
        self.emit("# the optimizer update: every read of the parameters is above this line")
        for w, g in zip(self.p.wrt, self.p.outputs[1:]):
            wi = self.ids[w]
            if g in self.into:  # w -= lr * A @ B, or m = beta m + A @ B, in the product
                A, B = (self.operand(x) for x in self.into[g].args)
                self.emit(f"# {g} = {A}*{B}, added into the update by BLAS   [MatMul]")
                if isinstance(opt, optim.SGD):
                    self.emit(f"_gemm({A}, {B}, {wi}, -_lr, DT(1))")
                    continue
                self.emit(f"_gemm({A}, {B}, _m_{wi}, DT(1), _beta)")
                r, c = w.shape
                self.emit(self.loop("_i", r, self.est(r) * self.est(c) * 2, 1))
                self.emit(f"for _j in range({self.idx(c)}):", 2)
                self.emit(f"{wi}[_i, _j] -= _lr * _m_{wi}[_i, _j]", 3)
                continue
            if is_matrix(w) and len(w.shape) != 2:
                # an array of another rank (a kernel F×C×kh×kw): one loop over flat views
                n = sp.Mul(*[sp.sympify(d) for d in w.shape])
                gi = self.operand(g) if g in self.ids else None
                for x in [wi, *[f"_{b}_{wi}" for b in opt.buffers], *([gi] if gi else [])]:
                    self.emit(f"_flat{x} = {x}.reshape({self.idx(n)})")
                gx = f"_flat{gi}[_k]" if gi else "DT(0)"
                self.emit(self.loop("_k", n, self.est(n) * 4, 1))
                ref, d = f"_flat{wi}[_k]", 2
                m, v = f"_flat_m_{wi}[_k]", f"_flat_v_{wi}[_k]"
            elif is_matrix(w):
                r, c = w.shape
                gi = self.operand(g) if g in self.ids else None
                gx = f"{gi}[_i, _j]" if gi else "DT(0)"
                self.emit(self.loop("_i", r, self.est(r) * self.est(c) * 4, 1))
                self.emit(f"for _j in range({self.idx(c)}):", 2)
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


def hyper_values(opt) -> np.ndarray:
    """The optimizer's constants, float64 (the kernel casts, as NumPy casts Python floats)."""
    if isinstance(opt, optim.SGD):
        return np.array([opt.lr])
    if isinstance(opt, optim.Momentum):
        return np.array([opt.lr, opt.beta])
    if isinstance(opt, optim.Adam):
        return np.array([opt.lr, opt.beta1, opt.beta2, opt.eps])
    raise SymbpError(f"unknown optimizer {opt!r}: use SGD, Momentum or Adam")


# the update's constants inside the kernel, read from the float64 array _f64
_HYPER = {
    optim.SGD: ["_lr = DT(_f64[0])"],
    optim.Momentum: ["_lr = DT(_f64[0])", "_beta = DT(_f64[1])"],
    optim.Adam: ["_lr = DT(_f64[0])", "_beta1 = DT(_f64[1])", "_omb1 = DT(1.0 - _f64[1])",
                 "_beta2 = DT(_f64[2])", "_omb2 = DT(1.0 - _f64[2])", "_eps = DT(_f64[3])",
                 "_bc1 = DT(1.0 - math.pow(_f64[1], _t))  # bias corrections of step _t",
                 "_bc2 = DT(1.0 - math.pow(_f64[2], _t))"],
}


_HEADER = '''\
# symbp generated kernel: target {target}, {dtype}.  Regenerated from the Program; do not edit.
import math

import numpy as np
from numba import njit, prange  # noqa: F401

from symbp.backends.blas import gemm as _gemm  # noqa: F401  (hashed into the cache key)

DT = np.{dtype}  # every constant is typed: a bare 0.5 would turn {dtype} code into float64
ACC = np.float64  # sums accumulate in float64
'''


def _array_type(dt, ndim):
    return f"{dt}[{', '.join([':'] * (ndim - 1) + ['::1'])}]"


def generate(p: Program, dtype, target: str, opt=None, boundscheck=False, cache_=True):
    """The module source and the kernel's calling convention for Program ``p``.

    Arguments: inputs, sizes, the workspace ``_ws`` (every scratch array is a view into
    it: one argument instead of one per array, since each costs ~0.3 µs per call), the
    float64 accumulators ``_f64`` if any, fresh output arrays (a gradient function); a
    step takes the optimizer state, then ``_f64`` (the optimizer's constants followed by
    the accumulators) and the step number ``_t``."""
    require(p, "cpu", target)
    dt = np.dtype(dtype).name
    g = _Gen(p, dtype, target, update=opt)
    g.run()
    if opt is not None:
        g.step(opt)
    ids = g.ids
    scalar_out = [o for o in p.outputs if o in ids and not is_matrix(o)
                  and o not in p.inputs]
    if opt is not None and len(scalar_out) == 1:  # a step returns its loss as a float:
        g.emit(f"return ACC({ids[scalar_out[0]]})")  # no tuple to box and unpack per call
    else:
        g.emit(f"return ({''.join(ids[o] + ', ' for o in scalar_out)})")
    outs = [b for b in g.buffers if b in g.outputs] if opt is None else []
    scratch = [b for b in g.buffers if b not in outs]
    params, types = [], []
    for x in p.inputs:
        if x in g.scalar_params:
            params.append(f"_ref_{ids[x]}")
            types.append(_array_type(dt, 1))
        else:
            params.append(ids[x])
            types.append(_array_type(dt, len(x.shape)) if is_matrix(x) else dt)
    if opt is None:
        params += [ids[d] for d in p.dims]
        types += ["int64"] * len(p.dims)
    params += ["_ws"]
    types += [_array_type(dt, 1)]
    if opt is None and g.acc64:
        params += ["_f64"]
        types += ["float64[::1]"]
    params += [ids[b] for b in outs]
    types += [_array_type(dt, len(b.shape)) for b in outs]
    state = []
    if opt is not None:
        for buf in opt.buffers:
            for w in p.wrt:
                state.append((buf, w))
                params.append(f"_{buf}_{ids[w]}")
                types.append(_array_type(dt, len(w.shape) if is_matrix(w) else 1))
        params += ["_f64", "_t"]
        types += ["float64[::1]", "int64"]
    name = "train_step" if opt is not None else ("loss_and_grad" if p.wrt else "forward")
    flags = ['error_model="numpy"', f"cache={bool(cache_)}"]
    if boundscheck:
        flags.append("boundscheck=True")
    # parallel=True only where a loop is a prange: it costs ~0.7 s of compile time, and
    # Numba warns about a parallel kernel with nothing to parallelise
    par = target == "parallel" and any("in prange(" in ln for ln in g.lines)
    kflags = flags + (["parallel=True"] if par else [])
    sig = f'"({", ".join(types)},)"'
    lines = [_HEADER.format(target=target, dtype=dt)]
    lines += [f"from {m} import {n} as {a}  # noqa: F401" for (m, n), a in g.imports.items()]
    table = {**HELPERS, **(HELPERS_F32 if dt == "float32" else {})}
    for h in sorted(g.used):
        lines.append(f"\n@njit({', '.join(flags)})" + table[h])
    lines.append(f"\n@njit({sig}, {', '.join(kflags)})")
    lines.append(f"def {name}({', '.join(params)}):")
    if opt is not None:
        lines += _bind_in_kernel(p, ids, scratch)
    if scratch:
        # One reshape per column count, then row slices of it: a Numba reshape costs
        # ~50-80 ns (W3 had 11 of them, a quarter of its kernel), a row slice ~nothing,
        # and both keep the C layout that BLAS and vectorised loops want.
        lines.append("    # scratch arrays: row blocks of the workspace, kept between calls")
        lines.append("    _o = 0")
        widths: dict = {}
        for b in scratch:
            if len(b.shape) == 2:
                widths.setdefault(_idx(b.shape[1], ids), []).append(b)
        for b in scratch:  # an array of another rank: its own slice, reshaped
            if len(b.shape) != 2:
                size = _idx(sp.Mul(*[sp.sympify(d) for d in b.shape]), ids)
                dims = ", ".join(_idx(d, ids) for d in b.shape) + ("," if len(b.shape) == 1 else "")
                lines.append(f"    {ids[b]} = _ws[_o:_o + {size}].reshape(({dims}))")
                lines.append(f"    _o += {size}")
        for k, (c, group) in enumerate(widths.items()):
            rows = _idx(sum((sp.sympify(b.shape[0]) for b in group), sp.Integer(0)), ids)
            lines.append(f"    _w{k} = _ws[_o:_o + ({rows}) * {c}].reshape(({rows}, {c}))")
            lines.append(f"    _o += ({rows}) * {c}")
            at = sp.Integer(0)
            for b in group:
                end = at + sp.sympify(b.shape[0])
                lines.append(f"    {ids[b]} = _w{k}[{_idx(at, ids)}:{_idx(end, ids)}]")
                at = end
    for w in g.scalar_params:  # a scalar parameter arrives as a 1-element view
        lines.append(f"    {ids[w]} = _ref_{ids[w]}[0]")
    if opt is not None:
        lines += ["    " + h for h in _HYPER[type(opt)]]
    lines += g.lines
    source = "\n".join(lines) + "\n"
    layout = {"name": name, "scratch": scratch, "outs": outs, "scalar_out": scalar_out,
              "state": state, "f64": g.f64_base + sum(g.acc64)}
    return source, layout


def _bind_in_kernel(p: Program, ids: dict, scratch) -> list[str]:
    """A step's sizes come from its inputs' shapes, checked in the kernel.

    Python then hands arrays straight in (no shape tuple to build and look up per call:
    that was half of a W3 step).  A mismatch or a workspace too small raises ValueError
    before anything is written; the caller then runs the full check (``bind_inputs``),
    which names the culprit, or grows the workspace."""
    mats = [x for x in p.inputs if is_matrix(x)]
    out, checks = [], []
    for d in p.dims:
        at = next(((x, k) for x in mats for k in range(len(x.shape)) if x.shape[k] == d), None)
        out.append(f"    {ids[d]} = {ids[at[0]]}.shape[{at[1]}]" if at else f"    {ids[d]} = 0")
        checks.append(f"{ids[d]} == 0")
    for x in mats:
        for k in range(len(x.shape)):
            checks.append(f"{ids[x]}.shape[{k}] != {_idx(x.shape[k], ids)}")
    need = sum((sp.Mul(*[sp.sympify(d) for d in b.shape]) for b in scratch), sp.Integer(0))
    checks.append(f"_ws.size < {_idx(need, ids)}")
    out.append("    # sizes from the inputs; a mismatch goes back to Python's full check")
    rows = [" or ".join(checks[k:k + 4]) for k in range(0, len(checks), 4)]
    out.append(f"    if ({(' or' + chr(10) + '            ').join(rows)}):")
    out.append('        raise ValueError("symbp: input shapes or workspace")')
    return out


# --- the callables ------------------------------------------------------------------------


class _Blas:
    """The thread count of the OpenBLAS the kernels call (SciPy's copy, as njit's np.dot).

    Whether a second thread pays depends on the moment, not the program: on this
    project's 2-core machine the W2 step (two 128x784x256 products) took 1.0-1.1 ms on
    two threads against 1.45-1.5 ms on one while the machine was otherwise idle, and
    3.9 ms against 2.1 ms while one other busy process ran (a GEMM split in two waits
    for its slower half; an earlier shared session saw 3.1-6.8 ms against 1.5-1.7).  So
    a compiled function measures it while it is called (``_ThreadTuner``,
    ``blas_threads="auto"``, the default); a fixed ``blas_threads=n`` is kept as given.
    A 'parallel' kernel with prange loops keeps one BLAS thread: its loops own the cores,
    and two pools would fight.  NumPy's OpenBLAS (the user's matmuls) is left alone.
    Needs threadpoolctl; without it the library default stays.
    """

    def __init__(self):
        self.libs = None
        self.now = None

    def use(self, n: int) -> None:
        if n == self.now:
            return
        if self.libs is None:
            try:
                import scipy.linalg.cython_blas  # noqa: F401  (load it, so it can be found)
                from threadpoolctl import ThreadpoolController

                self.libs = [c for c in ThreadpoolController().lib_controllers
                             if c.user_api == "blas" and "scipy" in os.path.basename(
                                 os.path.dirname(c.filepath))]
            except ImportError:
                self.libs = []
        for c in self.libs:
            c.set_num_threads(n)
        self.now = n


BLAS = _Blas()


def blas_threads(target: str, options: dict, prange: bool = False):
    """The BLAS thread count to use: an int, or "auto" (more than one core and no prange
    loop in the kernel: measured while it runs, ``_ThreadTuner``).  A kernel with prange
    loops uses 1 for "auto"."""
    n = options.get("blas_threads", "auto")
    if n == "auto":
        return "auto" if not prange and _cores() > 1 else 1
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise SymbpError(f'blas_threads must be a positive int or "auto", not {n!r}')
    return n


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _ThreadTuner:
    """``blas_threads="auto"``: time the calls on 1 and on all cores, keep the faster.

    A trial runs blocks of ``BLOCK`` calls (training steps) per candidate, alternating
    (1, n, 1, n: a machine whose speed drifts meets both alike), and drops each block's
    first call (it wakes or parks the BLAS threads).  More threads are kept only when
    their median is at least ``GAIN`` faster: one thread disturbs the rest of the machine
    least.  The trial is repeated every ``PERIOD`` seconds, since other processes come
    and go; it costs 8 calls on the slower setting every 30 s.
    """

    BLOCK, ROUNDS, GAIN, PERIOD = 4, 2, 0.9, 30.0

    def __init__(self, n: int, clock=None):
        self.clock = clock or time.monotonic
        self.cands = (1, n)
        self.best = 1
        self.retrial_at = 0.0
        self.plan: list = []
        self.times: dict = {}

    def next(self) -> tuple[int, bool]:
        """Threads for the next step, and whether to time it."""
        if not self.plan:
            if self.clock() < self.retrial_at:
                return self.best, False
            self.plan = [(c, k > 0) for _ in range(self.ROUNDS) for c in self.cands
                         for k in range(self.BLOCK)]
            self.times = {c: [] for c in self.cands}
        return self.plan[0][0], self.plan[0][1]

    def start(self) -> float | None:
        """Before a call: set the BLAS threads for it; its start time if it is timed."""
        n, timed = self.next()
        BLAS.use(n)
        return time.perf_counter() if timed else None

    def stop(self, t0: float | None) -> None:
        """After a call started with ``start`` (``t0`` None: it is not to be counted)."""
        self.record(None if t0 is None else time.perf_counter() - t0)

    def record(self, seconds: float | None) -> None:
        """After a step: its time (None when it was not timed or did not run)."""
        if not self.plan:
            return
        c, timed = self.plan.pop(0)
        if timed and seconds is not None:
            self.times[c].append(seconds)
        if not self.plan:
            med = {c: float(np.median(v)) for c, v in self.times.items() if v}
            many = self.cands[1]
            self.best = many if (1 in med and many in med
                                 and med[many] < self.GAIN * med[1]) else 1
            self.retrial_at = self.clock() + self.PERIOD


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


class _Workspace:
    """One preallocated array per batch size holding every scratch array (a few sizes
    are kept: the last batch of an epoch is smaller)."""

    def __init__(self, names, dims, dtype, keep=4):
        self.dtype, self.keep = dtype, keep
        self.sizes = [_shape_fn(n.shape, dims) for n in names]
        self.sets: dict = {}

    def get(self, dim_vals: tuple) -> np.ndarray:
        ws = self.sets.get(dim_vals)
        if ws is None:
            if len(self.sets) >= self.keep:
                self.sets.pop(next(iter(self.sets)))
            n = sum(int(np.prod(s(dim_vals))) for s in self.sizes)
            ws = self.sets[dim_vals] = np.empty(n, self.dtype)
        return ws


def _compile(p, dtype, target, opt, options):
    unknown = set(options) - {"boundscheck", "cache", "blas_threads"}
    if unknown:
        raise SymbpError(
            f"unknown option(s) {', '.join(sorted(unknown))} for target {target!r}: "
            "the Numba backends take boundscheck=True/False, cache=True/False and "
            'blas_threads=n or "auto"'
        )
    blas_threads(target, options)  # refuse a bad value before compiling
    p = optimize(p)
    source, layout = generate(p, dtype, target, opt, options.get("boundscheck", False),
                              options.get("cache", True))
    module = cache.load(source)
    return p, source, layout, getattr(module, layout["name"])


def build(program: Program, dtype=np.float64, target: str = "cpu", **options) -> Kernel:
    """Compile ``program``: ``fn(*inputs, *dims)`` returns ``(value, *grads)``.

    Options: ``boundscheck=True`` (IndexError instead of silent out-of-bounds reads, for
    tests), ``cache=False`` (do not keep machine code on disk), ``blas_threads=n`` (threads
    of the matrix products; "auto", the default, measures 1 against all cores while the
    function is called: see ``_Blas``).  Scratch arrays are kept
    per batch size; returned arrays are fresh for every call.
    """
    dt = np.dtype(dtype)
    p, source, layout, kern = _compile(program, dt, target, None, options)
    n_in, n_dims = len(p.inputs), len(p.dims)
    ws = _Workspace(layout["scratch"], p.dims, dt)
    out_shapes = [_shape_fn(o.shape, p.dims) for o in layout["outs"]]
    plan = []  # where each output comes from
    for o in p.outputs:
        if o in layout["scalar_out"]:
            plan.append(("ret", layout["scalar_out"].index(o), None))
        elif o in layout["outs"]:
            plan.append(("out", layout["outs"].index(o), None))
        elif o in p.inputs:
            plan.append(("in", p.inputs.index(o), None))
        else:  # a constant: a gradient that is identically zero
            shape = _shape_fn(o.shape, p.dims) if is_matrix(o) else None
            plan.append(("const", float(o) if not is_matrix(o) else 0.0, shape))

    threads = blas_threads(target, options, prange="in prange(" in source)
    tuner = _ThreadTuner(_cores()) if threads == "auto" and "_gemm(" in source else None
    if threads == "auto":
        threads = 1

    f64 = (np.zeros(layout["f64"]),) if layout["f64"] else ()

    def fn(*args):
        if tuner is None:
            BLAS.use(threads)
        else:
            t0 = tuner.start()
        dims = tuple(int(d) for d in args[n_in:n_in + n_dims])
        outs = [np.empty(f(dims), dt) for f in out_shapes]
        ret = kern(*args[:n_in], *dims, ws.get(dims), *f64, *outs)
        if tuner is not None:
            tuner.stop(t0)
        result = []
        for kind, i, shape in plan:
            if kind == "ret":
                result.append(dt.type(ret[i]))
            elif kind == "out":
                result.append(outs[i])
            elif kind == "in":
                result.append(np.array(args[i], dtype=dt))
            elif shape is not None:
                result.append(np.full(shape(dims), i, dt))
            else:
                result.append(dt.type(i))
        return tuple(result)

    fn.source = source
    fn.kernel = kern
    fn.tuner = tuner
    return Kernel(fn=fn, source=source)


class FusedStep:
    """A training step compiled into one call: ``loss = step(params, **data)``.

    Forward, backward and the optimizer update run in one Numba call; ``params`` (arrays
    of the step's dtype, C-contiguous; scalar parameters as 0-d arrays) are updated in
    place; ``state`` holds the optimizer buffers like ``symbp.optim.init_state``.
    ``blas_threads`` is the BLAS thread count in use (see ``_Blas``).
    """

    def __init__(self, program: Program, optimizer, dtype, target, options):
        self.optimizer, self.dtype, self.target = optimizer, np.dtype(dtype), target
        p, self.source, layout, self.kernel = _compile(program, self.dtype, target,
                                                       optimizer, options)
        self.program = p
        self.state = None
        self._wrt = {w.name for w in p.wrt}
        self._spec = [(s.name, s.name in self._wrt, is_matrix(s)) for s in p.inputs]
        self._ws = _Workspace(layout["scratch"], p.dims, self.dtype)
        self._state_keys = [(b, w.name) for b, w in layout["state"]]
        self._wsa = np.empty(0, self.dtype)  # the workspace: grown by _bind when too small
        self._names = [(name, is_p) for name, is_p, _ in self._spec]
        self._scalar_params = [is_p and not is_m for _, is_p, is_m in self._spec]
        if not any(self._scalar_params):
            self._scalar_params = None
        # float64 words: the optimizer's constants, then the kernel's accumulators
        self._f64 = np.zeros(layout["f64"])
        hp = hyper_values(optimizer)
        self._f64[:len(hp)] = hp
        self._threads = blas_threads(target, options, prange="in prange(" in self.source)
        self._blas = "_gemm(" in self.source  # small products are loops: no BLAS at all
        self._tuner = _ThreadTuner(_cores()) if self._blas and self._threads == "auto" \
            else None
        if self._threads == "auto":
            self._threads = 1
        self._float = opt_returns_float(layout)
        # constants of fixed shape (Identity(3), a Matrix of numbers) are made once and
        # join the data of every call, so the fast path below finds them
        self._consts = {s.name: s.array({}, self.dtype) for s in p.inputs
                        if isinstance(s, Constant) and all(d.is_Integer for d in s.shape)}

    @property
    def fn(self):
        return self

    @property
    def blas_threads(self) -> int:
        """The BLAS threads the step uses now (``blas_threads="auto"`` picks as it runs)."""
        return self._tuner.best if self._tuner is not None else self._threads

    def __call__(self, params: dict, /, **data) -> float:
        st = self.state
        if st is None:
            st = self.state = optim.init_state(self.optimizer, params)
        # The fast path (a W3 step is ~1 µs of kernel, so every Python line counts): arrays
        # go in as they come; the kernel binds and checks the sizes itself, Numba checks
        # dtypes and layouts.  Anything they refuse is converted or named below.
        try:
            d = {**data, **self._consts} if self._consts else data
            xs = [params[n] if p else d[n] for n, p in self._names]
            if len(params) + len(data) + len(self._consts) != len(xs):
                raise KeyError
        except (KeyError, TypeError):
            xs = self._bind(params, data)
        if self._scalar_params:  # a 0-d parameter travels as a 1-element view of itself
            xs = [x.reshape(1) if is_sp else x for x, is_sp in zip(xs, self._scalar_params)]
        t = st["t"] + 1  # counted once the step ran: a refused call leaves the state alone
        if self._state_keys:
            sv = [st[b][k] for b, k in self._state_keys]
            if self._scalar_params:
                sv = [v.reshape(1) if v.ndim == 0 else v for v in sv]
        else:
            sv = ()
        tuner = self._tuner
        if tuner is None:
            if self._blas and BLAS.now != self._threads:
                BLAS.use(self._threads)
        else:
            t0 = tuner.start()
        try:
            ret = self.kernel(*xs, self._wsa, *sv, self._f64, t)
        except (TypeError, ValueError):  # other types or sizes: check, convert, retry
            t0 = None  # binding and converting are not the step's time
            self._check_params(params)
            xs = self._bind(params, data)
            if self._scalar_params:
                xs = [x.reshape(1) if is_sp else x for x, is_sp in zip(xs, self._scalar_params)]
            ret = self.kernel(*xs, self._wsa, *sv, self._f64, t)
        if tuner is not None:
            tuner.stop(t0)
        st["t"] = t
        return ret if self._float else float(ret[0])

    def _bind(self, params, data):
        """Full check and documented conversion; grows the workspace for these sizes."""
        both = dict(data)
        for k, v in params.items():
            if k in both:
                raise InputError(f"{k} is given both as a parameter and as data")
            both[k] = v
        self._check_params(params)
        args = bind_inputs(self.program, both, self.dtype)
        n = len(self.program.inputs)
        ws = self._ws.get(tuple(args[n:]))
        if ws.size > self._wsa.size:  # one workspace, as big as the largest batch seen
            self._wsa = ws
        return [params[name] if is_p else a for a, (name, is_p, _) in zip(args[:n], self._spec)]

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


def opt_returns_float(layout) -> bool:
    """Whether a step kernel returns its loss as a bare float (see ``generate``)."""
    return len(layout["scalar_out"]) == 1


def build_step(program: Program, optimizer, dtype=np.float64, target: str = "cpu",
               **options) -> FusedStep:
    """A training step of the gradient ``program`` with ``optimizer`` fused in.

    Used by ``sb.compile_step`` for the 'cpu' and 'parallel' targets.
    """
    if not program.wrt:
        raise SymbpError("build_step needs a gradient Program (sb.gradient_program(f, params))")
    return FusedStep(program, optimizer, dtype, target, options)
