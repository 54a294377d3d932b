"""Data-parallel training over MPI (mpi4py): every rank holds the whole model, computes the
gradient of its shard of each global batch, and one sum over ranks makes them agree.

This is Horovod's scheme.  With a global batch of B rows split into shards of n_r rows
(Σ n_r = B) and a loss that is the mean over the batch's rows (plus terms in the
parameters alone, such as a penalty),

    L(batch) = Σ_r (n_r / B) · L(shard r),   so   ∇L(batch) = Σ_r (n_r / B) · ∇L(shard r).

Each rank scales its shard's gradient by n_r / B and one sum over ranks of a single
contiguous buffer (all gradients, then the loss: ``Allreduce(SUM)``, or on one machine
the rows of a shared-memory window that the update adds, ``summer``) yields the gradient
of the global batch on every rank, exactly, also when B does not divide by the number of
ranks.  Every rank then applies the same optimizer update to the same parameters
(broadcast from rank 0 at the start), so the parameters stay identical without ever being
sent again.

The backends' fused step (``compile_step`` with 'cpu'/'parallel') cannot be used here:
it applies the update inside the kernel right after the backward pass, and the reduction
has to come between the gradient and the update.  So a rank calls the compiled gradient
(``symbp.compile``, same target), which writes into the summed buffer itself, then one
compiled update over the flat buffers.  What a step costs beyond its shard's gradient is
what does not shrink with more ranks: the sum, the update of every parameter on every
rank, and the n_r/B scaling when shards differ (with equal shards the update
applies 1/K itself).  A reduce-scatter, an update of 1/K of the parameters and an
allgather (ZeRO-1) would save part of the update (about 0.1 of W2's 1.7 ms step on two
ranks, bench/RESULTS.md) but leave each rank 1/K of the optimizer state, which rank 0's
checkpoints (also the one Ctrl-C writes mid-epoch) need whole.

``import symbp`` never imports mpi4py: it is imported when ``fit(..., distributed='mpi')``
asks for it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import numpy as np

from .. import api as sb
from .. import optim
from ..errors import SymbpError, TrainingError

INSTALL = "pip install 'symbp[mpi]'"


def world():
    """MPI's COMM_WORLD, or a SymbpError saying what to install."""
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise SymbpError(
            f"distributed='mpi' needs mpi4py and an MPI library ({err}): {INSTALL} "
            "installs both (MPICH's wheel, with its mpiexec); then run the script with "
            "`mpiexec -n K python script.py`") from None
    return MPI.COMM_WORLD


def choose(distributed) -> Ranks | None:
    """``fit``'s ``distributed`` argument: 'mpi'; False (this process alone); or None
    (this process alone unless the environment variable SYMBP_DISTRIBUTED says 'mpi')."""
    if isinstance(distributed, Ranks):
        return distributed
    if distributed is False:
        return None
    if distributed is None:
        distributed = os.environ.get("SYMBP_DISTRIBUTED", "") or None
    if distributed is None:
        return None
    if distributed != "mpi":
        raise SymbpError(f"distributed={distributed!r}: use 'mpi' (data-parallel over "
                         "mpiexec's processes) or None (this process alone)")
    return Ranks(world())


def shard(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of a batch of ``n`` rows that ``rank`` of ``size`` takes: the first
    n mod size ranks take one row more (a rank may take none in a batch of < size rows)."""
    q, extra = divmod(n, size)
    lo = rank * q + min(rank, extra)
    return lo, lo + q + (rank < extra)


class Ranks:
    """This process's place among the ranks of a communicator."""

    def __init__(self, comm):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()

    @property
    def root(self) -> bool:
        return self.rank == 0

    def broadcast(self, flat: np.ndarray) -> None:
        """Rank 0's values of a buffer, in place on every rank."""
        self.comm.Bcast(flat, root=0)

    def sum(self, a: np.ndarray) -> None:
        """The sum over ranks of a buffer, in place on every rank."""
        from mpi4py import MPI

        self.comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)

    def own(self, rows: np.ndarray, arrays: dict, drawn: dict) -> dict:
        """This rank's shard of the global batch of ``rows`` (indices into ``arrays``,
        which every rank holds whole) and of ``drawn`` (arrays of the batch's rows, such
        as random slopes), gathered alone."""
        lo, hi = shard(len(rows), self.rank, self.size)
        mine = rows[lo:hi]
        return {**{k: a[mine] for k, a in arrays.items()},
                **{k: v[lo:hi] for k, v in drawn.items()}}

    def step(self, fn: sb.Compiled, optimizer, params: dict, flat: np.ndarray) -> Step:
        return Step(fn, optimizer, params, flat, self)

    @contextlib.contextmanager
    def stop_all_on_error(self):
        """An exception on one rank alone would leave the others waiting in the next
        collective forever: report it and abort the whole job instead.  A TrainingError
        of the loop is raised on every rank alike (it comes from the reduced loss and the
        identical parameters), so it propagates normally."""
        try:
            yield
        except TrainingError:
            raise
        except BaseException as err:
            tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
            sys.stderr.write(f"symbp: rank {self.rank} of {self.size} failed; stopping every "
                             f"rank (MPI Abort):\n{tb}")
            sys.stderr.flush()
            self.comm.Abort(1)


class Allreduce:
    """The sum over ranks by MPI's ``Allreduce``: one buffer [∇w1 … ∇wk, loss] per rank,
    summed in place; the update then reads one row."""

    def __init__(self, comm, size: int, dtype):
        self.comm = comm
        self.buf = np.zeros(size + 1, dtype=dtype)
        self.rows = self.buf[:-1].reshape(1, size)

    def mine(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's gradient buffer and its 1-entry loss buffer, for this step."""
        return self.buf[:-1], self.buf[-1:]

    def reduce(self) -> tuple[np.ndarray, float]:
        """The rows whose sum is the global gradient, and the global loss."""
        from mpi4py import MPI

        self.comm.Allreduce(MPI.IN_PLACE, self.buf, op=MPI.SUM)
        return self.rows, float(self.buf[-1])


class Shared:
    """The sum over ranks that share one machine's memory, with no pass of its own.

    Each rank writes its gradient into its row of one MPI-3 shared-memory window; after a
    barrier every rank's update reads all the rows and adds them as it reads them, in
    rank order (``numba_cpu.generate_update``): the same sum on every rank, so the
    parameters stay identical.  An ``Allreduce`` would copy the buffer in and out of
    MPICH's shared segment on both ranks before the update read it.  Two sets of rows are
    used in turn: a rank writes step s+2's gradient only after the barrier of step s+1,
    which every rank reaches after its update of step s has read the rows of step s.
    """

    def __init__(self, node, size: int, dtype):
        from mpi4py import MPI

        self.node, self.rank, self.k = node, node.Get_rank(), node.Get_size()
        dtype = np.dtype(dtype)
        total = 2 * self.k * (size + 1)
        self.win = MPI.Win.Allocate_shared(total * dtype.itemsize if self.rank == 0 else 0,
                                           dtype.itemsize, comm=node)
        mem, _ = self.win.Shared_query(0)
        whole = np.ndarray(buffer=mem, dtype=dtype, shape=(total,))
        self.grads = whole[:2 * self.k * size].reshape(2, self.k, size)
        self.losses = whole[2 * self.k * size:].reshape(2, self.k)
        self.win.Lock_all()  # one passive epoch for the window's life: Sync orders memory
        self.turn = 0
        # this rank's row of each half, the same objects every step (the gradient's cut of
        # a buffer is kept for the buffer it was made for)
        self._mine = [(self.grads[t, self.rank], self.losses[t, self.rank:self.rank + 1])
                      for t in (0, 1)]

    def mine(self) -> tuple[np.ndarray, np.ndarray]:
        return self._mine[self.turn]

    def reduce(self) -> tuple[np.ndarray, float]:
        self.win.Sync()  # this rank's writes are visible ...
        self.node.Barrier()  # ... once every rank has written its row
        self.win.Sync()
        rows, losses = self.grads[self.turn], self.losses[self.turn]
        self.turn ^= 1
        loss = losses[0]
        for x in losses[1:]:  # in rank order, in the buffer's dtype, as the update adds
            loss = loss + x
        return rows, float(loss)


_SHARED: dict = {}  # (communicator, size, dtype) -> Shared: a window outlives its step


def summer(comm, size: int, dtype):
    """How this job sums a gradient buffer of ``size`` entries over its ranks: through
    shared memory when every rank is on this machine, else MPI's Allreduce.
    ``SYMBP_MPI_SUM=allreduce`` asks for the Allreduce (``shared``, the default, falls
    back to it across machines)."""
    how = os.environ.get("SYMBP_MPI_SUM", "shared")
    if how not in ("shared", "allreduce"):
        raise SymbpError(f"SYMBP_MPI_SUM={how!r}: use 'shared' (the ranks on one machine "
                         "sum through shared memory) or 'allreduce' (MPI's Allreduce)")
    from mpi4py import MPI

    if how == "shared" and comm.Get_size() > 1:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        if node.Get_size() == comm.Get_size():  # every rank here: one window holds all
            key = (MPI.Comm.py2f(comm), size, np.dtype(dtype).str)
            if key not in _SHARED:
                _SHARED[key] = Shared(node, size, dtype)
            else:
                node.Free()
            return _SHARED[key]
        node.Free()
    return Allreduce(comm, size, dtype)


class Step:
    """``loss = step(params, size, **data)``: ``data`` is this rank's shard of a global
    batch of ``size`` rows; every rank returns the loss of the global batch and holds the
    same updated parameters.  ``state`` holds the optimizer buffers, as for one process.

    ``params`` are views of ``flat`` in order (``fit`` keeps them so).  On the Numba
    targets the compiled gradient writes straight into the buffer that is summed
    (``fn.kernel.fn.into``: no gradient arrays to allocate and copy per step), the sum is
    ``summer``'s, and one compiled loop over the flat buffers applies the update
    (``numba_cpu.build_update``; NumPy's update makes a temporary per operation: for Adam
    on W2 it took longer than the gradient itself).  That loop also keeps each entry in
    ``backup`` first and reports in ``finite`` whether every updated entry is finite:
    ``fit``'s guard then costs no pass of its own.  On 'numpy' the gradient's arrays are
    copied into the buffer, MPI's Allreduce sums it and the update is the reference
    ``optim.update``.  ``optimizer`` is read on every call: a schedule may replace it by
    one of the same kind with another learning rate.
    """

    def __init__(self, fn: sb.Compiled, optimizer, params: dict, flat: np.ndarray,
                 ranks: Ranks):
        self.fn, self.optimizer, self.ranks, self.flat = fn, optimizer, ranks, flat
        self.state = None
        self._kernel = None
        self.backup = None  # where the update keeps each entry first; None: no update kernel
        self.finite = True  # every entry the last update wrote is finite
        into = getattr(fn.kernel, "fn", None)
        into = getattr(into, "into", None)
        self._into = into if list(params) == [w.name for w in fn.wrt] else None
        if fn.target != "numpy":  # the update runs on the host's flat buffers
            from ..backends.numba_cpu import build_update

            self.sum = summer(ranks.comm, flat.size, flat.dtype)
            parts = self.sum.k if isinstance(self.sum, Shared) else 1
            self._kernel = build_update(optim.rule(optimizer), flat.dtype, parts)
            self._f64 = np.zeros(len(optim.rule(optimizer).hyper) + 1)  # hyper, then 1/K
            self.backup = np.empty(0, flat.dtype)  # no backup until fit's guard asks
        else:
            self.sum = Allreduce(ranks.comm, flat.size, flat.dtype)
        self._flat_state = None  # (state dict, {buffer: flat array}) when the kernel runs

    @property
    def source(self) -> str:
        return self.fn.source

    def __call__(self, params: dict, size: int, /, **data) -> float:
        if self.state is None:
            self.state = optim.init_state(self.optimizer, params)
        n = len(next(iter(data.values())))
        # ∇L(batch) = Σ_r (n_r / B) ∇L(shard r).  With equal shards that is 1/K of the sum,
        # which the compiled update applies as it reads it (one pass over the buffer less);
        # otherwise each rank scales its own gradient before the sum.
        fold = self._kernel is not None and size % self.ranks.size == 0
        grad, loss = self.sum.mine()
        if n:
            if self._into is not None:
                loss[0] = self._into(grad, *self.fn.bind({**params, **data}))
            else:
                loss[0], grads = self.fn(**params, **data)
                at = 0
                for k, v in params.items():
                    grad[at:at + v.size] = grads[k].ravel()
                    at += v.size
            if not fold and n != size:
                np.multiply(grad, n / size, out=grad)
                np.multiply(loss, n / size, out=loss)
        else:  # fewer rows than ranks: this rank adds nothing to the sum
            grad[...] = 0
            loss[...] = 0
        rows, total = self.sum.reduce()
        scale = n / size if fold else 1.0
        if self._kernel is None:
            optim.update(self.optimizer, params, self._grads(rows[0], params), self.state)
        else:
            self.state["t"] += 1
            self._f64[:-1] = optim.hyper(self.optimizer)
            self._f64[-1] = scale
            self.finite = self._kernel(self.flat, rows, self.backup, *self._buffers(params),
                                       self._f64, self.state["t"])
        return total * scale

    @staticmethod
    def _grads(flat: np.ndarray, params: dict) -> dict:
        grads, at = {}, 0
        for k, v in params.items():
            grads[k] = flat[at:at + v.size].reshape(v.shape)
            at += v.size
        return grads

    def _buffers(self, params) -> list:
        # The optimizer buffers as flat arrays whose per-parameter views are the state's, so
        # checkpoints see them; a state set from outside (resume) is copied in once.
        if self._flat_state is None or self._flat_state[0] is not self.state:
            flats = {}
            for b in self.optimizer.buffers:
                flats[b] = np.concatenate([self.state[b][k].ravel() for k in params])
                at = 0
                for k, v in params.items():
                    self.state[b][k] = flats[b][at:at + v.size].reshape(v.shape)
                    at += v.size
            self._flat_state = (self.state, flats)
        return [self._flat_state[1][b] for b in self.optimizer.buffers]


__all__ = ["Allreduce", "Ranks", "Shared", "Step", "choose", "shard", "summer", "world"]
