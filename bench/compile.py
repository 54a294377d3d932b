"""Compile time of the training step as the network deepens: cold, from the disk cache, and
JAX's cold jit compile of the same step.

    python bench/compile.py                       # depths 2,4,8,16,32, 3 processes each
    python bench/compile.py --depths 2,16 --rounds 5
    python bench/compile.py --base /tmp/main      # another checkout beside this one, interleaved
    python bench/compile.py --core 1              # pinned to core 1 instead of 0
    python bench/compile.py --depths 2 --cnn      # and two CNNs (no JAX column)

A tanh MLP 64 -> 64 x depth -> 10 (float32, softmax-CE, SGD, batch 32), compiled with
``sb.compile_step`` for the 'cpu' target in a fresh process pinned to one core
(``taskset -c 0``): cold = an empty SYMBP_CACHE_DIR (which also holds Numba's cache), warm =
the same directory again; cold, Numba started = an empty directory, with Numba imported
and set up before the clock starts (symbp's backend imported, one trivial function
compiled), as JAX's figure leaves out its import and client start.  Times are
``compile_step`` seconds (symbp's import excluded; Numba's, which compile_step makes,
included unless started) and the median over ``--rounds`` fresh directories, with the
process's CPU seconds of the same span in brackets.  JAX:
``jax.jit`` of value_and_grad plus the SGD update, ``lower().compile()`` seconds in a
fresh pinned process (JAX's import and CPU client start excluded; its persistent
compilation cache is off by default), skipped with a note when JAX is missing.
With ``--base`` every measurement runs once per checkout, alternating, so drift of a busy
machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

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
{start}
t, c = time.perf_counter(), time.process_time()
step = sb.compile_step(L, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
print(time.perf_counter() - t, time.process_time() - c)
'''

# "started": Numba imported and set up before the clock starts, as JAX's figure leaves out
# its import and CPU client: symbp's backend imported and one trivial function compiled
# (which loads Numba's typing and lowering registries and sets up LLVM), uncached
START = '''
from numba import njit
import symbp.backends.numba_cpu  # noqa: F401
njit(lambda x: x + 1)(1.0)
'''

JAX_SCRIPT = '''
import time
import jax, jax.numpy as jnp
depth = {depth}
sizes = [64] + [64] * depth + [10]
params = [(jnp.zeros((a, b), jnp.float32), jnp.zeros((1, b), jnp.float32))
          for a, b in zip(sizes, sizes[1:])]
X, T = jnp.zeros((32, 64), jnp.float32), jnp.zeros((32, 10), jnp.float32)

def loss(params, X, T):
    H = X
    for k, (W, b) in enumerate(params):
        H = H @ W + b
        if k < depth:
            H = jnp.tanh(H)
    return -jnp.mean(jnp.sum(T * jax.nn.log_softmax(H), axis=1))

def step(params, X, T):
    value, grads = jax.value_and_grad(loss)(params, X, T)
    return value, jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)

t, c = time.perf_counter(), time.process_time()
jax.jit(step).lower(params, X, T).compile()
print(time.perf_counter() - t, time.process_time() - c)
'''


# --cnn: two convolutional networks, one step each (Adam): the CNN of `symbp demo --model
# cnn` in float32 and a small one of every layer kind (tests/test_cnn.py's) in float64.
# The convolution routines they call are Numba functions cached with the package (compiled
# on first use on a machine, then loaded): what is timed is the network's own kernel.
CNN_SCRIPT = '''
import time
import numpy as np, symbp as sb
from symbp import demo, nn
if "{net}" == "demo":
    m, dt = demo.cnn(0), np.float32
else:
    m = nn.Sequential([nn.conv2d(3, 3, padding=1, activation="tanh"), nn.max_pool2d(2),
                       nn.conv2d(4, 2, stride=1), nn.PReLU(), nn.avg_pool2d(2),
                       nn.flatten(), nn.Dense(3)], inputs=(2, 6, 6), seed=5).build()
    dt = np.float64
t, c = time.perf_counter(), time.process_time()
step = sb.compile_step(m.loss, m.wrt, sb.Adam(1e-3), target="cpu", dtype=dt)
print(time.perf_counter() - t, time.process_time() - c)
'''

CORE = "0"  # --core


def _run(script: str, env: dict, cwd: str) -> tuple[float, float]:
    pin = ["taskset", "-c", CORE] if shutil.which("taskset") else []
    r = subprocess.run([*pin, sys.executable, "-c", script], env=env, capture_output=True,
                       text=True, cwd=cwd)
    if r.returncode != 0:
        raise SystemExit(f"failed:\n{r.stderr[-2000:]}")
    wall, cpu = r.stdout.split()[-2:]
    return float(wall), float(cpu)


def once(depth: int, cache: str, tree: str | None = None,
         started: bool = False) -> tuple[float, float]:
    env = {**os.environ, "SYMBP_CACHE_DIR": cache}
    if tree:
        env["PYTHONPATH"] = tree
    return _run(SCRIPT.format(depth=depth, start=START if started else ""), env, cache)


def jax_once(depth: int) -> tuple[float, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return _run(JAX_SCRIPT.format(depth=depth), env, tempfile.gettempdir())


def have_jax() -> bool:
    try:
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


def cnn_table(trees, rounds):
    """Cold and warm compile of the two CNNs (``CNN_SCRIPT``), each checkout in turn."""
    cols = [f"cold {n} (s)" for n, _ in trees] + [f"warm {n} (s)" for n, _ in trees]
    print("\n| network | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for net, label in (("demo", "demo CNN, float32"), ("small", "small CNN, float64")):
        cold: dict = {n: [] for n, _ in trees}
        warm: dict = {n: [] for n, _ in trees}
        for _ in range(rounds):
            for name, tree in trees:
                env = {**os.environ, "PYTHONPATH": tree}
                with tempfile.TemporaryDirectory() as cache:
                    env["SYMBP_CACHE_DIR"] = cache
                    cold[name].append(_run(CNN_SCRIPT.format(net=net), env, cache))
                    warm[name].append(_run(CNN_SCRIPT.format(net=net), env, cache))
        cells = [cell(cold[n]) for n, _ in trees] + [cell(warm[n]) for n, _ in trees]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="2,4,8,16,32")
    ap.add_argument("--cnn", action="store_true", help="also the two CNNs (CNN_SCRIPT)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", help="another checkout (a source tree), measured alternately")
    ap.add_argument("--core", default="0", help="the core every process is pinned to")
    args = ap.parse_args()
    global CORE
    CORE = args.core
    trees = [("this", os.path.dirname(HERE))]
    if args.base:
        trees.insert(0, ("base", os.path.abspath(args.base)))
    jax = have_jax()
    print(f"load average {os.getloadavg()[0]:.1f}; medians of {args.rounds} fresh processes; "
          "wall seconds (CPU seconds)"
          + ("" if jax else "; JAX is not installed: its column is left empty") + "\n")
    cols = ([f"cold {n} (s)" for n, _ in trees] + [f"cold {n}, Numba started (s)" for n, _ in trees]
            + [f"warm {n} (s)" for n, _ in trees])
    print("| depth | " + " | ".join(cols) + " | JAX cold (s) | cold this/JAX | started this/JAX |")
    print("|---" * (len(cols) + 4) + "|")
    for d in (int(x) for x in args.depths.split(",")):
        cold: dict = {n: [] for n, _ in trees}
        started: dict = {n: [] for n, _ in trees}
        warm: dict = {n: [] for n, _ in trees}
        jx = []
        for _ in range(args.rounds):
            for name, tree in trees:
                with tempfile.TemporaryDirectory() as cache:
                    cold[name].append(once(d, cache, tree))
                    warm[name].append(once(d, cache, tree))
                with tempfile.TemporaryDirectory() as cache:
                    started[name].append(once(d, cache, tree, started=True))
            if jax:
                jx.append(jax_once(d))
        cells = ([cell(cold[n]) for n, _ in trees] + [cell(started[n]) for n, _ in trees]
                 + [cell(warm[n]) for n, _ in trees])
        j = cell(jx) if jx else "—"
        ratio = (f"{med(cold['this'], 0) / med(jx, 0):.1f} | "
                 f"{med(started['this'], 0) / med(jx, 0):.1f}") if jx else "— | —"
        print(f"| {d} | " + " | ".join(cells) + f" | {j} | {ratio} |", flush=True)
    if args.cnn:
        cnn_table(trees, args.rounds)


def med(runs: list, k: int) -> float:
    return statistics.median(r[k] for r in runs)


def cell(runs: list) -> str:
    """Median wall seconds, and median CPU seconds of the process in brackets (on a busy
    machine the CPU seconds are what the work cost; the wall also holds the waits)."""
    return f"{med(runs, 0):.2f} ({med(runs, 1):.2f})"


if __name__ == "__main__":
    main()
