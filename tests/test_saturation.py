"""Saturated inputs keep their gradient: binary cross-entropy of σ(z) at z = −20, and
softmax / softmax cross-entropy at logits of ±1000.

bce's derivative is (p − t)/max(p(1 − p), ε) with PyTorch's ε = 1e-12; composed with
σ'(z) = p(1 − p) it gives p − t, so a confidently wrong prediction (z = −20, target 1,
p ≈ 2e-9) still gets a slope of ≈ −1.  A larger ε (1e-6) would floor p(1 − p) and shrink
that slope to −0.002: learning stalls 500×, unlike PyTorch.
"""

import numpy as np
import pytest
import scipy.special
import sympy as sp
from conftest import N, have, need

import symbp as sb
from symbp import functions as F

z = sp.Symbol("z", real=True)
SATURATED = [(-20.0, 1.0), (-25.0, 1.0), (20.0, 0.0), (-3.0, 1.0), (0.5, 0.3)]


@pytest.mark.parametrize("z0,t", SATURATED)
def test_scalar_slope_is_sigma_minus_t(z0, t):
    want = scipy.special.expit(z0) - t  # the exact derivative, computed without symbp
    g = sb.grad(F.bce(F.sigmoid(z), t), z)
    assert float(g.subs(z, z0).evalf(30)) == pytest.approx(want, rel=1e-9)
    _, grads = sb.compile(F.bce(F.sigmoid(z), t), [z])(z=z0)
    assert grads["z"] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_matrix_bce_of_sigmoid_at_saturation(target):
    if target != "numpy":
        need(have("numba"), "numba")
    Z, T = sp.MatrixSymbol("Z", N, 1), sp.MatrixSymbol("T", N, 1)
    fn = sb.compile(sb.binary_cross_entropy(sb.sigmoid(Z), T), [Z], target=target)
    z0, t = np.array([[z for z, _ in SATURATED]]).T, np.array([[t for _, t in SATURATED]]).T
    _, g = fn(Z=z0, T=t)
    # mean over the N entries: each slope is (σ(z) − t)/N
    np.testing.assert_allclose(g["Z"], (scipy.special.expit(z0) - t) / len(z0), rtol=1e-9)


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_softmax_ce_at_large_logits(target):
    # exp(1000) overflows: softmax and its cross-entropy shift each row by its max first
    if target != "numpy":
        need(have("numba"), "numba")
    Z, T = sp.MatrixSymbol("Z", N, 3), sp.MatrixSymbol("T", N, 3)
    z0 = np.array([[1000.0, 0.0, -1000.0], [800.0, 810.0, 0.0], [-1000.0, -999.0, -1001.0]])
    t = np.eye(3)[[1, 1, 0]]
    value, g = sb.compile(sb.softmax_cross_entropy(Z, T), [Z], target=target)(Z=z0, T=t)
    want = np.mean(scipy.special.logsumexp(z0, axis=1) - np.sum(t * z0, axis=1))
    assert value == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(g["Z"], (scipy.special.softmax(z0, axis=1) - t) / 3,
                               rtol=1e-12, atol=1e-300)
    Y = sb.compile_forward(sb.softmax(Z), target=target)(Z=z0)
    np.testing.assert_allclose(Y, scipy.special.softmax(z0, axis=1), rtol=1e-12, atol=1e-300)
