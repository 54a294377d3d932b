"""Data-parallel epoch time over MPI (issue 13): W2 on 1 and 2 processes.

    python bench/mpi.py                      # needs pip install -e '.[mpi]'
    python bench/mpi.py --rows 8192 --epochs 3 --repeats 5

W2: 784-256(relu)-10 softmax-CE, float32, Adam, global batch 256, synthetic data
(``--rows`` × 784, seeded). Every run is a fresh ``mpiexec -n K`` job, one BLAS/Numba
thread per process, one core each (``-bind-to core``). Runs: one process with the fused
step (``fit`` without ``distributed``, the baseline), then ``distributed='mpi'`` on 1 rank
and on 2, the gradients summed by MPI's Allreduce (``SYMBP_MPI_SUM=allreduce``) and
through shared memory (the default); ``--repeats`` rounds of the four, interleaved (a
neighbour's load hits all alike), and the median of each. Epoch time is the median over
the epochs after the first (the first compiles); "best" is the fastest epoch of all runs,
the one a neighbour's load disturbed least. Per step, rank 0's time in the phases: the
compiled gradient of its shard, the sum over ranks (waiting for the other rank included),
the update (with the guard's check and backup), and the rest of the epoch's time
(gathering the batch, Python; ``fit`` times an epoch without the accuracy it computes at
its end).
The machine's load average is printed before and after: on a shared machine the 2-rank
run needs both cores, the 1-process one only the less busy one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("gradient", "sum", "update")


def timed(f, spent: dict, name: str):
    def call(*a, **k):
        t0 = time.perf_counter()
        out = f(*a, **k)
        spent[name] += time.perf_counter() - t0
        return out
    return call


def worker(args) -> None:
    from symbp import distributed, nn, optim, train

    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.rows, 784)).astype(np.float32)
    y = rng.integers(0, 10, args.rows)
    m = nn.mlp([784, 256, 10], activations="relu", loss="softmax_ce", seed=0)
    opt = optim.Adam(1e-3)
    spent = dict.fromkeys(PHASES, 0.0)
    mode = None
    if args.mode == "fused":  # the cached step fit will take, its kernel timed
        step = train._step(m, opt, "cpu", np.float32)
        step.kernel = timed(step.kernel, spent, "gradient")
    else:
        from mpi4py import MPI

        class Ranks(distributed.Ranks):  # the step's gradient, sum and update timed
            def step(self, *a):
                s = super().step(*a)
                s._into = timed(s._into, spent, "gradient")
                s.sum.reduce = timed(s.sum.reduce, spent, "sum")
                s._kernel = timed(s._kernel, spent, "update")
                return s

        mode = Ranks(MPI.COMM_WORLD)
    t0 = time.perf_counter()
    h = train.fit(m, X, y, epochs=args.epochs, batch_size=256, optimizer=opt,
                  target="cpu", dtype=np.float32, progress=False, distributed=mode)
    wall = time.perf_counter() - t0
    if mode is None or mode.root:
        ms = {k: 1e3 * v / h.steps for k, v in spent.items()}
        ms["rest"] = 1e3 * sum(h.time) / h.steps - sum(ms.values())
        print(json.dumps({"epoch_s": float(np.median(h.time[1:])),
                          "best_s": float(np.min(h.time[1:])), "wall_s": wall, "ms": ms}))


def launch(mode: str, k: int, args, how: str) -> dict:
    env = dict(os.environ, SYMBP_MPI_SUM=how, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, __file__, "--worker", mode, "--rows", str(args.rows),
           "--epochs", str(args.epochs)]
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", str(k), "-bind-to", "core", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


RUNS = [("1 process, fused step", "fused", 1, "shared"),
        ("mpiexec -n 1, distributed", "mpi", 1, "shared"),
        ("mpiexec -n 2, distributed, Allreduce", "mpi", 2, "allreduce"),
        ("mpiexec -n 2, distributed, shared memory", "mpi", 2, "shared")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=("fused", "mpi"))
    args = ap.parse_args()
    if args.worker:
        return worker(argparse.Namespace(mode=args.worker, rows=args.rows, epochs=args.epochs))
    print(f"W2 784-256-10 relu softmax-CE, float32, Adam, global batch 256, {args.rows} rows, "
          f"median epoch of {args.epochs - 1} (after the first), median of {args.repeats} "
          f"interleaved runs; {os.cpu_count()} CPUs; load average before "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    results = {label: [] for label, *_ in RUNS}
    for _ in range(args.repeats):
        for label, mode, k, how in RUNS:
            results[label].append(launch(mode, k, args, how))
    print("| run | epoch s (each run) | median | rows/s | vs 1 process | best epoch | best vs "
          "1 process | ms per step: gradient / sum / update / rest |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for label, *_ in RUNS:
        rs = results[label]
        epoch = float(np.median([r["epoch_s"] for r in rs]))
        best = min(r["best_s"] for r in rs)
        base = base or (epoch, best)
        ms = {k: np.median([r["ms"][k] for r in rs]) for k in (*PHASES, "rest")}
        each = ", ".join(f"{r['epoch_s']:.3f}" for r in rs)
        print(f"| {label} | {each} | {epoch:.3f} | "
              f"{args.rows / epoch:,.0f} | {base[0] / epoch:.2f}x | {best:.3f} | "
              f"{base[1] / best:.2f}x | "
              f"{' / '.join(f'{v:.2f}' for v in ms.values())} |", flush=True)
    print(f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
