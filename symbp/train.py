"""The training loop: minibatches, optimizers, metrics, checkpoints, resume.

``fit`` drives two compiled callables from ``symbp.api``: the step
``loss = step(params, **data)`` (forward, backward and optimizer update; parameters
updated in place) and the forward function of the model's prediction.  It knows nothing
of SymPy.

Guarantees:

- A NaN or Inf loss or parameter stops training with ``TrainingError`` naming the epoch,
  the step and the culprit (parameters, data rows); the parameters are restored to their
  values before that step and the checkpoint file is left as it was (the last good one).
- Ctrl-C (SIGINT) is deferred to the end of the running step, so parameters and
  optimizer buffers are never half-updated; with ``checkpoint=`` the state at that step
  is saved before ``KeyboardInterrupt`` propagates.
- ``fit(..., resume=True)`` continues from the checkpoint (parameters, optimizer buffers,
  RNG state, epoch and position in the epoch's permutation) and ends with exactly the
  parameters of an uninterrupted run with the same seed.
- ``fit(..., distributed='mpi')`` under ``mpiexec -n K`` ends with the parameters of one
  process with the same global ``batch_size`` (``symbp.runtime.mpi``), on every rank.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import api as sb
from . import checkpoint as ckpt
from . import optim
from .errors import SymbpError, TrainingError
from .runtime import mpi as dist


@dataclass
class History:
    """Per-epoch metrics of a ``fit``: mean batch loss, accuracy after the epoch (a
    forward pass over the training set; None without a metric), wall time in seconds."""

    epoch: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_accuracy: list = field(default_factory=list)
    time: list = field(default_factory=list)
    steps: int = 0
    stopped: str | None = None  # 'target_loss' when early stopping ended the run

    def as_dict(self) -> dict:
        return asdict(self)

    def __repr__(self) -> str:
        if not self.epoch:
            return "History(no epochs)"
        acc = self.accuracy[-1]
        acc = "" if acc is None else f", accuracy {acc:.4f}"
        return (f"History({len(self.epoch)} epochs, {self.steps} steps, "
                f"loss {self.loss[-1]:.4g}{acc}, {sum(self.time):.2f} s)")


# --- compiled callables, cached on the model --------------------------------------------


def _step(model, optimizer, target, dtype):
    key = ("step", optimizer, target, np.dtype(dtype).str)
    if key not in model.cache:
        model.cache[key] = sb.compile_step(model.loss, model.wrt, optimizer,
                                           target=target, dtype=dtype)
    return model.cache[key]


def _gradient(model, target, dtype):
    # The unfused loss-and-gradient: a distributed step reduces between it and the update.
    key = ("gradient", target, np.dtype(dtype).str)
    if key not in model.cache:
        model.cache[key] = sb.compile(model.loss, model.wrt, target=target, dtype=dtype)
    return model.cache[key]


def _forward(model, what, target, dtype):
    key = (what, target, np.dtype(dtype).str)
    if key not in model.cache:
        expr = model.loss if what == "loss" else model.prediction
        model.cache[key] = sb.compile_forward(expr, target=target, dtype=dtype)
    return model.cache[key]


def _opt_state(step):
    return getattr(step, "state", None)


def _set_opt_state(step, state) -> None:
    # The step's optimizer buffers: {buffer: {param: array}, 't': steps taken}, as
    # optim.init_state makes them; None starts fresh.
    step.state = state


# --- evaluation ---------------------------------------------------------------------------


def predict(model, X, target: str = "numpy", dtype=None, batch_size: int | None = None):
    """The model's prediction for the rows of ``X`` (class probabilities for
    'softmax_ce', sigmoid probabilities for 'bce'); RReLU slopes at their mean.
    ``dtype`` defaults to that of the parameters."""
    dtype = _dtype(dtype or _param_dtype(model))
    X = _as_data("X", X, dtype, model.sample_shape)
    fwd = _forward(model, "prediction", target, dtype)
    params = _params_as(model, dtype)
    parts = []
    for i in range(0, len(X), batch_size or max(len(X), 1)):
        xb = X[i:i + (batch_size or len(X))]
        parts.append(np.asarray(fwd(**params, **model.slopes(len(xb), dtype),
                                    **{model.X.name: xb})))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def evaluate(model, X, y, target: str = "numpy", dtype=None, distributed=None) -> dict:
    """``{'loss': ..., 'accuracy': ...}`` of the model on ``(X, y)`` (slopes at their mean).

    ``distributed='mpi'`` (as in ``fit``): each rank evaluates its share of the rows and
    the metrics of the whole set are reduced across ranks (every rank passes all rows)."""
    dtype = _dtype(dtype or _param_dtype(model))
    X = _as_data("X", X, dtype, model.sample_shape)
    T = _as_data("y", model.targets(y), dtype)
    ranks = dist.choose(distributed)
    if ranks is not None:
        return _evaluate_shared(model, X, np.asarray(y), target, dtype, ranks)
    loss = _forward(model, "loss", target, dtype)
    params = _params_as(model, dtype)
    value = float(np.asarray(loss(**params, **model.slopes(len(X), dtype),
                                  **{model.X.name: X, model.T.name: T})))
    acc = model.accuracy(predict(model, X, target, dtype), y) if model.metric else None
    return {"loss": value, "accuracy": acc}


def _evaluate_shared(model, X, y, target, dtype, ranks) -> dict:
    # The loss is a mean over rows and the accuracy a mean of per-row hits: the rows' share
    # n_r/n weights each rank's means, and one sum across ranks gives those of all n rows.
    n = len(X)
    lo, hi = dist.shard(n, ranks.rank, ranks.size)
    part = np.zeros(2)
    if hi > lo:
        r = evaluate(model, X[lo:hi], y[lo:hi], target, dtype, distributed=False)
        part[:] = r["loss"], r["accuracy"] or 0.0
        part *= (hi - lo) / n
    ranks.sum(part)
    return {"loss": float(part[0]), "accuracy": float(part[1]) if model.metric else None}


def _param_dtype(model) -> np.dtype:
    return next(iter(model.params.values())).dtype


def _params_as(model, dtype) -> dict:
    return {k: v if v.dtype == dtype else v.astype(dtype) for k, v in model.params.items()}


def _dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise SymbpError(f"dtype must be float32 or float64, not {dtype}")
    return dtype


def _as_data(name, a, dtype, sample=None) -> np.ndarray:
    """``a`` as a C-contiguous array of ``dtype`` whose first axis counts the samples;
    ``sample``: the shape of one sample the model reads, (C, H, W) for images."""
    a = np.asarray(a)
    if a.dtype.kind not in "fiub":
        raise SymbpError(f"{name} has dtype {a.dtype}: training data must be numbers")
    if a.ndim == 1:
        a = a[:, None]
    if sample is not None and len(sample) > 1:  # images: N×C×H×W
        if a.shape[1:] != tuple(sample) or len(a) == 0:
            hint = (f"; reshape rows of {int(np.prod(sample))} pixels with "
                    f"{name}.reshape(-1, {', '.join(map(str, sample))})"
                    if a.ndim == 2 and a.shape[1] == np.prod(sample) else "")
            raise SymbpError(f"{name} must be a non-empty array of images N×"
                             f"{'×'.join(map(str, sample))} (the model's inputs), got shape "
                             f"{a.shape}{hint}")
    elif a.ndim != 2 or len(a) == 0:
        raise SymbpError(f"{name} must be a non-empty 2-D array (rows = samples), "
                         f"got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=dtype)


# --- fit --------------------------------------------------------------------------------


class _DeferSigint:
    """Hold Ctrl-C until the running step has finished (main thread only)."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def fit(model, X, y, epochs: int = 10, batch_size: int = 32, optimizer=None,
        target: str = "numpy", dtype=np.float32, seed: int = 0, shuffle: bool = True,
        target_loss: float | None = None, progress: bool = True, checkpoint=None,
        resume=False, validation=None, callback=None, guard: bool = True,
        distributed: str | None = None, lr_schedule=None) -> History:
    """Train ``model`` on rows ``X`` (or images N×C×H×W) with targets ``y``; returns the
    ``History``.  Minibatches are slices of the first axis.

    optimizer    ``symbp.SGD`` (default, lr 0.1), ``Momentum`` or ``Adam``.
    target       'numpy' (reference), 'cpu' or 'parallel' (Numba, update fused in), or
                 'cuda' (parameters, optimizer buffers and the data, when it fits, on the
                 GPU for the whole run; ``model.params`` are brought up to date after
                 every epoch).
    dtype        float32 (default) or float64; ``model.params`` are converted in place.
    seed         seeds the batch order and RReLU slopes (the model's own seed its init).
    target_loss  stop early once an epoch's mean loss is at or below it.
    checkpoint   a path: saved atomically after every epoch and on Ctrl-C.
    resume       True: continue from ``checkpoint`` if that file exists; or a path.
                 ``epochs`` counts the epochs of the whole run, resumed ones included.
    validation   ``(X_val, y_val)``: loss and accuracy recorded after every epoch.
    callback     ``callback(epoch, step, loss)`` after every step (both count from 0).
    guard        True: parameters are checked and backed up after every step, so a
                 failure restores those of the step before (one finiteness pass and one
                 copy of the parameters per step); False: only the loss is checked per
                 step and the parameters per epoch, a failure restores the epoch's start.
                 On 'cuda' the update kernel checks and backs up the parameters itself;
                 with guard=False and no callback the loss too stays on the device until
                 the epoch ends.
    distributed  'mpi': data-parallel over the processes of ``mpiexec -n K`` (needs
                 ``pip install 'symbp[mpi]'``); each rank computes the gradient of its
                 shard of every global batch of ``batch_size`` rows, one sum over ranks
                 adds them (through shared memory on one machine, MPI's Allreduce
                 across machines), every rank applies the same update.  Only rank 0
                 prints and writes the checkpoint; an exception on one rank aborts them
                 all.  None (default): this process alone, unless the environment sets
                 SYMBP_DISTRIBUTED=mpi.
    lr_schedule  ``lr_schedule(epoch) -> float``: the learning rate of each epoch (epochs
                 count from 0, over the whole run: a resumed run goes on where it
                 stopped), e.g. ``lambda e: 0.1 * 0.5**e``; the optimizer's ``lr`` is
                 then unused.  The compiled step reads it at every call: no recompiling.
    """
    dtype = _dtype(dtype)
    ranks = dist.choose(distributed)
    optimizer = optimizer if optimizer is not None else optim.SGD(0.1)
    X = _as_data("X", X, dtype, model.sample_shape)
    y_raw = np.asarray(y)
    T = _as_data("y", model.targets(y_raw), dtype)
    if len(T) != len(X):
        raise SymbpError(f"X has {len(X)} rows but y has {len(T)}")
    if batch_size < 1:
        raise SymbpError(f"batch_size must be at least 1, got {batch_size}")
    flat = _flatten(model.params, dtype)
    params = model.params
    if ranks is None:
        step = _step(model, optimizer, target, dtype)
    else:
        step = ranks.step(_gradient(model, target, dtype), optimizer, params, flat)
        progress = progress and ranks.root
    _set_opt_state(step, None)
    step.optimizer = optimizer  # a cached step may still hold an earlier run's schedule

    rng = np.random.default_rng(seed)
    hist, epoch0, row0, perm = History(), 0, 0, None
    path = Path(checkpoint) if checkpoint is not None else None
    src = path if resume is True else (Path(resume) if resume else None)
    if resume is True and path is None:
        raise SymbpError("resume=True needs checkpoint=PATH (or pass resume=PATH)")
    resumed_losses = None
    if src is not None and src.exists():
        epoch0, row0, perm, hist, resumed_losses = _restore(model, step, optimizer, rng, src,
                                                            len(X))

    if ranks is not None:
        # Every rank starts from rank 0's parameters (each read the same checkpoint and
        # seeded the same rng, so the optimizer state and batch order agree already).
        ranks.broadcast(flat)
        if not ranks.root:
            path = None  # rank 0 alone writes the checkpoint
    n = len(X)
    # where the parameters live while training: this process's flat array, or the GPU
    # (a device-resident step: parameters, optimizer buffers and, when they fit, the data)
    store = (_device_store(step, params, guard, {model.X.name: X, model.T.name: T})
             if hasattr(step, "to_device") else _HostParams(flat, params, step, guard))
    lazy = store.lazy and not guard and callback is None  # the loss stays on the device
    bar = _progress(progress, epochs, epoch0)
    fails = ranks.stop_all_on_error() if ranks is not None else contextlib.nullcontext()
    try:
        with fails, _DeferSigint() as sigint, np.errstate(all="ignore"):
            for epoch in range(epoch0, epochs):
                t0 = time.perf_counter()
                if lr_schedule is not None:
                    step.optimizer = _scheduled(optimizer, lr_schedule, epoch)
                if not guard:
                    store.keep()
                if perm is None:
                    perm = rng.permutation(n) if shuffle else np.arange(n)
                # One process: one gather per epoch, the batches are then contiguous
                # slices (views).  A rank gathers its shard of each batch alone: the
                # gather of every row would not shrink with the number of ranks.
                batches = store.shuffle(X, T, perm) if ranks is None else None
                losses, first = (resumed_losses or []), row0 // batch_size
                resumed_losses = None
                log = store.log(-(-(n - row0) // batch_size)) if lazy else None

                def failed(s, loss, i):
                    rows = perm[i:i + batch_size]
                    _fail(model, store, epoch, s, loss, {model.X.name: X[rows],
                          model.T.name: T[rows]}, rows, path, guard)

                read = [0]  # rows of the device's loss log read so far

                def flush(upto):  # the losses logged on the device up to step upto, checked
                    got = store.losses(log, read[0], upto)
                    for k, loss in enumerate(got, start=read[0]):
                        if not math.isfinite(loss):
                            failed(first + k, loss, row0 + k * batch_size)
                    losses.extend(got)
                    read[0] = upto

                for s, i in enumerate(range(row0, n, batch_size), start=first):
                    rows = perm[i:i + batch_size]
                    drawn = model.slopes(len(rows), dtype, rng)
                    if ranks is None:
                        xb, tb = batches(i, i + batch_size)
                        data = {model.X.name: xb, model.T.name: tb, **drawn}
                    if lazy:
                        step.launch(store.params, log, s - first, **data)
                        hist.steps += 1
                        if sigint.hit:
                            flush(s - first + 1)
                    else:
                        if ranks is None:
                            loss = step(store.params, **data)
                        else:
                            loss = step(store.params, len(rows), **ranks.own(
                                rows, {model.X.name: X, model.T.name: T}, drawn))
                        if not (math.isfinite(loss) and (not guard or store.finite(step))):
                            failed(s, loss, i)
                        if guard:
                            store.keep()
                        losses.append(loss)
                        hist.steps += 1
                        if callback is not None:
                            callback(epoch, s, loss)
                    if sigint.hit:
                        store.sync()
                        if path is not None and np.isfinite(flat).all():
                            _save(path, model, step, optimizer, rng, epoch, i + len(rows), perm,
                                  hist, seed, losses)
                        raise KeyboardInterrupt
                if lazy:
                    flush(s - first + 1)
                store.sync()
                if not guard and not np.isfinite(flat).all():
                    failed(s, losses[-1] if losses else math.nan, i)
                perm, row0 = None, 0
                _record(hist, model, epoch, losses, time.perf_counter() - t0, X, y_raw,
                        validation, target, dtype, ranks)
                if path is not None:
                    _save(path, model, step, optimizer, rng, epoch + 1, 0, None, hist, seed, [])
                if sigint.hit:  # Ctrl-C during the metrics or the save: stop here
                    raise KeyboardInterrupt
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_postfix(hist))
                elif progress:
                    print(f"epoch {epoch + 1}/{epochs}  {_postfix(hist)}", flush=True)
                if target_loss is not None and hist.loss[-1] <= target_loss:
                    hist.stopped = "target_loss"
                    break
    finally:
        store.sync()
        if bar is not None:
            bar.close()
    return hist


class _HostParams:
    """The parameters in one host array (``flat``; ``model.params`` are views of it): the
    guard's finiteness check, backup and restore, each one pass over one buffer.  A step
    whose update keeps each entry before changing it and reports whether the new ones are
    finite (the data-parallel step: ``backup``, ``finite``) does the check and the backup
    in its own pass."""

    lazy = False  # the step returns its loss on every call

    def __init__(self, flat, params, step=None, guard=True):
        self.flat, self.good = flat, flat.copy()  # good: the last parameters known finite
        self.params = params  # what the step takes: model.params, views of flat
        self._by_step = guard and getattr(step, "backup", None) is not None
        if self._by_step:
            step.backup = self.good

    def finite(self, step) -> bool:
        if self._by_step:
            return step.finite
        return bool(np.isfinite(self.flat).all())

    def keep(self) -> None:
        if not self._by_step:  # else the step kept the entries before changing them
            np.copyto(self.good, self.flat)

    def restore(self) -> None:
        np.copyto(self.flat, self.good)

    def sync(self) -> None:
        """The host parameters are current (the device's copy is on the host)."""

    @staticmethod
    def shuffle(X, T, perm):
        Xs, Ts = X[perm], T[perm]
        return lambda i, j: (Xs[i:j], Ts[i:j])


def _device_store(step, params, guard, data):
    from .runtime.device import DeviceParams

    return DeviceParams(step, params, guard, data)


def _scheduled(optimizer, lr_schedule, epoch: int):
    """The optimizer of this epoch: ``optimizer`` with the learning rate of the schedule."""
    if "lr" not in optim.rule(optimizer).hyper:
        raise SymbpError(f"lr_schedule: {type(optimizer).__name__} has no hyperparameter lr")
    lr = lr_schedule(epoch)
    if isinstance(lr, (bool, np.bool_)) or not isinstance(lr, (int, float, np.number)) \
            or not math.isfinite(lr) or lr < 0:
        raise SymbpError(f"lr_schedule({epoch}) returned {lr!r}: a learning rate is a finite "
                         "number >= 0")
    return replace(optimizer, lr=float(lr))


def _flatten(params: dict, dtype) -> np.ndarray:
    """Move the parameters into one flat array and make ``params`` views of it.

    The step updates the views in place; the per-step guard then costs one finiteness
    check and one copy of a single buffer, however many parameters there are.
    """
    flat = np.empty(sum(v.size for v in params.values()), dtype=dtype)
    at = 0
    for k, v in params.items():
        view = flat[at:at + v.size].reshape(v.shape)
        view[...] = v
        params[k] = view
        at += v.size
    return flat


def _fail(model, store, epoch, s, loss, data, rows, path, guard):
    """Restore the last good parameters and raise the error that names the culprits."""
    store.sync()
    bad = [k for k, v in model.params.items() if not np.isfinite(v).all()]
    store.restore()
    causes = []
    for name, a in data.items():
        r = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))
        if len(r):
            causes.append(f"the data {name} has NaN/Inf in rows {rows[r][:8].tolist()} "
                          "(indices into your array): clean or drop them")
    if bad:
        causes.append(f"the update made parameter(s) {', '.join(bad)} non-finite")
    if not causes or not any("data" in c for c in causes):
        causes.append("the loss or gradient overflowed: lower the learning rate, scale the "
                      "inputs, or train in float64")
    kept = f"; the last good checkpoint {path} is unchanged" if path is not None else ""
    err = TrainingError(
        f"training stopped at epoch {epoch + 1}, step {s + 1}: the loss is {loss}; "
        f"{'; '.join(causes)}. The parameters are those "
        f"{'before this step' if guard else 'at the start of this epoch'}{kept}."
    )
    err.epoch, err.step, err.params = epoch + 1, s + 1, bad
    raise err


def _record(hist, model, epoch, losses, seconds, X, y, validation, target, dtype, ranks):
    hist.epoch.append(epoch + 1)
    hist.loss.append(float(np.mean(losses)) if losses else float("nan"))
    acc = None
    if ranks is not None and model.metric is not None:
        acc = evaluate(model, X, y, target, dtype, distributed=ranks)["accuracy"]
    elif model.metric is not None:
        acc = model.accuracy(predict(model, X, target, dtype), y)
    hist.accuracy.append(acc)
    if validation is not None:
        r = evaluate(model, validation[0], validation[1], target, dtype, distributed=ranks)
        hist.val_loss.append(r["loss"])
        hist.val_accuracy.append(r["accuracy"])
    hist.time.append(seconds)


def _postfix(hist) -> str:
    parts = [f"loss {hist.loss[-1]:.4f}"]
    if hist.accuracy[-1] is not None:
        parts.append(f"acc {hist.accuracy[-1]:.4f}")
    if hist.val_accuracy and hist.val_accuracy[-1] is not None:
        parts.append(f"val_acc {hist.val_accuracy[-1]:.4f}")
    return "  ".join(parts)


def _progress(progress, epochs, done):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm  # optional: a plain line per epoch without it
    except ImportError:
        return None
    return tqdm(total=epochs, initial=done, unit="epoch", leave=True)


# --- checkpoints ------------------------------------------------------------------------


def _save(path, model, step, optimizer, rng, epoch, row, perm, hist, seed, losses):
    """Checkpoint the state at a step boundary: resuming replays the rest exactly."""
    arrays = {f"param/{k}": v for k, v in model.params.items()}
    state = _opt_state(step) or {}
    for buf in optimizer.buffers:
        for k, v in state.get(buf, {}).items():
            arrays[f"opt/{buf}/{k}"] = v
    if perm is not None:
        arrays["perm"] = perm
    meta = {
        "epoch": epoch, "row": row, "t": int(state.get("t", 0)), "seed": seed,
        "optimizer": type(optimizer).__name__, "hyper": asdict(optimizer),
        "rng": rng.bit_generator.state, "history": hist.as_dict(), "losses": losses,
        "params": {k: list(v.shape) for k, v in model.params.items()},
        "dtype": np.dtype(next(iter(model.params.values())).dtype).str,
    }
    ckpt.save(path, arrays, meta)


def _restore(model, step, optimizer, rng, path, n):
    c = ckpt.load(path)
    m, a = c.meta, c.arrays
    try:
        shapes = {k: tuple(v) for k, v in m["params"].items()}
        want = {k: v.shape for k, v in model.params.items()}
        if shapes != want:
            raise TrainingError(f"checkpoint {path} holds parameters {shapes} but the model "
                                f"has {want}: it belongs to a different model")
        if m["optimizer"] != type(optimizer).__name__:
            raise TrainingError(f"checkpoint {path} was trained with {m['optimizer']}, not "
                                f"{type(optimizer).__name__}: its buffers do not fit")
        for k in model.params:
            np.copyto(model.params[k], a[f"param/{k}"], casting="unsafe")
        state = None
        if m["t"] > 0:
            state = optim.init_state(optimizer, model.params)
            for buf in optimizer.buffers:
                for k in model.params:
                    np.copyto(state[buf][k], a[f"opt/{buf}/{k}"], casting="unsafe")
            state["t"] = int(m["t"])
        _set_opt_state(step, state)
        rng.bit_generator.state = m["rng"]
        perm = a.get("perm")
        if perm is not None and (perm.shape != (n,) or perm.dtype.kind not in "iu"):
            raise TrainingError(f"checkpoint {path} was taken on {len(perm)} rows; "
                                f"resume it with the same data ({n} rows given)")
        hist = History(**m["history"])
        losses = [float(v) for v in m["losses"]]
        return int(m["epoch"]), int(m["row"]), perm, hist, losses
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, TrainingError):
            raise
        raise TrainingError(f"checkpoint {path} is incomplete or inconsistent: {err!r}") from None


__all__ = ["History", "fit", "evaluate", "predict"]
