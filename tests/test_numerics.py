"""Numerical safety of the NumPy reference: inputs of ±1000, probabilities of exactly 0 and 1.

Every case compiles a scalar loss over a small matrix Z filled with extreme values and
checks that the loss and every gradient are finite, in float32 and float64."""

import warnings

import numpy as np
import pytest
import sympy as sp

import symbp as sb
from symbp import functions as F

N = sp.Symbol("N")
Z, T = sp.MatrixSymbol("Z", N, 3), sp.MatrixSymbol("T", N, 3)
EXTREME = np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, -1000.0],
                    [1000.0, 1000.0, 999.0], [0.5, -1000.0, 1000.0]])
ONE_HOT = np.eye(3)[[0, 2, 1, 1]]

LOSSES = {
    "softmax": lambda: F.mse(F.softmax(Z), T),
    "log_softmax": lambda: -sb.Total(sp.HadamardProduct(F.log_softmax(Z), T)) / N,
    "cross_entropy(softmax)": lambda: F.cross_entropy(F.softmax(Z), T),
    "softmax_cross_entropy": lambda: F.softmax_cross_entropy(Z, T),
    "bce_with_logits": lambda: F.bce_with_logits(Z, T),
    "bce(sigmoid)": lambda: F.binary_cross_entropy(F.sigmoid(Z), T),
    **{f"mse({name})": (lambda f=f: F.mse(f(Z), T))
       for name, f in [("softplus", F.softplus), ("sigmoid", F.sigmoid), ("tanh", F.tanh),
                       ("elu", F.elu), ("selu", F.selu), ("gelu", F.gelu),
                       ("gelu_tanh", F.gelu_tanh), ("silu", F.silu), ("relu", F.relu),
                       ("leaky_relu", F.leaky_relu)]},
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_at_plus_minus_1000(name, dtype):
    fn = sb.compile(LOSSES[name](), [Z, T], dtype=dtype)
    with warnings.catch_warnings():
        # a branch NumPy evaluates and then discards may overflow (np.select / where);
        # what matters is the value the loss returns
        warnings.simplefilter("ignore", RuntimeWarning)
        v, g = fn(Z=EXTREME, T=ONE_HOT)
    assert np.isfinite(v), name
    for k, arr in g.items():
        assert arr.dtype == dtype and np.all(np.isfinite(arr)), (name, k, arr)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_probabilities_exactly_0_and_1(dtype):
    P = sp.MatrixSymbol("P", N, 3)
    fn = sb.compile(F.binary_cross_entropy(P, T), [P, T], dtype=dtype)
    Pv = np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 1e-30]])
    Tv = np.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # log(0) = -inf, then clamped
        v, g = fn(P=Pv, T=Tv)
    assert np.isfinite(v) and all(np.all(np.isfinite(a)) for a in g.values())
    # PyTorch's value: per-entry logs clamped at -100, mean over 6 entries
    with np.errstate(divide="ignore"):
        want = -(Tv * np.maximum(np.log(Pv), -100)
                 + (1 - Tv) * np.maximum(np.log(1 - Pv), -100)).mean()
    assert v == pytest.approx(want, rel=1e-6)
    # the confident right answers (p = t = 0 or 1) contribute 0 loss and 0 gradient
    assert g["P"][0, 0] == 0 and g["P"][0, 1] == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_rows_sum_to_one_at_extremes(dtype):
    fw = sb.compile_forward(F.softmax(Z), dtype=dtype)
    Y = fw(Z=EXTREME)
    assert np.all(np.isfinite(Y)) and np.allclose(Y.sum(1), 1)
    ls = sb.compile_forward(F.log_softmax(Z), dtype=dtype)(Z=EXTREME)
    assert np.all(np.isfinite(ls)) and ls.max() <= 0
