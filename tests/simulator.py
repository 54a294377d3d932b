"""Numba's CUDA simulator, fast enough for the tests' subprocesses.

The simulator runs each CUDA thread as a Python thread, and its scheduler
(``numba.cuda.simulator.kernel.BlockManager.run``) polls them in a loop that holds the
GIL.  With Python's default switch interval (5 ms) every thread of a block waited up to
5 ms for its turn, ~60 ms a block: ``tests/cuda_check.py step`` took 257 s, 82 % of it in
the simulator's launches.  With a 20 µs interval the GIL passes at once and the same run
takes 56-59 s, printing the default interval's report exactly (3 runs of 3).

Threads then interleave finely, which uncovers a race of the simulator's own: a block's
shared array is looked up by the line that allocates it and created when missing, two
steps another thread can fall between, so two threads of one block could each get an
array of their own (a reduction then sums garbage: 2 of 2 runs of ``cuda_check.py step``
got a wrong fit).  ``fast`` makes that allocation atomic first, and leaves the switch
interval alone where the simulator's internals are not the ones patched here.
"""

import sys
import threading


def fast() -> None:
    """Call first in a process that runs kernels in the simulator."""
    if _atomic_shared_arrays():
        sys.setswitchinterval(2e-5)


def _atomic_shared_arrays() -> bool:
    """``cuda.shared.array`` in the simulator, one array per block and line under a lock;
    False (nothing changed) where the simulator is not built as this expects."""
    import numpy as np
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    shared = getattr(kernelapi, "FakeCUDAShared", None)
    if shared is None or not hasattr(shared(0), "_allocations"):
        return False
    plain = shared.array
    lock = threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:  # dynamic shared memory: one buffer made up front, no race
            return plain(self, shape, dtype)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)  # the kernel's line, as the simulator keys it
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    shared.array = array
    return True
