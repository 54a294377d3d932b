"""Printed derivations compared with known-good text and LaTeX, checked by hand.

A printer bug (a dropped minus sign, a lost 1/N) leaves every number right and the
lecture wrong, so the printed strings themselves are compared here.  Each golden string
was derived by hand: the line-by-line check is in the comment above it.  When a printing
rule changes on purpose, update the one string of its case (they are all at the top).
"""

# the golden LaTeX lines are compared verbatim, so they keep their length
# ruff: noqa: E501

import numpy as np
import pytest
import sympy as sp

import symbp as sb
from symbp.errors import SymbpError
from symbp.printing import derive

N = sp.Symbol("N")

# softmax + cross-entropy, Z = XW + 1b (X: N×2, W: 2×3):
#   L = −(1/N) Σ_nc T_nc log Y_nc with Y = softmax(Z) row-wise, = (1/N) Σ_n (r_n lse(Z_n) −
#   Σ_c T_nc Z_nc) with r = T𝟏 (the row sums of T); so ∂L/∂Z_nc = (Y_nc r_n − T_nc)/N, i.e.
#   Δ = (Y ⊙ (T𝟏)𝟏ᵀ − T)/N, exact for any T ((Y − T)/N when rows sum to 1);
#   ∂L/∂W = Xᵀ Δ, ∂L/∂b = 𝟏ᵀ Δ.
CE_TEXT = """\
Forward pass
  Z = X W + 𝟏b             ∈ ℝ^N×3
  Y = softmax(Z)           ∈ ℝ^N×3
  L = −(1/N) Σ T ⊙ log Y
Backward pass (ordered derivatives)
  Δ = (Y ⊙ (T𝟏)𝟏ᵀ − T)/N   ∈ ℝ^N×3
Gradients
  ∂L/∂W = Xᵀ Δ   ∈ ℝ^2×3
  ∂L/∂b = 𝟏ᵀΔ    ∈ ℝ^1×3"""

CE_LATEX = r"""\begin{align*}
&\text{forward pass} \\
Z &= X W + \mathbf{1}b && \in \mathbb{R}^{N\times 3} \\
Y &= \operatorname{softmax}\left(Z\right) && \in \mathbb{R}^{N\times 3} \\
L &= -\frac{1}{N}\textstyle\sum T \odot \log Y \\
&\text{backward pass (ordered derivatives)} \\
\Delta &= \frac{Y \odot \left(T\,\mathbf{1}\right)\mathbf{1}^{\top} - T}{N} && \in \mathbb{R}^{N\times 3} \\
&\text{gradients} \\
\frac{\partial L}{\partial W} &= X^{\top} \Delta && \in \mathbb{R}^{2\times 3} \\
\frac{\partial L}{\partial b} &= \mathbf{1}^{\top} \Delta && \in \mathbb{R}^{1\times 3}
\end{align*}"""

# sigmoid + mse over N×2 entries: L = Σ (H − T)²/(2N), so ∂⁺L/∂H = 2(H − T)/(2N) = (H − T)/N;
#   σ' = H(1 − H) elementwise, Δ = ∂⁺L/∂H ⊙ H ⊙ (1 − H); ∂L/∂W = Xᵀ Δ, ∂L/∂b = 1ᵀ Δ.
MSE_TEXT = """\
Forward pass
  Z = X W + 𝟏b              ∈ ℝ^N×2
  H = σ(Z)                  ∈ ℝ^N×2
  L = Σ((H − T)^∘²)/(2·N)
Backward pass (ordered derivatives)
  ∂⁺L/∂H = (H − T)/N         ∈ ℝ^N×2
  Δ = ∂⁺L/∂H ⊙ H ⊙ (1 − H)   ∈ ℝ^N×2
Gradients
  ∂L/∂W = Xᵀ Δ   ∈ ℝ^2×2
  ∂L/∂b = 𝟏ᵀΔ    ∈ ℝ^1×2"""

MSE_LATEX = r"""\begin{align*}
&\text{forward pass} \\
Z &= X W + \mathbf{1}b && \in \mathbb{R}^{N\times 2} \\
H &= \sigma\left(Z\right) && \in \mathbb{R}^{N\times 2} \\
L &= \frac{\textstyle\sum \left(\left(H - T\right)^{\circ 2}\right)}{2 N} \\
&\text{backward pass (ordered derivatives)} \\
\frac{\partial^{+} L}{\partial H} &= \frac{H - T}{N} && \in \mathbb{R}^{N\times 2} \\
\Delta &= \frac{\partial^{+} L}{\partial H} \odot H \odot \left(1 - H\right) && \in \mathbb{R}^{N\times 2} \\
&\text{gradients} \\
\frac{\partial L}{\partial W} &= X^{\top} \Delta && \in \mathbb{R}^{2\times 2} \\
\frac{\partial L}{\partial b} &= \mathbf{1}^{\top} \Delta && \in \mathbb{R}^{1\times 2}
\end{align*}"""

# one sigmoid neuron, L = (y − t)²/2: ∂⁺L/∂y = y − t, ∂⁺L/∂z = ∂⁺L/∂y · y(1 − y),
#   ∂L/∂w = ∂⁺L/∂z · x, ∂L/∂b = ∂⁺L/∂z.
NEURON_TEXT = """\
Forward pass
  z = w·x + b
  y = σ(z)
  L = (y − t)²/2
Backward pass (ordered derivatives)
  ∂⁺L/∂y = y − t
  ∂⁺L/∂z = ∂⁺L/∂y · y·(1 − y)
Gradients
  ∂L/∂w = ∂⁺L/∂z · x
  ∂L/∂b = ∂⁺L/∂z"""

NEURON_LATEX = r"""\begin{align*}
&\text{forward pass} \\
z &= w x + b \\
y &= \sigma\left(z\right) \\
L &= \frac{\left(y - t\right)^{2}}{2} \\
&\text{backward pass (ordered derivatives)} \\
\frac{\partial^{+} L}{\partial y} &= y - t \\
\frac{\partial^{+} L}{\partial z} &= \frac{\partial^{+} L}{\partial y} \cdot y \left(1 - y\right) \\
&\text{gradients} \\
\frac{\partial L}{\partial w} &= \frac{\partial^{+} L}{\partial z} \cdot x \\
\frac{\partial L}{\partial b} &= \frac{\partial^{+} L}{\partial z}
\end{align*}"""


def _ce():
    X, T = sp.MatrixSymbol("X", N, 2), sp.MatrixSymbol("T", N, 3)
    W, b = sp.MatrixSymbol("W", 2, 3), sp.MatrixSymbol("b", 1, 3)
    return sb.softmax_cross_entropy(sb.dense(X, W, b), T), [W, b]


def _mse():
    X, T = sp.MatrixSymbol("X", N, 2), sp.MatrixSymbol("T", N, 2)
    W, b = sp.MatrixSymbol("W", 2, 2), sp.MatrixSymbol("b", 1, 2)
    return sb.mse(sb.sigmoid(sb.dense(X, W, b)), T), [W, b]


def _neuron():
    w, x, b, t = sp.symbols("w x b t", real=True)
    return (sb.sigmoid(w * x + b) - t) ** 2 / 2, [w, b]


CASES = {
    "softmax_ce": (_ce, CE_TEXT, CE_LATEX),
    "sigmoid_mse": (_mse, MSE_TEXT, MSE_LATEX),
    "neuron": (_neuron, NEURON_TEXT, NEURON_LATEX),
}


@pytest.mark.parametrize("case", list(CASES))
def test_printed_derivation_matches_golden_text(case):
    make, text, latex = CASES[case]
    d = derive(*make())
    assert d.text() == text
    assert d.latex() == latex


def _numbers(f, wrt, seed=3):
    rng = np.random.default_rng(seed)
    at = {}
    for s in sb.gradient_program(f, wrt).inputs:
        at[s.name] = rng.normal(size=(4 if s.shape[0] == N else int(s.shape[0]),
                                      int(s.shape[1]))) if isinstance(s, sp.MatrixSymbol) \
            else float(rng.normal())
    if "T" in at and at["T"].shape[1] == 3:  # one-hot class targets for cross-entropy
        at["T"] = np.eye(3)[rng.integers(0, 3, len(at["T"]))]
    return at


@pytest.mark.parametrize("case", list(CASES))
def test_check_re_evaluates_forward_rows(case):
    f, wrt = CASES[case][0]()
    d = derive(f, wrt, at=_numbers(f, wrt))
    assert d.check() < 1e-9
    # a forward formula that disagrees with its value is caught: the printed L off by 2
    row = d.forward[-1]
    row.expr = 2 * row.expr
    with pytest.raises(SymbpError, match="derivation row"):
        d.check()
