"""LaTeX size of a deep network's gradient: named intermediates vs the inlined expression.

A width-4 scalar tanh network of depth 1..16 with loss ½(Σ h − t)².  For each depth:

- ``derive``: characters of ``symbp.derive(L, params).latex()``, the whole derivation
  (forward rows, every ordered derivative, every parameter's gradient), which names each
  intermediate once, so its size grows linearly with depth;
- ``sympy.diff``: characters of ``sympy.latex(sympy.diff(L, w))`` for ONE first-layer
  weight ``w`` (the deepest path), the inlined tree, as far as it finishes within the
  time budget (about a minute in all).

Run:  python bench/latex_size.py [--max-depth 16] [--budget 60] [--no-write]
It prints a table and rewrites the "LaTeX size" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import sympy as sp

import symbp as sb

WIDTH = 4


def network(depth: int, width: int = WIDTH):
    xs = [sp.Symbol(f"x_{i}", real=True) for i in range(width)]
    t = sp.Symbol("t", real=True)
    h, params = xs, []
    for layer in range(1, depth + 1):
        new = []
        for j in range(width):
            ws = [sp.Symbol(f"w{layer}_{j}{i}", real=True) for i in range(width)]
            b = sp.Symbol(f"b{layer}_{j}", real=True)
            params += ws + [b]
            # unevaluated: SymPy's canonical ordering would compare the deep shared
            # subexpressions as trees, exponential in depth (the network is a DAG)
            z = sp.Add(*[sp.Mul(w, x, evaluate=False) for w, x in zip(ws, h)], b,
                       evaluate=False)
            new.append(sp.tanh(z, evaluate=False))
        h = new
    return (sp.Add(*h, -t, evaluate=False)) ** 2 / 2, params


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-depth", type=int, default=16)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds for sympy.diff")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    rows, spent, inline_alive = [], 0.0, True
    for depth in range(1, args.max_depth + 1):
        f, params = network(depth)
        t0 = time.perf_counter()
        d = sb.derive(f, params)
        tex = d.latex()
        t_derive = time.perf_counter() - t0
        n_rows = len(d.forward) + len(d.backward) + len(d.gradients)
        inline, t_inline = None, None
        if inline_alive:
            t0 = time.perf_counter()
            inline = len(sp.latex(sp.diff(f, params[0])))  # w1_00, the deepest weight
            t_inline = time.perf_counter() - t0
            spent += t_inline
            # the next depth costs several times this one: stop before the budget is gone
            if spent + 4 * t_inline > args.budget:
                inline_alive = False
        rows.append((depth, len(params), n_rows, len(tex), t_derive, inline, t_inline))
        print(f"depth {depth:2d}: derive {len(tex):8d} chars ({t_derive:.2f} s), "
              f"sympy.diff {inline if inline is not None else '—':>10} chars"
              + (f" ({t_inline:.2f} s)" if t_inline is not None else ""), flush=True)

    table = [
        "| depth | parameters | derivation rows | derive LaTeX (chars) | chars / depth | "
        "derive time (s) | inlined sympy.diff ∂L/∂w1_00 LaTeX (chars) | "
        "sympy.diff+latex time (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for depth, npar, nrows, size, td, inl, ti in rows:
        table.append(
            f"| {depth} | {npar} | {nrows} | {size} | {size / depth:.0f} | {td:.2f} | "
            f"{inl if inl is not None else 'not run (budget)'} | "
            f"{f'{ti:.2f}' if ti is not None else '—'} |"
        )
    print("\n".join(table))
    if not args.no_write:
        write_section(table)


def write_section(table):
    path = Path(__file__).with_name("RESULTS.md")
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = "\n".join([
        "## LaTeX size",
        "",
        f"`python bench/latex_size.py` (width-{WIDTH} scalar tanh network, loss ½(Σh − t)²). "
        "`derive` is the whole derivation (forward rows, every ordered derivative, every "
        "parameter's gradient, all parameters); the inlined column is `sympy.latex(sympy.diff"
        "(L, w1_00))` for ONE first-layer weight, run while the next depth fits a ~1 minute "
        "budget. Named intermediates keep the derivation linear in depth (constant chars per "
        "depth); the inlined derivative of a single weight grows geometrically.",
        "",
        *table,
        "",
    ])
    pat = re.compile(r"^## LaTeX size\n.*?(?=^## |\Z)", re.S | re.M)
    text = pat.sub(section, text) if pat.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text)
    print(f"wrote the LaTeX size section of {path}")


if __name__ == "__main__":
    main()
