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
first).  The module is Numba's dialect; symbp's own lowering (``symbp.backends.native``)
compiles it to the same machine operations in a fifth to a third of Numba's time
(bench/RESULTS.md), and Numba
compiles whatever that lowering does not take (``prange``, ``boundscheck=True``, the
convolution kernels).
"""

from __future__ import annotations

import ast
import functools
import keyword
import os
import re
import textwrap

# OpenMP threads that spin while they wait steal both cores from BLAS on a busy 2-core
# machine (a parallel W1 step took 2-30 ms instead of 0.3): let idle threads sleep.  Set
# before Numba starts its OpenMP pool; a value the user chose is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numba  # noqa: E402, F401  (fail at import when Numba is missing: target unavailable)
import numpy as np  # noqa: E402
import sympy as sp  # noqa: E402

from .. import cache
from ..errors import SymbpError
from ..functions import Activation
from ..heads import require, rule
from ..ir import Program, _names_in, is_constant
from ..matrix import is_matrix
from ..passes import optimize
from ..runtime.step import FusedStep, gradient_call
from ..runtime.threads import blas_threads
from . import Kernel, blas, identifiers  # noqa: F401  (blas: Numba's start without scipy.linalg)
from .scalar import Routines, ScalarPrinter, entry_lines, rule_names

# --- the table: the njit routines kernels call ----------------------------------------------
# max, min and one per function row, printed from the row (scalar.Routines), plus the CPU's
# own tanh: libm's tanh costs ~3 exp calls here.
HELPERS = Routines(lambda names: NumbaPrinter(names), "", "DT", {
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
HELPERS_F32 = HELPERS.replace({
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
})

# The routines are inlined by Numba itself, at every call: left to LLVM, a routine called
# from a kernel of more than a few blocks stayed a call, and a map loop that calls stays
# scalar.  A 2-layer tanh step of width 256 at batch 512 spent 1.28 ms in its maps and sums
# with the calls and 0.18 ms inlined (the whole step 3.09 -> 2.51 ms).  Inlining changes no
# arithmetic: the same operations, in the same order, on each entry.
INLINE = 'inline="always"'


class NumbaPrinter(ScalarPrinter):
    """Scalar expressions for njit code: typed constants ``DT(...)``, helpers, no float64
    leaks (the shared rules: ``scalar.ScalarPrinter``).

    ``names`` maps SymPy symbols to the text they print as (a local, ``X[_i, _j]``,
    ``DT(N)`` for a size); ``used`` collects the helper names printed.
    """

    helpers = HELPERS

    def __init__(self, names: dict, dt: str = "DT"):
        super().__init__(dt)  # "ACC": float64 arithmetic (an optimizer's per-step scalars)
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
            f"the Numba backends cannot print {e}: write {name} in other functions, or "
            "make it a row of symbp.functions with a `formula` (and a stable `rule`)"
        )

    def _print_tanh(self, e):
        return self._helper("tanh", e.args)  # the fast, vectorisable _tanh of the table


# the kernel module's own globals: a user symbol called `np` must not shadow them (Python's
# builtins and keywords, `max`, `range`, `None`, ..., are avoided by `identifiers` itself)
_RESERVED = {"math", "np", "njit", "prange", "DT", "ACC"}


def _idx(d, ids) -> str:
    """A size as integer Python: 128, N, 2*N (a size named like a global, `np`, is `np_2`)."""
    if isinstance(d, int) or getattr(d, "is_Integer", False):  # most sizes: no printing
        return str(int(d))
    d = sp.sympify(d)
    if d.is_Symbol and d in ids:
        return ids[d]
    return _printed(d, tuple(sorted(((s, ids[s]) for s in d.free_symbols if s in ids),
                                    key=lambda sn: sn[1])))


@functools.lru_cache(maxsize=4096)
def _printed(d, names: tuple) -> str:
    """``d`` printed with its symbols renamed by ``names`` ((symbol, new name), ...): a
    deep network prints the same few sizes (``62*N``) hundreds of times."""
    return str(d.xreplace({s: sp.Symbol(n) for s, n in names}))


# piecewise-linear heads: a compare and a select, as cheap as arithmetic in a vector loop
# (a function row says its own cost)
_CHEAP = {"Heaviside", "Abs", "Max", "Min", "sign"}


def _cost(expr, dtype=np.float64) -> int:
    """Rough per-entry cost of a map body, in units of one vectorised arithmetic op
    (~0.25 ns here): arithmetic and piecewise-linear heads 1, a transcendental 20 (a libm
    exp in a loop is ~5 ns per entry), float32 tanh 4 (a rational function that
    vectorises: ~0.9 ns per entry)."""
    f32 = np.dtype(dtype) == np.float32
    n = 0
    for node in sp.preorder_traversal(expr):
        if isinstance(node, Activation):
            n += node.cost
        elif isinstance(node, sp.Function):
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


# Maps written over a dead operand (_Gen.over_operand); False: every value its own rows (the
# tests compare the two).
IN_PLACE = True


class _Gen:
    """Prints one kernel for a Program: a def with one block per assignment."""

    def __init__(self, p: Program, dtype, target: str, update=None):
        self.p = p
        self.dt = np.dtype(dtype)
        self.parallel = target == "parallel"
        self.update = update  # an optimizer's rule: print a training step
        names = list(p.inputs) + list(p.dims) + [n for a in p.body for n in (a.name, *a.also)]
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
        self.over: dict = {}  # a map's name -> the dead operand whose storage it takes (over)
        self.scalar_params = [w for w in p.wrt if not is_matrix(w)] if update else []
        # the float64 array _f64: a step's optimizer constants, then the fixed accumulators
        self.f64_base = len(update.hyper) if update is not None else 0
        self.acc64: list[int] = []
        # gradients a pass fused into the update (passes.fuse_update): name -> A·B
        self.into = {a.name: a.expr for a in p.body if rule(a.expr).extra.get("into_update")}
        self.imports: dict = {}  # (module, name) -> its alias in the kernel module
        self.blocks: list[tuple[int, int]] = []  # line ranges: one stage each (_stages)
        self.sizes: dict = {}  # idx's memo

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

    def over_operand(self, a, e) -> str:
        """The buffer map ``e`` (assigned by ``a``) writes: the storage of an operand it
        reads entry by entry at the entry it writes, where that operand is scratch that
        nothing after this map reads (``t3 = tanh(b0 + t1)`` written over ``t1``), else
        its own.  Each entry is read before it is written, so the values are the same; the
        map writes where the product before it has just left its output in the cache, and
        the workspace holds one array fewer (a batch-4096 step of width 256: 28.6 -> 25.2
        ms on one core, bench/RESULTS.md)."""
        name = a.name
        if not IN_PLACE or name in self.buffers or name in self.outputs:
            return self.buffer(name)
        for x in e.operands:
            if (is_matrix(x) and x in self.buffers and x not in self.outputs
                    and x not in self.p.inputs and tuple(x.shape) == tuple(e.shape)
                    and all(u.name == name or u.name in self.done
                            for u in self.users.get(x, ()))):
                self.over[name] = self.over.get(x, x)
                break
        return self.buffer(name)

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
        self.emit(f"{acc} = {self.use('symbp.backends.views', 'rows')}(_f64, {at}, {at + int(n)})")
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
        # a few sizes (N, 64, 2*N) are printed hundreds of times in a deep kernel
        if d not in self.sizes:
            self.sizes[d] = _idx(d, self.ids)
        return self.sizes[d]

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
            start = len(self.lines)
            rule(a.expr).cpu(self, a)  # the head's own lowering (symbp/heads)
            self.blocks.append((start, len(self.lines)))
            self.done.add(a.name)
            self.done.update(a.also)

    def operand(self, x) -> str:
        if isinstance(x, sp.Transpose):
            return f"{self.ids[x.arg]}.T"
        return self.ids[x]


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
        depth of the innermost body.  An axis of one entry is no loop, its index 0: a
        convolution step had 31 loops of one pass, and LLVM's time grows with the loops of
        a kernel (each is a vectorised loop, its remainder and its checks)."""
        depth = 1
        for k, (v, n) in enumerate(zip(self.index_vars(len(shape)), shape)):
            if sp.sympify(n) == 1:
                self.emit(f"{v} = 0", depth)
                continue
            self.emit(self.loop(v, n, work, 1, serial=serial or k > 0) if depth == 1
                      else f"for {v} in range({self.idx(n)}):", depth)
            depth += 1
        return depth


    # --- the optimizer update, fused after the gradient ------------------------------------

    def step(self, rule):
        """The optimizer's update of every parameter, printed from its rule's formulas."""
        self.emit("# the optimizer update: every read of the parameters is above this line")
        names = rule_names(rule)
        for w, g in zip(self.p.wrt, self.p.outputs[1:]):
            start = len(self.lines)
            self.param_update(rule, names, w, g)
            self.blocks.append((start, len(self.lines)))

    def param_update(self, rule, names, w, g):
        """Parameter ``w``'s update from its gradient ``g``: one stage of the kernel."""
        wi = self.ids[w]
        # the parameter and its buffers, entry (i, j) of a matrix, a scalar's 1-element view
        at = f"[{', '.join(self.index_vars(len(w.shape)))}]" if is_matrix(w) else "[0]"
        arrays = {rule.w: wi if is_matrix(w) else f"_ref_{wi}"}
        arrays.update({sp.Symbol(b): f"_{b}_{wi}" for b in rule.state})
        refs = {x: a + at for x, a in arrays.items()}
        if g in self.into:  # x <- alpha x + gamma A @ B in one BLAS call
            k, x, alpha, gamma = self.into[g].how
            A, B = (self.operand(y) for y in self.into[g].args[:2])
            self.emit(f"# {g} = {A}*{B}, added into the update by BLAS   [MatMul]")
            self.entries(w, rule, rule.update[:k], refs, None, 2)
            self.emit(f"_gemm({A}, {B}, {arrays[x]}, {self.rule_expr(gamma, names)}, "
                      f"{self.rule_expr(alpha, names)})")
            self.entries(w, rule, rule.update[k + 1:], refs, None, 2)
        elif is_matrix(w):
            gi = self.operand(g) if g in self.ids else None
            self.entries(w, rule, rule.update, refs, f"{gi}{at}" if gi else "DT(0)", 4)
        else:
            gx = self.ids[g] if g in self.ids else self.expr(g)
            self.entries(w, rule, rule.update, refs, gx, 4)

    def entries(self, w, rule, assigns, refs, gx, work):
        """``assigns`` of the rule for every entry of parameter ``w``: a loop nest over a
        matrix (``work`` arithmetic per entry for the prange decision), one line each
        for a scalar."""
        if not assigns:
            return
        lines = entry_lines(rule, assigns, refs, gx, self.rule_expr)
        depth = 1
        if is_matrix(w):  # one loop per axis (a kernel F×C×kh×kw has four)
            size = 1
            for d in w.shape:
                size *= self.est(d)
            depth = self.nest(w.shape, size * work)
        for line in lines:
            self.emit(line, depth)

    def rule_expr(self, e, names) -> str:
        """A formula of the update: only the rule's own names (a program symbol called
        ``lr`` is not the learning rate)."""
        pr = NumbaPrinter(names)
        out = pr.doprint(e)
        self.used |= pr.used
        return out


# --- the optimizer's rule, printed (its names and entries: scalar.rule_names, entry_lines) --


def _rule_prologue(rule) -> tuple[list[str], set]:
    """The update's scalars, once per call: the hyperparameters from the float64 array
    ``_f64``, and the per-step scalars computed from them and the step count ``_t`` in
    float64 (as NumPy computes with Python floats), each then rounded to DT once."""
    f64 = {sp.Symbol(h): f"_f64[{k}]" for k, h in enumerate(rule.hyper)}
    f64[rule.t] = "_t"
    pr = NumbaPrinter(f64, dt="ACC")
    lines = [f"_opt_{h} = DT(_f64[{k}])" for k, h in enumerate(rule.hyper)]
    lines += [f"_opt_{s} = DT({pr.doprint(e)})" for s, e in rule.per_step]
    return lines, pr.used




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


def generate(p: Program, dtype, target: str, rule=None, boundscheck=False, cache_=True):
    """The module source and the kernel's calling convention for Program ``p``.

    Arguments: inputs, sizes, the workspace ``_ws`` (every scratch array is a view into
    it: one argument instead of one per array, since each costs ~0.3 µs per call), the
    float64 accumulators ``_f64`` if any, fresh output arrays (a gradient function); a
    step (``rule``: an optimizer's ``symbp.optim.Rule``) takes the optimizer state, then
    ``_f64`` (the hyperparameters followed by the accumulators) and the step number ``_t``."""
    require(p, "cpu", target)
    dt = np.dtype(dtype).name
    g = _Gen(p, dtype, target, update=rule)
    g.run()
    prologue = []
    if rule is not None:
        g.step(rule)
        prologue, used = _rule_prologue(rule)
        g.used |= used
    ids = g.ids
    scalar_out = [o for o in p.outputs if o in ids and not is_matrix(o)
                  and o not in p.inputs]
    if rule is not None and len(scalar_out) == 1:  # a step returns its loss as a float:
        g.emit(f"return ACC({ids[scalar_out[0]]})")  # no tuple to box and unpack per call
    else:
        g.emit(f"return ({''.join(ids[o] + ', ' for o in scalar_out)})")
    outs = [b for b in g.buffers if b in g.outputs] if rule is None else []
    # a map written over a dead operand (_Gen.over_operand) takes that operand's rows
    scratch = [b for b in g.buffers if b not in outs and b not in g.over]
    split = len(g.blocks) >= SPLIT_MIN_BLOCKS
    addr = _table(p, rule) if split else []
    tabled = {w for _, w in addr}
    if addr:
        g.use("symbp.backends.address", "array")
    params, types = [], []
    for x in p.inputs:
        if x in tabled:
            continue
        if x in g.scalar_params:
            params.append(f"_ref_{ids[x]}")
            types.append(_array_type(dt, 1))
        else:
            params.append(ids[x])
            types.append(_array_type(dt, len(x.shape)) if is_matrix(x) else dt)
    if rule is None:
        params += [ids[d] for d in p.dims]
        types += ["int64"] * len(p.dims)
    if addr:
        params.append("_pa")
        types.append("int64[::1]")
    params += ["_ws"]
    types += [_array_type(dt, 1)]
    if rule is None and g.acc64:
        params += ["_f64"]
        types += ["float64[::1]"]
    params += [ids[b] for b in outs]
    types += [_array_type(dt, len(b.shape)) for b in outs]
    state = []
    if rule is not None:
        for buf in rule.state if not addr else ():  # tabled state: entries of _pa
            for w in p.wrt:
                state.append((buf, w))
                params.append(f"_{buf}_{ids[w]}")
                types.append(_array_type(dt, len(w.shape) if is_matrix(w) else 1))
        params += ["_f64", "_t"]
        types += ["float64[::1]", "int64"]
    name = "train_step" if rule is not None else ("loss_and_grad" if p.wrt else "forward")
    flags = ['error_model="numpy"', f"cache={bool(cache_)}"]
    if boundscheck:
        flags.append("boundscheck=True")
    sig = f'"({", ".join(types)},)"'
    if scratch:  # views of the workspace (symbp.backends.views)
        g.use("symbp.backends.views", "view")
        g.use("symbp.backends.views", "rows")
    lines = [_HEADER.format(target=target, dtype=dt)]
    lines += [f"from {m} import {n} as {a}  # noqa: F401" for (m, n), a in g.imports.items()]
    table = HELPERS_F32 if dt == "float32" else HELPERS
    for h in sorted(g.used):
        lines.append(f"\n@njit({', '.join(flags + [INLINE])})" + table[h])
    top = []  # the kernel's own lines before the stages: sizes, scratch views, scalars
    # split: a scratch matrix -> (its block, first row, end row, None); a parameter or
    # its optimizer state in the address table -> ("_pa", its entry, None, its shape)
    views: dict = {}
    # a step binds its sizes in the kernel; a gradient or forward kernel checks its inputs
    # against the sizes it is given (api.Forward's repeated call checks nothing else)
    top += _bind_in_kernel(p, [x for x in p.inputs if is_matrix(x) and x not in tabled],
                           ids, scratch, loops=split, given=rule is None)
    for k, (buf, w) in enumerate(addr):
        shape = f"({', '.join(str(int(d)) for d in w.shape)})"
        views[ids[w] if buf is None else f"_{buf}_{ids[w]}"] = ("_pa", str(k), None, shape)

    if scratch:
        # One block per column count, then row ranges of it, cut by symbp.backends.views
        # (a few instructions each, where Numba's slice and reshape cost ~40 ms of compile
        # each): all keep the C layout that BLAS and vectorised loops want.
        top.append("    # scratch arrays: row blocks of the workspace, kept between calls")
        top.append("    _o = 0")
        widths: dict = {}
        for b in scratch:
            if len(b.shape) == 2:
                widths.setdefault(_idx(b.shape[1], ids), []).append(b)
        for b in scratch:  # an array of another rank: its own view
            if len(b.shape) != 2:
                size = _idx(sp.Mul(*[sp.sympify(d) for d in b.shape]), ids)
                dims = ", ".join(_idx(d, ids) for d in b.shape) + ("," if len(b.shape) == 1 else "")
                top.append(f"    {ids[b]} = _view(_ws, _o, ({dims}))")
                top.append(f"    _o += {size}")
                top += [f"    {ids[y]} = {ids[b]}" for y, x in g.over.items() if x == b]
        for k, (c, group) in enumerate(widths.items()):
            rows = _idx(sum((sp.sympify(b.shape[0]) for b in group), sp.Integer(0)), ids)
            top.append(f"    _w{k} = _view(_ws, _o, ({rows}, {c}))")
            top.append(f"    _o += ({rows}) * {c}")
            at = sp.Integer(0)
            for b in group:
                end = at + sp.sympify(b.shape[0])
                lo, hi = _idx(at, ids), _idx(end, ids)
                for y in [b] + [y for y, x in g.over.items() if x == b]:
                    views[ids[y]] = (f"_w{k}", lo, hi, None)
                    if not split:
                        top.append(f"    {ids[y]} = _rows(_w{k}, {lo}, {hi})")
                at = end
    for w in g.scalar_params:  # a scalar parameter arrives as a 1-element view
        top.append(f"    {ids[w]} = _ref_{ids[w]}[0]")
    top += ["    " + h for h in prologue]
    known = set(params) | _stored(top)
    scalars = {ids[n] for n in ids if not is_matrix(n)}
    if split:
        # arrays of one type may be taken from a tuple by a loop over repeated calls
        kinds = {a: t for a, t in zip(params, types)}
        kinds.update({w: "workspace" for w, _, _, shape in views.values() if shape is None})
        kinds.update({ids[d]: "int64" for d in p.dims})  # sizes: what row numbers are made of
        stages, body, cuts = _stages(g.lines, g.blocks, known, scalars, flags, views, kinds)
        top += cuts
    else:
        stages, body = [], g.lines
    lines += stages
    # parallel=True only where a loop is a prange: it costs ~0.7 s of compile time, and
    # Numba warns about a parallel kernel with nothing to parallelise
    par = target == "parallel" and any("in prange(" in ln for ln in body)
    kflags = flags + (["parallel=True"] if par else [])
    lines.append(f"\n@njit({sig}, {', '.join(kflags)})")
    lines.append(f"def {name}({', '.join(params)}):")
    lines += top + body
    source = "\n".join(lines) + "\n"
    layout = {"name": name, "scratch": scratch, "outs": outs, "scalar_out": scalar_out,
              "state": state, "f64": g.f64_base + sum(g.acc64),
              "table": [(buf, w.name) for buf, w in addr] or None}
    return source, layout


def generate_update(rule, dtype, parts=1, cache_=True) -> str:
    """The module source of ``flat_update(w, G, B, *buffers, _f64, _t)`` -> bool: ``rule``
    applied to every entry of flat arrays (all the parameters, concatenated), with the
    gradient ``s * (G[0] + ... + G[parts-1])``: ``_f64`` holds the hyperparameters, then
    ``s``.

    Data-parallel training takes it where the reduction comes between the gradient and the
    update.  ``G`` holds one row per part of the gradient, summed in row order as they are
    read: one row after an Allreduce; one per rank when the ranks share memory, so the
    reduction costs no pass of its own (``runtime.mpi``).  ``s`` is the 1/K of a mean over
    K equal shards, applied here instead of in a pass of its own.  Each entry is first
    kept in ``B`` (the guard's backup; empty without a guard), and the result says
    whether every updated entry is finite: the guard's check and copy cost no pass of
    their own either.  The sum is printed out (no loop over the rows) and the backup is
    one test outside the loop, so the loop stays vectorised: W2's Adam update took 0.11 ms
    so, against 0.9 ms with a loop over the rows or with ``B`` aliasing ``w``."""
    dt = np.dtype(dtype).name
    prologue, used = _rule_prologue(rule)
    bufs = [sp.Symbol(b) for b in rule.state]
    refs = {rule.w: "w[_i]", **{b: f"_{b}_w[_i]" for b in bufs}}
    pr_used: set = set()

    def expr(e, names):
        pr = NumbaPrinter(names)
        out = pr.doprint(e)
        pr_used.update(pr.used)
        return out

    body = entry_lines(rule, rule.update, refs, "_gs*_g", expr)
    flags = ['error_model="numpy"', f"cache={bool(cache_)}"]
    types = ([_array_type(dt, 1), f"{dt}[:, ::1]", _array_type(dt, 1)]
             + [_array_type(dt, 1)] * len(bufs) + ["float64[::1]", "int64"])
    lines = [_HEADER.format(target="cpu", dtype=dt)]
    table = {**HELPERS, **(HELPERS_F32 if dt == "float32" else {})}
    for h in sorted(used | pr_used):
        lines.append(f"\n@njit({', '.join(flags + [INLINE])})" + table[h])
    lines.append(f'\n@njit("({", ".join(types)},)", {", ".join(flags)})')
    lines.append(f"def flat_update(w, G, B, {''.join(f'_{b}_w, ' for b in bufs)}_f64, _t):")
    lines += ["    " + h for h in prologue]
    lines.append(f"    _gs = DT(_f64[{len(rule.hyper)}])")
    lines.append("    _finite = True")
    sizes = " or ".join(f"_{b}_w.size != w.size" for b in bufs)
    lines.append(f"    if G.shape[0] != {parts} or G.shape[1] != w.size or B.size not in "
                 f"(0, w.size){' or ' + sizes if sizes else ''}:")
    lines.append('        raise ValueError("symbp: flat_update\'s buffer sizes")')
    lines.append("    _keep = B.size != 0")
    lines.append("    for _i in range(w.size):")
    lines.append("        if _keep:")
    lines.append("            B[_i] = w[_i]")
    lines.append(f"        _g = {' + '.join(f'G[{r}, _i]' for r in range(parts))}")
    lines += ["        " + ln for ln in body]
    lines.append("        _finite &= math.isfinite(w[_i])")
    lines.append("    return _finite")
    return "\n".join(lines) + "\n"


# --- stages: the kernel as a sequence of calls ----------------------------------------------
# LLVM's optimisation of one function grows faster than its length (one kernel of a 16-layer
# step: 10 s, 5.4 of them in LLVM, against 2 s for 2 layers).  So each head's block becomes
# its own small njit function, and blocks that differ only in the names they touch (the
# layers of an MLP) share one: its machine code is made once, whatever the depth.


# Below this many blocks one function compiles faster than its stages and their calls (a
# 2-layer step: 2.1 s whole, 3.1 s split); from about 8 layers up the split wins.
SPLIT_MIN_BLOCKS = 40
SPLIT_MAX_DISTINCT = 0.5  # ... and at most this many distinct stages per call (_stages)

# acc_vector's accumulators, cut from _f64
_ACC_SLICE = re.compile(r"^    (_acc_\w+) = _rows\(_f64, (\d+), (\d+)\)$")


# A split step takes its parameters and their optimizer state as one int64 array of addresses
# (symbp.backends.address): 70 array arguments were a third to a half of a 32-layer step's
# cold compile.
# False: one argument each, as in kernels below the split size (the tests compare the two).
ADDRESS_TABLE = True


def _table(p: Program, rule) -> list:
    """A deep step's address table (``symbp.backends.address``): the parameters, then each
    optimizer buffer of each, as (buffer or None, parameter); empty where a parameter is
    not a matrix of fixed shape (those keep the one-argument-each convention)."""
    fixed = all(is_matrix(w) and all(sp.sympify(d).is_Integer for d in w.shape) for w in p.wrt)
    if not ADDRESS_TABLE or rule is None or not fixed:
        return []
    return [(None, w) for w in p.wrt] + [(b, w) for b in rule.state for w in p.wrt]


def _cut(n: str, w: str, lo: str, hi: str, shape) -> str:
    """The line binding view ``n``: rows lo:hi of workspace block ``w``, or (``shape``
    given) the array at address table entry ``w[lo]``."""
    if shape is None:
        return f"{n} = _rows({w}, {lo}, {hi})"
    return f"{n} = _array({w}[{lo}], {shape}, DT)"


def _stored(lines) -> set:
    """The names that ``lines`` (one indentation level inside a def) bind."""
    tree = cache.parse(textwrap.dedent("\n".join(lines)) or "pass")
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
            and isinstance(n.ctx, ast.Store)}


# a variable of generated code: an identifier not after `.` (X.T's T is an attribute); the
# kernel's text has no strings, so a regex reads it as the tokenizer would, ~20x faster
_IDENT = re.compile(r"(?<![\w.])[A-Za-z_]\w*")


def _code(text: str) -> str:
    """``text`` without its comments (the head comment names the layer: two layers' blocks
    still agree)."""
    return "\n".join(ln.split("#", 1)[0].rstrip() for ln in text.splitlines())


def _names(text) -> list[str]:
    """The variables of ``text`` in order of first appearance (no attributes: ``X.T``'s T)."""
    found = (m[0] for m in _IDENT.finditer(_code(text)))
    return list(dict.fromkeys(n for n in found if not keyword.iskeyword(n)))


def _rename(text, names: dict) -> str:
    """``text``, comments dropped, with its variables renamed (an attribute stays)."""
    return _rename_line(_code(text), names)


def _stages(lines, blocks, known: set, scalars: set, flags, views: dict, kinds: dict
            ) -> tuple[list[str], list[str], list[str]]:
    """The stage functions, the kernel body that calls them, and the views it cuts itself.

    ``lines``: the kernel's body, ``blocks`` its line ranges, one per head (or fused group,
    or parameter update); ``known``: the names bound before the first block (arguments,
    scratch views); ``scalars``: the program's scalar names.  A block reads the arrays and
    scalars it names from the kernel (its arguments, in order of first use), and returns
    the program scalars it binds.  Two blocks the same up to a renaming of their variables
    call one function.

    ``views``: scratch matrices as row ranges of a workspace block
    (``t3 = _rows(_w0, N, 2*N)``).  A stage takes the block and the two row numbers and
    cuts its views itself, compiled once for all its calls (with Numba's own slices, at
    ~40 ms of compile time each, a kernel that cut every view itself took seconds at
    depth 16; ``symbp.backends.views`` made a cut a few instructions).

    ``kinds``: the type of each array a repeated call may take from a tuple (``_roll``)."""
    known = set(known) | set(views)
    first_views, views = views, dict(views)
    funcs: dict = {}  # canonical text -> function name
    bodies: dict = {}  # function name -> (arguments, body text, names local to a copy)
    defs, body, at = [], [], 0
    for start, end in blocks:
        body += lines[at:start]  # lines between blocks stay in the kernel (comments)
        at = end
        block = lines[start:end]
        if not any(ln.strip() and not ln.strip().startswith("#") for ln in block):
            body += block
            continue
        # a fixed accumulator is a slice of _f64 at an offset that differs from layer to
        # layer: cut like a scratch view, from row numbers passed in
        for ln in block:
            m = _ACC_SLICE.match(ln)
            if m:
                views[m[1]] = ("_f64", m[2], m[3], None)
        block = [ln for ln in block if not _ACC_SLICE.match(ln)]
        text = textwrap.dedent("\n".join(block)) + "\n"
        names = _names(text)
        bound = _stored(block)
        args, values, cuts = [], [], []
        for n in names:
            if n in views:
                w, lo, hi, shape = views[n]
                cuts.append(_cut(n, w, f"_lo_{n}", f"_hi_{n}", shape))
                new = [(w, w)] if w not in args else []
                # a bare 11 is typed Literal[int](11): Numba would compile the stage
                # once per distinct row number
                lo, hi = (f"np.int64({x})" if x.isdigit() else x for x in (lo, hi or ""))
                ends = [(f"_hi_{n}", hi)] if shape is None else []
                for a, v in new + [(f"_lo_{n}", lo)] + ends:
                    args.append(a)
                    values.append(v)
            elif n in known:
                args.append(n)
                values.append(n)
        text = "".join(c + "\n" for c in cuts) + text
        names = _names(text)
        rets = [n for n in names if n in bound and n not in views
                and (n in scalars or n in known)]
        # the canonical form: variables named by first appearance; globals (range, DT,
        # _gemm) and sizes printed as numbers keep their text
        local = [n for n in names if n in args or n in bound or n in views]
        canon = {n: f"_c{k}" for k, n in enumerate(local)}
        key = (_rename(text, canon), tuple(canon[n] for n in rets))
        fn = funcs.get(key)
        if fn is None:
            fn = funcs[key] = f"_stage{len(funcs)}"
            fl = flags + (["parallel=True"] if "in prange(" in text else [])
            ret = f"    return {', '.join(rets)}{',' if len(rets) == 1 else ''}" if rets else ""
            defs.append(f"\n@njit({', '.join(fl)})\ndef {fn}({', '.join(args)}):\n"
                        + textwrap.indent(text, "    ") + ret + ("\n" if ret else ""))
            bodies[fn] = (args, text, set(args) | {n for n in names if n in views})
        notes = [ln for ln in block if ln.strip().startswith("#") and ln.startswith("    #")]
        body.append(_Call(fn, values, rets, notes, lines[start:end]))
        known |= set(rets)
    body += lines[at:]
    items = _roll(body, kinds)
    sites = sum(len(x.calls) if isinstance(x, _Loop) else isinstance(x, _Call) for x in items)
    # Stage functions pay where calls share them: Numba compiles each on its own, at
    # 0.15-0.9 s apiece, so a kernel whose stages are mostly distinct stays one function
    # (a small CNN's step: 36 stages for 40 calls compiled in 15.7 s, as one function 9.6 s)
    if sites >= SPLIT_MIN_BLOCKS and len(defs) <= SPLIT_MAX_DISTINCT * sites:
        return defs, [ln for x in items for ln in _lines(x)], []
    # Rolled up, the kernel is small again: one function, each loop running the text of its
    # stages (no calls to compile), the other blocks as they were, reading views cut once
    read = {n for x in items if isinstance(x, _Call)
            for n in _names(textwrap.dedent("\n".join(x.block)))}
    cuts = ["    " + _cut(n, *v) for n, v in first_views.items() if n in read]
    return [], [ln for x in items for ln in _lines(x, bodies)], cuts


# --- loops over repeated calls ----------------------------------------------------------------
# Even with shared stages, a kernel that calls them once per layer grows with the depth: every
# call site is typed, lowered, and LLVM inlines a copy of the stage into it.  A run of calls
# that repeats (forward: product, map; backward: map, product; the updates: W, b) becomes one
# loop over the repetitions, so the kernel's code is the same at depth 8 and 32.  An argument
# that changes from one repetition to the next is either an array taken from a tuple (the
# layers' W) or a row number that moves by the same step each time (``(2 + 2*_l)*N``); a
# run whose arguments are anything else stays as it was.  The same code on the same
# arguments in the same order: the loop computes bit for bit what the calls did.

ROLL_MIN_REPS = 2  # runs repeated fewer times stay as they are
_ROLL_MAX_PERIOD = 8  # calls in one repetition


class _Call:
    """One stage call of the kernel body, ``rets = fn(*values)``: its head comments and
    the block of the one-function kernel it stands for."""

    def __init__(self, fn: str, values: list, rets: list, notes: list, block: list):
        self.fn, self.values, self.rets, self.notes, self.block = fn, values, rets, notes, block

    def lines(self, values=None, indent="    ") -> list[str]:
        call = f"{self.fn}({', '.join(values or self.values)})"
        rets = f"{', '.join(self.rets)}{',' if len(self.rets) == 1 else ''} = " if self.rets else ""
        return [indent + n.strip() for n in self.notes] + [indent + rets + call]


class _Loop:
    """A run of calls as ``for _l in range(reps)``: ``tuples`` bind the arrays the
    repetitions take by ``_l``; ``calls`` are the first repetition's, with its arguments
    written in ``_l``."""

    def __init__(self, reps: int, tuples: list, calls: list, name: str):
        self.reps, self.tuples, self.calls, self.name = reps, tuples, calls, name


@functools.cache
def _affine(text: str):
    """``66*N + 1`` as {"N": 66, "": 1}; np.int64(11) as {"": 11}; None if not of that form."""
    try:
        return _affine_node(cache.parse(text, mode="eval").body)
    except (SyntaxError, ValueError):
        return None


def _affine_node(n):
    if isinstance(n, ast.Constant) and type(n.value) is int:
        return {"": n.value}
    if isinstance(n, ast.Name):
        return {n.id: 1}
    if (isinstance(n, ast.Call) and ast.unparse(n.func) == "np.int64" and len(n.args) == 1
            and not n.keywords):
        return _affine_node(n.args[0])
    if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Add, ast.Sub, ast.Mult)):
        a, b = _affine_node(n.left), _affine_node(n.right)
        if a is None or b is None:
            return None
        if isinstance(n.op, ast.Mult):  # one side must be a number: c*(a*N + b)
            c, t = (a[""], b) if set(a) == {""} else (b[""], a) if set(b) == {""} else (0, None)
            return None if t is None else {k: c * v for k, v in t.items()}
        sign = 1 if isinstance(n.op, ast.Add) else -1
        out = dict(a)
        for k, v in b.items():
            out[k] = out.get(k, 0) + sign * v
        return out
    return None


def _row(text: str, kinds: dict):
    """``text`` as a row number's terms (``_affine``) if it is made of sizes (int64 names
    of ``kinds``) alone: a float or an array is never interpolated."""
    t = _affine(text)
    return t if t is not None and all(kinds.get(x) == "int64" for x in t if x) else None


def _slot_reps(values: list, kinds: dict) -> tuple[int, str]:
    """How many of ``values`` (one argument through the repetitions) a loop can pass, and
    how: 'same' (one text), 'tuple' (arrays of one kind) or 'affine' (a row number made of
    the int64 names of ``kinds``)."""
    same = next((k for k, v in enumerate(values) if v != values[0]), len(values))
    kind = kinds.get(values[0])
    tup = next((k for k, v in enumerate(values) if kind is None or kinds.get(v) != kind),
               len(values))
    aff = 0
    t0, t1 = (_row(v, kinds) for v in (values + values)[:2])
    if len(values) > 1 and t0 is not None and t1 is not None:
        step = {x: t1.get(x, 0) - t0.get(x, 0) for x in {*t0, *t1}}
        aff = next((k for k, v in enumerate(values) if (t := _row(v, kinds)) is None
                    or any(t.get(x, 0) != t0.get(x, 0) + k * step.get(x, 0)
                           for x in {*t, *step})), len(values))
    return max((same, "same"), (tup, "tuple"), (aff, "affine"), key=lambda r: r[0])


def _run_at(items: list, i: int, period: int, kinds: dict) -> int:
    """How many times the ``period`` calls at ``items[i]`` repeat, arguments included."""
    first = items[i:i + period]
    if len(first) < period or not all(isinstance(c, _Call) and not c.rets for c in first):
        return 0
    reps = 1
    while len(items) >= i + (reps + 1) * period and all(
            isinstance(c, _Call) and not c.rets and c.fn == f.fn
            and len(c.values) == len(f.values)
            for c, f in zip(items[i + reps * period:i + (reps + 1) * period], first)):
        reps += 1
    for j, f in enumerate(first):
        for a in range(len(f.values)):
            values = [items[i + r * period + j].values[a] for r in range(reps)]
            reps = min(reps, _slot_reps(values, kinds)[0])
    return reps


def _roll(items: list, kinds: dict) -> list:
    """The kernel body, ``items`` (lines and ``_Call``s), with repeated runs as ``_Loop``s."""
    out, i, made = [], 0, {}
    while i < len(items):
        best = (0, 0)  # (calls covered, period): the longest run, then the shortest period
        for period in range(1, _ROLL_MAX_PERIOD + 1):
            reps = _run_at(items, i, period, kinds)
            if reps >= max(ROLL_MIN_REPS, 2) and (reps * period, -period) > (best[0], -best[1]):
                best = (reps * period, period)
        if not best[0]:
            out.append(items[i])
            i += 1
            continue
        covered, period = best
        out.append(_loop(items[i:i + covered], period, kinds, f"_r{len(out)}", made))
        i += covered
    return out


def _loop(calls: list, period: int, kinds: dict, name: str, made: dict) -> _Loop:
    """``calls`` (a run of ``period`` calls, repeated) as one loop over ``_l``; ``made``:
    the tuples of earlier loops (the backward pass and the updates read the forward's)."""
    reps = len(calls) // period
    tuples, first = [], []
    for j, c in enumerate(calls[:period]):
        values = []
        for a in range(len(c.values)):
            vals = [calls[r * period + j].values[a] for r in range(reps)]
            how = _slot_reps(vals, kinds)[1]
            if how == "same":
                values.append(vals[0])
            elif how == "tuple":  # one tuple per list of arrays, read forward or back
                t = made.get(tuple(vals)) or made.get(tuple(vals[::-1]))
                if t is None:
                    t = made[tuple(vals)] = f"{name}_{j}_{a}"
                    tuples.append(f"{t} = ({', '.join(vals)},)")
                back = made.get(tuple(vals)) != t
                values.append(f"{t}[{reps - 1} - _l]" if back else f"{t}[_l]")
            else:
                values.append(_affine_text(_affine(vals[0]), _affine(vals[1])))
        first.append((c, values))
    return _Loop(reps, tuples, first, name)


def _affine_text(t0: dict, t1: dict) -> str:
    """The row number of repetition ``_l``: t0 + _l*(t1 - t0), as int64 arithmetic."""
    parts = []
    for k in sorted({*t0, *t1}, key=lambda x: (x == "", x)):
        c, d = t0.get(k, 0), t1.get(k, 0) - t0.get(k, 0)
        coef = f"{c}" if c else ""
        if d:
            coef += (" - " if d < 0 else " + ") * bool(c) + ("-" if d < 0 and not c else "")
            coef += "_l" if abs(d) == 1 else f"{abs(d)}*_l"
        if coef:
            parts.append(coef if k == "" else f"({coef})*{k}")
    return " + ".join(parts) or "np.int64(0)"


def _lines(item, bodies=None) -> list[str]:
    """The kernel lines of a body item: calls of the stage functions, or, given their
    ``bodies``, the blocks themselves (a loop runs its stages' text on renamed locals)."""
    if isinstance(item, str):
        return [item]
    if isinstance(item, _Call):
        return item.lines() if bodies is None else item.block
    out = [f"    # {item.reps} repetitions of the next {len(item.calls)} block(s); the "
           "first one's heads shown"]
    out += ["    " + t for t in item.tuples] + [f"    for _l in range({item.reps}):"]
    for j, (c, values) in enumerate(item.calls):
        if bodies is None:
            out += c.lines(values, "        ")
            continue
        args, text, local = bodies[c.fn]
        # a copy's own names: its arguments that the repetitions change, the views it cuts
        ren = {n: f"{item.name}c{j}_{n}" for n in local
               if n not in args or values[args.index(n)] != n}
        out += ["        " + n.strip() for n in c.notes]
        out += [f"        {ren[a]} = {v}" for a, v in zip(args, values) if a in ren]
        out += ["        " + _rename_line(ln, ren) for ln in text.splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
    return out


def _rename_line(line: str, names: dict) -> str:
    """``line`` with its variables renamed (an attribute after `.`, ``X.T``'s T, stays)."""
    return _IDENT.sub(lambda m: names.get(m[0], m[0]), line)


def _bind_in_kernel(p: Program, mats: list, ids: dict, scratch, loops=False,
                    given=False) -> list[str]:
    """A step's sizes come from its inputs' shapes, checked in the kernel.

    Python then hands arrays straight in (no shape tuple to build and look up per call:
    that was half of a W3 step).  A mismatch or a workspace too small raises ValueError
    before anything is written; the caller then runs the full check (``bind_inputs``),
    which names the culprit, or grows the workspace.  ``loops``: inputs of one shape (the
    layers' W of a deep network) are checked by one loop over a tuple of them: a chain of
    a hundred comparisons cost a deep kernel about a second of compile time.  ``mats``:
    the matrix inputs that are arguments (not in the address table: Python checks those).
    ``given``: the sizes are arguments (a gradient or forward kernel, whose output arrays
    Python allocates at those sizes), and the inputs are checked against them."""
    out, checks = [], []
    for d in p.dims if not given else ():
        at = next(((x, k) for x in mats for k in range(len(x.shape)) if x.shape[k] == d), None)
        out.append(f"    {ids[d]} = {ids[at[0]]}.shape[{at[1]}]" if at else f"    {ids[d]} = 0")
        checks.append(f"{ids[d]} == 0")
    groups: dict = {}  # a shape, as printed -> the inputs of that shape
    for x in mats:
        groups.setdefault(tuple(_idx(d, ids) for d in x.shape), []).append(x)
    out.append("    # sizes from the inputs; a mismatch goes back to Python's full check")
    for shape, xs in groups.items():
        if loops and len(xs) >= 3:
            k = len([c for c in checks if c.startswith("_bad")])
            out.append(f"    _shape{k} = ({', '.join(ids[x] for x in xs)},)")
            out.append(f"    _bad{k} = False")
            out.append(f"    for _x in _shape{k}:")
            out.append(f"        _bad{k} |= " + " or ".join(
                f"_x.shape[{i}] != {n}" for i, n in enumerate(shape)))
            checks.append(f"_bad{k}")
            continue
        for x in xs:
            checks += [f"{ids[x]}.shape[{i}] != {n}" for i, n in enumerate(shape)]
    need = sum((sp.Mul(*[sp.sympify(d) for d in b.shape]) for b in scratch), sp.Integer(0))
    checks.append(f"_ws.size < {_idx(need, ids)}")
    rows = [" or ".join(checks[k:k + 4]) for k in range(0, len(checks), 4)]
    out.append(f"    if ({(' or' + chr(10) + '            ').join(rows)}):")
    out.append('        raise ValueError("symbp: input shapes or workspace")')
    return out


# --- the callables ------------------------------------------------------------------------


def _compile(p, dtype, target, rule, options):
    unknown = set(options) - {"boundscheck", "cache", "blas_threads"}
    if unknown:
        raise SymbpError(
            f"unknown option(s) {', '.join(sorted(unknown))} for target {target!r}: "
            "the Numba backends take boundscheck=True/False, cache=True/False and "
            'blas_threads=n or "auto"'
        )
    blas_threads(target, options)  # refuse a bad value before compiling
    p = optimize(p, target=target, rule=rule)
    source, layout = generate(p, dtype, target, rule, options.get("boundscheck", False),
                              options.get("cache", True))
    module = cache.load(source)
    return p, source, layout, getattr(module, layout["name"])


def build(program: Program, dtype=np.float64, target: str = "cpu", **options) -> Kernel:
    """Compile ``program``: ``fn(*inputs, *dims)`` returns ``(value, *grads)``.

    Options: ``boundscheck=True`` (IndexError instead of silent out-of-bounds reads, for
    tests), ``cache=False`` (do not keep machine code on disk), ``blas_threads=n`` (threads
    of the matrix products; "auto", the default, measures 1 against all cores while the
    function is called: see ``symbp.runtime.threads``).  Scratch arrays are kept per batch
    size; returned arrays are fresh for every call.
    """
    dt = np.dtype(dtype)
    p, source, layout, kern = _compile(program, dt, target, None, options)
    return Kernel(fn=gradient_call(p, source, layout, kern, dt, target, options), source=source)


def build_step(program: Program, optimizer, dtype=np.float64, target: str = "cpu",
               **options) -> FusedStep:
    """A training step of the gradient ``program`` with ``optimizer``'s update fused in.

    Used by ``sb.compile_step`` for the 'cpu' and 'parallel' targets.
    """
    if not program.wrt:
        raise SymbpError("build_step needs a gradient Program (sb.gradient_program(f, params))")
    dt = np.dtype(dtype)
    rule = getattr(optimizer, "rule", None)
    if rule is None:
        raise SymbpError(f"unknown optimizer {optimizer!r}: use SGD, Momentum or Adam")
    p, source, layout, kern = _compile(program, dt, target, rule, options)
    return FusedStep(p, source, layout, kern, optimizer, dt, target, options)


def build_update(rule, dtype=np.float64, parts=1, **options):
    """``flat_update(w, G, B, *buffers, f64, t)`` -> all finite, compiled
    (``generate_update``); ``f64`` the float64 hyperparameters and the gradient's scale,
    ``t`` the 1-based step count."""
    source = generate_update(rule, dtype, parts, options.get("cache", True))
    return cache.load(source).flat_update
