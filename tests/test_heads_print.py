"""Every symbp head prints readably in SymPy's str, pprint and latex.

A map prints as its body over its operands (``tanh(X*W1 + b1)``), never as
``Elementwise(Lambda(_e0, ...), ...)``; the gradients of a real MLP stay short.
"""

from __future__ import annotations

import pytest
import sympy as sp

import symbp as sb
from symbp.matrix import AxisSum, LogSoftmax, Softmax, SoftmaxCrossEntropy, Total

N = sp.Symbol("N")
X, T = sp.MatrixSymbol("X", N, 4), sp.MatrixSymbol("T", N, 3)
W1, b1 = sp.MatrixSymbol("W1", 4, 5), sp.MatrixSymbol("b1", 1, 5)
W2, b2 = sp.MatrixSymbol("W2", 5, 3), sp.MatrixSymbol("b2", 1, 3)
H = sb.tanh(sb.dense(X, W1, b1))
Z = sb.dense(H, W2, b2)
LOSS = sb.cross_entropy(sb.softmax(Z), T)

NOISE = ("Lambda", "_e0", "Elementwise", "Dummy", "_g", "_y")
PRINTERS = {
    "str": str,
    "pretty": lambda e: sp.pretty(e, use_unicode=True),
    "ascii": lambda e: sp.pretty(e, use_unicode=False),
    "latex": sp.latex,
}

# (expression, names its str must show, a limit on each printing's length)
HEADS = [
    (H, ["tanh", "X", "W1", "b1"], 120),
    (sb.sigmoid(X * W1), ["sigmoid", "X", "W1"], 120),
    (2 * sb.tanh(X * W1) - 1, ["2", "tanh", "- 1"], 120),
    (sb.fill(sp.Symbol("c"), X), ["c"], 40),
    (Total(H), ["sum", "tanh"], 140),
    (AxisSum(H, 0), ["sum", "axis=0"], 160),
    (AxisSum(H, 1), ["sum", "axis=1"], 160),
    (Softmax(Z), ["softmax", "W2", "b2"], 200),
    (LogSoftmax(Z), ["log_softmax", "W2"], 200),
    (SoftmaxCrossEntropy(Z, T), ["softmax_cross_entropy", "T"], 220),
    (sb.mse(H, sp.MatrixSymbol("Y", N, 5)), ["sum", "tanh", "Y"], 160),
]


@pytest.mark.parametrize("printer", PRINTERS)
@pytest.mark.parametrize("e, names, limit", HEADS, ids=[str(k) for k in range(len(HEADS))])
def test_every_head_prints_readably(e, names, limit, printer):
    text = PRINTERS[printer](e)
    for noise in NOISE:
        assert noise not in text, text
    assert len(text) < limit * (3 if printer in ("pretty", "ascii") else 1.6), text
    if printer == "str":
        for n in names:
            assert n in text, (n, text)


@pytest.mark.parametrize("printer", PRINTERS)
@pytest.mark.parametrize("w", [W2, b2, W1, b1], ids=str)
def test_mlp_gradients_print_short(w, printer):
    g = sb.grad(LOSS, w)
    text = PRINTERS[printer](g)
    for noise in NOISE:
        assert noise not in text, text
    # W2: tanh(X*W1 + b1).T*(-T + softmax(...))/N, H^T (Y - T)/N with H and Y written out
    assert len(text) < {"str": 140, "latex": 400}.get(printer, 900), text
    if printer == "str":
        for n in ("softmax", "T", "N", "tanh"):
            assert n in text
        if w in (W1, b1):
            assert ".*" in text  # the Hadamard product reads as one, not as a product


def test_printed_map_keeps_its_parentheses():
    e = sb.elementwise(lambda z: 2 * z, X * W1 + sp.OneMatrix(N, 1) * b1)
    assert str(e).replace(" ", "") in ("2*(X*W1+1*b1)", "2*(1*b1+X*W1)")
    assert str(sp.MatMul(X.T, sb.elementwise(lambda a, b: a * b, X, X))) == "X.T*(X.*X)"
    assert sp.latex(2 * sb.exp(X)) == r"2 e^{X}"
