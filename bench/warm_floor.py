"""What a warm start cannot go below: Numba's import and its first load from its cache.

    python bench/warm_floor.py              # 5 fresh processes, pinned to core 0
    python bench/warm_floor.py --rounds 9 --core 1

Each fresh process (symbp, NumPy and SymPy imported first, as in bench/compile.py) times,
in process CPU seconds: ``import numba``; ``import symbp.backends.numba_cpu`` (symbp's
backend, the passes and the runtime); and loading a one-line ``@njit(cache=True)`` function
whose machine code is already in Numba's cache (the first load of any cached function
sets up Numba's typing and target registries: it imports numba.np.* and SciPy's BLAS).
A warm ``compile_step`` makes all three, so their sum is its floor on this machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

TRIVIAL = '''
from numba import njit

@njit("(float32[::1],)", cache=True)
def first(x):
    return x[0] + 1
'''

SCRIPT = '''
import sys, time
import numpy, sympy, symbp
sys.path.insert(0, {where!r})
c0 = time.process_time()
import numba
c1 = time.process_time()
import symbp.backends.numba_cpu
c2 = time.process_time()
import floor_trivial
c3 = time.process_time()
print(c1 - c0, c2 - c1, c3 - c2)
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--core", default="0")
    args = ap.parse_args()
    pin = ["taskset", "-c", args.core] if shutil.which("taskset") else []
    runs = []
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "floor_trivial.py"), "w") as f:
            f.write(TRIVIAL)
        script = SCRIPT.format(where=d)
        for k in range(args.rounds + 1):  # the first fills Numba's cache
            r = subprocess.run([*pin, sys.executable, "-c", script], capture_output=True,
                               text=True, check=True, cwd=d)
            if k:
                runs.append([float(x) for x in r.stdout.split()[-3:]])
    cols = list(zip(*runs))
    med = [statistics.median(c) for c in cols]
    total = statistics.median(sum(r) for r in runs)
    print(f"load average {os.getloadavg()[0]:.1f}; medians of {args.rounds} fresh processes, "
          "CPU seconds\n")
    print("| import numba | import symbp's backend | first cached load | sum |")
    print("|---|---|---|---|")
    print(f"| {med[0]:.3f} | {med[1]:.3f} | {med[2]:.3f} | {total:.3f} |")


if __name__ == "__main__":
    main()
