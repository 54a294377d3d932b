"""The compiled calls: a loss-and-gradient function and the fused training step.

The Numba CPU backend generates and compiles a kernel (``symbp.backends.numba_cpu``); the
objects here call it: they bind the arrays, hand it its workspace and optimizer state,
set the BLAS threads, and turn its results into what the user sees.  A call of a small
network is a few microseconds of kernel, so the hot paths here are kept to a few lines.
"""

from __future__ import annotations

from itertools import compress
from operator import is_not, itemgetter

import numpy as np

from .. import optim
from ..api import bind_inputs, same_dtypes
from ..errors import InputError, SymbpError
from ..ir import Program
from ..matrix import Constant, is_matrix
from . import threads as _threads
from .threads import BLAS
from .workspace import Workspace, shape_fn


def gradient_call(p: Program, source: str, layout: dict, kern, dt, target: str,
                  options: dict):
    """``fn(*inputs, *dims)`` -> ``(value, *grads)`` around a compiled gradient (or forward)
    kernel.  Scratch arrays are kept per batch size; returned arrays are fresh, of dtype
    ``dt`` and their symbols' shapes (``fn.shaped``: the caller converts nothing)."""
    n_in = len(p.inputs)
    ws = Workspace(layout["scratch"], p.dims, dt)
    out_shapes = [shape_fn(o.shape, p.dims) for o in layout["outs"]]
    plan = []  # where each output comes from
    for o in p.outputs:
        if o in layout["scalar_out"]:
            plan.append(("ret", layout["scalar_out"].index(o), None))
        elif o in layout["outs"]:
            plan.append(("out", layout["outs"].index(o), None))
        elif o in p.inputs:
            plan.append(("in", p.inputs.index(o), None))
        else:  # a constant: a gradient that is identically zero
            shape = shape_fn(o.shape, p.dims) if is_matrix(o) else None
            plan.append(("const", float(o) if not is_matrix(o) else 0.0, shape))
    # the usual order (the values the kernel returns, then its output buffers): the
    # result is those two in a row, with no per-output dispatch
    direct = list(p.outputs) == list(layout["scalar_out"]) + list(layout["outs"])

    # pick: the result as one C-level pick from (*values, *buffers) when every output is
    # one of those, in another order (W3's gradients come out last layer first)
    n_ret = len(layout["scalar_out"])
    order = [i if kind == "ret" else n_ret + i for kind, i, _ in plan]
    pick = (itemgetter(*order) if not direct and len(order) > 1
            and all(kind in ("ret", "out") for kind, _, _ in plan) else None)

    threads, tuner = _threads.for_kernel(target, options, source)
    blas = "_gemm(" in source  # small products are loops: no BLAS threads to set
    f64 = (np.zeros(layout["f64"]),) if layout["f64"] else ()
    sized: dict = {}  # sizes -> (the sizes as ints, (workspace, *f64), output shapes)

    def at_sizes(key):
        # a few sizes are kept, as in Workspace: the last batch of an epoch is smaller
        if len(sized) >= ws.keep:
            sized.pop(next(iter(sized)))
        dims = tuple(int(d) for d in key)
        sized[key] = dims, (ws.get(dims), *f64), [f(dims) for f in out_shapes]
        return sized[key]

    def on_threads(k):
        """``k`` (the kernel) on the BLAS thread count chosen for it; with no BLAS call in
        the kernel (W3's products are loops) there is nothing to set around it."""
        if not blas and tuner is None:
            return k

        def run(*kargs):
            if tuner is not None:
                t0 = tuner.start()
            elif BLAS.now != threads:
                BLAS.use(threads)
            try:
                ret = k(*kargs)
            finally:
                BLAS.done()  # the user's own BLAS thread count back
            if tuner is not None:
                tuner.stop(t0)
            return ret

        return run

    run = on_threads(kern)
    dts = [dt] * len(out_shapes)

    def result(ret, outs, args, dims):
        if direct:
            return (*map(dt.type, ret), *outs)
        if pick is not None:
            return pick((*map(dt.type, ret), *outs))
        out = []
        for kind, i, shape in plan:
            if kind == "ret":
                out.append(dt.type(ret[i]))
            elif kind == "out":
                out.append(outs[i])
            elif kind == "in":
                out.append(np.array(args[i], dtype=dt))
            elif shape is not None:
                out.append(np.full(shape(dims), i, dt))
            else:
                out.append(dt.type(i))
        return tuple(out)

    # A call of a small network is ~1 µs of kernel: this path allocates the outputs and
    # nothing else (the sizes' workspace and output shapes are looked up, not computed)
    def fn(*args):
        dims, extra, shapes = sized.get(args[n_in:]) or at_sizes(args[n_in:])
        outs = list(map(np.empty, shapes, dts))
        return result(run(*args, *extra, *outs), outs, args, dims)

    # A gradient's value (the only value the kernel returns, W3's case) goes to float() in
    # api.Compiled: ``call`` hands it on as Numba boxed it, a Python float holding a
    # value of dtype dt exactly, when the signature says so.  np.float32 of it on the way
    # cost ~2,400 instructions, a sixth of W3's kernel call.
    bare = (bool(p.wrt) and plan[0] == ("ret", 0, None) and n_ret == 1
            and (direct or pick is not None) and _returns(kern, dt))

    def at(key):
        """``call(*inputs)``: what ``fn(*inputs, *key)`` returns, with the lookups of these
        sizes done once, except that a gradient's value may be a Python float (of dtype
        dt's value) rather than a dtype scalar.

        ``call`` checks nothing itself (``api.Forward`` checks the dtypes, calls it with
        the arrays of a call and falls back to the full check when it raises): Numba's
        dispatch refuses (TypeError) an array of another rank or layout or a read-only
        one, and the kernel refuses (ValueError) inputs that are not of these sizes,
        before it writes anything."""
        dims, extra, shapes = sized.get(key) or at_sizes(key)
        tail = (*key, *extra)

        def call(*xs):
            outs = list(map(np.empty, shapes, dts))
            ret = run(*xs, *tail, *outs)
            if bare:
                return pick((*ret, *outs)) if pick is not None else (*ret, *outs)
            return result(ret, outs, xs, dims)

        return call

    fn.source = source
    fn.kernel = kern
    fn.tuner = tuner
    fn.shaped = True
    fn.at = at
    if p.wrt and plan[0][0] != "out":  # a gradient, whose value the kernel returns
        fn.into = gradient_into(p, layout, plan, lambda key: sized.get(key) or at_sizes(key), run)
    return fn


def _returns(kern, dt) -> bool:
    """Whether the compiled ``kern`` returns a tuple of dtype ``dt`` scalars alone."""
    info = getattr(kern, "__self__", None)
    if getattr(info, "native", False):  # symbp's own lowering (symbp.backends.native)
        return info.returns_floats_of({"float32": "f32", "float64": "f64"}.get(dt.name))
    from numba import from_dtype
    from numba.core import types

    sigs = getattr(kern, "nopython_signatures", [])
    return len(sigs) == 1 and isinstance(sigs[0].return_type, types.BaseTuple) and all(
        t == from_dtype(dt) for t in sigs[0].return_type)


def gradient_into(p: Program, layout: dict, plan: list, at_sizes, run):
    """``into(buf, *inputs, *dims)`` -> the value, as a float; the gradients, raveled and
    concatenated in ``wrt`` order, are written into the first entries of the 1-D ``buf``.

    Data-parallel training sums that buffer across processes: the kernel's output buffers
    become its slices, so a call allocates and copies no gradient.  ``plan``,
    ``at_sizes`` (sizes -> (sizes as ints, (workspace, *f64), ...)) and ``run`` (the kernel
    on its BLAS threads) are ``gradient_call``'s.
    """
    n_in = len(p.inputs)
    grad_shapes = [shape_fn(o.shape, p.dims) if is_matrix(o) else (lambda dims: ())
                   for o in p.outputs[1:]]
    # writes[k]: the gradient (0-based) that is the kernel's k-th output buffer; every
    # other gradient (a scalar it returns, an input, a constant, a repeat) is copied
    writes = [next(j for j, e in enumerate(plan[1:]) if e[:2] == ("out", k))
              for k in range(len(layout["outs"]))]
    copied = [j for j in range(len(plan) - 1) if j not in writes]
    # (sizes, id(buffer)) -> (the buffer, its slices shaped as the gradients).  The entry
    # holds the buffer itself and a hit must be that very object: an id alone is reused by
    # the next object once its own is freed (the MPI sum's fresh view of each step's half
    # of the window took the other half's slices, a wrong answer on some ranks only)
    cut: dict = {}

    def slices(buf, dims):
        hit = cut.get((dims, id(buf)))
        if hit is not None and hit[0] is buf:
            return hit[1]
        if len(cut) >= 4:  # a few buffers at a time (the MPI sum's two halves)
            cut.clear()
        views, at = [], 0
        for f in grad_shapes:
            shape = f(dims)
            size = int(np.prod(shape))
            views.append(buf[at:at + size].reshape(shape))
            at += size
        cut[(dims, id(buf))] = (buf, views)
        return views

    def value(entry, ret, outs, args):
        kind, i, _ = entry
        return {"ret": ret, "out": outs, "in": args}[kind][i] if kind != "const" else i

    def into(buf, *args):
        dims, extra, _ = at_sizes(args[n_in:])
        views = slices(buf, dims)
        outs = [views[j] for j in writes]
        ret = run(*args, *extra, *outs)
        for j in copied:
            views[j][...] = value(plan[j + 1], ret, outs, args)
        return float(value(plan[0], ret, outs, args))

    return into


class HoldsOptimizer:
    """``optimizer``: assignable with another optimizer of the same kind only (a schedule's
    learning rate); ``_take(opt)`` hands its numbers to the compiled code."""

    _optimizer = None

    @property
    def optimizer(self):
        return self._optimizer

    @optimizer.setter
    def optimizer(self, opt) -> None:
        same_kind(self._optimizer, opt)
        self._take(opt)
        self._optimizer = opt

    def _take(self, opt) -> None:
        raise NotImplementedError


class FusedStep(HoldsOptimizer):
    """A training step compiled into one call: ``loss = step(params, **data)``.

    Forward, backward and the optimizer update run in one Numba call; ``params`` (arrays
    of the step's dtype, C-contiguous; scalar parameters as 0-d arrays) are updated in
    place; ``state`` holds the optimizer buffers like ``symbp.optim.init_state``.
    ``blas_threads`` is the BLAS thread count in use (see ``threads.Blas``).

    The kernel reads the optimizer's hyperparameters from ``hyper`` (float64, in
    ``optim.rule(optimizer).hyper`` order) on every call: assigning ``step.optimizer``
    another optimizer of the same kind (a learning-rate schedule) changes them, with no
    recompilation.
    """

    warm = False  # True: found by its expression's record (symbp.warm), no pass was run

    def __init__(self, p: Program, source: str, layout: dict, kernel, optimizer, dtype,
                 target: str, options: dict):
        self.dtype, self.target = np.dtype(dtype), target
        # ``p``: the Program, or a ``symbp.warm.Outline`` of it (a step found by its record)
        self._p, self.source, self.kernel, self.layout = p, source, kernel, layout
        self.state = None
        self._wrt = {w.name for w in p.wrt}
        self._spec = [(s.name, s.name in self._wrt, is_matrix(s)) for s in p.inputs]
        self._ws = Workspace(layout["scratch"], p.dims, self.dtype)
        self._state_keys = [(b, w.name) for b, w in layout["state"]]
        self._wsa = np.empty(0, self.dtype)  # the workspace: grown by _bind when too small
        # A deep step takes its parameters and their optimizer state as one table of
        # addresses (symbp.backends.address): (buffer or None, parameter) per entry
        self._table = layout.get("table")
        self._shapes = {s.name: tuple(int(d) for d in s.shape) for s in p.wrt
                        if self._table is not None}
        self._held: list = []  # the arrays whose addresses _pa holds, kept alive
        self._pa = np.zeros(0, np.int64)
        tabled = set(self._shapes)
        self._args = [k for k, (name, _, _) in enumerate(self._spec) if name not in tabled]
        self._names = [self._spec[k][:2] for k in self._args]
        # the arguments that are arrays (matrices; parameters, 0-d when scalar) and must
        # be of the step's dtype itself before Numba sees them (api.same_dtypes)
        arrays = [self._spec[k][1] or self._spec[k][2] for k in self._args]
        self._arrays = None if all(arrays) else arrays  # None: every argument
        self._n_tabled = len(tabled)
        self._scalar_params = [is_p and not is_m for _, is_p, is_m in self._spec]
        if not any(self._scalar_params):
            self._scalar_params = None
        # float64 words: the optimizer's hyperparameters, then the kernel's accumulators
        self._f64 = np.zeros(layout["f64"])
        self.hyper = self._f64[:len(optim.rule(optimizer).hyper)]
        self.optimizer = optimizer
        self._threads, self._tuner = _threads.for_kernel(target, options, source)
        self._blas = "_gemm(" in self.source  # small products are loops: no BLAS at all
        self._float = opt_returns_float(layout)
        # constants of fixed shape (Identity(3), a Matrix of numbers) are made once and
        # join the data of every call, so the fast path below finds them
        self._consts = {s.name: s.array({}, self.dtype) for s in p.inputs
                        if isinstance(s, Constant) and all(d.is_Integer for d in s.shape)}

    @property
    def program(self) -> Program:
        """The step's optimized Program (one found by its record builds it now)."""
        if not isinstance(self._p, Program):
            self._p = self._p.rebuild()
        return self._p

    def _take(self, opt) -> None:
        self.hyper[:] = optim.hyper(opt)  # the kernel reads them at its next call

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
        # go in as they come once their dtypes are the step's; the kernel binds and checks
        # the sizes itself, Numba checks ranks and layouts.  Anything refused is converted
        # or named below.
        try:
            d = {**data, **self._consts} if self._consts else data
            xs = [params[n] if p else d[n] for n, p in self._names]
            if (len(params) + len(data) + len(self._consts) != len(xs) + self._n_tabled
                    or not same_dtypes(xs if self._arrays is None
                                       else compress(xs, self._arrays), self.dtype)):
                raise KeyError  # a name given twice or unknown, or another dtype
            if self._table is not None:
                held = [params[w] if b is None else st[b][w] for b, w in self._table]
                if len(held) != len(self._held) or any(map(is_not, held, self._held)):
                    raise KeyError  # other arrays than last time: check them, new addresses
        except (KeyError, TypeError, AttributeError):  # a list, None, ...: checked below
            xs = self._bind(params, data)
        if self._scalar_params:  # a 0-d parameter travels as a 1-element view of itself
            xs = [x.reshape(1) if is_sp else x for x, is_sp in zip(xs, self._scalar_params)]
        t = st["t"] + 1  # counted once the step ran: a refused call leaves the state alone
        head = (self._pa,) if self._table is not None else ()
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
            ret = self.kernel(*xs, *head, self._wsa, *sv, self._f64, t)
        except (TypeError, ValueError):  # other types or sizes: check, convert, retry
            t0 = None  # binding and converting are not the step's time
            self._check_params(params)
            xs = self._bind(params, data)
            if self._scalar_params:
                xs = [x.reshape(1) if is_sp else x for x, is_sp in zip(xs, self._scalar_params)]
            head = (self._pa,) if self._table is not None else ()  # _bind made it anew
            ret = self.kernel(*xs, *head, self._wsa, *sv, self._f64, t)
        finally:
            if self._blas:
                BLAS.done()  # the user's own BLAS thread count back
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
        args = bind_inputs(self._p, both, self.dtype)  # inputs and dims: an Outline has them
        n = len(self._p.inputs)
        ws = self._ws.get(tuple(args[n:]))
        if ws.size > self._wsa.size:  # one workspace, as big as the largest batch seen
            self._wsa = ws
        if self._table is not None:
            self._address(params)
        return [params[name] if is_p else args[k] for k in self._args
                for name, is_p, _ in [self._spec[k]]]

    def _address(self, params) -> None:
        """The address table of ``params`` and the optimizer state, after checking each
        array is one the kernel may read and write as its symbol's shape: the kernel sees
        only addresses, so nothing else checks them."""
        st = self.state
        held = []
        for b, w in self._table:
            a = params[w] if b is None else st.get(b, {}).get(w)
            what = f"parameter {w}" if b is None else f"optimizer state {b}[{w!r}]"
            if not (isinstance(a, np.ndarray) and a.dtype == self.dtype
                    and a.shape == self._shapes[w] and a.flags.c_contiguous
                    and a.flags.writeable and a.flags.aligned):
                raise InputError(
                    f"{what} must be a writeable C-contiguous {self.dtype} array of shape "
                    f"{self._shapes[w]}; got {type(a).__name__} {getattr(a, 'dtype', '')} "
                    f"{getattr(a, 'shape', '')}: reset it with optim.init_state or convert "
                    f"it once with np.ascontiguousarray")
            held.append(a)
        self._pa = np.array([a.__array_interface__["data"][0] for a in held], np.int64)
        self._held = held

    def _check_params(self, params):
        check_params(params, self._wrt, self.dtype)


def check_params(params: dict, wrt, dtype) -> None:
    """Every parameter of ``wrt`` present in ``params`` as an array the step can update in
    place (the CPU step's kernel writes it; the device step copies back into it)."""
    for name in wrt:
        w = params.get(name)
        if w is None:
            raise InputError(f"parameter {name} is missing from params")
        if not (isinstance(w, np.ndarray) and w.dtype == dtype
                and w.flags.c_contiguous and w.flags.writeable):
            raise InputError(
                f"parameter {name} must be a writeable C-contiguous {dtype} array "
                f"(a 0-d array for a scalar) to be updated in place; got "
                f"{type(w).__name__} {getattr(w, 'dtype', '')}: convert it once with "
                f"np.ascontiguousarray(w, dtype=np.{dtype})"
            )


def same_kind(compiled, opt) -> None:
    """A compiled step prints one optimizer kind's update: another kind is refused (its
    hyperparameters alone may change, e.g. by a learning-rate schedule)."""
    if compiled is not None and type(opt) is not type(compiled):
        raise SymbpError(
            f"this step was compiled for {type(compiled).__name__}, not "
            f"{type(opt).__name__}: compile another step (sb.compile_step) for it")


def opt_returns_float(layout) -> bool:
    """Whether a step kernel returns its loss as a bare float (see ``generate``)."""
    return len(layout["scalar_out"]) == 1
