"""Compile time of the training step as the network deepens: cold and from the disk cache.

    python bench/compile.py                       # depths 2,4,8,16,32, 3 processes each
    python bench/compile.py --depths 2,16 --rounds 5

A tanh MLP 64 -> 64 x depth -> 10 (float32, softmax-CE, SGD, batch 32), compiled with
``sb.compile_step`` for the 'cpu' target in a fresh process pinned to one core
(``taskset -c 0``): cold = an empty SYMBP_CACHE_DIR (which also holds Numba's cache), warm =
the same directory again.  Times are ``compile_step`` seconds (imports excluded) and the
median over ``--rounds`` fresh directories.  JAX is not installed here: the issue's JAX
figures (jit, pinned, same network) are printed beside ours for comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

JAX = 1.17  # issue 12: JAX jit's cold compile of this step, 1.15-1.19 s at every depth 2-32

SCRIPT = '''
import time
import numpy as np, sympy as sp, symbp as sb
depth = {depth}
N = sp.Symbol("N")
X, T = sp.MatrixSymbol("X", N, 64), sp.MatrixSymbol("T", N, 10)
H, params = X, []
sizes = [64] + [64] * depth + [10]
for k, (a, b) in enumerate(zip(sizes, sizes[1:])):
    W, c = sp.MatrixSymbol(f"W{{k}}", a, b), sp.MatrixSymbol(f"b{{k}}", 1, b)
    params += [W, c]
    H = sb.dense(H, W, c)
    if k < depth:
        H = sb.tanh(H)
L = sb.softmax_cross_entropy(H, T)
t = time.perf_counter()
step = sb.compile_step(L, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
print(time.perf_counter() - t)
'''


def once(depth: int, cache: str) -> float:
    env = {**os.environ, "SYMBP_CACHE_DIR": cache}
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    r = subprocess.run([*pin, sys.executable, "-c", SCRIPT.format(depth=depth)], env=env,
                       capture_output=True, text=True, cwd=cache)
    if r.returncode != 0:
        raise SystemExit(f"depth {depth} failed:\n{r.stderr[-2000:]}")
    return float(r.stdout.split()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="2,4,8,16,32")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; medians of {args.rounds} fresh processes\n")
    print("| depth | cold (s) | warm (s) | JAX cold (issue 12) | cold/JAX |")
    print("|---|---|---|---|---|")
    for d in (int(x) for x in args.depths.split(",")):
        cold, warm = [], []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as cache:
                cold.append(once(d, cache))
                warm.append(once(d, cache))
        c, w = statistics.median(cold), statistics.median(warm)
        print(f"| {d} | {c:.2f} | {w:.2f} | 1.15-1.19 | {c / JAX:.1f} |", flush=True)


if __name__ == "__main__":
    main()
