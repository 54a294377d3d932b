"""Training-step time of a small CNN: symbp's fused cpu step against PyTorch eager.

    X N×1×8×8 → conv 8@3×3 (pad 1) → ReLU → max-pool 2 → conv 16@3×3 (pad 1) → ReLU
      → max-pool 2 → flatten (64) → dense 10 → softmax-CE;  batch 64, float32, SGD

One step is forward + backward + the SGD update.  Both run on one core: start it as
``taskset -c 0 python bench/cnn_step.py`` (PyTorch is also held to one thread).  The
frameworks take turns (round-robin, ROUNDS rounds of STEPS steps each) so a machine
whose speed drifts meets both alike; the figure is the median step.
"""

from __future__ import annotations

import time

import numpy as np
import sympy as sp

import symbp as sb

ROUNDS, STEPS, BATCH = 7, 50, 64


def symbp_step(data, init):
    N = sp.Symbol("N", integer=True, positive=True)
    X, T = sb.tensor("X", N, 1, 8, 8), sp.MatrixSymbol("T", N, 10)
    K1, b1 = sb.tensor("K1", 8, 1, 3, 3), sb.tensor("b1", 8)
    K2, b2 = sb.tensor("K2", 16, 8, 3, 3), sb.tensor("b2", 16)
    W, c = sp.MatrixSymbol("W", 64, 10), sp.MatrixSymbol("c", 1, 10)
    H = sb.max_pool2d(sb.relu(sb.conv2d(X, K1, b1, padding=1)), 2)
    H = sb.max_pool2d(sb.relu(sb.conv2d(H, K2, b2, padding=1)), 2)
    L = sb.softmax_cross_entropy(sb.dense(sb.flatten(H), W, c), T)
    t0 = time.perf_counter()
    step = sb.compile_step(L, [K1, b1, K2, b2, W, c], sb.SGD(0.05), target="cpu",
                           dtype=np.float32, blas_threads=1)
    params = {k: v.copy() for k, v in init.items()}
    step(params, **data)
    cold = time.perf_counter() - t0
    return (lambda: step(params, **data)), cold


def torch_step(data, init):
    import torch

    torch.set_num_threads(1)
    F = torch.nn.functional
    p = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    x, t = torch.tensor(data["X"]), torch.tensor(data["T"])
    opt = torch.optim.SGD(list(p.values()), lr=0.05)

    def step():
        opt.zero_grad()
        h = F.max_pool2d(F.relu(F.conv2d(x, p["K1"], p["b1"], padding=1)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, p["K2"], p["b2"], padding=1)), 2)
        z = h.flatten(1) @ p["W"] + p["c"]
        loss = -(t * torch.log_softmax(z, 1)).sum() / len(z)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def main():
    rng = np.random.default_rng(0)
    f32 = np.float32
    data = {"X": rng.normal(size=(BATCH, 1, 8, 8)).astype(f32),
            "T": np.eye(10, dtype=f32)[rng.integers(0, 10, BATCH)]}
    init = {"K1": rng.normal(size=(8, 1, 3, 3)).astype(f32) / 3,
            "b1": np.zeros(8, f32), "K2": rng.normal(size=(16, 8, 3, 3)).astype(f32) / 8,
            "b2": np.zeros(16, f32), "W": rng.normal(size=(64, 10)).astype(f32) / 8,
            "c": np.zeros((1, 10), f32)}
    sym, cold = symbp_step(data, init)
    steps = {"symbp cpu": sym, "torch eager": torch_step(data, init)}
    times = {k: [] for k in steps}
    for _ in range(ROUNDS):
        for name, step in steps.items():
            step()  # the first call of a round wakes caches; not counted
            for _ in range(STEPS):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    print(f"cold compile (symbp, fresh process): {cold:.2f} s")
    base = np.median(times["torch eager"])
    for name, ts in times.items():
        m = np.median(ts)
        print(f"{name:12s} median {m * 1e6:8.1f} µs/step   {m / base:5.2f}× torch eager")


if __name__ == "__main__":
    main()
