"""A matrix value read twice: its adjoint is the sum of both users' contributions.

v̄ = Σ_j v̄_j ∂v_j/∂v over every user j.  Keeping one contribution (the last one sent)
leaves gradients 20-130 % off, silently, in three everyday networks: tied weights (an
autoencoder X·W·Wᵀ), a residual connection (H + f(H)) and a pre-activation feeding two
maps.  Each network is also written by hand in NumPy; its float64 central differences
are the reference, independent of symbp's reverse pass and of its backends.
"""

import numpy as np
import pytest
import sympy as sp
from conftest import N, have, need

import symbp as sb


def sig(z):
    return 1 / (1 + np.exp(-z))


X = sp.MatrixSymbol("X", N, 4)
T = sp.MatrixSymbol("T", N, 3)
W = sp.MatrixSymbol("W", 4, 3)
W2 = sp.MatrixSymbol("W2", 3, 3)
V = sp.MatrixSymbol("V", 3, 3)
b = sp.MatrixSymbol("b", 1, 3)
c = sp.MatrixSymbol("c", 1, 4)


def tied():
    # encoder H = σ(XW + b), decoder H Wᵀ + c: W is read by both products
    H = sb.sigmoid(sb.dense(X, W, b))
    f = sb.mse(H * W.T + sp.OneMatrix(N, 1) * c, X)

    def ref(a):
        H = sig(a["X"] @ a["W"] + a["b"])
        return np.mean((H @ a["W"].T + a["c"] - a["X"]) ** 2)

    return f, [W, b, c], ref


def residual():
    # R = H + tanh(H W2): H reaches the loss directly and through the block
    H = sb.tanh(sb.dense(X, W, b))
    R = H + sb.tanh(H * W2)
    f = sb.mse(R * V, T)

    def ref(a):
        H = np.tanh(a["X"] @ a["W"] + a["b"])
        R = H + np.tanh(H @ a["W2"])
        return np.mean((R @ a["V"] - a["T"]) ** 2)

    return f, [W, b, W2, V], ref


def two_maps():
    # Z feeds σ(Z) and tanh(Z), which are combined by two products
    Z = sb.dense(X, W, b)
    f = sb.mse(sb.sigmoid(Z) * V + sb.tanh(Z) * W2, T)

    def ref(a):
        Z = a["X"] @ a["W"] + a["b"]
        return np.mean((sig(Z) @ a["V"] + np.tanh(Z) @ a["W2"] - a["T"]) ** 2)

    return f, [W, b, V, W2], ref


CASES = {"tied_weights": tied, "residual": residual, "two_maps": two_maps}


def arrays(seed=7, n=5):
    rng = np.random.default_rng(seed)
    shapes = {"X": (n, 4), "T": (n, 3), "W": (4, 3), "W2": (3, 3), "V": (3, 3), "b": (1, 3),
              "c": (1, 4)}
    return {k: rng.normal(scale=0.7, size=s) for k, s in shapes.items()}


def central(ref, a, name, h=1e-6):
    g = np.zeros_like(a[name])
    for i in np.ndindex(g.shape):
        up, dn = ({**a, name: a[name].copy()} for _ in range(2))
        up[name][i] += h
        dn[name][i] -= h
        g[i] = (ref(up) - ref(dn)) / (2 * h)
    return g


@pytest.mark.parametrize("target", ["numpy", "cpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_value_read_twice_gets_the_sum_of_its_adjoints(case, target):
    if target != "numpy":
        need(have("numba"), "numba")
    f, params, ref = CASES[case]()
    a = arrays()
    fn = sb.compile(f, params, target=target)
    value, grads = fn(**{k: v for k, v in a.items() if k in {s.name for s in fn.program.inputs}})
    assert value == pytest.approx(ref(a), rel=1e-12)
    for p in params:
        np.testing.assert_allclose(grads[p.name], central(ref, a, p.name), rtol=1e-6,
                                   atol=1e-8, err_msg=f"{case}: ∂L/∂{p.name} on {target}")
