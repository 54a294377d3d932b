"""Training on an NVIDIA GPU with everything on the device.

A CUDA training step keeps the parameters, their gradients and the optimizer's buffers
in flat device buffers for the whole run (each parameter a view of its stretch of the
flat buffer), so a step moves no parameter across the bus: ``symbp_cuda_run`` (the
generated kernels) writes the gradients into the flat gradient buffer, and one
``_update`` kernel applies the optimizer's rule to every entry and logs the loss.  The
loss comes to the host only when asked for.  Training data that fits is uploaded once
(``DeviceData``); each epoch's shuffle is a gather on the device.

``COUNT`` tallies what the runtime asks of the GPU (kernel launches, copies each way and
their bytes), so tests and ``bench/gpu_check.py`` can report launches and traffic per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import sympy as sp

from .. import optim
from ..errors import InputError, ShapeError, SymbpError
from ..matrix import Constant
from .step import HoldsOptimizer, check_params


@dataclass
class Counts:
    """Work asked of the GPU: kernel launches, host→device and device→host copies with
    their bytes, device→device copies."""

    launches: int = 0
    h2d: int = 0
    h2d_bytes: int = 0
    d2h: int = 0
    d2h_bytes: int = 0
    d2d: int = 0

    def copy(self) -> Counts:
        return Counts(**{f.name: getattr(self, f.name) for f in fields(self)})


COUNT = Counts()


def cuda():
    """``numba.cuda`` on a machine with a usable GPU (or the simulator), else a one-line
    SymbpError saying why not."""
    try:
        from numba import cuda as nc
    except ImportError as err:  # pragma: no cover - numba is a core dependency
        raise SymbpError(f"target 'cuda' needs numba's CUDA support: {err}") from None
    if not nc.is_available():
        raise SymbpError("target 'cuda' needs an NVIDIA GPU and its driver, and this machine "
                         "has none that Numba can use: train with target='cpu' (or set "
                         "NUMBA_ENABLE_CUDASIM=1 to run the kernels in Numba's simulator)")
    return nc


def out_of_memory(err: BaseException) -> bool:
    """Whether a CUDA error is the device running out of memory."""
    return "OUT_OF_MEMORY" in str(err) or "out of memory" in str(err).lower()


def oom_error(what: str, nbytes: int | None = None) -> SymbpError:
    size = "" if nbytes is None else (f" ({nbytes / 2**20:,.1f} MiB)" if nbytes >= 2**20
                                      else f" ({nbytes:,} bytes)")
    return SymbpError(f"the GPU ran out of memory for {what}{size}: use a smaller batch_size "
                      "or model, float32, or target='cpu'")


def alloc(nc, shape, dtype, what: str):
    """A device array, with out-of-memory as a SymbpError naming ``what``."""
    try:
        return nc.device_array(shape, dtype)
    except Exception as err:  # noqa: BLE001 - numba-cuda's CudaAPIError, or MemoryError
        if out_of_memory(err) or isinstance(err, MemoryError):
            raise oom_error(what, int(np.prod(shape)) * np.dtype(dtype).itemsize) from None
        raise


def upload(dst, x) -> None:
    """Host array ``x`` into device array ``dst``, counted."""
    dst.copy_to_device(x)
    COUNT.h2d += 1
    COUNT.h2d_bytes += x.nbytes


def download(src, out=None):
    """Device array ``src`` to the host (into ``out`` if given), counted."""
    h = src.copy_to_host() if out is None else src.copy_to_host(out)
    COUNT.d2h += 1
    COUNT.d2h_bytes += h.nbytes
    return h


def on_device(x) -> bool:
    """Whether ``x`` is a device array (numba-cuda's, or the simulator's)."""
    return not isinstance(x, np.ndarray) and (
        hasattr(x, "__cuda_array_interface__") or getattr(x, "__cuda_ndarray__", False))


def host_call(ns: dict):
    """The generated host driver ``symbp_cuda`` (host arrays in, host arrays out), with
    its launches and copies counted in ``COUNT``."""
    run, launches = ns["symbp_cuda"], ns["_LAUNCHES"]
    size = np.dtype(ns["_HT"]).itemsize
    up = len(ns["_SCALAR_INPUTS"]) * size  # the scalar inputs go up as one array
    down = ns["_N_SLOTS"] * size if any(k == "slot" for k, _ in ns["_OUTPUTS"]) else 0

    def fn(*args):
        try:
            out = run(*args)
        except Exception as err:  # noqa: BLE001 - numba-cuda's CudaAPIError
            if out_of_memory(err):
                raise oom_error("the device buffers of this call") from None
            raise
        ins = [a.nbytes for a in args if isinstance(a, np.ndarray) and a.ndim]
        outs = [o.nbytes for o in out if isinstance(o, np.ndarray) and o.ndim]
        COUNT.launches += launches
        COUNT.h2d += len(ins) + (up > 0)
        COUNT.h2d_bytes += sum(ins) + up
        COUNT.d2h += len(outs) + (down > 0)
        COUNT.d2h_bytes += sum(outs) + down
        return out

    return fn


class DeviceStep(HoldsOptimizer):
    """A CUDA training step: ``loss = step(params, **data)``.

    ``params`` are either the device views ``step.to_device(params)`` returned (updated in
    place on the device: nothing crosses the bus but the loss), or host arrays (copied to
    the device before the step and back after it, as the CPU step updates them in place).
    Data arrays may be host arrays (copied each call) or device arrays.  ``state`` reads
    the optimizer's buffers back to the host (for a checkpoint) and writes them.
    """

    def __init__(self, program, source: str, ns: dict, optimizer, dtype, block: int):
        self.program, self.source, self.dtype = program, source, np.dtype(dtype)
        self.kernel = ns["symbp_cuda_run"]
        self.module, self._block = ns, block  # the generated module: every kernel by name
        self._nc = cuda()
        self.launches = ns["_LAUNCHES"] + 1  # the program's kernels, then _update
        self._run_inputs = ns["_RUN_INPUTS"]
        self._scalar_inputs = ns["_SCALAR_INPUTS"]
        where = ns["_OUTPUTS"]
        self._loss_slot = where[0][1]
        self._wrt = [w.name for w in program.wrt]
        shapes = [tuple(int(d) for d in w.shape) for w in program.wrt]
        self.layout, at = {}, 0  # name -> (offset, shape) in the flat buffers
        for name, shape in zip(self._wrt, shapes):
            self.layout[name] = (at, shape)
            at += math.prod(shape)
        self.size = at
        self.optimizer = optimizer
        rule = optim.rule(optimizer)
        self.P = self._flat("the parameters")
        self.G = self._flat("the gradients")
        self._bufs = {b: self._flat(f"the optimizer buffer {b}") for b in rule.state}
        self.views = self._views(self.P)
        gviews = self._views(self.G)
        # the gradients: written by the run in place, or copied on the device after it
        # (a gradient that is an input, or equal to another's), or constant (set once)
        self._after, consts, written = [], np.zeros(self.size, self.dtype), {}
        for name, (kind, ref) in zip(self._wrt, where[1:]):
            if kind == "run" and ref not in written:
                written[ref] = gviews[name]
            elif kind == "run":
                self._after.append((gviews[name], ("out", ref)))
            elif kind == "input":
                self._after.append((gviews[name], ("in", str(program.inputs[ref]))))
            else:  # a constant gradient (zero: the loss does not read this parameter)
                a, shape = self.layout[name]
                consts[a:a + math.prod(shape)] = ref
        self._outs = [written[j] for j in range(len(written))]
        upload(self.G, consts)
        self._consts = {s.name: s for s in program.inputs if isinstance(s, Constant)}
        self._symbols = {s.name: s for s in program.inputs}
        self._data_names = {s.name for s in program.inputs
                            if s.name not in self.layout and s.name not in self._consts}
        self._const_dev: dict = {}
        self._data: dict = {}  # name -> device buffer for host data
        self._log = alloc(self._nc, (1, 2), self.dtype, "the loss")
        upload(self._log, np.zeros((1, 2), self.dtype))  # no entry flagged yet
        self.backup = self.P  # _update copies each entry here before changing it
        self.finite = True
        self.state = None

    # --- buffers ------------------------------------------------------------------------
    def _flat(self, what):
        return alloc(self._nc, max(self.size, 1), self.dtype, what)

    def _views(self, flat) -> dict:
        return {n: flat[a:a + math.prod(s)].reshape(s) for n, (a, s) in self.layout.items()}

    def to_device(self, params: dict) -> dict:
        """Copy the host ``params`` into the step's flat device buffer; returns the device
        views to pass to the step from now on."""
        for name in self._wrt:
            w = params.get(name)
            if w is None:
                raise InputError(f"parameter {name} is missing from params")
            upload(self.views[name], np.ascontiguousarray(w, self.dtype))
        return dict(self.views)

    def to_host(self, params: dict) -> None:
        """Copy the device parameters into the host arrays ``params`` (in place)."""
        for name in self._wrt:
            download(self.views[name], params[name])

    # --- optimizer ------------------------------------------------------------------------
    def _take(self, opt) -> None:
        optim.rule(opt)  # a malformed rule fails here; its numbers go with each launch

    @property
    def state(self):
        """The optimizer's buffers as host arrays ``{buffer: {param: array}, 't': t}``
        (copied from the device on every read: a checkpoint's), or None before a step."""
        if self._t == 0:
            return None
        out = {b: {n: download(v) for n, v in self._views(d).items()}
               for b, d in self._bufs.items()}
        out["t"] = self._t
        return out

    @state.setter
    def state(self, st) -> None:
        self._t = 0 if st is None else int(st["t"])
        for b, d in self._bufs.items():
            if st is None:
                upload(d, np.zeros(d.shape, self.dtype))
            else:
                for n, v in self._views(d).items():
                    upload(v, np.ascontiguousarray(st[b][n], self.dtype))

    @property
    def fn(self):
        return self

    # --- a step ---------------------------------------------------------------------------
    def __call__(self, params: dict, /, **data) -> float:
        """One step; returns the loss (one small copy to the host)."""
        host = self._host_params(params)
        self.launch(params if host is None else self.views, self._log, 0, **data)
        if host is not None:
            self.to_host(host)
        return self.read(self._log, 0)

    def read(self, log, s: int) -> float:
        """The loss logged at row ``s`` of ``log``; sets ``finite`` from the row's flag."""
        row = download(log[s:s + 1])
        self.finite = row[0, 1] == 0
        if not self.finite:  # the flag stays set until cleared
            upload(log[s:s + 1], np.zeros((1, 2), self.dtype))
        return float(row[0, 0])

    def launch(self, params: dict, log, s: int, /, **data) -> None:
        """One step on the device, nothing read back: the loss goes to ``log[s, 0]``,
        ``log[s, 1]`` is set when an updated parameter entry is not finite."""
        args, dims = self._arguments(params, data)
        try:
            S = self.kernel(*args, *self._outs, *dims)
        except Exception as err:  # noqa: BLE001 - numba-cuda's CudaAPIError
            if out_of_memory(err):
                sizes = ", ".join(f"{d}={v}" for d, v in zip(self.program.dims, dims))
                raise oom_error(f"the buffers of a batch with {sizes}") from None
            raise
        for dst, (kind, ref) in self._after:
            dst.copy_to_device(self._outs[ref] if kind == "out" else args[
                self._run_inputs.index(ref)])
            COUNT.d2d += 1
        t = self._t + 1
        scal = [self.dtype.type(v) for v in optim.step_scalars(self._optimizer, t)]
        n = self.size
        grid = (max(n, 1) + self._block - 1) // self._block
        self.module["_update"][grid, self._block](self.P, self.backup, self.G,
                                               *self._bufs.values(), *scal, n, S,
                                               self._loss_slot, log, s)
        COUNT.launches += self.launches
        self._t = t

    def _host_params(self, params):
        # the device views of this step: the fast path; host arrays: copied in and out
        views = self.views
        if all(params.get(n) is views[n] for n in self._wrt):
            return None
        if all(isinstance(params.get(n), np.ndarray) for n in self._wrt):
            check_params(params, self._wrt, self.dtype)
            self.to_device(params)
            return params
        bad = next(n for n in self._wrt if params.get(n) is not views[n])
        raise InputError(f"parameter {bad} is neither a NumPy array nor this step's device "
                         "view of it: pass host arrays, or the views step.to_device(params) "
                         "returned")

    def _arguments(self, params, data):
        """The run's matrix inputs as device arrays, and the sizes."""
        if set(data) != self._data_names:
            want, got = self._data_names, set(data)
            raise InputError(f"this step takes the data {', '.join(sorted(want))}"
                             + "".join(f"; {what} {', '.join(sorted(names))}" for what, names
                                       in (("missing", want - got), ("unexpected", got - want))
                                       if names))
        dims: dict = {}
        args = []
        for name in self._run_inputs:
            if name in self.layout:
                args.append(params[name])
            elif name in self._consts:
                args.append(None)  # made for the sizes, below
            else:
                x = self._data_array(name, data[name])
                self._bind(self._symbols[name], x.shape, dims)
                args.append(x)
        dv = tuple(dims[d] for d in self.program.dims)
        if self._consts:
            consts = self._constants(dims, dv)
            args = [consts[n] if n in consts else a for n, a in zip(self._run_inputs, args)]
        if self._scalar_inputs:
            vals = np.array([data[n] for n in self._scalar_inputs], self.dtype)
            upload(self.module["_buffers"](*dv)[-1][:len(vals)], vals)
        return args, dv

    def _data_array(self, name, x):
        if on_device(x):
            if np.dtype(x.dtype) != self.dtype or not x.is_c_contiguous():
                raise InputError(f"{name} is a device array of {x.dtype}: the step takes "
                                 f"C-contiguous {self.dtype} arrays")
            return x
        x = np.ascontiguousarray(x, self.dtype)
        buf = self._data.get(name)
        if buf is None or tuple(buf.shape) != x.shape:
            buf = self._data[name] = alloc(self._nc, x.shape, self.dtype, f"the data {name}")
        upload(buf, x)
        return buf

    def _bind(self, s, shape, dims):
        """The host's check and words (``api.bind_inputs``), on a device array's shape."""
        from ..api import _bind_dim

        if len(shape) != len(s.shape):
            raise ShapeError(f"{s.name} must be a {len(s.shape)}-D array of shape {s.shape}, "
                             f"got shape {tuple(shape)}")
        for axis, (d, n) in enumerate(zip(s.shape, shape)):
            _bind_dim(s.name, axis, sp.sympify(d), n, dims, len(s.shape))

    def _constants(self, dims, dv):
        got = self._const_dev.get(dv)
        if got is None:
            got = self._const_dev[dv] = {}
            for name, s in self._consts.items():
                a = s.array(dims, self.dtype)
                got[name] = alloc(self._nc, a.shape, self.dtype, name)
                upload(got[name], a)
        return got


class DeviceData:
    """Training matrices on the device, uploaded once; ``epoch(perm)`` shuffles them there
    (the permutation's indices are the only upload), ``rows(i, j)`` are views of the
    shuffled rows."""

    def __init__(self, arrays: dict, gather, block: int):
        self._nc, self._gather, self._block = cuda(), gather, block
        self.dev, self.shuffled = {}, {}
        for k, a in arrays.items():
            self.dev[k] = alloc(self._nc, a.shape, a.dtype, f"the training data {k}")
            upload(self.dev[k], np.ascontiguousarray(a))
            self.shuffled[k] = alloc(self._nc, a.shape, a.dtype, f"the training data {k}")

    @staticmethod
    def fits(arrays: dict) -> bool:
        """Whether two copies of the arrays (as given and shuffled) take at most half the
        device's free memory."""
        free, _ = cuda().current_context().get_memory_info()
        return 2 * sum(a.nbytes for a in arrays.values()) <= free / 2

    def epoch(self, perm) -> None:
        idx = alloc(self._nc, perm.shape, np.int64, "the permutation")
        upload(idx, np.ascontiguousarray(perm, np.int64))
        gather = self._gather
        for k, src in self.dev.items():
            dst = self.shuffled[k]
            n = dst.shape[0] * dst.shape[1]
            gather[(max(n, 1) + self._block - 1) // self._block, self._block](src, idx, dst)
            COUNT.launches += 1

    def rows(self, i: int, j: int) -> tuple:
        return tuple(v[i:j] for v in self.shuffled.values())


class DeviceParams:
    """``fit``'s parameters on the device: the step's views, the guard's backup (kept by
    the ``_update`` kernel itself, entry by entry), the loss log, and the training data
    when it fits (``DeviceData``).  The host copy (``model.params``) is brought up to
    date by ``sync``: once per epoch, for the metrics and the checkpoint."""

    lazy = True  # the step can leave its loss on the device (``DeviceStep.launch``)

    def __init__(self, step, params: dict, guard: bool, data: dict):
        self.step, self.host = step, params
        self.params = step.to_device(params)
        self.good = alloc(step._nc, step.P.shape, step.dtype, "the guard's backup")
        self.good.copy_to_device(step.P)
        COUNT.d2d += 1
        # with the guard, _update keeps each entry in good before changing it; without,
        # fit keeps the epoch's start (B = P: the kernel's copy is a no-op)
        step.backup = self.good if guard else step.P
        self._guard = guard
        block = step._block
        data = {k: v for k, v in data.items() if v.ndim == 2}
        self.data = None  # streamed: host batches, copied by the step
        if len(data) == 2 and DeviceData.fits(data):
            self.data = DeviceData(data, step.module["_gather"], block)

    def finite(self, step) -> bool:
        return step.finite  # the flag the last loss came with

    def keep(self) -> None:
        if not self._guard:
            self.good.copy_to_device(self.step.P)
            COUNT.d2d += 1

    def restore(self) -> None:
        self.step.P.copy_to_device(self.good)
        COUNT.d2d += 1
        self.sync()

    def sync(self) -> None:
        self.step.to_host(self.host)

    def shuffle(self, X, T, perm):
        if self.data is None:  # streamed: host batches, copied by the step
            from ..train import _HostParams

            return _HostParams.shuffle(X, T, perm)
        self.data.epoch(perm)
        return self.data.rows

    def log(self, steps: int):
        """A zeroed loss log of ``steps`` rows (loss, non-finite flag)."""
        log = alloc(self.step._nc, (max(steps, 1), 2), self.step.dtype, "the loss log")
        upload(log, np.zeros(log.shape, self.step.dtype))
        return log

    def losses(self, log, a: int, b: int) -> list:
        """The losses of steps a..b-1 of the epoch, read from ``log``."""
        if b <= a:
            return []
        return [float(v) for v in download(log[a:b])[:, 0]]
