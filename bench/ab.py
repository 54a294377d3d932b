"""A/B: this checkout against another one (a git worktree of an older commit), interleaved.

    git worktree add /tmp/base <commit>
    python bench/ab.py --base /tmp/base                 # compile times and W1-W3 steps
    python bench/ab.py --base /tmp/base --what W2 --rounds 9

Each round runs every measurement once per checkout, alternating, each in a fresh process
with that checkout first on ``PYTHONPATH``: compile = the W1 step from an empty disk cache
(cold), then again from it (cached), ``compile_step`` seconds; Wk = ``peers.py --worker
symbp-cpu Wk`` ms/step (median of its repeats).  Prints the median and the minimum over
the rounds and the ratio this/base of the medians.  Drift of the machine's speed hits both
checkouts alike; a difference smaller than the spread between rounds is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from peers import compile_times  # noqa: E402  (the same measurement as peers.py's table)


def run(tree: str, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": tree}
    r = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    if r.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(args[:3])} failed:\n{r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def measure(tree: str, what: str) -> dict:
    bench = os.path.join(tree, "bench")
    if what == "compile":
        (_, cold, _), (_, cached, _) = compile_times("cpu", tree)
        return {"compile cold (s)": cold, "compile cached (s)": cached}
    out = json.loads(run(tree, [os.path.join(bench, "peers.py"), "--worker", "symbp-cpu",
                                what, "--repeats", "5"]))
    return {f"{what} step (ms)": statistics.median(out["per"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the other checkout (a source tree)")
    ap.add_argument("--what", default="compile,W1,W2,W3")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    this, base = os.path.dirname(HERE), os.path.abspath(args.base)
    got: dict = {}
    for _ in range(args.rounds):
        for what in args.what.split(","):
            for name, tree in (("base", base), ("this", this)):
                for key, v in measure(tree, what).items():
                    got.setdefault(key, {}).setdefault(name, []).append(v)
    print(f"this: {this}\nbase: {base}\n{args.rounds} rounds, load average now "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| measure | base median | this median | base min | this min | this/base |")
    print("|---|---|---|---|---|---|")
    for key, v in got.items():
        b, t = statistics.median(v["base"]), statistics.median(v["this"])
        print(f"| {key} | {b:.4g} | {t:.4g} | {min(v['base']):.4g} | {min(v['this']):.4g} "
              f"| {t / b:.2f} |")


if __name__ == "__main__":
    main()
