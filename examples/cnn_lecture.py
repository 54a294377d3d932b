"""How δ flows back through a convolution and a max-pool, with numbers.

One 1-channel 4×4 image goes through

    Z₁ = X ⋆ K + b        2 filters 3×3, padding 1      1×2×4×4
    H₁ = ReLU(Z₁)                                        1×2×4×4
    H₂ = maxpool₂(H₁)     2×2 windows, stride 2          1×2×2×2
    Z₃ = flatten(H₂) W + c                               1×3
    L  = CE(softmax(Z₃), T)

and back: Δ₃ = Y − T, the max-pool sends each δ to the first maximum of its window,
ReLU′ masks it, and the convolution's rules are

    ∂L/∂K[f,c,u,v] = Σₙ Σᵢ Σⱼ Δ₁[n,f,i,j] · X[n,c,i·s+u−p,j·s+v−p]    (∂L/∂K = X ⋆ Δ₁)
    ∂L/∂X = Δ₁ ⋆_full rot180(K)                                        (a transposed convolution)
    ∂L/∂b[f] = Σₙ Σᵢ Σⱼ Δ₁[n,f,i,j]

Every gradient is checked against central differences (float64) before anything is printed.

Run:  python examples/cnn_lecture.py [--format all|text|latex|md]
"""

from __future__ import annotations

import argparse

import numpy as np
import sympy as sp

import symbp as sb
from symbp.printing import derive, matrix_formulas

N = sp.Symbol("N", integer=True, positive=True)
X = sb.tensor("X", N, 1, 4, 4)
K = sb.tensor("K", 2, 1, 3, 3)
b = sp.MatrixSymbol("b", 1, 2)
W = sp.MatrixSymbol("W", 8, 3)
c = sp.MatrixSymbol("c", 1, 3)
T = sp.MatrixSymbol("T", N, 3)
PARAMS = [X, K, b, W, c]

Z1 = sb.conv2d(X, K, b, padding=1)
H2 = sb.max_pool2d(sb.relu(Z1), 2)
LOSS = sb.softmax_cross_entropy(sb.dense(sb.flatten(H2), W, c), T)


def numbers() -> dict:
    """A diagonal stroke; a vertical and a horizontal edge filter; small fixed weights."""
    x = np.array([[0.9, 0.2, 0.0, 0.1],
                  [0.3, 1.0, 0.1, 0.0],
                  [0.0, 0.2, 0.8, 0.4],
                  [0.1, 0.0, 0.5, 1.0]]).reshape(1, 1, 4, 4)
    k = np.array([[[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, -1.0]],
                  [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -1.0, -1.0]]]).reshape(2, 1, 3, 3)
    # a little asymmetry, so no pre-activation sits on ReLU's kink and no window of H₁
    # holds two equal positive maxima: there the loss has no derivative to check
    k = k / 2 + np.array([0.05, -0.03, 0.02, 0.01, 0.04, -0.02, 0.03, 0.0, -0.01]).reshape(3, 3)
    w = np.round(np.random.default_rng(11).normal(scale=0.5, size=(8, 3)), 2)
    return {"X": x, "K": k, "b": np.array([[0.1, -0.1]]), "W": w,
            "c": np.array([[0.0, 0.1, -0.1]]), "T": np.array([[0.0, 1.0, 0.0]])}


def check(at: dict) -> sb.GradcheckResult:
    """The compiled gradients against float64 central differences, on every entry."""
    result = sb.gradcheck(LOSS, PARAMS, at, eps=1e-6, tol=1e-6)
    assert result.ok, str(result)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Backpropagation through a small CNN.")
    ap.add_argument("--format", choices=("all", "text", "latex", "md"), default="all")
    fmt = ap.parse_args(argv).format
    at = numbers()
    print("Central differences vs the compiled gradient (float64):")
    print(check(at))
    d = derive(LOSS, PARAMS, at=at)
    # each printed formula, evaluated on its own, against the gradient program's values
    print(f"Printed formulas re-evaluated: largest difference {d.check():.1e}")
    f = matrix_formulas(LOSS, PARAMS)
    for name, show in (("text", lambda o: o.text()), ("md", lambda o: o.markdown()),
                       ("latex", lambda o: o.latex())):
        if fmt in ("all", name):
            print(f"\n### The derivation ({name})\n")
            print(show(d))
            print(f"\n### The δ-rule ({name})\n")
            print(show(f))
    print("\nAll gradients agree with central differences.")


if __name__ == "__main__":
    main()
