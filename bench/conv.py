"""Where the time of a small CNN's convolutions and poolings goes: direct loops vs im2col.

    python bench/conv.py                    # digits CNN, N=64: one core, then both
    python bench/conv.py --net lenet --n 64 --rounds 9

For each layer of the net, forward and every gradient, microseconds per call (median over
rounds; each round times every variant once, in turn, so drift hits all alike), float32:

    numpy        symbp.backends.conv_numpy: im2col views + tensordot (BLAS)
    direct       symbp.backends.conv_numba, serial loops (no im2col matrix)
    direct-par   the same with prange over the images (filters for dK, db)
    im2col       Numba: the im2col matrix written by a loop into a buffer, one np.dot
                 (BLAS) for the product, col2im for dX (defined here, for comparison)
    im2col-par   the same with prange in the im2col/col2im loops
    torch        PyTorch eager (torch.nn.functional, torch.nn.grad, aten's max-pool
                 backward), for scale: the peer the issue's training-step target names

"one core" runs in a subprocess under ``taskset -c 0`` with one Numba and one BLAS thread;
"both" unpinned, with the default thread counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

NETS = {
    # name: [(layer, kind, input N-less shape, params)]; conv params: (F, kh, kw, s, p)
    "digits": [("conv1", "conv", (1, 8, 8), (8, 3, 3, 1, 1)),
               ("pool1", "max", (8, 8, 8), 2),
               ("conv2", "conv", (8, 4, 4), (16, 3, 3, 1, 1)),
               ("pool2", "max", (16, 4, 4), 2)],
    "lenet": [("conv1", "conv", (1, 28, 28), (6, 5, 5, 1, 0)),
              ("pool1", "max", (6, 24, 24), 2),
              ("conv2", "conv", (6, 12, 12), (16, 5, 5, 1, 0)),
              ("pool2", "max", (16, 8, 8), 2)],
}
VARIANTS = ["numpy", "direct", "direct-par", "im2col", "im2col-par", "torch"]


def im2col_kernels():
    """im2col + one BLAS product, in Numba (the alternative to direct loops)."""
    from numba import njit, prange

    def im2col(X, kh, kw, s, p, cols):
        # cols[(n·ho + i)·wo + j, (c·kh + u)·kw + v] = X[n, c, i·s+u−p, j·s+v−p] (0 outside)
        N, C, H, W = X.shape
        ho, wo = (H + 2 * p - kh) // s + 1, (W + 2 * p - kw) // s + 1
        for n in prange(N):
            for i in range(ho):
                for j in range(wo):
                    row = (n * ho + i) * wo + j
                    for c in range(C):
                        for u in range(kh):
                            r = i * s + u - p
                            for v in range(kw):
                                q = j * s + v - p
                                ok = 0 <= r < H and 0 <= q < W
                                cols[row, (c * kh + u) * kw + v] = X[n, c, r, q] if ok else 0

    def col2im(dcols, kh, kw, s, p, dX):
        N, C, H, W = dX.shape
        ho, wo = (H + 2 * p - kh) // s + 1, (W + 2 * p - kw) // s + 1
        for n in prange(N):
            dX[n] = 0
            for i in range(ho):
                for j in range(wo):
                    row = (n * ho + i) * wo + j
                    for c in range(C):
                        for u in range(kh):
                            r = i * s + u - p
                            if 0 <= r < H:
                                for v in range(kw):
                                    q = j * s + v - p
                                    if 0 <= q < W:
                                        dX[n, c, r, q] += dcols[row, (c * kh + u) * kw + v]

    def nchw_to_rows(G, Gt):
        # Gt[(n·ho + i)·wo + j, f] = G[n, f, i, j]
        N, F, ho, wo = G.shape
        for n in prange(N):
            for f in range(F):
                for i in range(ho):
                    for j in range(wo):
                        Gt[(n * ho + i) * wo + j, f] = G[n, f, i, j]

    def rows_to_nchw(Yt, b, Y):
        N, F, ho, wo = Y.shape
        for n in prange(N):
            for f in range(F):
                for i in range(ho):
                    for j in range(wo):
                        Y[n, f, i, j] = Yt[(n * ho + i) * wo + j, f] + b[f]

    def build(par):
        jit = njit(parallel=par)
        i2c, c2i, to_rows, to_nchw = jit(im2col), jit(col2im), jit(nchw_to_rows), jit(rows_to_nchw)

        @jit
        def fwd(X, Kmat, b, kh, kw, s, p, cols, Yt, Y):
            i2c(X, kh, kw, s, p, cols)
            np.dot(cols, Kmat.T, Yt)
            to_nchw(Yt, b, Y)

        @jit
        def grad_kernel(G, X, kh, kw, s, p, cols, Gt, dKmat):
            i2c(X, kh, kw, s, p, cols)
            to_rows(G, Gt)
            np.dot(Gt.T, cols, dKmat)

        @jit
        def grad_input(G, Kmat, kh, kw, s, p, Gt, dcols, dX):
            to_rows(G, Gt)
            np.dot(Gt, Kmat, dcols)
            c2i(dcols, kh, kw, s, p, dX)

        return fwd, grad_input, grad_kernel

    return {False: build(False), True: build(True)}


def torch_cases(net: str, n: int) -> dict:
    """The same layers in PyTorch eager, float32 (empty when torch is missing)."""
    try:
        import torch
    except ImportError:
        return {}
    if os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    t32 = lambda *shape: torch.tensor(rng.normal(size=shape).astype(np.float32))
    F_, grad, out = torch.nn.functional, torch.nn.grad, {}
    for layer, kind, shape, prm in NETS[net]:
        X = t32(n, *shape)
        if kind == "conv":
            F, kh, kw, s, p = prm
            K, b = t32(F, shape[0], kh, kw), t32(F)
            G = torch.randn(F_.conv2d(X, K, b, s, p).shape)
            ops = {"fwd": lambda X=X, K=K, b=b, s=s, p=p: F_.conv2d(X, K, b, s, p),
                   "dX": lambda X=X, K=K, G=G, s=s, p=p: grad.conv2d_input(
                       X.shape, K, G, s, p),
                   "dK": lambda X=X, K=K, G=G, s=s, p=p: grad.conv2d_weight(
                       X, K.shape, G, s, p),
                   "db": lambda G=G: G.sum((0, 2, 3))}
        else:
            Y, idx = F_.max_pool2d(X, prm, return_indices=True)
            G = torch.randn(Y.shape)
            back = torch.ops.aten.max_pool2d_with_indices_backward
            ops = {"fwd": lambda X=X, k=prm: F_.max_pool2d(X, k),
                   "dX": lambda G=G, X=X, k=prm, idx=idx: back(G, X, [k, k], [k, k], [0, 0],
                                                              [1, 1], False, idx)}
        with torch.no_grad():
            for op, fn in ops.items():
                fn()
                out[(layer, op)] = fn
    return out


def cases(net: str, n: int, variant: str, i2c) -> dict:
    """{(layer, op): zero-argument callable} for one variant."""
    from symbp.backends import conv_numba as cb
    from symbp.backends import conv_numpy as cn

    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
    out = {}
    par = variant.endswith("-par")
    for layer, kind, shape, prm in NETS[net]:
        X = f32(n, *shape)
        if kind == "conv":
            F, kh, kw, s, p = prm
            C = shape[0]
            K, b = f32(F, C, kh, kw), f32(F)
            Y = cn.conv2d(X, K, b, s, p)
            G = f32(*Y.shape)
            if variant == "numpy":
                ops = {"fwd": lambda X=X, K=K, b=b, s=s, p=p: cn.conv2d(X, K, b, s, p),
                       "dX": lambda G=G, K=K, X=X, s=s, p=p: cn.conv2d_grad_input(
                           G, K, X.shape, s, p),
                       "dK": lambda G=G, X=X, K=K, s=s, p=p: cn.conv2d_grad_kernel(
                           G, X, K.shape, s, p),
                       "db": lambda G=G: cn.conv2d_grad_bias(G)}
            elif variant.startswith("direct"):
                fw = cb.conv2d_parallel if par else cb.conv2d_serial
                gi = cb.conv2d_grad_input_parallel if par else cb.conv2d_grad_input_serial
                gk = cb.conv2d_grad_kernel_parallel if par else cb.conv2d_grad_kernel_serial
                gb = cb.conv2d_grad_bias_parallel if par else cb.conv2d_grad_bias_serial
                Yo, dX, dK, db = (np.empty_like(a) for a in (Y, X, K, b))
                ops = {"fwd": lambda fw=fw, X=X, K=K, b=b, s=s, p=p, o=Yo: fw(X, K, b, s, p, o),
                       "dX": lambda gi=gi, G=G, K=K, s=s, p=p, o=dX: gi(G, K, s, p, o),
                       "dK": lambda gk=gk, G=G, X=X, s=s, p=p, o=dK: gk(G, X, s, p, o),
                       "db": lambda gb=gb, G=G, o=db: gb(G, o)}
            else:
                fw, gi, gk = i2c[par]
                ho, wo = Y.shape[2], Y.shape[3]
                rows, ckk = n * ho * wo, C * kh * kw
                Kmat = np.ascontiguousarray(K.reshape(F, ckk))
                cols, dcols = (np.empty((rows, ckk), np.float32) for _ in range(2))
                Yt, Gt = (np.empty((rows, F), np.float32) for _ in range(2))
                Yo, dX, dK = np.empty_like(Y), np.empty_like(X), np.empty((F, ckk), np.float32)
                db = np.empty_like(b)
                gb = cb.conv2d_grad_bias_parallel if par else cb.conv2d_grad_bias_serial
                ops = {"fwd": lambda a=(X, Kmat, b, kh, kw, s, p, cols, Yt, Yo), fw=fw: fw(*a),
                       "dX": lambda a=(G, Kmat, kh, kw, s, p, Gt, dcols, dX), gi=gi: gi(*a),
                       "dK": lambda a=(G, X, kh, kw, s, p, cols, Gt, dK), gk=gk: gk(*a),
                       "db": lambda gb=gb, G=G, o=db: gb(G, o)}
                # the comparison is only fair if both compute the same numbers
                fw(X, Kmat, b, kh, kw, s, p, cols, Yt, Yo)
                gk(G, X, kh, kw, s, p, cols, Gt, dK)
                gi(G, Kmat, kh, kw, s, p, Gt, dcols, dX)
                for got, want in ((Yo, Y), (dK.reshape(K.shape), cn.conv2d_grad_kernel(
                        G, X, K.shape, s, p)), (dX, cn.conv2d_grad_input(G, K, X.shape, s, p))):
                    assert np.allclose(got, want, rtol=1e-4, atol=1e-4), layer
        else:
            k = prm
            Y = cn.max_pool2d(X, k)
            G = f32(*Y.shape)
            if variant == "numpy":
                ops = {"fwd": lambda X=X, k=k: cn.max_pool2d(X, k),
                       "dX": lambda G=G, X=X, k=k: cn.max_pool2d_grad(G, X, k)}
            elif variant.startswith("direct"):
                fw = cb.max_pool2d_parallel if par else cb.max_pool2d_serial
                gi = cb.max_pool2d_grad_parallel if par else cb.max_pool2d_grad_serial
                Yo, dX = np.empty_like(Y), np.empty_like(X)
                ops = {"fwd": lambda fw=fw, X=X, k=k, o=Yo: fw(X, k, k, o),
                       "dX": lambda gi=gi, G=G, X=X, k=k, o=dX: gi(G, X, k, k, o)}
            else:
                continue  # pooling has no product: im2col does not apply
        for op, fn in ops.items():
            fn()  # compile, warm the caches
            out[(layer, op)] = fn
    return out


def worker(net: str, n: int, rounds: int, budget: float) -> dict:
    i2c = im2col_kernels()
    fns = {v: cases(net, n, v, i2c) for v in VARIANTS if v != "torch"}
    fns["torch"] = torch_cases(net, n)
    keys = list(fns["numpy"])
    # calls per timing: about budget/rounds seconds spread over every (key, variant)
    reps = {}
    for v in VARIANTS:
        for key, fn in fns[v].items():
            t = time.perf_counter()
            fn()
            dt = max(time.perf_counter() - t, 1e-6)
            reps[v, key] = max(3, int(budget / rounds / (len(keys) * len(VARIANTS)) / dt))
    times = {k: [] for k in reps}
    for _ in range(rounds):
        for v in VARIANTS:
            for key, fn in fns[v].items():
                m = reps[v, key]
                t = time.perf_counter()
                for _ in range(m):
                    fn()
                times[v, key].append((time.perf_counter() - t) / m * 1e6)
    return {f"{v}|{layer}|{op}": statistics.median(ts) for (v, (layer, op)), ts in times.items()}


def table(res: dict, title: str) -> str:
    rows = sorted({tuple(k.split("|")[1:]) for k in res}, key=lambda r: list(
        dict.fromkeys(tuple(k.split("|")[1:]) for k in res)).index(r))
    lines = [f"**{title}** (µs per call, median)", "",
             "| layer | op | " + " | ".join(VARIANTS) + " |",
             "|---|---|" + "---:|" * len(VARIANTS)]
    for layer, op in rows:
        cells = [f"{res[f'{v}|{layer}|{op}']:.1f}" if f"{v}|{layer}|{op}" in res else "-"
                 for v in VARIANTS]
        lines.append(f"| {layer} | {op} | " + " | ".join(cells) + " |")
    # the whole training step's share: every op but conv1's dX (the input needs no gradient)
    tot = {v: sum(t for k, t in res.items() if k.startswith(v + "|")
                  and not k.endswith("conv1|dX")) for v in VARIANTS}
    lines.append("| **all but conv1 dX** | | " + " | ".join(
        f"**{tot[v]:.0f}**" for v in VARIANTS) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", choices=NETS, default="digits")
    ap.add_argument("--n", type=int, default=64, help="batch size")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of timing per run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.net, a.n, a.rounds, a.budget)))
        return
    here = os.path.dirname(os.path.abspath(__file__))
    args = [sys.executable, os.path.join(here, "conv.py"), "--worker", "--net", a.net,
            "--n", str(a.n), "--rounds", str(a.rounds), "--budget", str(a.budget)]
    one = {"NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    for title, cmd, env in (("one core", ["taskset", "-c", "0", *args], one),
                            ("both cores", args, {})):
        p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{title}: the worker failed:\n{p.stderr[-3000:]}")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        print(table(res, f"{a.net}, N={a.n}, float32, {title}") + "\n")


if __name__ == "__main__":
    main()
