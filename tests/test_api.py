"""The public API contract of DESIGN.md: grad, compile, compile_forward, gradcheck."""

import numpy as np
import pytest
import sympy as sp

import symbp as sb

N = sp.Symbol("N")
X, T = sp.MatrixSymbol("X", N, 3), sp.MatrixSymbol("T", N, 2)
W, b = sp.MatrixSymbol("W", 3, 2), sp.MatrixSymbol("b", 1, 2)
F = sb.mse(sb.sigmoid(sb.dense(X, W, b)), T)


def data(rng, n=4):
    return dict(X=rng.normal(size=(n, 3)), T=rng.uniform(size=(n, 2)),
                W=rng.normal(size=(3, 2)), b=rng.normal(size=(1, 2)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compile_returns_value_and_named_grads(dtype, rng):
    fn = sb.compile(F, [W, b], dtype=dtype)
    v, g = fn(**data(rng))
    assert isinstance(v, float) and set(g) == {"W", "b"}
    assert g["W"].shape == (3, 2) and g["b"].shape == (1, 2) and g["W"].dtype == dtype
    assert "def symbp_numpy" in fn.source and fn.target == "numpy"
    assert sorted(fn.input_names) == ["T", "W", "X", "b"]


def test_batch_size_is_bound_from_the_data(rng):
    fn = sb.compile(F, [W])
    for n in (1, 2, 7):
        v, g = fn(**data(rng, n))
        assert np.isfinite(v)


def test_float32_agrees_with_float64(rng):
    d = data(rng)
    v32, g32 = sb.compile(F, [W, b], dtype=np.float32)(**d)
    v64, g64 = sb.compile(F, [W, b])(**d)
    assert v32 == pytest.approx(v64, rel=1e-5)
    assert np.allclose(g32["W"], g64["W"], rtol=1e-4, atol=1e-6)


def test_grad_single_and_sequence():
    x, y = sp.symbols("x y", real=True)
    assert sb.grad(x * y, x) == y
    assert sb.grad(x * y, (x, y)) == (y, x)
    gW = sb.grad(F, W)
    assert gW.is_Matrix and tuple(gW.shape) == (3, 2)


def test_compile_forward_value(rng):
    d = data(rng)
    Z = sb.compile_forward(sb.dense(X, W, b))(X=d["X"], W=d["W"], b=d["b"])
    assert np.allclose(Z, d["X"] @ d["W"] + d["b"])


def test_gradcheck_reports_per_parameter_and_catches_a_wrong_gradient(rng, monkeypatch):
    r = sb.gradcheck(F, [W, b], data(rng))
    assert r.ok and set(r.errors) == {"W", "b"} and "W" in str(r)
    # a deliberately wrong derivative row must fail the check
    from symbp import functions

    monkeypatch.setattr(functions.sigmoid, "fdiff", lambda self, argindex=1: self)
    bad = sb.gradcheck(sb.mse(sb.sigmoid(sb.dense(X, W, b)), T), [W], data(rng))
    assert not bad.ok and "FAIL" in str(bad)
