"""The chapter 《深度学习误差反向传播算法入门》 (an introduction to error backpropagation),
reproduced end to end with symbp, section by section:

  一 计算图        the graph of p = x + y, with values and gradients on its edges
  二 链式法则      the chain rule on f(g(x)), printed as ordered derivatives
  三 反向传播      one neuron: z = w·x + b, y = σ(z), L = ½(y − t)²
  四 激活函数      σ′ = σ(1 − σ) peaks at 1/4; tanh′ = 1 − tanh²; ReLU′ is a step
  五 Softmax      outputs sum to 1; softmax + cross-entropy gives y − t
  六 误差反向传播  a two-layer network: δ-rule in matrix and index form, gradient check

Run:  python examples/lecture.py [--format text|latex|md] [--out DIR]
With --out, the graphs (PNG/SVG, when Graphviz's `dot` is installed) and the activation
plots (when matplotlib is installed) are written there too.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import sympy as sp

import symbp as sb
from symbp.printing import derive, matrix_formulas
from symbp.printing.graph import render, to_dot
from symbp.printing.tex import text

FORMAT = "text"
OUT: Path | None = None


def show(title: str, d) -> None:
    """Print a derivation (or formulas) in the chosen format under a heading."""
    print(f"\n### {title}\n")
    print({"text": d.text, "latex": d.latex, "md": d.markdown}[FORMAT]())


def picture(name: str, dot: str) -> None:
    if OUT is None:
        return
    (OUT / f"{name}.dot").write_text(dot)
    if shutil.which("dot"):
        render(dot, OUT / f"{name}.png")
        render(dot, OUT / f"{name}.svg")
        print(f"[graph written to {OUT / name}.png and .svg]")
    else:
        print(f"[graph DOT written to {OUT / name}.dot; install Graphviz to render it]")


def plot(name: str) -> None:
    if OUT is None:
        return
    try:
        from symbp.printing.plots import plot_activation

        print(f"[plot written to {plot_activation(name, OUT / f'{name}.png')}]")
    except sb.SymbpError as e:  # matplotlib missing
        print(f"[no plot: {e}]")


def section_graph():
    print("\n## 一、计算图: p = x + y")
    x, y = sp.symbols("x y", real=True)
    at = {x: 2.0, y: 3.0}
    show("p = x + y at x = 2, y = 3", derive(x + y, [x, y], at=at, loss="p"))
    dot = to_dot(x + y, at=at, loss="p")
    print("Each edge carries the forward value (above) and the gradient (below, red):")
    print(dot)
    picture("p_equals_x_plus_y", dot)


def section_chain_rule():
    print("\n## 二、链式法则: f(g(x)) with g(x) = x², f(u) = sin u")
    x = sp.Symbol("x", real=True)
    f = sp.sin(x**2)
    d = derive(f, [x], at={x: 0.7}, loss="f")
    show("∂f/∂x = ∂f/∂g · ∂g/∂x", d)
    ref = sp.diff(f, x)
    print(f"sympy.diff: {ref} = {float(ref.subs(x, 0.7)):.6f};  derivation: {d.gradient(x):.6f}")
    assert np.isclose(d.gradient(x), float(ref.subs(x, 0.7)))


def section_neuron():
    print("\n## 三、反向传播: one neuron, squared error")
    w, x, b, t = sp.symbols("w x b t", real=True)
    L = (sb.sigmoid(w * x + b) - t) ** 2 / 2
    at = {w: 0.5, x: 1.0, b: 0.1, t: 1.0}
    show("symbolic", derive(L, [w, b]))
    show("with numbers", derive(L, [w, b], at=at))
    picture("neuron", to_dot(L, at=at, wrt=[w, b]))


def section_activations():
    print("\n## 四、激活函数层")
    z = sp.Symbol("z", real=True)
    show("Sigmoid: y = σ(z)", derive(sb.sigmoid(z), [z], loss="y"))
    d1 = sp.diff(sb.sigmoid(z), z)  # σ(1 − σ), from sigmoid's own fdiff
    s = sb.sigmoid.formula(z)  # 1/(1 + e^{−z}), to solve σ″ = 0
    zmax = sp.solve(sp.diff(s, z, 2), z)
    peak = sp.simplify(sp.diff(s, z).subs(z, zmax[0]))
    print(f"σ′(z) = {text(d1)};  σ″(z) = 0 at z = {zmax};  σ′(0) = {peak}  (the maximum, 1/4)")
    assert peak == sp.Rational(1, 4)
    print("Through n sigmoid layers the gradient shrinks by at most (1/4)^n:",
          ", ".join(f"n={n}: {0.25**n:.1e}" for n in (1, 5, 10)))
    plot("sigmoid")
    show("Tanh: y = tanh(z)", derive(sb.tanh(z), [z], loss="y"))
    plot("tanh")
    for v in (-1.5, 2.0):
        show(f"ReLU at z = {v}", derive(sb.relu(z), [z], at={z: v}, loss="y"))
    print("ReLU′(z) = [z > 0]: the gradient passes unchanged or is stopped.")
    plot("relu")


def section_softmax():
    print("\n## 五、Softmax 层")
    zs = sp.symbols("z1:4", real=True)
    ys = sb.softmax(list(zs))
    total = sp.simplify(sum(ys))
    print(f"Σ_j softmax(z)_j = {total}  (symbolically)")
    assert total == 1
    N = sp.Symbol("N")
    Z, T = sp.MatrixSymbol("Z", N, 3), sp.MatrixSymbol("T", N, 3)
    z = np.array([[2.0, 1.0, 0.1]])
    y = sb.compile_forward(sb.softmax(Z))(Z=z)
    print(f"softmax({z[0].tolist()}) = {np.round(y[0], 4).tolist()}, sum = {y.sum():.6f}")
    # softmax + cross-entropy: the ordered derivative on the logits is y − t (over N rows)
    L = sb.softmax_cross_entropy(Z, T)
    d = derive(L, [Z], at={Z: z, T: np.array([[1.0, 0.0, 0.0]])})
    show("softmax + cross-entropy, one example (N = 1)", d)
    assert np.allclose(d.gradient(Z), y - np.array([[1.0, 0.0, 0.0]]))
    # the same by hand: L = −Σ t log y with Σ t = 1 gives ∂L/∂z₁ = y₁ − t₁
    ts = sp.symbols("t1:4", real=True)
    Ls = -sum(ti * sp.log(yi) for ti, yi in zip(ts, ys))
    g = sp.simplify(sp.diff(Ls, zs[0]).subs(ts[0], 1 - ts[1] - ts[2]))
    print(f"∂L/∂z₁ − (y₁ − t₁) = {sp.simplify(g - (ys[0] - ts[0]).subs(ts[0], 1 - ts[1] - ts[2]))}")


def section_network():
    print("\n## 六、误差反向传播: a two-layer network")
    N = sp.Symbol("N")
    X = sp.MatrixSymbol("X", N, 3)
    W1, b1 = sp.MatrixSymbol("W1", 3, 4), sp.MatrixSymbol("b1", 1, 4)
    W2, b2 = sp.MatrixSymbol("W2", 4, 2), sp.MatrixSymbol("b2", 1, 2)
    T = sp.MatrixSymbol("T", N, 2)
    H1 = sb.sigmoid(sb.dense(X, W1, b1))
    L = sb.softmax_cross_entropy(sb.dense(H1, W2, b2), T)
    wrt = [W1, b1, W2, b2]
    show("forward and backward tables", derive(L, wrt))
    show("the δ-rule and its index form", matrix_formulas(L, wrt))
    rng = np.random.default_rng(0)
    arrays = {"X": rng.normal(size=(6, 3)), "W1": rng.normal(size=(3, 4)),
              "b1": rng.normal(size=(1, 4)), "W2": rng.normal(size=(4, 2)),
              "b2": rng.normal(size=(1, 2)), "T": np.eye(2)[rng.integers(0, 2, 6)]}
    check = sb.gradcheck(L, wrt, arrays)
    print("\nGradient check (back-propagation vs central differences):")
    print(check)
    assert check.ok


def main(argv=None):
    global FORMAT, OUT
    ap = argparse.ArgumentParser(description="The backpropagation chapter, with symbp.")
    ap.add_argument("--format", choices=("text", "latex", "md"), default="text")
    ap.add_argument("--out", type=Path, help="write graphs and plots into this folder")
    args = ap.parse_args(argv)
    FORMAT, OUT = args.format, args.out
    if OUT is not None:
        OUT.mkdir(parents=True, exist_ok=True)
    section_graph()
    section_chain_rule()
    section_neuron()
    section_activations()
    section_softmax()
    section_network()
    print("\nAll sections reproduced.")


if __name__ == "__main__":
    main()
