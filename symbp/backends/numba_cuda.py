"""The CUDA backend: a Program printed as Numba CUDA kernels plus a host driver.

Each assignment becomes one kernel launch, in program order, on device buffers that are
allocated once per batch size and reused.  A head's ``cuda`` rule (symbp/heads) is its
launch, or "maps"/"scalars" for the heads this module groups into one kernel:

    Elementwise       one kernel per fused group: ``passes.fuse`` composes single-use
                      chains, then consecutive maps of one shape share a kernel (a value
                      used only inside its group stays in a register)
    MatMul            a tiled shared-memory product, one TILE×TILE block per output tile;
                      transposed operands are read transposed, never copied; maps that
                      alone read the product (bias, activation) run in its kernel
    AxisSum           a TILE×TILE block sums a strip of columns (axis 0) or rows (axis 1)
                      with a tree in shared memory; the column sums of a map's value (a
                      bias gradient) are taken in that map's kernel, in the same order
    Total             one block: strided partial sums, then a tree in shared memory
    Softmax, LogSoftmax, SoftmaxCrossEntropy
                      TILE rows per block, TILE threads per row: max, then Σ exp, each
                      reduced by a shared-memory tree (stable: exp(z - max))
    scalar heads      a one-thread kernel per run of consecutive scalar assignments

Scalars live on the device in one small array, so no step waits for the host until the
results are copied back.  float32 discipline (a float64 instruction costs 32-64x on
consumer GPUs): ``math.exp``, never ``np.exp``; every constant printed in the target
dtype; sizes converted before they meet a float; reductions accumulate in the target
dtype with trees, not long sequential sums.  ``tests/cuda_ptx_check.py`` compiles the
float32 kernels to PTX and checks that no ``.f64`` instruction is left.

The generated module is plain text (``Kernel.source``): kernels, the device helpers the
program uses, a ``_SIGNATURES`` table (argument types of every kernel, for ahead-of-time
compiling), ``symbp_cuda_run`` (every launch, on device arrays) and the host driver
``symbp_cuda`` around it.  A training step's module adds ``_update``, the optimizer's rule
(symbp.optim) printed as one kernel over the flat parameter buffer, which
``symbp.runtime.device.DeviceStep`` launches after the run.  This printer shares no code
with the NumPy reference backend, so the tests compare two independent printings.
"""

from __future__ import annotations

import linecache
import re

import numpy
import sympy as sp
from sympy.printing.precedence import PRECEDENCE

from ..errors import SymbpError, UnsupportedError
from ..heads import require, rule
from ..ir import Program
from ..matrix import Elementwise, is_matrix
from ..passes import optimize
from ..runtime import device
from . import Kernel, identifiers
from .scalar import Routines, ScalarPrinter, entry_lines

# Kernel code sees these globals; an IR name spelled like one is renamed (`math` ->
# `math_2`; Python's builtins, `max`, `range`, ..., are avoided by `identifiers` itself).
_RESERVED = {"math", "cuda", "float32", "float64", "int64", "numpy", "symbp_cuda", "warnings",
             "NumbaPerformanceWarning"}

# --- the table: device routines, max, min and one per function row ---------------------
# printed from the rows (scalar.Routines) in the module's dtype _DT
_HELPERS = Routines(lambda names: CudaPrinter("_DT"), "@cuda.jit(device=True)", "_DT")

# Tree reductions over threadIdx.x within one row of a TILE×TILE block (used by the row
# kernels); every thread of the block must call them (they synchronise).
_ROW_TREES = """\
@cuda.jit(device=True)
def _row_sum(sh, v, ty, tx):
    sh[ty, tx] = v
    cuda.syncthreads()
    s = _TILE // 2
    while s > 0:
        if tx < s:
            sh[ty, tx] += sh[ty, tx + s]
        cuda.syncthreads()
        s //= 2
    r = sh[ty, 0]
    cuda.syncthreads()
    return r


# A NaN this max drops still reaches every output of its row: Σ exp(z − max) reads it.
@cuda.jit(device=True)
def _row_max(sh, v, ty, tx):
    sh[ty, tx] = v
    cuda.syncthreads()
    s = _TILE // 2
    while s > 0:
        if tx < s:
            sh[ty, tx] = max(sh[ty, tx], sh[ty, tx + s])
        cuda.syncthreads()
        s //= 2
    r = sh[ty, 0]
    cuda.syncthreads()
    return r
"""

# Fixed kernels: (source, argument kinds); 'M' a matrix, 'V' the scalar vector, 'i' an
# int, 'f' a float of the target dtype.  Row kernels put TILE rows in a block.
_ROW_PROLOGUE = """\
    sh = cuda.shared.array((_TILE, _TILE), _DT)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    i = cuda.blockIdx.x * _TILE + ty
    ok = i < R
    # max and Σ exp(z - max) of row i, each reduced over the row's TILE threads
    m = Z[i, 0] if ok else _DT(0)
    if ok:
        for j in range(tx, C, _TILE):
            m = max(m, Z[i, j])
    m = _row_max(sh, m, ty, tx)
    s = _DT(0)
    if ok:
        for j in range(tx, C, _TILE):
            s += math.exp(Z[i, j] - m)
    s = _row_sum(sh, s, ty, tx)
"""


def _sce_body(also: str) -> str:
    """The rest of a softmax-CE row kernel after ``_ROW_PROLOGUE``: L[i] and Rs[i] from the
    row's max and Σ exp; ``also`` is one more line of the loop over the row's entries."""
    return """\
    tm = _DT(0)
    r = _DT(0)
    if ok:
        for j in range(tx, C, _TILE):
            tm += T[i, j] * (m - Z[i, j])
            r += T[i, j]
""" + also + """\
    tm = _row_sum(sh, tm, ty, tx)
    r = _row_sum(sh, r, ty, tx)
    if tx == 0 and ok:
        L[i, 0] = tm + r * math.log(s)
        Rs[i, 0] = r
"""


_FIXED = {
    "_total": ('''\
@cuda.jit
def _total(M, R, C, S, k, scale):
    """S[k] = scale · Σ M, in one block: strided partial sums, then a tree."""
    sh = cuda.shared.array(_BLOCK, _DT)
    t = cuda.threadIdx.x
    acc = _DT(0)
    for n in range(t, R * C, _BLOCK):
        i = n // C
        acc += M[i, n - i * C]
    sh[t] = acc
    cuda.syncthreads()
    s = _BLOCK // 2
    while s > 0:
        if t < s:
            sh[t] += sh[t + s]
        cuda.syncthreads()
        s //= 2
    if t == 0:
        S[k] = sh[0] * scale
''', "MiiVif"),
    "_axis_sum0": ('''\
@cuda.jit
def _axis_sum0(M, Y, R, C):
    """Y = 1ᵀ M (column sums): a block sums TILE columns, its TILE rows of threads
    stride down them (reads coalesced along the row), then a tree over the rows."""
    sh = cuda.shared.array((_TILE, _PAD), _DT)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    j = cuda.blockIdx.x * _TILE + tx
    acc = _DT(0)
    if j < C:
        for i in range(ty, R, _TILE):
            acc += M[i, j]
    sh[ty, tx] = acc
    cuda.syncthreads()
    s = _TILE // 2
    while s > 0:
        if ty < s:
            sh[ty, tx] += sh[ty + s, tx]
        cuda.syncthreads()
        s //= 2
    if ty == 0 and j < C:
        Y[0, j] = sh[0, tx]
''', "MMii"),
    "_axis_sum1": ('''\
@cuda.jit
def _axis_sum1(M, Y, R, C):
    """Y = M 1 (row sums): TILE rows per block, TILE threads per row, then a tree."""
    sh = cuda.shared.array((_TILE, _TILE), _DT)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    i = cuda.blockIdx.x * _TILE + ty
    acc = _DT(0)
    if i < R:
        for j in range(tx, C, _TILE):
            acc += M[i, j]
    acc = _row_sum(sh, acc, ty, tx)
    if tx == 0 and i < R:
        Y[i, 0] = acc
''', "MMii"),
    "_softmax": ('''\
@cuda.jit
def _softmax(Z, Y, R, C):
    """Y = softmax(Z) row by row, as exp(z - max) / Σ exp(z - max)."""
''' + _ROW_PROLOGUE + '''\
    if ok:
        for j in range(tx, C, _TILE):
            Y[i, j] = math.exp(Z[i, j] - m) / s
''', "MMii"),
    "_log_softmax": ('''\
@cuda.jit
def _log_softmax(Z, Y, R, C):
    """Y = log softmax(Z) row by row, as z - max - log Σ exp(z - max)."""
''' + _ROW_PROLOGUE + '''\
    if ok:
        ls = math.log(s)  # (z - m) - log s: m + log s would round to the spacing of m
        for j in range(tx, C, _TILE):
            Y[i, j] = (Z[i, j] - m) - ls
''', "MMii"),
    "_sce_rows": ('''\
@cuda.jit
def _sce_rows(Z, T, L, Rs, R, C):
    """L[i] = −Σ_j T_ij log softmax(Z_i)_j, the cross-entropy of row i (then _total), as
    Σ_j T_ij (max − Z_ij) + r log Σ_j exp(Z_ij − max) with r = Rs[i] = Σ_j T_ij: exact for
    every T (r = 1 for one-hot rows), and no cancellation of lse against Z at large logits."""
''' + _ROW_PROLOGUE + _sce_body(""), "MMMMii"),
    "_sce_softmax_rows": ('''\
@cuda.jit
def _sce_softmax_rows(Z, T, L, Rs, Y, R, C):
    """_sce_rows, and Y = softmax(Z) (the gradient's) from the same max and Σ exp: one
    pass over the logits instead of two."""
''' + _ROW_PROLOGUE + _sce_body("            Y[i, j] = math.exp(Z[i, j] - m) / s\n"), "MMMMMii"),
    "_transpose": ('''\
@cuda.jit
def _transpose(X, Y, R, C):
    """Y = Xᵀ (Y is R×C)."""
    n = cuda.grid(1)
    if n < R * C:
        i = n // C
        j = n - i * C
        Y[i, j] = X[j, i]
''', "MMii"),
}

_NEEDS_TREES = {"_axis_sum1", "_softmax", "_log_softmax", "_sce_rows", "_sce_softmax_rows"}


def _matmul_loop(ta: bool, tb: bool) -> str:
    """The tiled product's body up to its accumulator ``_acc`` = (op(A) op(B))[_i0 + _ty,
    _j0 + _tx] for arrays ``_A``, ``_B`` and sizes ``_M``×``_N`` (shared ``_K``).

    Each block computes one TILE×TILE tile; per step along K it stages a tile of op(A) and
    of op(B) in shared memory.  Threads load along the stored rows (coalesced): a
    transposed operand's tile is written transposed into shared memory, padded by one
    column so that those writes do not collide in one bank.
    """
    a_load = ("_sA[_tx, _ty] = _A[_k0 + _ty, _i0 + _tx] if (_k0 + _ty < _K and _i0 + _tx < _M) "
              "else _DT(0)" if ta else
              "_sA[_ty, _tx] = _A[_i0 + _ty, _k0 + _tx] if (_i0 + _ty < _M and _k0 + _tx < _K) "
              "else _DT(0)")
    b_load = ("_sB[_tx, _ty] = _B[_j0 + _ty, _k0 + _tx] if (_j0 + _ty < _N and _k0 + _tx < _K) "
              "else _DT(0)" if tb else
              "_sB[_ty, _tx] = _B[_k0 + _ty, _j0 + _tx] if (_k0 + _ty < _K and _j0 + _tx < _N) "
              "else _DT(0)")
    return f'''\
    _sA = cuda.shared.array((_TILE, _PAD), _DT)
    _sB = cuda.shared.array((_TILE, _PAD), _DT)
    _tx = cuda.threadIdx.x
    _ty = cuda.threadIdx.y
    _i0 = cuda.blockIdx.y * _TILE
    _j0 = cuda.blockIdx.x * _TILE
    _acc = _DT(0)
    for _k0 in range(0, _K, _TILE):
        {a_load}
        {b_load}
        cuda.syncthreads()
        for _kk in range(_TILE):
            _acc += _sA[_ty, _kk] * _sB[_kk, _tx]
        cuda.syncthreads()
'''


def _matmul_kernel(ta: bool, tb: bool) -> tuple[str, str]:
    """Cm = op(A) op(B), op(A) M×K, op(B) K×N, with op a transpose where flagged."""
    name = f"_mm_{'t' if ta else 'n'}{'t' if tb else 'n'}"
    text = f"{'Aᵀ' if ta else 'A'} {'Bᵀ' if tb else 'B'}"
    src = (f'@cuda.jit\ndef {name}(_A, _B, _C, _M, _N, _K):\n    """C = {text}, tiled: C is M×N, '
           'the shared dimension is K."""\n' + _matmul_loop(ta, tb)
           + "    if _i0 + _ty < _M and _j0 + _tx < _N:\n"
           "        _C[_i0 + _ty, _j0 + _tx] = _acc\n")
    return name, src


# --- the scalar printer -------------------------------------------------------------------


class CudaPrinter(ScalarPrinter):
    """Scalar expressions as CUDA device code in one dtype (the shared rules:
    ``scalar.ScalarPrinter``).

    Every number prints as ``float32(...)`` (or ``float64``) so nothing promotes, and a
    constant subexpression folds to one such number; integer powers become products;
    symbp's functions call their device routines (printed from their rows);
    ``Heaviside``/``Piecewise``/``sign`` become conditional expressions with
    typed branches.
    """

    helpers = _HELPERS

    def _typed(self, text):
        # the sign outside the call: x + (-7) prints as x - float32(7)
        if text.startswith("-"):
            return "-" + super()._typed(text[1:])
        return super()._typed(text)

    def _print(self, expr, **kwargs):
        # A constant subexpression (sqrt(2), 2*pi) folds to one typed literal.
        if (isinstance(expr, sp.Expr) and expr.is_number and not expr.is_Atom
                and not isinstance(expr, sp.Piecewise)):
            return self._num(float(expr.evalf(20)))
        return super()._print(expr, **kwargs)

    _print_Half = ScalarPrinter._print_Rational

    def _print_Mul(self, e):
        # ½·√2·x prints as one typed constant times x: float32(0.7071067811865476)*x
        nums = [a for a in e.args if a.is_number]
        if not nums or (len(nums) == 1 and nums[0].is_Integer):
            return super()._print_Mul(e)
        c = float(sp.Mul(*nums).evalf(20))
        rest = sp.Mul(*[a for a in e.args if not a.is_number])
        if c == -1:
            return "-" + self.parenthesize(rest, PRECEDENCE["Mul"], strict=True)
        return f"{self._num(c)}*{self.parenthesize(rest, PRECEDENCE['Mul'], strict=True)}"



# --- the generator ------------------------------------------------------------------------


def _ids(program: Program) -> dict:
    names = list(program.inputs) + list(program.dims) + [
        n for a in program.body for n in (a.name, *a.also)]
    return identifiers(names, _RESERVED)


class _Gen:
    """Prints one Program as a CUDA module: kernels first, then the host driver."""

    def __init__(self, program: Program, dtype, tile: int, block: int, fuse: bool):
        self.p = program
        self.dt = numpy.dtype(dtype).name  # 'float32' / 'float64'
        self.tile, self.block, self.fuse = tile, block, fuse
        self.ids = _ids(program)
        self.helpers: set[str] = set()
        self.pr = CudaPrinter(self.dt, self.helpers)
        self.fixed: dict[str, str] = {}  # fixed kernels used, name -> source
        self.kernels: list[str] = []  # per-assignment kernels
        self.sigs: dict[str, str] = {}
        self.driver: list[str] = []
        self.scratch: list[tuple[str, str]] = []  # (buffer, shape source)
        self.unbuffered: set = set()  # map values that never leave their fused kernel
        self.dims = set(program.dims)
        # scalar slots on the device: scalar inputs first (uploaded as one slice)
        scalars = [s for s in program.inputs if not is_matrix(s)]
        self.n_scalar_inputs = len(scalars)
        scalars += [n for a in program.body for n in (a.name, *a.also) if not is_matrix(n)]
        self.slot = {s: k for k, s in enumerate(scalars)}
        self.uses = self._uses()
        self.pos = {a.name: k for k, a in enumerate(program.body)}

    # names ---------------------------------------------------------------------------
    def d(self, name) -> str:
        """The driver's device buffer of a matrix name."""
        return f"_d_{self.ids[name]}"

    def shape_src(self, shape) -> list[str]:
        env = {d: sp.Symbol(self.ids[d]) for d in self.p.dims}
        return [str(sp.sympify(x).xreplace(env)) for x in shape]

    def _uses(self) -> dict:
        """name -> indices of the assignments that read it (outputs count as a read)."""
        from ..ir import _names_in

        uses: dict = {}
        for k, a in enumerate(self.p.body):
            for n in _names_in(a.expr):
                uses.setdefault(n, set()).add(k)
        for o in self.p.outputs:
            uses.setdefault(o, set()).add(len(self.p.body))
        return uses

    def sig(self, kinds: str) -> str:
        t = {"M": f"{self.dt}[:, ::1]", "V": f"{self.dt}[::1]", "i": "int64", "f": self.dt,
             "L": f"{self.dt}[:, ::1]"}
        return "void(" + ", ".join(t[k] for k in kinds) + ")"

    def use_fixed(self, name: str):
        if name not in self.fixed:
            src, kinds = _FIXED[name]
            self.fixed[name] = src
            self.sigs[name] = self.sig(kinds)
            if name in _NEEDS_TREES:
                self.fixed.setdefault("_row_trees", _ROW_TREES)

    # the walk ------------------------------------------------------------------------
    def run(self, update=None) -> str:
        body = list(self.p.body)
        k = 0
        while k < len(body):
            a = body[k]
            how = rule(a.expr).cuda  # "maps", "scalars" or the head's own launch rule
            if how == "maps":
                group = self._group(body, k)
                after = body[k + len(group)] if k + len(group) < len(body) else None
                colsum = after if self._colsum(group, after) else None
                self.elementwise(group, k, colsum)
                k += len(group) + (colsum is not None)
            elif how == "scalars":
                run = [a]
                while (k + len(run) < len(body)
                       and rule(body[k + len(run)].expr).cuda == "scalars"):
                    run.append(body[k + len(run)])
                self.scalars(run)
                k += len(run)
            elif (group := self._epilogue(body, k)) is not None:
                self.elementwise(group, k + 1, product=a)
                k += 1 + len(group)
            else:
                how(self, a)
                k += 1
        return self.module(update)

    def _group(self, body, k) -> list:
        """The maps from body[k] on that share one kernel."""
        group = [body[k]]
        while (self.fuse and k + len(group) < len(body)
               and self._fusable(group, body[k + len(group)])):
            group.append(body[k + len(group)])
        return group

    def _epilogue(self, body, k):
        """The maps after product body[k] that its kernel can compute where it holds each
        entry (bias and activation after a dense layer's product): they alone read the
        product, at their own entry.  None if not (or if a column sum will take them)."""
        a = body[k]
        if not (self.fuse and rule(a.expr).extra.get("cuda_epilogue") and k + 1 < len(body)
                and rule(body[k + 1].expr).cuda == "maps"):
            return None
        group = self._group(body, k + 1)
        end = k + 1 + len(group)
        if (tuple(group[0].expr.shape) != tuple(a.name.shape)
                or not self.uses.get(a.name)
                or any(u not in range(k + 1, end) for u in self.uses[a.name])
                or any(isinstance(x, sp.Transpose) and x.arg == a.name
                       for g in group for x in g.expr.operands)
                or self._colsum(group, body[end] if end < len(body) else None)):
            return None
        return group

    def _colsum(self, group, b) -> bool:
        """b = 1ᵀ M (column sums, a bias gradient) of a member M of the group: the group's
        kernel can sum M where it computes it."""
        into_map = b is not None and rule(b.expr).extra.get("cuda_into_map")
        return bool(self.fuse and into_map and into_map(b.expr)
                    and b.expr.args[0] in {g.name for g in group})

    def _fusable(self, group, b) -> bool:
        """b joins the group if it is a map of the same shape that reads the group's
        values only at its own entry (never transposed)."""
        if rule(b.expr).cuda != "maps":
            return False
        if tuple(b.expr.shape) != tuple(group[0].expr.shape):
            return False
        members = {g.name for g in group}
        return not any(isinstance(x, sp.Transpose) and x.arg in members for x in b.expr.operands)

    # elementwise groups --------------------------------------------------------------
    def elementwise(self, group, k, colsum=None, product=None):
        """One kernel for a group of maps; with ``colsum`` (the next assignment, Y = 1ᵀ M
        of a member M) the kernel also sums the columns, in ``_axis_sum0``'s layout and
        order; with ``product`` (the assignment before, P = op(A) op(B), read by the group
        alone) it is the product's kernel, the maps its epilogue.  Either way one launch
        instead of two, and the value passed on from a register, not memory."""
        shape = tuple(group[0].expr.shape)
        members = {g.name for g in group}
        last = k + len(group) + (colsum is not None)  # the first assignment after the kernel
        # a member is stored if something outside the group reads it
        stored = [g.name for g in group
                  if any(u >= last for u in self.uses.get(g.name, ()))]
        arrays, scal, dims = [], False, []
        loads, body = [], []
        local: dict = {}  # name -> local variable in the kernel
        if product is not None:
            local[product.name] = "_acc"  # the product's entry, in the tiled loop's register

        def operand(x):
            nonlocal scal
            if isinstance(x, sp.Transpose):
                arr = x.arg
                if arr not in arrays:
                    arrays.append(arr)
                i = "_j" if x.shape[0] != 1 else "0"
                j = "_i" if x.shape[1] != 1 else "0"
                if x not in local:
                    local[x] = f"{self.ids[arr]}_T_"
                    loads.append(f"{local[x]} = {self.ids[arr]}[{i}, {j}]")
                return local[x]
            if x in local:
                return local[x]
            if is_matrix(x):
                if x not in arrays:
                    arrays.append(x)
                i = "_i" if x.shape[0] != 1 else "0"
                j = "_j" if x.shape[1] != 1 else "0"
                loads.append(f"{self.ids[x]}_ = {self.ids[x]}[{i}, {j}]")
            elif x in self.dims:
                if x not in dims:
                    dims.append(x)
                loads.append(f"{self.ids[x]}_ = {self.dt}({self.ids[x]})")
            elif x in self.slot:
                scal = True
                loads.append(f"{self.ids[x]}_ = _S[{self.slot[x]}]")
            else:
                raise SymbpError(f"map operand {x} is neither a matrix, a scalar nor a size")
            local[x] = f"{self.ids[x]}_"
            return local[x]

        docs = []
        for g in group:
            e = g.expr
            env = {v: sp.Symbol(operand(x)) for v, x in zip(e.lam.variables, e.operands)}
            expr = e.lam.expr.xreplace(env)
            docs.append(f"{self.ids[g.name]} = {_doc(e, self.ids)}")
            temps, (value,) = sp.cse([expr], symbols=_temps(len(body)), optimizations=None)
            for t, v in temps:
                body.append(f"{t} = {self.pr.doprint(v)}")
            local[g.name] = f"{self.ids[g.name]}_"
            body.append(f"{local[g.name]} = {self.pr.doprint(value)}")
            if g.name in stored:
                body.append(f"{self.ids[g.name]}[_i, _j] = {local[g.name]}")
        arrays = [x for x in arrays if x not in members]
        R, C = self.shape_src(shape)
        name = f"_k_{self.ids[group[0].name]}"
        sums = [colsum.name] if colsum is not None else []
        params = ([self.ids[x] for x in arrays] + [self.ids[x] for x in stored + sums]
                  + (["_S"] if scal else []) + [self.ids[x] for x in dims] + ["_R", "_C"])
        kinds = ("M" * (len(arrays) + len(stored) + len(sums)) + ("V" if scal else "")
                 + "i" * (len(dims) + 2))
        if colsum is not None:
            docs.append(f"{self.ids[colsum.name]} = {_doc(colsum.expr, self.ids)}")
        lines = ["@cuda.jit", f"def {name}({', '.join(params)}):"]
        lines.append(f'    """{"; ".join(docs)}"""')
        if product is not None:  # _mm_*'s tiled loop, then the maps at (_i, _j)
            A, B = product.expr.args
            ta, tb = isinstance(A, sp.Transpose), isinstance(B, sp.Transpose)
            (K,) = self.shape_src([A.shape[1]])
            lines[1] = f"def {name}(_A, _B, {', '.join(params[:-2])}, _M, _N, _K):"
            docs.insert(0, f"{self.ids[product.name]} = {_doc(product.expr, self.ids)}")
            lines[2] = f'    """{"; ".join(docs)}"""'
            lines.append(_matmul_loop(ta, tb).rstrip("\n"))
            lines += ["    _i = _i0 + _ty", "    _j = _j0 + _tx", "    if _i < _M and _j < _N:"]
            lines += [f"        {s}" for s in loads + body]
            grid, block = f"_grid2({R}, {C})", "(_TILE, _TILE)"
            kinds = "MM" + kinds + "i"
            ops = [self.d(x.arg if isinstance(x, sp.Transpose) else x) for x in (A, B)]
        elif colsum is None:
            lines += ["    _n = cuda.grid(1)", "    if _n < _R * _C:",
                      "        _i = _n // _C", "        _j = _n - _i * _C"]
            lines += [f"        {s}" for s in loads + body]
            grid, block = f"_grid1({R} * {C})", "_BLOCK"
        else:  # _axis_sum0's loop and tree, the map's entry computed where it is summed
            lines += ["    _sh = cuda.shared.array((_TILE, _PAD), _DT)",
                      "    _tx = cuda.threadIdx.x", "    _ty = cuda.threadIdx.y",
                      "    _j = cuda.blockIdx.x * _TILE + _tx", "    _acc = _DT(0)",
                      "    if _j < _C:", "        for _i in range(_ty, _R, _TILE):"]
            lines += [f"            {s}" for s in loads + body]
            lines += [f"            _acc += {local[colsum.expr.args[0]]}",
                      "    _sh[_ty, _tx] = _acc", "    cuda.syncthreads()",
                      "    _s = _TILE // 2", "    while _s > 0:", "        if _ty < _s:",
                      "            _sh[_ty, _tx] += _sh[_ty + _s, _tx]",
                      "        cuda.syncthreads()", "        _s //= 2",
                      "    if _ty == 0 and _j < _C:",
                      f"        {self.ids[colsum.name]}[0, _j] = _sh[0, _tx]"]
            grid, block = f"_grid_tiles({C})", "(_TILE, _TILE)"
        self.kernels.append("\n".join(lines) + "\n")
        self.sigs[name] = self.sig(kinds)
        args = ([self.d(x) for x in arrays] + [self.d(x) for x in stored + sums]
                + (["_scalars"] if scal else []) + [self.ids[x] for x in dims] + [R, C])
        if product is not None:
            args = ops + args + [K]
        what = ", ".join(self.ids[g.name] for g in group) + "".join(
            f", {self.ids[x]}" for x in sums)
        if product is not None:
            what = f"{self.ids[product.name]} = {self.doc(product.expr)}; {what}"
            self.unbuffered.add(product.name)
        self.driver.append(f"{name}[{grid}, {block}]({', '.join(args)})  # {what}")
        self.unbuffered |= members - set(stored)

    # runs of scalar assignments -------------------------------------------------------
    def scalars(self, run):
        reads, dims = [], []
        done = {a.name for a in run}
        lines, docs = [], []
        for a in run:
            for n in sorted(a.expr.free_symbols, key=str):
                if n in self.dims and n not in dims:
                    dims.append(n)
                elif n in self.slot and n not in done and n not in reads:
                    reads.append(n)
        env = {n: sp.Symbol(f"{self.ids[n]}_") for n in dims}
        env.update({n: sp.Symbol(self.ids[n]) for n in list(reads) + [a.name for a in run]})
        body = [f"{self.ids[n]} = _S[{self.slot[n]}]" for n in reads]
        body += [f"{self.ids[n]}_ = {self.dt}({self.ids[n]})" for n in dims]
        for a in run:
            docs.append(f"{self.ids[a.name]} = {_doc(a.expr, self.ids)}")
            body.append(f"{self.ids[a.name]} = {self.pr.doprint(a.expr.xreplace(env))}")
            body.append(f"_S[{self.slot[a.name]}] = {self.ids[a.name]}")
        name = f"_k_{self.ids[run[0].name]}"
        params = ["_S"] + [self.ids[n] for n in dims]
        lines = ["@cuda.jit", f"def {name}({', '.join(params)}):", f'    """{"; ".join(docs)}"""',
                 "    if cuda.grid(1) == 0:"]
        lines += [f"        {s}" for s in body]
        self.kernels.append("\n".join(lines) + "\n")
        self.sigs[name] = self.sig("V" + "i" * len(dims))
        args = ["_scalars"] + [self.ids[n] for n in dims]
        what = ", ".join(self.ids[a.name] for a in run)
        self.driver.append(f"{name}[1, 1]({', '.join(args)})  # {what}")

    # what the heads' launch rules (symbp/heads) print with ----------------------------
    def matmul_kernel(self, ta: bool, tb: bool) -> str:
        """The tiled product kernel for op(A) op(B), op a transpose where flagged."""
        name, src = _matmul_kernel(ta, tb)
        if name not in self.fixed:
            self.fixed[name] = src
            self.sigs[name] = self.sig("MMMiii")
        return name

    def doc(self, e) -> str:
        return _doc(e, self.ids)

    # the module ----------------------------------------------------------------------
    def module(self, update=None) -> str:
        """The module text; ``update`` (an optimizer's rule) adds its flat ``_update``
        kernel, which a device-resident training step launches after ``symbp_cuda_run``."""
        p, ids = self.p, self.ids
        # the device arrays a call reads and writes: the matrix inputs, then the matrix
        # values that are outputs (the gradients); a training step passes its own (views
        # of its flat parameter and gradient buffers), a host call its copies
        ins = [s for s in p.inputs if is_matrix(s)]
        made = {n for a in p.body for n in (a.name, *a.also)}
        outs = list(dict.fromkeys(o for o in p.outputs if is_matrix(o) and o in made))
        io = ins + outs
        mats = [n for a in p.body for n in (a.name, *a.also)
                if is_matrix(n) and n not in self.unbuffered and n not in outs]
        dims = [ids[d] for d in p.dims]
        key = "(" + "".join(f"{d}, " for d in dims) + ")"

        def alloc(shape):
            return f"cuda.device_array(({', '.join(shape)},), _HT)"

        allocs = [alloc(self.shape_src(n.shape)) for n in mats]
        allocs += [f"cuda.device_array({shape}, _HT)" for _, shape in self.scratch]
        allocs.append(f"cuda.device_array({max(len(self.slot), 1)}, _HT)")
        names = [self.d(n) for n in mats] + [b for b, _ in self.scratch] + ["_scalars"]

        out = [_HEADER.format(dt=self.dt, tile=self.tile, block=self.block)]
        if update is not None:  # a training step's kernels
            self.kernels += [self.update_kernel(update), _GATHER]
            self.sigs["_gather"] = f"void({self.dt}[:, ::1], int64[::1], {self.dt}[:, ::1])"
        out += [_HELPERS[h] for h in sorted(self.helpers)]
        trees = self.fixed.pop("_row_trees", None)  # device functions before their callers
        out += ([trees] if trees else []) + list(self.fixed.values()) + self.kernels
        sigs = "".join(f"    {k!r}: {v!r},\n" for k, v in self.sigs.items())
        out.append("# argument types of every kernel, for ahead-of-time compiling "
                   "(cuda.compile_ptx)\n_SIGNATURES = {\n" + sigs + "}\n")
        out.append(self.layout(ins, outs))

        lines = [*_sized("_buffers", dims, key, allocs, names,
                         "Scratch device buffers for one set of sizes: allocated once, then "
                         "reused."), "", "",
                 *_sized("_io", dims, key, [alloc(self.shape_src(n.shape)) for n in io],
                         [self.d(n) for n in io],
                         "The device copies of a host call's matrix inputs and outputs."),
                 "", ""]
        run = [self.d(n) for n in io] + dims
        lines += [f"def symbp_cuda_run({', '.join(run)}):",
                  '    """Every kernel of one call, in order, on device arrays: the matrix '
                  'inputs, then\n    the matrix outputs (written in place).  Returns the '
                  'device scalars."""',
                  "    (", *_wrap(names, "        "), f"    ) = _buffers({', '.join(dims)})"]
        lines += [f"    {s}" for s in self.driver]
        lines += ["    return _scalars", "", ""]

        params = [ids[s] for s in p.inputs] + dims
        lines += [f"def symbp_cuda({', '.join(params)}):",
                  '    """Host arrays in, host arrays out: copies around symbp_cuda_run."""']
        if io:
            lines += ["    (", *_wrap([self.d(n) for n in io], "        "),
                      f"    ) = _io({', '.join(dims)})"]
        for s in ins:
            lines.append(f"    {self.d(s)}.copy_to_device({ids[s]})")
        lines.append(f"    _scalars = _buffers({', '.join(dims)})[-1]")
        if self.n_scalar_inputs:
            vals = ", ".join(ids[s] for s in p.inputs if not is_matrix(s))
            lines.append(f"    _scalars[:{self.n_scalar_inputs}].copy_to_device("
                         f"numpy.array([{vals}], _HT))")
        lines.append(f"    symbp_cuda_run({', '.join(run)})")
        results = []
        if any(not is_matrix(o) and o in self.slot for o in p.outputs):
            lines.append("    _h = _scalars.copy_to_host()")
        for o in p.outputs:
            if is_matrix(o):
                results.append(f"{self.d(o)}.copy_to_host()")
            elif o in self.slot:
                results.append(f"_HT(_h[{self.slot[o]}])")
            elif o in self.dims:
                results.append(f"_HT({ids[o]})")
            else:
                results.append(f"_HT({float(o)!r})")
        lines.append(f"    return ({', '.join(results)},)")
        out.append("_cache = {}\n\n\n" + "\n".join(lines) + "\n")
        return "\n\n".join(out)

    def layout(self, ins, outs) -> str:
        """What a caller of ``symbp_cuda_run`` needs to know, as module constants."""
        p = self.p
        where = []  # each output of the program: where its value is after a run
        for o in p.outputs:
            if o in outs:
                where.append(("run", outs.index(o)))
            elif o in self.slot:
                where.append(("slot", self.slot[o]))
            elif o in p.inputs:
                where.append(("input", p.inputs.index(o)))
            else:
                where.append(("const", float(o) if not is_matrix(o) else 0.0))
        scal = [str(s) for s in p.inputs if not is_matrix(s)]
        return ("# symbp_cuda_run's calling convention: its matrix inputs by name, the scalar "
                "inputs\n# (in _scalars[:n]), where each output of the program lies after a "
                "run, and\n# how many kernels one run launches\n"
                f"_RUN_INPUTS = {tuple(str(s) for s in ins)!r}\n"
                f"_SCALAR_INPUTS = {tuple(scal)!r}\n"
                f"_OUTPUTS = {tuple(where)!r}\n"
                f"_LAUNCHES = {len(self.driver)}\n"
                f"_N_SLOTS = {max(len(self.slot), 1)}\n")

    def update_kernel(self, rule) -> str:
        """``_update``: the optimizer's rule (symbp.optim) on every entry of the flat
        parameter buffer, with the step's log: ``L[s] = (loss, 1 if an entry is not
        finite)``.  The hyperparameters and per-step scalars come as arguments, rounded
        to the dtype once per step on the host (as the CPU step rounds them)."""
        bufs = [f"_{b}_w" for b in rule.state]
        scalars = [f"_opt_{h}" for h in rule.hyper] + [f"_opt_{s}" for s, _ in rule.per_step]
        refs = {rule.w: "w[_i]", **{sp.Symbol(b): f"_{b}_w[_i]" for b in rule.state}}

        def expr(e, names):
            return self.pr.doprint(e.xreplace({x: sp.Symbol(n) for x, n in names.items()}))

        body = entry_lines(rule, rule.update, refs, "g[_i]", expr)
        params = ["w", "_B", "g", *bufs, *scalars, "_n", "_S", "_slot", "_L", "_s"]
        lines = ["@cuda.jit", f"def _update({', '.join(params)}):",
                 '    """The optimizer\'s update of every parameter entry (one flat buffer), '
                 "each first\n    kept in B (the guard\'s backup); L[s, 0] = the loss, "
                 'L[s, 1] = 1 when an updated\n    entry is not finite."""',
                 "    _i = cuda.grid(1)",
                 "    if _i == 0:",
                 "        _L[_s, 0] = _S[_slot]",
                 "    if _i < _n:",
                 "        _B[_i] = w[_i]",
                 *[f"        {ln}" for ln in body],
                 "        if not math.isfinite(w[_i]):",
                 "            _L[_s, 1] = _DT(1)"]
        kinds = "VVV" + "V" * len(bufs) + "f" * len(scalars) + "iVi" + "L" + "i"
        self.sigs["_update"] = self.sig(kinds)
        return "\n".join(lines) + "\n"


# the epoch's shuffle of training data kept on the device
_GATHER = '''\
@cuda.jit
def _gather(X, idx, Y):
    """Y[r, c] = X[idx[r], c]: one thread per entry."""
    n = cuda.grid(1)
    if n < Y.shape[0] * Y.shape[1]:
        r = n // Y.shape[1]
        Y[r, n - r * Y.shape[1]] = X[idx[r], n - r * Y.shape[1]]
'''


def _sized(fn, dims, key, allocs, names, doc) -> list[str]:
    """A function of the sizes returning device arrays made once per set of sizes."""
    return [f"def {fn}({', '.join(dims)}):", f'    """{doc}"""',
            f"    key = {key}",
            f"    got = _cache.get(('{fn}', key))",
            "    if got is None:",
            "        if len(_cache) >= 8:  # a few batch sizes (e.g. the last, short batch)",
            "            _cache.clear()",
            f"        got = _cache[('{fn}', key)] = (",
            *[f"            {a},  # {n}" for a, n in zip(allocs, names)],
            "        )",
            "    return got"]


_HEADER = '''\
# Generated by symbp (target "cuda"): kernels, then the host driver symbp_cuda.
import math
import warnings

import numpy
from numba import cuda, float32, float64, int64  # noqa: F401  (kernels use the dtype names)
from numba.core.errors import NumbaPerformanceWarning

# Small batches launch small grids on purpose; Numba would warn at every such launch.
warnings.filterwarnings("ignore", message="Grid size", category=NumbaPerformanceWarning)

_DT = {dt}  # the kernels' dtype: every constant and shared array is {dt}
_HT = numpy.{dt}
_TILE = {tile}  # matmul tile and reduction block edge (a power of two)
_PAD = {tile} + 1  # padded shared rows: column reads hit distinct banks (a constant for Numba)
_BLOCK = {block}  # threads per block of 1-D kernels (a power of two)


def _grid1(n):
    return ((n + _BLOCK - 1) // _BLOCK,)


def _grid2(rows, cols):
    return ((cols + _TILE - 1) // _TILE, (rows + _TILE - 1) // _TILE)


def _grid_tiles(n):
    return ((n + _TILE - 1) // _TILE,)
'''


def _wrap(names, indent, width=92) -> list[str]:
    """``a, b, c,`` broken into lines of at most ``width`` characters."""
    lines, cur = [], indent
    for n in names:
        if len(cur) + len(n) + 2 > width and cur.strip():
            lines.append(cur.rstrip())
            cur = indent
        cur += f"{n}, "
    return lines + [cur.rstrip()]


def _temps(start: int):
    k = start
    while True:
        yield sp.Symbol(f"_c{k}")
        k += 1


def _doc(e, ids) -> str:
    """A one-line reading of an assignment's head for comments and docstrings."""
    if isinstance(e, Elementwise):
        env = {v: sp.Symbol(ids.get(x, str(x)) if not isinstance(x, sp.Transpose)
                            else ids[x.arg] + "ᵀ")
               for v, x in zip(e.lam.variables, e.operands)}
        return sp.sstr(e.lam.expr.xreplace(env))
    text = sp.sstr(e.xreplace({n: sp.Symbol(s) for n, s in ids.items()
                               if not is_matrix(n)}))
    for n, s in ids.items():  # matrix names print as their identifiers
        if is_matrix(n) and str(n) != s:
            text = re.sub(rf"\b{re.escape(str(n))}\b", s, text)
    return text.replace('"', "'")


def _power_of_two(name, v) -> int:
    v = int(v)
    if v < 1 or v & (v - 1):
        raise SymbpError(f"CUDA option {name}={v} must be a power of two (the tree reductions "
                         "halve it)")
    return v


def generate(program: Program, dtype=numpy.float32, tile: int = 16, block: int = 256,
             fuse: bool = True, update=None) -> str:
    """The CUDA module source for ``program`` (no Numba needed to generate it); with
    ``update`` (an optimizer's ``Rule``) also its ``_update`` kernel."""
    dtype = numpy.dtype(dtype)
    if dtype not in (numpy.float32, numpy.float64):
        raise SymbpError(f"the CUDA backend computes in float32 or float64, not {dtype}")
    tile, block = _power_of_two("tile", tile), _power_of_two("block", block)
    if tile * tile > 1024:
        raise SymbpError(f"CUDA option tile={tile}: a block of tile² = {tile * tile} threads "
                         "exceeds CUDA's 1024")
    if block > 1024:
        raise SymbpError(f"CUDA option block={block} exceeds CUDA's 1024 threads per block")
    if fuse:  # compose single-use chains of maps first (passes.fuse), drop dead code
        program = optimize(program, target="cuda")
    require(program, "cuda")
    nd = next((a for a in program.body if is_matrix(a.name) and len(a.name.shape) != 2), None)
    if nd is not None:
        raise UnsupportedError(
            f"the CUDA backend computes with matrices only, and {nd.name} = {nd.expr} is a "
            f"{len(nd.name.shape)}-D array: compile this program for 'cpu', 'parallel' or "
            "'numpy'")
    return _Gen(program, dtype, tile, block, fuse).run(update)


def load(source: str) -> dict:
    """Execute a generated module (kernels are compiled lazily, at their first launch)."""
    filename = f"<symbp-cuda-{abs(hash(source)):x}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns: dict = {"__name__": "symbp_cuda_generated"}
    exec(compile(source, filename, "exec"), ns)  # our own generated source, never user text
    return ns


def _options(tile=None, block=None, fuse=True, **options) -> dict:
    if options:
        raise SymbpError(f"unknown CUDA options {sorted(options)}: use tile, block, fuse")
    from numba import config

    # Numba's simulator runs one Python thread per CUDA thread: small blocks there
    small = config.ENABLE_CUDASIM
    return {"tile": tile or (4 if small else 16), "block": block or (8 if small else 256),
            "fuse": fuse}


def build(program: Program, dtype=numpy.float32, target: str = "cuda", **options) -> Kernel:
    """Compile ``program`` for Numba CUDA.

    ``fn(*inputs, *dims)`` takes host arrays and returns host arrays ``(loss, *grads)``
    (fresh copies); device buffers are kept per batch size (the last four sizes), so one
    compiled function must not be called from two threads at once.

    Options: ``tile`` (matmul tile and reduction block edge, a power of two,
    tile² ≤ 1024; 16), ``block`` (threads of 1-D kernels; 256; in Numba's simulator the
    defaults are 4 and 8) and
    ``fuse`` (``passes.optimize`` first, then consecutive same-shape maps share one
    kernel; ``fuse=False`` gives one kernel per assignment, for debugging).
    """
    source = generate(program, dtype, **_options(**options))
    device.cuda()  # no GPU: one line saying so, before any kernel is compiled
    return Kernel(fn=device.host_call(load(source)), source=source)


def build_step(program: Program, optimizer, dtype=numpy.float32, target: str = "cuda",
               **options):
    """A training step whose parameters, gradients and optimizer buffers stay on the
    device (``symbp.runtime.device.DeviceStep``): the program's kernels, then one
    ``_update`` kernel over the flat parameter buffer.  Used by ``sb.compile_step``.

    None for a program with a scalar parameter, or a parameter whose shape depends on a
    size: ``compile_step`` then takes the gradient call and the NumPy update.
    """
    opts = _options(**options)
    rule_ = getattr(optimizer, "rule", None)
    if rule_ is None:
        raise SymbpError(f"unknown optimizer {optimizer!r}: use SGD, Momentum or Adam")
    if any(not is_matrix(w) or not all(sp.sympify(d).is_Integer for d in w.shape)
           for w in program.wrt):
        return None
    source = generate(program, dtype, update=rule_, **opts)
    device.cuda()
    ns = load(source)
    if ns["_OUTPUTS"][0][0] != "slot":
        raise UnsupportedError(f"the loss {program.outputs[0]} is not computed on the device: "
                               "compile this step for 'cpu'")
    return device.DeviceStep(program, source, ns, optimizer, dtype, opts["block"])
