"""BLAS threads of the compiled kernels: how many the matrix products use, measured while a
compiled function runs (``blas_threads="auto"``) or fixed by the user.

The kernels call OpenBLAS through ``symbp.backends.blas.gemm``; ``BLAS`` sets its thread
count, ``ThreadTuner`` decides it, ``for_kernel`` reads the user's option and the
kernel's source (BLAS calls? prange loops?) once per compiled function.
"""

from __future__ import annotations

import math
import os
import time

from ..errors import SymbpError


class Blas:
    """The thread count of the OpenBLAS the kernels call (``symbp.backends.blas.LIBRARY``).

    Whether a second thread pays depends on the moment, not the program: on this
    project's 2-core machine the W2 step (two 128x784x256 products) took 1.0-1.1 ms on
    two threads against 1.45-1.5 ms on one while the machine was otherwise idle, and
    3.9 ms against 2.1 ms while one other busy process ran (a GEMM split in two waits
    for its slower half; an earlier run on a busier machine saw 3.1-6.8 ms against 1.5-1.7).  So
    a compiled function measures it while it is called (``ThreadTuner``,
    ``blas_threads="auto"``, the default); a fixed ``blas_threads=n`` is kept as given.
    A 'parallel' kernel with prange loops keeps one BLAS thread: its loops own the cores,
    and two pools would fight.

    The user's own matmuls are left alone.  When the kernels call NumPy's OpenBLAS (the
    one ``np.dot`` uses), ``use`` sets its count for one kernel call and ``done`` gives the
    user's count back right after (two ctypes calls, ~1 µs, and only when the counts
    differ).  symbp's own copy (``blas.SHARED`` false) is set the same way and kept: no one
    else calls it.  It is read on every call all the same, since threadpoolctl's limits
    reach it too.  Beside it, NumPy's copy takes the float64 products and the float32 ones
    of at most 64^3 multiply-adds (``blas.OPENBLAS_SMALL``): set and given back as above.
    A float32 kernel then wakes only one pool: OpenBLAS runs a product of at most 64^3
    multiply-adds on the calling thread whatever its count (two pools taking turns in one
    step fight for the cores: bench/RESULTS.md).  Intel's MKL (on Intel CPUs where
    ``symbp[mkl]`` is installed) is set as symbp's own copy is, for the calling thread only
    (``blas.threads_of``), with symbp's own copy beside it (set and kept), or NumPy's
    where that is missing (set and given back).  When they call SciPy's copy, ``use`` sets
    it through threadpoolctl and keeps it (``now``); without threadpoolctl the library
    default stays.
    """

    def __init__(self):
        self.libs = None  # SciPy's copy: its threadpoolctl controllers
        self.now = None  # SciPy's copy: the count set last.  OpenBLAS by address: None
        self.shared = False  # the kernels' OpenBLAS is NumPy's copy, the user's too
        # OpenBLAS by address: get/set_num_threads (ctypes) of the kernels' library and of
        # the OpenBLAS beside it, and the user's counts of NumPy's copy to give back
        self._get = self._set = self._get_np = self._set_np = None
        self.user = self.user_np = None
        self.shared_np = True  # the library beside is NumPy's copy: give its count back

    def use(self, n: int) -> None:
        if self._get is not None:  # OpenBLAS by address, on every call: one ctypes read
            now = self._get()
            if now != n:
                self._set(n)
                if self.shared:
                    self.user = now
            if self._get_np is not None:
                now = self._get_np()
                if now != n:
                    self._set_np(n)
                    if self.shared_np:
                        self.user_np = now
            return
        if n == self.now:
            return
        if self.libs is None:
            self._find()
            if self._get is not None:
                self.use(n)
                return
        for c in self.libs:
            c.set_num_threads(n)
        self.now = n

    def done(self) -> None:
        """After a kernel call: the user's thread count back (NumPy's OpenBLAS)."""
        if self.user is not None:
            self._set(self.user)
            self.user = None
        if self.user_np is not None:
            self._set_np(self.user_np)
            self.user_np = None

    def _find(self) -> None:
        from ..backends.blas import OPENBLAS as lib
        from ..backends.blas import OPENBLAS_SMALL as beside
        from ..backends.blas import SHARED, SMALL_SHARED, threads_of

        self.libs = []
        if lib is not None:
            self._get, self._set = threads_of(lib)
            self.shared = SHARED
            if beside is not None:
                self._get_np, self._set_np = threads_of(beside)
                self.shared_np = SMALL_SHARED  # beside MKL it may be symbp's own copy
            return
        try:
            import scipy.linalg.cython_blas  # noqa: F401  (load it, so it can be found)
            from threadpoolctl import ThreadpoolController

            self.libs = [c for c in ThreadpoolController().lib_controllers
                         if c.user_api == "blas" and "scipy" in os.path.basename(
                             os.path.dirname(c.filepath))]
        except ImportError:
            pass


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
    """``blas_threads="auto"``: run on 1 or on all ``n`` cores, whichever is faster now.

    Every call is timed (two clock reads).  The tuner runs its current choice and now and
    then *probes* the other one for a few calls, then keeps whichever had the lower mean
    time.  The mean, not the median or the minimum: a run lasts the sum of its calls, and
    next to a busy process two threads are often bimodal (fast while the scheduler leaves
    our second thread alone, many times slower when it does not), so a median or a minimum
    can call fast a choice that costs more in total.  Means drop their largest sample
    (``trimmed``): one call the OS interrupted must not decide for a window.  The current
    choice's mean is over its last ``WINDOW`` calls, enough to hold several of a bimodal
    pattern's slow calls: measured next to a spin loop (W2, bench/RESULTS.md), two threads
    took 0.7 ms and, one call in five or six, 4.8 ms while the OpenBLAS thread waited out
    the neighbour's time slice; a mean of 1.4 ms against one thread's 1.2, which a window
    of 8 calls less its largest called 0.7.

    When to probe:

    - **a jump**: all but one of the current choice's last ``TAIL`` calls above ``JUMP``
      times its mean at the last decision: a neighbour process took a core, or the
      machine slowed down.  Three slow calls of four, not one or two: on a loaded machine
      one call in a few dozen loses its core for a time slice (5-40x a W2 step) on any
      thread count.  Probe at once, against the second fastest of those calls, not the
      level from before;
    - **a drift**: the mean of the last ``RECENT`` calls (less their largest) above
      ``DRIFT`` times the mean at the last decision, which the bimodal pattern above
      gives without ever making three calls of four slow.  Probe at once, against that
      recent mean;
    - **periodically**: after ``wait`` seconds of calls, a wait that doubles from ``WAIT``
      to ``MAX_WAIT`` each time a probe confirms the choice (a steady machine is probed
      ever more rarely) and starts again at ``WAIT`` after a switch or a jump.  This is
      how a neighbour that *left* is found: the current choice does not change then, the
      other one got faster.

    What probing may cost: each probe call's excess over the current choice's mean is
    counted in ``spent``; a probe starts only while ``spent`` is at most ``BUDGET`` of
    all the time measured.  A probe ends, keeping the current choice, at its first call
    slower than 2 * ``ABORT`` times that mean, its second slower than ``ABORT`` times, or
    after ``PROBE`` calls or more once its mean is not better; it switches only after
    ``CONFIRM`` calls that stayed better (a choice that is fast in stretches must not win
    on a few calls).  So a choice 6x (or 150x) worse costs a few % of the run however long
    the run is, and a choice as good costs nothing to check.  The first call after a
    change of thread count wakes or parks BLAS threads: not a sample.  More threads are
    kept only when at least ``1 - GAIN`` faster: one thread disturbs the rest of the
    machine least.  ``clock`` (seconds, default ``time.perf_counter``) times the calls made
    through ``start`` / ``stop``; ``use`` sets the thread count (default ``BLAS.use``).
    """

    WINDOW, RECENT, TAIL, PROBE, CONFIRM, GAP = 32, 16, 4, 4, 16, 8
    JUMP, DRIFT, ABORT, GAIN, BUDGET = 1.5, 1.3, 2.0, 0.95, 0.03
    WAIT, MAX_WAIT = 0.05, 1.0

    def __init__(self, n: int, clock=None, use=None):
        self.clock = clock or time.perf_counter
        self.use = use or BLAS.use
        self.cands = (1, n)
        self.best = 1  # the choice being run; ``now`` differs from it during a probe
        self.now = 1
        self.win: list = []  # the current choice's last WINDOW call times
        self.level = math.inf  # their mean when the choice was last decided
        self.high = math.inf  # JUMP times that
        self.probe: list | None = None  # the other choice's samples while probing
        self.ref = 0.0  # the current choice's mean when the probe began
        self.keep = 0  # a probe begun at a jump or drift: the calls of the window to keep
        self.strikes = 0  # probe calls slower than ABORT * ref
        self.fresh = False  # this call follows a change of thread count: not a sample
        self.calls = 0  # calls on the current choice since the last probe
        self.elapsed = 0.0  # seconds of all recorded calls
        self.spent = 0.0  # seconds the probes cost above the current choice
        self.due = 0.0  # ``elapsed`` at which the next periodic probe may start
        self.wait = self.WAIT
        self.probes = self.switches = 0

    def next(self) -> int:
        """Threads for the next call."""
        return self.now

    def start(self) -> float:
        """Before a call: set the BLAS threads for it; returns its start time."""
        self.use(self.now)
        return self.clock()

    def stop(self, t0: float | None) -> None:
        """After a call started with ``start`` (``t0`` None: it is not to be counted)."""
        self.record(None if t0 is None else self.clock() - t0)

    def record(self, seconds: float | None) -> None:
        """After a call on ``next()`` threads: its time (None: not timed or did not run)."""
        if seconds is None:
            return
        self.elapsed += seconds
        if self.probe is not None:
            self._probe_step(seconds)
            return
        if self.fresh:  # back from a probe: the thread count changed under this call, so
            self.fresh = False  # not a sample; nor charged to the probe, since a neighbour
            return  # that arrived meanwhile would make it look expensive
        win = self.win
        win.append(seconds)
        if len(win) > self.WINDOW:
            del win[0]
        self.calls += 1
        if self.spent > self.BUDGET * self.elapsed:
            return
        if seconds > self.high:
            # a jump: all but one of the last TAIL calls above JUMP * level
            if len(win) >= self.TAIL and sorted(win[-self.TAIL:])[1] > self.high:
                self.wait = self.WAIT
                self._begin_probe(sorted(win[-self.TAIL:])[1], keep=self.TAIL)
                return
        elif not self.calls & 3 and len(win) >= self.RECENT:
            # a drift: the recent mean (a bimodal pattern's slow calls included) well
            # above.  Looked at every fourth call (a drift is slow to show anyway) and not
            # on a slow call: a jump forming (slow call after slow call) is the jump
            # test's, with its better reference
            recent = trimmed(win[-self.RECENT:])
            if recent > self.DRIFT * self.level:
                self.wait = self.WAIT
                self._begin_probe(recent, keep=self.RECENT)
                return
        if self.calls >= self.GAP and self.elapsed >= self.due:
            self._begin_probe(trimmed(win))

    def _begin_probe(self, ref: float, keep: int = 0) -> None:
        self.ref, self.keep, self.strikes = ref, keep, 0
        self.probe = []
        self.probes += 1
        self.now = self.cands[1] if self.best == self.cands[0] else self.cands[0]
        self.fresh = True

    def _probe_step(self, seconds: float) -> None:
        self.spent += max(0.0, seconds - self.ref)
        if seconds > 2 * self.ABORT * self.ref:  # far worse (or interrupted): stop paying
            self._end_probe(False)
            return
        if self.fresh:  # the call that woke or parked the BLAS threads: not a sample
            self.fresh = False
            return
        probe = self.probe
        probe.append(seconds)
        if seconds > self.ABORT * self.ref:
            self.strikes += 1
        m = trimmed(probe)
        many, one = (m, self.ref) if self.now != 1 else (self.ref, m)
        better = (self.cands[1] if many < self.GAIN * one else 1) == self.now
        if self.strikes >= 2 or (len(probe) >= self.PROBE and not better):
            self._end_probe(False)
        elif len(probe) >= self.CONFIRM:
            self._end_probe(True)

    def _end_probe(self, switch: bool) -> None:
        if switch:
            self.best, self.win = self.now, list(self.probe)
            self.wait = self.WAIT
            self.switches += 1
        else:
            self.now = self.best
            self.fresh = True
            self.wait = min(2 * self.wait, self.MAX_WAIT)
            if self.keep:  # a jump or a drift: the calls before describe another machine
                del self.win[:-self.keep]
        self.level = trimmed(self.win)
        self.high = self.JUMP * self.level
        self.probe = None
        self.calls = 0
        self.due = self.elapsed + self.wait


def trimmed(xs: list) -> float:
    """The mean of ``xs`` without its largest value: a run's time is the sum of its calls,
    but one call the OS interrupted must not decide for a whole window."""
    return (sum(xs) - max(xs)) / (len(xs) - 1) if len(xs) > 1 else xs[0]


def for_kernel(target: str, options: dict, source: str):
    """``(threads, tuner)`` for a compiled kernel: a fixed thread count, or 1 to start with
    and the ``ThreadTuner`` that measures (``blas_threads="auto"``, BLAS calls in the
    kernel, more than one core)."""
    threads = blas_threads(target, options, prange="in prange(" in source)
    tuner = ThreadTuner(cores()) if threads == "auto" and "_gemm(" in source else None
    return (1 if threads == "auto" else threads), tuner
