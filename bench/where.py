"""Where a training step's time goes, and which BLAS is fastest for its products.

    python bench/where.py                                  # the grid points symbp loses on
    python bench/where.py --points mlp-d2-w1024-b64 --libraries numba,numpy

Part 1, the step: each point (peers.py's ``mlp-d<depth>-w<width>-b<batch>``, float32,
SGD, one BLAS thread) runs in a fresh process pinned to one core (``taskset -c 0``).  The
compiled step is timed four ways: through the public call ``step(params, X=, T=)``; its
kernel called directly with the same arguments; the kernel compiled with every value in
rows of its own (``numba_cpu.IN_PLACE = False``: no map written over the operand it
replaces); and that kernel printed with every matrix product removed (``_gemm(...)`` lines
dropped, everything else kept).  So: call overhead = public call - kernel; in the kernel
with rows of its own, products = it - it without products, and maps, sums, softmax and
updates = it without products.  (Without its products, a kernel whose maps write over the
products they read computes each call on what its earlier calls left: at depth 16 that
kernel slowed from 0.024 to 0.35 ms per call over a few thousand calls.)  Minimum of
``--repeats`` blocks (a shared machine only ever adds time).

Part 2, the products: the three product shapes of a dense layer of the point (forward
``H @ W`` (B, w, w); weight gradient ``H.T @ G`` (w, B, w); input gradient ``G @ W.T``
(B, w, w)) on each BLAS reachable here, pinned, one thread each, ms per product and
GFLOP/s:

- ``symbp``: the kernels' ``_gemm`` called from njit code on the library the first
  ``--blas`` choice loads (``own``: symbp's OpenBLAS, on AMD Zen 4 with its Haswell
  kernels for float32, NumPy's copy for float64 and for products of at most 64^3
  multiply-adds; ``numpy``: NumPy's OpenBLAS);
- ``symbp-scipy``: the same on SciPy's OpenBLAS (Numba's ``np.dot`` library);
- ``numpy``: ``np.dot(..., out=)`` from Python (NumPy's OpenBLAS, its own kernels);
- ``xla``: ``jax.jit(a @ b)`` (XLA's CPU dot, what JAX's step uses);
- ``torch``: ``torch.mm(..., out=)``.

Part 1 runs once per ``--blas`` library (``SYMBP_BLAS=own``, ``numpy`` or ``scipy``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
POINTS = ["mlp-d16-w64-b32", "mlp-d2-w256-b64", "mlp-d2-w1024-b64", "mlp-d2-w2048-b64",
          "mlp-d2-w256-b512", "mlp-d2-w256-b4096"]
LIBRARIES = ("symbp", "symbp-scipy", "numpy", "xla", "torch")


def best(call, repeats, target_s=0.05):
    """Minimum seconds per call over ``repeats`` blocks of about ``target_s`` each."""
    call()
    t = time.perf_counter()
    call()
    n = max(1, int(target_s / max(time.perf_counter() - t, 1e-7)))
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            call()
        out.append((time.perf_counter() - t) / n)
    return min(out)


def without_products(source: str):
    """The step kernel printed from ``source`` with its matrix products dropped."""
    text = re.sub(r"(?m)^(\s*)_gemm\(.*\)$", r"\1pass", source).replace("cache=True",
                                                                         "cache=False")
    path = os.path.join(tempfile.mkdtemp(), "no_products.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("no_products", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train_step


def step_parts(point: str, repeats: int) -> dict:
    import symbp as sb

    sys.path.insert(0, HERE)
    import peers

    from symbp.backends import numba_cpu

    L, params = peers.symbp_expr(point)
    X, T = peers.batches(point)[0]

    def kernel_and_args():
        step = sb.compile_step(L, params, sb.SGD(0.001), target="cpu", dtype=np.float32,
                               blas_threads=1)
        P = peers.init(point)
        kernel, seen = step.kernel, []
        step.kernel = lambda *a: seen.append(a) or kernel(*a)
        step(P, X=X, T=T)
        step.kernel = kernel
        # the first try finds the workspace too small; the retry has it
        return step, P, kernel, seen[-1]

    numba_cpu.IN_PLACE = False  # every value in rows of its own, as before the in-place maps
    own_step, _, own_rows, own_args = kernel_and_args()
    numba_cpu.IN_PLACE = True
    step, P, kernel, args = kernel_and_args()
    # without products from the kernel in rows of its own: where a map writes over the
    # product it reads, each call without the product starts from what the last call left
    # (g7 = g5 ⊙ (1 - t6²) over g5, again and again), and such a kernel slowed tenfold
    bare = without_products(own_step.source)
    public = best(lambda: step(P, X=X, T=T), repeats)
    direct = best(lambda: kernel(*args), repeats)
    rest = best(lambda: bare(*own_args), repeats)
    own = best(lambda: own_rows(*own_args), repeats)
    return {"public": public, "kernel": direct, "rest": rest, "own_rows": own}


def shapes(point: str):
    m = re.fullmatch(r"mlp-d(\d+)-w(\d+)-b(\d+)", point)
    _, w, b = map(int, m.groups())
    return {"H @ W": (b, w, w, False), "H.T @ G": (w, b, w, True), "G @ W.T": (b, w, w, None)}


def product_times(point: str, libraries, repeats: int) -> dict:
    """ms per product for each shape and library (None: not installed)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, (m, k, n, t) in shapes(point).items():
        # t: True = A is stored transposed (H.T), None = B is (W.T), False = neither
        A = rng.standard_normal((k, m) if t else (m, k), dtype=np.float32)
        B = rng.standard_normal((n, k) if t is None else (k, n), dtype=np.float32)
        a = A.T if t else A
        bm = B.T if t is None else B
        C = np.empty((m, n), np.float32)
        row = {}
        for lib in libraries:
            f = product(lib, a, bm, C)
            row[lib] = None if f is None else best(f, repeats) * 1e3
        out[name] = {"shape": (m, k, n), **row}
    return out


def product(lib, a, b, C):
    """A no-argument call computing ``a @ b`` into ``C`` with ``lib``; None if missing."""
    if lib == "numpy":
        return lambda: np.dot(a, b, out=C)
    if lib.startswith("symbp"):
        from numba import njit

        from symbp.backends import blas

        keep = blas.OPENBLAS
        if lib == "symbp-scipy":
            blas.OPENBLAS = None  # read when the call is lowered: SciPy's library

        @njit
        def run(a, b, C):
            blas.gemm(a, b, C, 1.0, 0.0)

        run(a, b, C)  # compiled now, against the library chosen above
        blas.OPENBLAS = keep
        return lambda: run(a, b, C)
    try:
        if lib == "xla":
            import jax

            ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
            f = jax.jit(lambda x, y: x @ y)
            return lambda: f(ja, jb).block_until_ready()
        if lib == "torch":
            import torch

            torch.set_num_threads(1)
            ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(C)
            return lambda: torch.mm(ta, tb, out=tc)
    except ImportError:
        return None
    raise SystemExit(f"unknown library {lib!r}: {', '.join(LIBRARIES)}")


def worker(point, libraries, repeats):
    return {"step": step_parts(point, repeats),
            "products": product_times(point, libraries, repeats)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--libraries", default=",".join(LIBRARIES))
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--blas", default="own,numpy,scipy",
                    help="the kernels' library for part 1 (SYMBP_BLAS); the first one's "
                         "process also times part 2")
    ap.add_argument("--worker")
    args = ap.parse_args()
    libraries = [lib for lib in args.libraries.split(",") if lib]
    if args.worker:
        print(json.dumps(worker(args.worker, libraries, args.repeats)))
        return
    load = os.getloadavg()[0]
    got, steps = {}, {}
    for point in args.points.split(","):
        for k, kind in enumerate(args.blas.split(",")):
            env = {**os.environ, **ONE_THREAD, "SYMBP_BLAS": kind}
            libs = args.libraries if k == 0 else ""  # the products once per point
            # pinned before it starts: OpenBLAS sizes its thread pool from the affinity
            r = subprocess.run(["taskset", "-c", "0", sys.executable, __file__, "--worker",
                                point, "--libraries",
                                libs, "--repeats", str(args.repeats)],
                               capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise SystemExit(f"{point} failed:\n{r.stderr[-2000:]}")
            out = json.loads(r.stdout.strip().splitlines()[-1])
            steps[point, kind] = out["step"]
            if k == 0:
                got[point] = out["products"]
    print(f"pinned to CPU 0, one thread, minimum of {args.repeats} blocks; load average "
          f"{load:.1f} at start, {os.getloadavg()[0]:.1f} at end\n")
    print("| point | kernels' BLAS | public call (ms) | kernel | call overhead "
          "| kernel, every value its own rows | its products | its maps, sums, softmax, "
          "updates | products share |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (point, kind), s in steps.items():
        prod = s["own_rows"] - s["rest"]
        print(f"| {point} | {kind} | {s['public'] * 1e3:.4g} | {s['kernel'] * 1e3:.4g} "
              f"| {(s['public'] - s['kernel']) * 1e6:.1f} µs | {s['own_rows'] * 1e3:.4g} "
              f"| {prod * 1e3:.4g} | {s['rest'] * 1e3:.4g} | {prod / s['own_rows']:.0%} |")
    print("\nproducts: ms per product (GFLOP/s)\n")
    print("| point | product (m, k, n) | " + " | ".join(libraries) + " |")
    print("|---|---|" + "---|" * len(libraries))
    for point, g in got.items():
        for name, row in g.items():
            m, k, n = row["shape"]
            cells = [f"{row[lib]:.4g} ({2 * m * k * n / row[lib] / 1e6:.0f})"
                     if row[lib] is not None else "-" for lib in libraries]
            print(f"| {point} | {name} ({m}, {k}, {n}) | " + " | ".join(cells) + " |")


ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}


if __name__ == "__main__":
    main()
