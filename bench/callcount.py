"""Instructions per W3 public call, counted by valgrind's callgrind: a figure the load
of a shared machine cannot change (bench/call.py's timings can).

    python bench/callcount.py                      # this checkout
    python bench/callcount.py --base /tmp/base     # and another checkout

Each tree runs in one process under ``valgrind --tool=callgrind --instr-atstart=no``;
for each call the process warms up (300 calls), zeroes the counters with
``callgrind_control``, makes ``--calls`` calls and dumps the counters.  The figure is
the dump's total over the calls, less that of the same loop calling ``lambda: None``.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(n):
    sys.path.insert(0, HERE)
    from call import w3_calls

    calls = {**w3_calls(), "empty": lambda: None}
    pid = str(os.getpid())

    def ctl(*a):
        subprocess.run(["callgrind_control", *a, pid], stdout=subprocess.DEVNULL, check=True)

    ctl("-i", "on")
    for k, call in enumerate(calls.values()):
        for _ in range(300):
            call()
        ctl("-z")
        for _ in range(n):
            call()
        ctl("-d", f"call{k}")
    return list(calls)


def count(tree, n):
    """{call: instructions per call} for the checkout ``tree``."""
    out = tempfile.mkdtemp()
    env = {**os.environ, "PYTHONPATH": tree, "PYTHONHASHSEED": "0"}
    r = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                        f"--callgrind-out-file={out}/cg.%p", sys.executable,
                        os.path.abspath(__file__), "--worker", "--calls", str(n)],
                       env=env, capture_output=True, text=True, cwd=out)
    if r.returncode != 0:
        raise SystemExit(f"{tree}: worker failed:\n{r.stderr[-2000:]}")
    names = r.stdout.strip().splitlines()[-1].split("|")
    got = {}
    for f in glob.glob(f"{out}/cg.*"):
        text = open(f).read()
        tag = re.search(r"^desc: Trigger: dump call(\d+)$", text, re.M)  # not the exit's
        total = re.search(r"^summary: (\d+)", text, re.M)
        if tag and total:
            got[names[int(tag.group(1))]] = int(total.group(1)) / n
    return {k: got[k] - got["empty"] for k in names if k != "empty"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="another checkout (a source tree) to count alongside")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        print("|".join(worker(args.calls)))
        return
    trees = [("this", os.path.dirname(HERE))]
    if args.base:
        trees.insert(0, ("base", os.path.abspath(args.base)))
    got = {name: count(tree, args.calls) for name, tree in trees}
    for name, tree in trees:
        print(f"{name}: {tree}")
    cols = [n for n, _ in trees]
    print(f"\n| W3, instructions per call ({args.calls} calls) | " + " | ".join(cols)
          + (" | this/base |" if args.base else " |"))
    print("|---|" + "---|" * len(cols) + ("---|" if args.base else ""))
    for what in got["this"]:
        cells = [f"{got[c][what]:,.0f}" for c in cols]
        ratio = f" | {got['this'][what] / got['base'][what]:.2f}" if args.base else ""
        print(f"| {what} | " + " | ".join(cells) + ratio + " |")


if __name__ == "__main__":
    main()
