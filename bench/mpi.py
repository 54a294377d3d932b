"""Data-parallel epoch time over MPI (issue 13): W2 on 1 and 2 processes.

    python bench/mpi.py                      # needs pip install -e '.[mpi]'
    python bench/mpi.py --rows 8192 --epochs 3

W2: 784-256(relu)-10 softmax-CE, float32, Adam, global batch 256, synthetic data
(``--rows`` × 784, seeded).  Every run is a fresh ``mpiexec -n K`` job, one BLAS/Numba
thread per process, one core each (``-bind-to core``).  Rows: one process with the fused
step (``fit`` without ``distributed``, the baseline), then ``distributed='mpi'`` on 1 and
2 ranks.  Epoch time is the median over the epochs after the first (the first compiles);
the Allreduce share is rank 0's time inside ``Allreduce`` (waiting for the other
rank included) over the wall time of the whole ``fit``.
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


def worker(args) -> None:
    from symbp import distributed, nn, optim, train

    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.rows, 784)).astype(np.float32)
    y = rng.integers(0, 10, args.rows)
    m = nn.mlp([784, 256, 10], activations="relu", loss="softmax_ce", seed=0)
    spent = [0.0]
    mode = None if args.mode == "fused" else "mpi"
    if mode:
        # Time the collective inside the step: wrap this rank's communicator.
        from mpi4py import MPI

        class Timed:
            def __init__(self, comm):
                self.comm = comm

            def Allreduce(self, *a, **k):
                t0 = time.perf_counter()
                self.comm.Allreduce(*a, **k)
                spent[0] += time.perf_counter() - t0

            def __getattr__(self, name):
                return getattr(self.comm, name)

        mode = distributed.Ranks(Timed(MPI.COMM_WORLD))
    h = train.fit(m, X, y, epochs=args.epochs, batch_size=256, optimizer=optim.Adam(1e-3),
                  target="cpu", dtype=np.float32, progress=False, distributed=mode)
    if mode is None or mode.root:
        print(json.dumps({"epoch_s": float(np.median(h.time[1:])), "total_s": sum(h.time),
                          "allreduce_s": spent[0], "steps": h.steps}))


def launch(mode: str, k: int, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--worker", choices=("fused", "mpi"))
    args = ap.parse_args()
    if args.worker:
        return worker(argparse.Namespace(mode=args.worker, rows=args.rows, epochs=args.epochs))
    print(f"W2 784-256-10 relu softmax-CE, float32, Adam, global batch 256, {args.rows} rows, "
          f"median epoch of {args.epochs - 1} (after the first); {os.cpu_count()} CPUs")
    print("| run | epoch s | rows/s | vs 1 process (fused) | Allreduce share |")
    print("|---|---|---|---|---|")
    base = None
    for label, mode, k in [("1 process, fused step", "fused", 1),
                           ("mpiexec -n 1, distributed", "mpi", 1),
                           ("mpiexec -n 2, distributed", "mpi", 2)]:
        r = launch(mode, k, args)
        base = base or r["epoch_s"]
        share = (f"{r['allreduce_s'] / r['total_s']:.1%}" if mode == "mpi" else "-")
        print(f"| {label} | {r['epoch_s']:.3f} | {args.rows / r['epoch_s']:,.0f} | "
              f"{base / r['epoch_s']:.2f}x | {share} |", flush=True)


if __name__ == "__main__":
    main()
