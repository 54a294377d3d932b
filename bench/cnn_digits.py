"""Time per step and per epoch of the digits CNN of ``symbp demo --model cnn``: symbp's
fused cpu step (``train.fit``'s step) against PyTorch eager, the same network, float32.

    1×8×8 → conv 32@3×3 (pad 1) → ReLU → max-pool 2 → conv 64@3×3 (pad 1) → ReLU
      → max-pool 2 → flatten (256) → dense 10 → softmax-CE;  Adam, batch 32

An epoch is one pass of minibatches over the demo's training images and their shifts
(6,735 images, 211 steps; fit's per-epoch metrics pass is not counted).  Both run on one
core: ``taskset -c 0 python bench/cnn_digits.py`` (PyTorch held to one thread, symbp to
one BLAS thread).  The frameworks take turns (round-robin, ROUNDS rounds of one epoch
each) so a machine whose speed drifts meets both alike; the figures are medians.
"""

from __future__ import annotations

import time

import numpy as np

import symbp as sb
from symbp import demo

ROUNDS, BATCH, LR = 5, 32, 3e-3


def batches(X, T, rng):
    perm = rng.permutation(len(X))
    Xs, Ts = X[perm], T[perm]
    return [(Xs[i:i + BATCH], Ts[i:i + BATCH]) for i in range(0, len(X), BATCH)]


def symbp_epoch(model):
    t0 = time.perf_counter()
    step = sb.compile_step(model.loss, model.wrt, sb.Adam(LR), target="cpu",
                           dtype=np.float32, blas_threads=1)
    params = {k: np.ascontiguousarray(v, np.float32) for k, v in model.params.items()}
    cold = time.perf_counter() - t0

    def epoch(data, steps):
        for x, t in data:
            s0 = time.perf_counter()
            step(params, X=x, T=t)
            steps.append(time.perf_counter() - s0)

    return epoch, cold


def torch_epoch(model):
    import torch

    torch.set_num_threads(1)
    F = torch.nn.functional
    p = {k: torch.tensor(np.asarray(v, np.float32), requires_grad=True)
         for k, v in model.params.items()}
    opt = torch.optim.Adam(list(p.values()), lr=LR, eps=1e-8)

    def step(x, t):
        opt.zero_grad()
        h = F.max_pool2d(F.relu(F.conv2d(x, p["K1"], p["b1"], padding=1)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, p["K2"], p["b2"], padding=1)), 2)
        z = h.flatten(1) @ p["W3"] + p["b3"]
        loss = -(t * torch.log_softmax(z, 1)).sum() / len(z)
        loss.backward()
        opt.step()
        return loss

    def epoch(data, steps):
        for x, t in data:
            s0 = time.perf_counter()
            step(x, t)
            steps.append(time.perf_counter() - s0)

    return epoch


def main():
    import torch

    Xtr, _, ytr, _ = demo.digits(0)
    X, y = demo.shifted(Xtr.reshape(-1, 1, 8, 8), ytr)
    X = np.ascontiguousarray(X, np.float32)
    T = np.eye(10, dtype=np.float32)[y]
    model = demo.cnn(0)
    sym, cold = symbp_epoch(model)
    runs = {"symbp cpu": (sym, lambda d: d),
            "torch eager": (torch_epoch(model),
                            lambda d: [(torch.from_numpy(x), torch.from_numpy(t))
                                       for x, t in d])}
    rng = np.random.default_rng(0)
    warm = batches(X, T, rng)[:5]
    for run, conv in runs.values():  # compile, and wake the caches
        run(conv(warm), [])
    epochs = {k: [] for k in runs}
    steps = {k: [] for k in runs}
    for _ in range(ROUNDS):
        data = batches(X, T, rng)
        for name, (run, conv) in runs.items():
            d = conv(data)
            t0 = time.perf_counter()
            run(d, steps[name])
            epochs[name].append(time.perf_counter() - t0)
    print(f"{len(X)} images, {len(data)} steps of {BATCH} per epoch, {ROUNDS} rounds; "
          f"symbp compile_step {cold:.1f} s (not in the figures)")
    base_e, base_s = np.median(epochs["torch eager"]), np.median(steps["torch eager"])
    print("| | ms per epoch | µs per step | vs torch eager |\n|---|---:|---:|---:|")
    for name in runs:
        e, s = np.median(epochs[name]), np.median(steps[name])
        print(f"| {name} | {1e3 * e:.0f} | {1e6 * s:.0f} | {e / base_e:.2f}× epoch, "
              f"{s / base_s:.2f}× step |")


if __name__ == "__main__":
    main()
