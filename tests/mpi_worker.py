"""Run by tests/test_mpi.py under ``mpiexec -n K``: trains the tests' MLP (``--model cnn``:
a small CNN on 1×4×4 images) with ``fit(..., distributed='mpi')`` and has rank 0 save the
parameters (``--out``).

``--fail-rank R --fail-step S`` raises on rank R alone at global step S (counted from 0)
(``--kill``: dies by SIGKILL instead) to check that every rank stops; ``--nan-row`` puts a
NaN in one row of X; ``--seed-per-rank`` initialises each rank's model with a different
seed, so only rank 0's parameters are right until broadcast; ``--sum allreduce`` sums the
gradients with MPI's Allreduce instead of through shared memory (the compiled targets).
"""

import argparse
import dataclasses
import os
import signal
import sys

import numpy as np

import symbp as sb
from symbp import nn, train
from symbp.errors import TrainingError

OPTIMIZERS = {"sgd": sb.SGD(0.1), "momentum": sb.Momentum(0.05, 0.9), "adam": sb.Adam(0.01)}


def data(n=50, d=5, c=3, seed=0, kind="mlp"):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    if kind == "cnn":  # 1×4×4 images; class k lights pixel row k
        X = rng.normal(size=(n, 1, 4, 4))
        X[np.arange(n), 0, y] += 2.0
        return X, y
    X = rng.normal(size=(n, d)) + 2.0 * np.eye(c, d)[y]
    return X, y


def model(seed=1, act="tanh", kind="mlp"):
    if kind == "cnn":
        return nn.Sequential([nn.conv2d(3, 3, padding=1, activation=act), nn.max_pool2d(2),
                              nn.flatten(), nn.Dense(3)], inputs=(1, 4, 4), seed=seed).build()
    return nn.mlp([5, 7, 3], activations=act, seed=seed)


def run(args, distributed=None, rank=0):
    X, y = data(kind=args.model)
    if args.nan_row is not None:
        X[args.nan_row, 0] = np.nan
    m = model(seed=args.model_seed + (rank if args.seed_per_rank else 0), act=args.act,
              kind=args.model)
    fail = None
    if args.fail_rank is not None and rank == args.fail_rank:
        seen = [0]

        def fail(epoch, s, loss):
            seen[0] += 1
            if seen[0] > args.fail_step:
                if args.kill:  # the process dies at once, as under the OOM killer
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure on rank {rank}")
    h = train.fit(m, X, y, epochs=args.epochs, batch_size=args.batch,
                  optimizer=optimizer(args), dtype=np.dtype(args.dtype),
                  target=args.target, seed=3, progress=args.progress, callback=fail,
                  checkpoint=args.checkpoint, resume=bool(args.checkpoint) and args.resume,
                  distributed=distributed, lr_schedule=halving(args) if args.schedule else None)
    return m, h


def optimizer(args):
    opt = OPTIMIZERS[args.opt]
    return opt if args.lr is None else dataclasses.replace(opt, lr=args.lr)


def halving(args):
    lr0 = OPTIMIZERS[args.opt].lr
    return lambda epoch: lr0 * 0.5**epoch


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--opt", default="sgd", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float)  # another learning rate than OPTIMIZERS'
    p.add_argument("--dtype", default="float64")
    p.add_argument("--target", default="numpy")
    p.add_argument("--act", default="tanh")
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--model-seed", type=int, default=1)
    p.add_argument("--seed-per-rank", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--checkpoint")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--fail-step", type=int, default=0)
    p.add_argument("--nan-row", type=int)
    p.add_argument("--kill", action="store_true")
    p.add_argument("--schedule", action="store_true")  # the learning rate halves per epoch
    p.add_argument("--sum", default="shared", choices=("shared", "allreduce"))
    return p


def main(argv=None):
    from mpi4py import MPI

    args = parser().parse_args(argv)
    os.environ["SYMBP_MPI_SUM"] = args.sum  # how the compiled targets sum over ranks
    rank = MPI.COMM_WORLD.Get_rank()
    try:
        m, h = run(args, distributed="mpi", rank=rank)
    except TrainingError as err:  # raised on every rank alike: each reports and exits 3
        if rank == 0 and args.out:
            np.savez(args.out, error=str(err))
        return 3
    X, y = data(n=31, seed=5, kind=args.model)  # other rows: the metrics of all of them, reduced
    ev = train.evaluate(m, X, y, target=args.target, distributed="mpi")
    # Every rank must hold the same parameters: compare each with rank 0's.
    flat = np.concatenate([v.ravel() for v in m.params.values()]).astype(np.float64)
    root = flat.copy()
    MPI.COMM_WORLD.Bcast(root, root=0)
    same = MPI.COMM_WORLD.allreduce(int(np.array_equal(flat, root)), op=MPI.MIN)
    if rank == 0 and args.out:
        np.savez(args.out, same=same, loss=np.array(h.loss), steps=h.steps,
                 accuracy=np.array(h.accuracy), test=[ev["loss"], ev["accuracy"]],
                 **{k: v for k, v in m.params.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
