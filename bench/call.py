"""The public call's cost: W3 through ``fn(**arrays)`` and through ``compile_forward``.

    python bench/call.py                        # this checkout
    python bench/call.py --base /work/main      # and another checkout, in the same run

W3 is peers.py's XOR network (2-8 tanh-1 sigmoid, binary CE, batch 4, float32, 'cpu'):
``sb.compile(L, params)`` called as ``fn(**params, X=X, T=T)`` (value and gradients),
and ``sb.compile_forward(sigmoid(H))`` called as ``fwd(**params, X=X)`` (the
predictions); beside them the fused SGD step ``step(params, X=X, T=T)``, whose repeated
call checks its arrays the same way.  Each measurement runs in a fresh process pinned to
one core (CPU 0, as ``taskset -c 0``), checkouts alternating round by round, each first on
``PYTHONPATH``.
A process times ``--blocks`` blocks of ``--calls`` calls after a warm-up; the figures are
the median and the minimum over every block of every round, in µs per call.  Blocks are
short (10 calls): on a shared core another process's time slice then spoils a few blocks,
which the median ignores, rather than most of them (blocks of 100 calls of the 21 µs call
came out bimodal, 22 or 104 µs, with a load average of 7 on two cores).

Every block of calls is followed by a block of fixed pure-Python work (``reference``).  On
the shared machine the same instructions run up to ~1.8x slower for stretches (no GC
collection, steal time or timer cost explains it: the reference block slows down with
the calls), so besides the median over every block the table gives the median over the
*quiet* blocks, those whose reference block ran within 10 % of its fastest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def w3():
    """(loss, params, predictions) of W3, built as peers.py builds it."""
    import sympy as sp

    import symbp as sb

    N = sp.Symbol("N")
    X, T = sp.MatrixSymbol("X", N, 2), sp.MatrixSymbol("T", N, 1)
    W0, b0 = sp.MatrixSymbol("W0", 2, 8), sp.MatrixSymbol("b0", 1, 8)
    W1, b1 = sp.MatrixSymbol("W1", 8, 1), sp.MatrixSymbol("b1", 1, 1)
    Y = sb.sigmoid(sb.dense(sb.tanh(sb.dense(X, W0, b0)), W1, b1))
    return sb.binary_cross_entropy(Y, T), [W0, b0, W1, b1], Y


def reference():
    """Fixed pure-Python work (~as long as the call on a quiet core): the core's speed now."""
    s = 0
    for i in range(150):
        s += i * i
    return s


def blocks(call, n_blocks, n_calls):
    """µs per call of each block, and of the reference block run right after it."""
    for _ in range(200):  # warm up: first binding, workspace, caches
        call()
    per, ref = [], []
    for _ in range(n_blocks):
        t = time.perf_counter_ns()
        for _ in range(n_calls):
            call()
        t1 = time.perf_counter_ns()
        for _ in range(n_calls):
            reference()
        per.append((t1 - t) / n_calls / 1e3)
        ref.append((time.perf_counter_ns() - t1) / n_calls / 1e3)
    return per, ref


def w3_calls() -> dict:
    """The W3 calls measured, compiled for 'cpu' in float32, by name: the public call,
    the forward call, and (for comparison: it checks the same way) the fused SGD step,
    which updates its own copy of the parameters."""
    import numpy as np

    import symbp as sb

    sys.path.insert(0, HERE)
    from peers import data, init

    L, params, Y = w3()
    fn = sb.compile(L, params, target="cpu", dtype=np.float32)
    fwd = sb.compile_forward(Y, target="cpu", dtype=np.float32)
    P = init("W3")
    X, T = data("W3")
    step = sb.compile_step(L, params, sb.SGD(0.5), target="cpu", dtype=np.float32)
    Q = {k: v.copy() for k, v in P.items()}
    return {"fn(**arrays)": lambda: fn(**P, X=X, T=T), "compile_forward": lambda: fwd(**P, X=X),
            "fused step": lambda: step(Q, X=X, T=T)}


def worker(n_blocks, n_calls):
    return {name: blocks(call, n_blocks, n_calls) for name, call in w3_calls().items()}


def run(tree, n_blocks, n_calls):
    env = {**os.environ, "PYTHONPATH": tree}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                        "--blocks", str(n_blocks), "--calls", str(n_calls)],
                       env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if r.returncode != 0:
        raise SystemExit(f"{tree}: worker failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="another checkout (a source tree) to measure alongside")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=2000)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--cpu", type=int, default=0, help="the core to pin to; -1: unpinned")
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        if args.cpu >= 0:  # before anything starts a thread
            os.sched_setaffinity(0, {args.cpu})
        print(json.dumps(worker(args.blocks, args.calls)))
        return
    trees = [("this", os.path.dirname(HERE))]
    if args.base:
        trees.insert(0, ("base", os.path.abspath(args.base)))
    load = os.getloadavg()[0]
    got: dict = {}
    for _ in range(args.rounds):
        for name, tree in trees:
            for what, (per, ref) in run(tree, args.blocks, args.calls).items():
                got.setdefault(what, {}).setdefault(name, []).extend(zip(per, ref))
    print(f"{args.rounds} rounds x {args.blocks} blocks x {args.calls} calls, pinned to CPU "
          f"{args.cpu}; load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    for name, tree in trees:
        print(f"{name}: {tree}")
    cols = [n for n, _ in trees]
    print("\n| W3 call (µs) | " + " | ".join(f"{c} median | {c} min | {c} quiet (share)"
                                            for c in cols)
          + (" | this/base (medians) |" if args.base else " |"))
    print("|---|" + "---|---|---|" * len(cols) + ("---|" if args.base else ""))
    for what, by in got.items():
        fastest = min(r for c in cols for _, r in by[c])
        cells = []
        for c in cols:
            per = [t for t, _ in by[c]]
            quiet = [t for t, r in by[c] if r <= 1.1 * fastest]
            cells.append(f"{statistics.median(per):.2f} | {min(per):.2f} | "
                         + (f"{statistics.median(quiet):.2f} ({len(quiet) / len(per):.0%})"
                            if quiet else "-"))
        med = {c: statistics.median([t for t, _ in by[c]]) for c in cols}
        ratio = f" | {med['this'] / med['base']:.2f}" if args.base else ""
        print(f"| {what} | " + " | ".join(cells) + ratio + " |")


if __name__ == "__main__":
    main()
