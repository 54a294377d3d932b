"""Softmax + cross-entropy is exact for every target, not only rows that sum to 1.

``cross_entropy(softmax(Z), T)`` is rewritten to the stable head SoftmaxCrossEntropy; its
value, ∂/∂Z (and through Z = X W, ∂/∂W) and ∂/∂T are checked against the plain formula
−Σ T log softmax(Z)/N written here in NumPy float64, and against central differences of
it, for one-hot, soft, label-smoothed, masked (all-zero) and unnormalised target rows, on
every CPU target.  CUDA runs the same head on Numba's simulator through the case table of
tests/cuda_check.py (its soft-target case).
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp
from conftest import have, need

import symbp as sb
from symbp.matrix import SoftmaxCrossEntropy

N = sp.Symbol("N")
C = 4
X, W = sp.MatrixSymbol("X", N, 3), sp.MatrixSymbol("W", 3, C)
Z, T = sp.MatrixSymbol("Z", N, C), sp.MatrixSymbol("T", N, C)
TARGETS = ["numpy", "cpu", "parallel"]

# one row of each kind; each fails the old rewrite lse(Z) − Σ T·Z except the one-hot row
ROWS = {
    "one-hot": [0.0, 0.0, 1.0, 0.0],
    "soft": [0.1, 0.6, 0.2, 0.1],
    "label-smoothed": list(0.9 * np.eye(C)[1] + 0.1 / C),
    "masked": [0.0, 0.0, 0.0, 0.0],
    "unnormalised": [1.5, 0.0, 0.7, 2.0],
}


def plain(Zv, Tv):
    """−Σ T log softmax(Z)/N, straight from the definition (no log-sum-exp rewrite)."""
    P = np.exp(Zv) / np.exp(Zv).sum(axis=1, keepdims=True)
    return -np.sum(Tv * np.log(P)) / Zv.shape[0]


def central(f, A, eps=1e-6):
    """∂f/∂A by central differences in float64."""
    G = np.zeros_like(A)
    for idx in np.ndindex(A.shape):
        Ap, Am = A.copy(), A.copy()
        Ap[idx] += eps
        Am[idx] -= eps
        G[idx] = (f(Ap) - f(Am)) / (2 * eps)
    return G


def data(kinds, seed=0):
    rng = np.random.default_rng(seed)
    Tv = np.array([ROWS[k] for k in kinds])
    return rng.normal(size=(len(kinds), 3)), rng.normal(size=(3, C)), Tv


_fns: dict = {}


def compiled(target, which):
    """One compiled function per (target, form): the head itself, and the user's spelling."""
    key = (target, which)
    if key not in _fns:
        if which == "head":
            f, wrt = sb.softmax_cross_entropy(Z, T), [Z, T]
        else:
            f, wrt = sb.cross_entropy(sb.softmax(X * W), T), [W, T]
        _fns[key] = sb.compile(f, wrt, target=target, dtype=np.float64)
    return _fns[key]


def test_the_users_spelling_becomes_the_head():
    f = sb.cross_entropy(sb.softmax(X * W), T)
    assert isinstance(f, SoftmaxCrossEntropy)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", [k for k in ROWS if k != "one-hot"])
def test_value_and_gradients_match_the_plain_formula(target, kind):
    kinds = ["one-hot", kind, kind, "soft"]  # the row kind among others, twice
    Xv, Wv, Tv = data(kinds)
    Zv = Xv @ Wv
    n = len(kinds)
    P = np.exp(Zv) / np.exp(Zv).sum(axis=1, keepdims=True)

    # the head on logits: value, ∂/∂Z and ∂/∂T
    v, g = compiled(target, "head")(Z=Zv, T=Tv)
    assert v == pytest.approx(plain(Zv, Tv), rel=1e-12, abs=1e-14)
    dZ = central(lambda A: plain(A, Tv), Zv)
    assert np.allclose(g["Z"], dZ, rtol=1e-7, atol=1e-9)
    # the closed forms: (softmax(Z) ⊙ T𝟏 − T)/N and −log softmax(Z)/N
    assert np.allclose(g["Z"], (P * Tv.sum(1, keepdims=True) - Tv) / n, rtol=1e-12, atol=1e-15)
    assert np.allclose(g["T"], -np.log(P) / n, rtol=1e-12, atol=1e-15)
    assert np.allclose(g["T"], central(lambda A: plain(Zv, A), Tv), rtol=1e-7, atol=1e-9)

    # the user's cross_entropy(softmax(X W), T): ∂/∂W through the rewrite
    v, g = compiled(target, "user")(X=Xv, W=Wv, T=Tv)
    assert v == pytest.approx(plain(Zv, Tv), rel=1e-12, abs=1e-14)
    dW = central(lambda A: plain(Xv @ A, Tv), Wv)
    assert np.allclose(g["W"], dW, rtol=1e-7, atol=1e-9)
    assert np.allclose(g["T"], -np.log(P) / n, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("target", TARGETS)
def test_masked_rows_add_nothing(target):
    # an all-zero row is a sample left out: the loss is the others' sum over N, and its
    # logits get no gradient at all
    Xv, Wv, Tv = data(["one-hot", "masked", "soft"], seed=3)
    Zv = Xv @ Wv
    v, g = compiled(target, "head")(Z=Zv, T=Tv)
    keep = [0, 2]
    assert v == pytest.approx(plain(Zv[keep], Tv[keep]) * 2 / 3, rel=1e-12)
    assert np.all(g["Z"][1] == 0)


@pytest.mark.parametrize("target", TARGETS)
def test_large_logits_stay_finite_and_exact(target):
    # logits near ±1000: exp overflows in the plain formula, so compare with the
    # log-sum-exp form evaluated here in float64 by row
    Zv = np.array([[1000.0, 999.0, -1000.0, 0.0], [-1000.0, -1001.0, -999.5, -1000.0]])
    Tv = np.array([ROWS["unnormalised"], ROWS["label-smoothed"]])
    m = Zv.max(axis=1, keepdims=True)
    ls = Zv - m - np.log(np.exp(Zv - m).sum(axis=1, keepdims=True))
    v, g = compiled(target, "head")(Z=Zv, T=Tv)
    assert v == pytest.approx(-np.sum(Tv * ls) / 2, rel=1e-12)
    P = np.exp(ls)
    assert np.allclose(g["Z"], (P * Tv.sum(1, keepdims=True) - Tv) / 2, rtol=1e-12, atol=1e-15)
    assert np.allclose(g["T"], -ls / 2, rtol=1e-12)


def test_matches_pytorch_with_probability_targets():
    need(have("torch"), "pytorch", "no comparison with torch.nn.functional.cross_entropy")
    import torch
    Xv, Wv, Tv = data(["one-hot", "soft", "label-smoothed", "masked", "unnormalised"])
    Zv = Xv @ Wv
    v, g = compiled("numpy", "head")(Z=Zv, T=Tv)
    Zt = torch.tensor(Zv, dtype=torch.float64, requires_grad=True)
    Tt = torch.tensor(Tv, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(Zt, Tt)  # probability targets, mean over N
    loss.backward()
    assert v == pytest.approx(loss.item(), rel=1e-12)
    assert np.allclose(g["Z"], Zt.grad.numpy(), rtol=1e-12, atol=1e-15)
    assert np.allclose(g["T"], Tt.grad.numpy(), rtol=1e-12, atol=1e-15)
