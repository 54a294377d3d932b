"""The public entry points: ``grad``, ``compile`` and ``gradcheck``."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter, itemgetter

import numpy as np
import sympy as sp

from . import warm
from .backends import backend
from .errors import InputError, ShapeError, SymbpError
from .grad import grad as grad_pass
from .ir import Program, check_names, lower, verify
from .matrix import Constant, is_matrix


def wrt_tuple(wrt) -> tuple[tuple, bool]:
    """``(symbols, single)``: what to differentiate by, checked; ``single`` when one
    symbol was passed (the result is then one gradient, not a tuple)."""
    # Anything that is not a sequence (a number, a str, an expression) is one culprit:
    # report it by name below rather than letting tuple() fail with "not iterable".
    single = isinstance(wrt, (sp.Basic, str)) or not hasattr(wrt, "__iter__")
    items = (wrt,) if single else tuple(wrt)
    for w in items:
        if not isinstance(w, (sp.Symbol, sp.MatrixSymbol)):
            raise SymbpError(
                f"cannot differentiate with respect to {w!r}: pass a sympy Symbol or "
                "MatrixSymbol (or a sequence of them)"
            )
    return items, single


def _scalar_loss(f):
    # strict: never parse a string (sympify would eval it) or take lists as a loss
    try:
        f = sp.sympify(f, strict=True)
    except sp.SympifyError:
        raise SymbpError(
            f"the loss must be a SymPy expression, not {type(f).__name__} {f!r}: build it "
            "from sympy Symbols / MatrixSymbols (symbp never parses strings)"
        ) from None
    if not isinstance(f, sp.Expr) and not is_matrix(f):
        raise SymbpError(f"the loss must be a scalar expression, not {type(f).__name__} {f}")
    if is_matrix(f):
        raise SymbpError(
            f"the loss must be a scalar, but {f} is a {f.shape[0]}×{f.shape[1]} matrix: "
            "reduce it with a loss (sb.mse, sb.cross_entropy, ...) or symbp.matrix.Total"
        )
    return f


def gradient_program(f, wrt) -> Program:
    """Lower ``f`` and apply the reverse pass: the ordered-derivative Program."""
    items, _ = wrt_tuple(wrt)
    p = verify(lower(_scalar_loss(f)))
    check_names(p, items)
    return grad_pass(p, items)


def raise_to_sympy(p: Program) -> dict:
    """Inline a Program back into SymPy expressions, one per assigned name."""
    # a constant input (Identity, a Matrix of numbers) reads as the constant it stands for
    env: dict = {c: c.value for c in p.inputs if isinstance(c, Constant)}
    for a in p.body:
        env[a.name] = a.expr.xreplace(env) if env else a.expr
    return env


def grad(f, wrt):
    """∂f/∂wrt as SymPy expression(s), by ordered derivatives.

    ``wrt`` is one Symbol/MatrixSymbol (returns one expression) or a sequence (returns a
    tuple).  A MatrixSymbol's gradient is a matrix expression of its shape.
    """
    items, single = wrt_tuple(wrt)
    p = gradient_program(f, items)
    env = raise_to_sympy(p)
    out = tuple(env.get(g, g) for g in p.outputs[1:])
    out = tuple(
        sp.ZeroMatrix(*w.shape) if is_matrix(w) and not is_matrix(g) else g
        for w, g in zip(items, out)
    )
    return out[0] if single else out


# What a call's array must match to skip the full check: the exact class (the full check
# reads a subclass, a masked array say, as a plain array), shape, dtype, and C-contiguous +
# aligned + writeable in one flag (``carray``).  A C-level getter: no Python frame per array.
_SIG = attrgetter("__class__", "shape", "dtype", "flags.carray")
# Python and NumPy floats: a scalar input the fast path converts as the full check does
_FLOATS = (float, np.float32, np.float64)


def same_dtypes(arrays, dtype: np.dtype) -> bool:
    """Whether every one of ``arrays`` has dtype ``dtype`` (byte order included).

    Calls that skip the full check ask this of every array they hand to Numba directly:
    Numba's dispatch alone can read a byte-swapped float32 array as a native one.  It
    remembers array types by a fingerprint that leaves byte order and alignment out, so
    once any misaligned float32 array has been typed in the process, a big-endian one of
    the same rank and layout passes as float32 and its bytes are read as garbage.  (A
    loop: ~2,500 instructions for six arrays, against ~3,700 for comparing a list of
    their dtypes.)"""
    for x in arrays:
        d = x.dtype
        if d is not dtype and d != dtype:
            return False
    return True


@dataclass
class _Bound:
    """A binding that passed ``bind_inputs``: the same arrays again need no check."""

    sigs: list  # _SIG of each matrix input, as converted
    tail: list  # the sizes' values, the kernel's last arguments
    consts: dict  # position in the arguments -> the constant's array at these sizes
    call: object  # the kernel's call at these sizes (``fn.at``) taking the matrices, or None


@dataclass
class Forward:
    """A compiled forward program: ``fn(**arrays)`` returns the expression's value."""

    program: Program
    target: str
    dtype: np.dtype
    kernel: object

    def __post_init__(self):
        ins = self.program.inputs
        # the fast path of ``bind``: matrix inputs are checked by _SIG, in program order;
        # scalars and constants (rare) are placed by ``_place``
        self._mat_at = [k for k, s in enumerate(ins)
                        if is_matrix(s) and not isinstance(s, Constant)]
        self._mats = [ins[k].name for k in self._mat_at]
        self._scalars = {k: s.name for k, s in enumerate(ins)
                         if not is_matrix(s) and not isinstance(s, Constant)}
        self._n_names = len(self._mats) + len(self._scalars)
        # a call's matrices, in one C-level call (itemgetter of one name gives no tuple)
        mats = self._mats
        self._take = (itemgetter(*mats) if len(mats) > 1 else
                      (lambda d: (d[mats[0]],)) if mats else (lambda d: ()))
        self._plain = not self._scalars and not any(isinstance(s, Constant) for s in ins)
        self._at = getattr(self.kernel.fn, "at", None) if self._plain else None
        self._last: _Bound | None = None

    @property
    def source(self) -> str:
        return self.kernel.source

    @property
    def input_names(self) -> list[str]:
        """The arrays a call takes (constants such as Identity(k) are bound already)."""
        return [s.name for s in self.program.inputs if not isinstance(s, Constant)]

    def bind(self, arrays: dict) -> list:
        """The kernel's positional arguments for ``arrays``, checked (``bind_inputs``).

        The check runs in full once; calls whose arrays then match it (the same names,
        and per array the same class, shape and dtype, C-contiguous, aligned and
        writeable) skip it: for such arrays the check converts nothing and binds the
        same sizes, so its answer is known.  Anything else takes the full check, which
        converts or names the culprit.
        """
        last = self._last
        if last is not None:
            xs = self._matching(arrays, last)
            if xs is not None:
                if self._plain:
                    return [*xs, *last.tail]
                args = self._place(xs, arrays, last)
                if args is not None:
                    return args
        args = bind_inputs(self.program, arrays, self.dtype)
        ins = self.program.inputs
        tail = args[len(ins):]
        self._last = _Bound(
            sigs=[_SIG(args[k]) for k in self._mat_at], tail=tail,
            # copies: the arrays of this call are the kernel's, which may return them
            consts={k: x.copy() for k, (s, x) in enumerate(zip(ins, args))
                    if isinstance(s, Constant)},
            call=self._at(tuple(tail)) if self._at is not None else None)
        return args

    def _matching(self, arrays, last):
        """The matrices of ``arrays`` in program order when they match ``last`` (see
        ``bind``), else None."""
        if len(arrays) != self._n_names:
            return None
        try:
            xs = self._take(arrays)
            return xs if list(map(_SIG, xs)) == last.sigs else None
        except Exception:  # another name, or not an array: the full check names it
            return None

    def _place(self, xs, arrays, last):
        """The arguments in program order when scalars or constants sit between the
        matrices; None when a scalar is missing or not a plain float (the full check
        decides)."""
        args, it = [], iter(xs)
        for k in range(len(self.program.inputs)):
            if k in last.consts:  # a fresh copy, as the full check builds one per call
                args.append(last.consts[k].copy())
            elif k in self._scalars:
                v = arrays.get(self._scalars[k])  # None: a name missing
                if type(v) not in _FLOATS:
                    return None
                args.append(self.dtype.type(v))
            else:
                args.append(next(it))
        return args + last.tail

    def _again(self, arrays):
        """What the kernel's call at the last checked sizes returns for ``arrays``, or
        None when they need the full check (``bind``).

        Python checks the dtypes alone (``same_dtypes``); the call refuses, before the
        kernel writes anything, an array that is not C-contiguous, writeable and of the
        checked rank and sizes (Numba's dispatch checks the types, the kernel the shapes:
        ``runtime.step.gradient_call``), and the full check then converts it or names the
        culprit.  A misaligned array is read where it lies, as Numba reads it (the full
        check copies it)."""
        last = self._last
        if last is None or last.call is None or len(arrays) != self._n_names:
            return None
        try:
            xs = self._take(arrays)
            return last.call(*xs) if same_dtypes(xs, self.dtype) else None
        except Exception:  # a name missing, another type or size: the full check decides
            return None

    # positional-only: a symbol may be named `self` (or anything else) and still be passed
    # by name
    def __call__(self, /, **arrays):
        out = self._again(arrays)
        return (out if out is not None else self.kernel.fn(*self.bind(arrays)))[0]


class Compiled(Forward):
    """A compiled loss-and-gradient function: ``value, grads = fn(**arrays)``."""

    def __post_init__(self):
        super().__post_init__()
        self._wrt_names = [w.name for w in self.wrt]
        # a kernel whose results are already dtype scalars and fresh arrays of the right
        # shapes (``runtime.step.gradient_call``) needs no conversion per call
        self._shaped = getattr(self.kernel.fn, "shaped", False)

    @property
    def wrt(self) -> tuple:
        return self.program.wrt

    def __call__(self, /, **arrays):
        out = self._again(arrays)
        if out is not None:  # arrays like the last checked ones: the kernel's call
            return float(out[0]), dict(zip(self._wrt_names, out[1:]))
        out = self.kernel.fn(*self.bind(arrays))
        if self._shaped:
            return float(out[0]), dict(zip(self._wrt_names, out[1:]))
        loss, grads = out[0], out[1:]
        return float(loss), {w.name: _shaped(g, w, self.dtype) for w, g in zip(self.wrt, grads)}


def _shaped(g, w, dtype):
    return np.asarray(g, dtype=dtype) if is_matrix(w) else dtype.type(g)


def compile(f, wrt, target: str = "numpy", dtype=np.float64, **options) -> Compiled:
    """Compile the loss ``f`` and its gradient w.r.t. ``wrt`` for ``target``.

    Targets: 'numpy' (reference), 'cpu', 'parallel' (Numba), 'cuda'.  The call
    ``fn(**arrays)`` takes every input symbol by name and returns ``(value, grads)``.
    """
    dtype = _float_dtype(dtype)
    p = gradient_program(f, wrt)
    kernel = backend(target).build(p, dtype=dtype, target=target, **options)
    return Compiled(p, target, dtype, kernel)


def _float_dtype(dtype) -> np.dtype:
    try:
        d = np.dtype(dtype)
    except TypeError:
        d = None
    if d not in (np.float32, np.float64):
        raise SymbpError(f"dtype must be float32 or float64, not {dtype!r}")
    return d


def compile_forward(expr, target: str = "numpy", dtype=np.float64, **options) -> Forward:
    """Compile the value of ``expr`` alone (predictions, logits) for ``target``."""
    dtype = _float_dtype(dtype)
    p = verify(lower(expr))
    kernel = backend(target).build(p, dtype=dtype, target=target, **options)
    return Forward(p, target, dtype, kernel)


class Step:
    """One training step: forward, backward and the optimizer update, parameters in place.

    ``loss = step(params, **data)`` where ``params`` maps names to arrays of ``dtype``
    that are updated in place; ``step.state`` holds the optimizer buffers.  This is the
    reference implementation (gradient call, then ``optim.update``); backends that fuse
    the update provide ``build_step``.
    """

    def __init__(self, fn: Compiled, optimizer):
        from . import optim

        self.fn, self.optimizer, self._optim = fn, optimizer, optim
        self.state = None

    @property
    def source(self) -> str:
        return self.fn.source

    def __call__(self, params: dict, /, **data) -> float:
        if self.state is None:
            self.state = self._optim.init_state(self.optimizer, params)
        loss, grads = self.fn(**params, **data)
        self._optim.update(self.optimizer, params, grads, self.state)
        return loss


def compile_step(f, params, optimizer, target: str = "numpy", dtype=np.float64, **options):
    """Compile a training step of loss ``f`` over ``params`` with ``optimizer``.

    A backend whose module defines ``build_step`` fuses the update into the compiled
    call; otherwise (or where it returns None) the step is the gradient call followed by
    the NumPy update.
    """
    mod = backend(target)
    if hasattr(mod, "build_step"):
        dtype = _float_dtype(dtype)
        items, _ = wrt_tuple(params)
        # the passes run unless a record of this very step is in the disk cache
        step = warm.build_step(mod, _scalar_loss(f), items, optimizer, dtype, target, options)
        if step is not None:  # None: this backend fuses no update into this program
            return step
    return Step(compile(f, params, target=target, dtype=dtype, **options), optimizer)


def bind_inputs(p: Program, arrays: dict, dtype) -> list:
    """Check the arrays against the program's symbols; bind dims; return positional args.

    Documented conversion: numeric arrays (ints, bools, other float widths) are converted
    to ``dtype`` and made C-contiguous; anything else is an error naming the input.
    """
    dtype = np.dtype(dtype)
    # constants (Identity(k), a Matrix of numbers) are bound here, once the sizes are known
    names = {s.name: s for s in p.inputs if not isinstance(s, Constant)}
    missing = [n for n in names if n not in arrays]
    extra = [n for n in arrays if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(extra)}")
        raise InputError(
            f"{'; '.join(parts)}: this function takes exactly {', '.join(names) or 'nothing'}"
        )
    dims: dict = {}
    args = []
    for s in p.inputs:
        if isinstance(s, Constant):
            args.append(s)  # its array, once the sizes are bound
            continue
        name = s.name
        x = arrays[name]
        if is_matrix(s):
            x = _as_array(name, x, dtype)
            if x.ndim != len(s.shape):
                raise ShapeError(
                    f"{name} must be a {len(s.shape)}-D array of shape {s.shape}, got shape "
                    f"{x.shape}"
                )
            for axis, (d, n) in enumerate(zip(s.shape, x.shape)):
                _bind_dim(name, axis, sp.sympify(d), n, dims, len(s.shape))
        else:
            x = _as_array(name, x, dtype)
            if x.ndim != 0:
                raise ShapeError(f"{name} is a scalar symbol but got an array of shape {x.shape}")
            x = dtype.type(x)
        args.append(x)
    for d in p.dims:
        if d not in dims:
            raise InputError(f"size {d} is not bound by any input array")
        if dims[d] == 0:
            raise ShapeError(f"size {d} is 0: an empty batch has no mean loss")
        args.append(dims[d])
    return [s.array(dims, dtype) if isinstance(s, Constant) else s for s in args]


def _as_array(name, x, dtype):
    if isinstance(x, (list, tuple)):
        try:
            x = np.asarray(x)
        except ValueError as err:  # ragged nested lists: NumPy cannot make them an array
            raise InputError(f"{name} is not a rectangular array of numbers: {err}") from None
    if not isinstance(x, (np.ndarray, int, float, np.number, bool, np.bool_)):
        raise InputError(f"{name} must be a NumPy array or a number, not {type(x).__name__}")
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise InputError(f"{name} has dtype {x.dtype}: symbp computes in {dtype} (real numbers)")
    # np.ascontiguousarray promotes a 0-d array to shape (1,), which made every scalar
    # input fail the scalar-shape check: convert 0-d values with astype instead.
    if x.ndim == 0:
        return x.astype(dtype)
    x = np.ascontiguousarray(x, dtype=dtype)
    # Numba's typed kernels take writeable, aligned arrays only: a read-only one (np.load
    # with mmap_mode="r", a frozen array) or one off its entries' alignment (a view into
    # a byte buffer) raised a raw Numba TypeError on 'cpu' and 'parallel'
    return x if x.flags.writeable and x.flags.aligned else x.copy()


def _axis_word(axis: int, rank: int) -> str:
    # rows and columns of a matrix; an image's axis 1 is its channels, not columns
    if rank == 2 and axis < 2:
        return ("rows", "columns")[axis]
    return f"entries along axis {axis}"


def _bind_dim(name, axis, d, n, dims, rank=2):
    if d.is_number:
        if int(d) != n:
            raise ShapeError(
                f"{name} has {n} {_axis_word(axis, rank)} but its "
                f"symbol says {d}"
            )
        return
    if isinstance(d, sp.Symbol):
        if d in dims and dims[d] != n:
            raise ShapeError(
                f"{name} says {d} = {n} but an earlier input bound {d} = {dims[d]}"
            )
        dims[d] = n
        return
    raise ShapeError(f"{name}: cannot bind the size expression {d}; use a plain Symbol")


@dataclass
class GradcheckResult:
    """Max relative error (‖analytic − numeric‖∞ / max(‖analytic‖∞, ‖numeric‖∞)) per wrt."""

    errors: dict
    tol: float

    @property
    def ok(self) -> bool:
        return all(e <= self.tol for e in self.errors.values())

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        rows = [f"{'parameter':<16} max rel. error"]
        rows += [f"{k:<16} {v:.3e}{'' if v <= self.tol else '  FAIL'}"
                 for k, v in self.errors.items()]
        return "\n".join(rows)


def gradcheck(f, wrt, arrays: dict, eps: float = 1e-6, tol: float = 1e-6,
              target: str = "numpy", max_entries: int = 200, seed: int = 0) -> GradcheckResult:
    """Compare the compiled gradient with float64 central differences.

    At most ``max_entries`` entries per parameter are probed (chosen at random, seeded).
    """
    fn = compile(f, wrt, target=target, dtype=np.float64)
    base = {k: np.array(v, dtype=np.float64) for k, v in arrays.items()}
    _, grads = fn(**base)
    rng = np.random.default_rng(seed)
    errors = {}
    for w in fn.wrt:
        x = base[w.name]
        flat = x.reshape(-1) if x.ndim else None
        idx = np.arange(x.size)
        if x.size > max_entries:
            idx = rng.choice(x.size, max_entries, replace=False)
        num = np.zeros(len(idx))
        for k, i in enumerate(idx):
            vals = []
            for sgn in (1, -1):
                y = {**base}
                if flat is None:
                    y[w.name] = x + sgn * eps
                else:
                    z = flat.copy()
                    z[i] += sgn * eps
                    y[w.name] = z.reshape(x.shape)
                vals.append(fn(**y)[0])
            num[k] = (vals[0] - vals[1]) / (2 * eps)
        ana = np.asarray(grads[w.name], dtype=np.float64).reshape(-1)[idx]
        scale = max(np.max(np.abs(ana)), np.max(np.abs(num)), 1e-12)
        errors[w.name] = float(np.max(np.abs(ana - num)) / scale)
    return GradcheckResult(errors, tol)
