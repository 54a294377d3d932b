"""BLAS threads of the compiled kernels: how many the matrix products use, measured while a
compiled function runs (``blas_threads="auto"``) or fixed by the user.

The kernels call SciPy's OpenBLAS through ``symbp.backends.blas.gemm``; ``BLAS`` sets its
thread count, ``ThreadTuner`` decides it, ``for_kernel`` reads the user's option and the
kernel's source (BLAS calls? prange loops?) once per compiled function.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..errors import SymbpError


class Blas:
    """The thread count of the OpenBLAS the kernels call (SciPy's copy, as njit's np.dot).

    Whether a second thread pays depends on the moment, not the program: on this
    project's 2-core machine the W2 step (two 128x784x256 products) took 1.0-1.1 ms on
    two threads against 1.45-1.5 ms on one while the machine was otherwise idle, and
    3.9 ms against 2.1 ms while one other busy process ran (a GEMM split in two waits
    for its slower half; an earlier shared session saw 3.1-6.8 ms against 1.5-1.7).  So
    a compiled function measures it while it is called (``ThreadTuner``,
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


BLAS = Blas()


def blas_threads(target: str, options: dict, prange: bool = False):
    """The BLAS thread count to use: an int, or "auto" (more than one core and no prange
    loop in the kernel: measured while it runs, ``ThreadTuner``).  A kernel with prange
    loops uses 1 for "auto"."""
    n = options.get("blas_threads", "auto")
    if n == "auto":
        return "auto" if not prange and cores() > 1 else 1
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise SymbpError(f'blas_threads must be a positive int or "auto", not {n!r}')
    return n


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ThreadTuner:
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


def for_kernel(target: str, options: dict, source: str):
    """``(threads, tuner)`` for a compiled kernel: a fixed thread count, or 1 to start with
    and the ``ThreadTuner`` that measures (``blas_threads="auto"``, BLAS calls in the
    kernel, more than one core)."""
    threads = blas_threads(target, options, prange="in prange(" in source)
    tuner = ThreadTuner(cores()) if threads == "auto" and "_gemm(" in source else None
    return (1 if threads == "auto" else threads), tuner
