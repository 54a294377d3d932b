"""Performance as the work grows (issue 12): the step grid against JAX and PyTorch, compile
time per depth, the public call, and ``blas_threads="auto"`` beside a busy neighbour.

    python bench/scale.py                           # everything, ~15-25 minutes
    python bench/scale.py --parts grid --modes pinned --rounds 3
    python bench/scale.py --parts grid --points mlp-d16-w64-b32,mlp-d2-w2048-b64
    python bench/scale.py --parts grid --base /tmp/before   # and symbp from another checkout
    python bench/scale.py --parts grid --base-env SYMBP_BLAS=numpy   # or with other settings

The grid: a tanh MLP width -> width x depth -> 10, softmax-CE, float32, SGD (peers.py's
``mlp-d<depth>-w<width>-b<batch>`` workloads), value, gradient and update in one step:
depth 1-32 at width 64 and batch 32, width 16-2048 at depth 2 and batch 64, batch 1-4096
at depth 2 and width 256.  Every (point, framework, mode) runs in its own fresh process,
round-robin over the frameworks; ``pinned`` = ``taskset -c 0`` for every framework (one
core: symbp and PyTorch then use one thread, XLA one core), ``unpinned`` = both cores,
each framework with its defaults (symbp ``blas_threads="auto"``, PyTorch two threads).
The table gives medians in ms/step and symbp/JAX, symbp/PyTorch from this one run;
``--base`` adds a column: symbp imported from another checkout (its ``PYTHONPATH``), the
same workloads, in the same round-robin (before/after in one run); ``--base-env K=V,...``
sets environment variables for that column only (without ``--base``: this checkout with
those settings, e.g. another BLAS for the kernels).

The other parts run the scripts that own them and print their tables: ``compile``
(bench/compile.py: cold and cached compile per depth, JAX's cold jit beside it), ``call``
(bench/call.py: W3 through ``fn(**arrays)`` and ``compile_forward``), ``threads``
(bench/threads.py: W2 with auto and fixed BLAS threads, with and without a neighbour).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEPTHS = [f"mlp-d{d}-w64-b32" for d in (1, 2, 4, 8, 16, 32)]
WIDTHS = [f"mlp-d2-w{w}-b64" for w in (16, 64, 256, 1024, 2048)]
BATCHES = [f"mlp-d2-w256-b{b}" for b in (1, 64, 512, 4096)]
POINTS = list(dict.fromkeys(DEPTHS + WIDTHS + BATCHES))  # d2-w256-b64 is in two lines
FRAMEWORKS = ("symbp-cpu", "jax-jit", "torch-eager")
PARTS = {"compile": ["compile.py", "--depths", "2,4,8,16,32", "--rounds", "1"],
         "call": ["call.py", "--rounds", "2", "--blocks", "1000"],
         "threads": ["threads.py", "--steps", "1000", "--repeats", "2"]}


def step_ms(framework: str, point: str, pinned: bool, repeats: int, base=None,
            base_env=None):
    """Median ms/step of one framework on one point, in a fresh process; None if the
    framework is not installed (its error's last line goes to stderr).  ``symbp-base``:
    symbp-cpu imported from the checkout ``base`` (None: this one), with ``base_env``
    added to its environment."""
    pin = ["taskset", "-c", "0"] if pinned else []
    env = dict(os.environ)
    if framework == "symbp-base":
        framework = "symbp-cpu"
        if base:
            env["PYTHONPATH"] = base
        env.update(base_env or {})
    r = subprocess.run([*pin, sys.executable, os.path.join(HERE, "peers.py"), "--worker",
                        framework, point, "--repeats", str(repeats)],
                       capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {point} {framework}: skipped ({last[:120]})", file=sys.stderr)
        return None
    return statistics.median(json.loads(r.stdout.strip().splitlines()[-1])["per"])


def grid(points, modes, rounds, repeats, base=None, base_env=None):
    load, t0 = os.getloadavg()[0], time.time()
    compare = bool(base or base_env)
    fws = FRAMEWORKS + (("symbp-base",) if compare else ())
    got: dict = {}
    for _ in range(rounds):
        for mode in modes:
            for point in points:
                for fw in fws:
                    ms = step_ms(fw, point, mode == "pinned", repeats, base, base_env)
                    if ms is not None:
                        got.setdefault((mode, point, fw), []).append(ms)
    print(f"## step grid: median ms/step of {rounds} fresh process(es) x {repeats} repeats; "
          f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
          f"{time.time() - t0:.0f} s\n")
    if compare:
        settings = " ".join(f"{k}={v}" for k, v in (base_env or {}).items())
        print(f"symbp before: {base or 'this checkout'}{', ' + settings if settings else ''}\n")
    for mode in modes:
        print(f"### {mode}\n")
        head = ["symbp", "JAX", "PyTorch"] + (["symbp before"] if compare else [])
        ratio_of = ["JAX", "PyTorch"] + (["before"] if compare else [])
        print("| point | " + " | ".join(head + [f"symbp/{r}" for r in ratio_of]) + " |")
        print("|---|" + "---|" * (len(head) + len(ratio_of)))
        for point in points:
            ms = {fw: statistics.median(got[mode, point, fw])
                  for fw in fws if (mode, point, fw) in got}
            cells = [f"{ms[fw]:.4g}" if fw in ms else "-" for fw in fws]
            ratios = [f"{ms['symbp-cpu'] / ms[fw]:.2f}" if {"symbp-cpu", fw} <= ms.keys()
                      else "-" for fw in fws[1:]]
            print(f"| {point} | " + " | ".join(cells + ratios) + " |")
        print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="grid,compile,call,threads")
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--modes", default="pinned,unpinned")
    ap.add_argument("--rounds", type=int, default=1, help="fresh processes per grid cell")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--base", help="another checkout: its symbp as one more grid column")
    ap.add_argument("--base-env", default="",
                    help="K=V,...: environment for that column (alone: this checkout)")
    args = ap.parse_args()
    try:
        base_env = dict(kv.split("=", 1) for kv in args.base_env.split(",") if kv)
    except ValueError:
        raise SystemExit(f"--base-env {args.base_env!r}: give K=V pairs, comma-separated") from None
    parts = args.parts.split(",")
    if "pinned" in args.modes and not shutil.which("taskset"):
        raise SystemExit("pinned runs need taskset (util-linux)")
    if "grid" in parts:
        base = os.path.abspath(args.base) if args.base else None
        grid(args.points.split(","), args.modes.split(","), args.rounds, args.repeats, base,
             base_env)
    for part in parts:
        if part in PARTS:
            script, *rest = PARTS[part]
            print(f"## {part}: python bench/{script} {' '.join(rest)}\n", flush=True)
            subprocess.run([sys.executable, os.path.join(HERE, script), *rest], check=True)
            print(flush=True)
        elif part != "grid":
            raise SystemExit(f"unknown part {part!r}: grid, {', '.join(PARTS)}")


if __name__ == "__main__":
    main()
