"""Scalars beside matrices and constant matrices, on every CPU target.

SymPy refuses ``Z + 1`` ("Mix of Matrix and Scalar symbols"); symbp's idioms are
``sb.fill(c, Z)``, ``sb.elementwise(f, Z, c)``, ``sb.dense(X, W, b)`` with a scalar ``b``,
and scalar arithmetic on symbp's own matrix expressions (``1 + sb.exp(Z)``).  Constant
matrices (Identity, a Matrix of numbers, ZeroMatrix, OneMatrix) lower to inputs the
compiled function binds itself.  Each case: value and gradients on every target against
the NumPy reference, the reference against float64 central differences, and the value
against a hand-written NumPy formula.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

import symbp as sb
from symbp.errors import ShapeError, UnsupportedError
from symbp.matrix import Elementwise, Total

N = sp.Symbol("N")
X = sp.MatrixSymbol("X", N, 3)
w = sp.MatrixSymbol("w", 3, 1)
W = sp.MatrixSymbol("W", 3, 2)
Y = sp.MatrixSymbol("Y", N, 2)
b = sp.Symbol("b", real=True)
c = sp.Symbol("c", real=True)

RNG = np.random.default_rng(3)
DATA = {"X": RNG.normal(size=(4, 3)), "w": RNG.normal(size=(3, 1)),
        "W": RNG.normal(size=(3, 2)) / 2, "Y": RNG.normal(size=(4, 2)), "b": 0.3, "c": -0.7}
I3 = np.eye(3)
M = np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.25]])


def _np_mse(A, B):
    return float(np.mean((A - B) ** 2))


# (name, loss, wrt, NumPy value from DATA)
CASES = [
    ("scalar bias X*w + b", lambda: sb.mse(sb.dense(X, w, b), sp.MatrixSymbol("y", N, 1)),
     [w, b],
     lambda d: _np_mse(d["X"] @ d["w"] + d["b"], d["y"])),
    ("X*w + fill(b, ...)", lambda: sb.mse(X * w + sb.fill(b, (N, 1)), sp.MatrixSymbol("y", N, 1)),
     [w, b], lambda d: _np_mse(d["X"] @ d["w"] + d["b"], d["y"])),
    ("1 + exp(Z)", lambda: Total(sb.log(1 + sb.exp(X * W))) / N, [W],
     lambda d: float(np.sum(np.log1p(np.exp(d["X"] @ d["W"]))) / 4)),
    ("2*tanh(Z) - 1", lambda: sb.mse(2 * sb.tanh(X * W) - 1, Y), [W],
     lambda d: _np_mse(2 * np.tanh(d["X"] @ d["W"]) - 1, d["Y"])),
    ("c - sigmoid(Z)/c", lambda: sb.mse(c - sb.sigmoid(X * W) / c, Y), [W, c],
     lambda d: _np_mse(d["c"] - 1 / (1 + np.exp(-d["X"] @ d["W"])) / d["c"], d["Y"])),
    ("elementwise(z*b + c)", lambda: sb.mse(sb.elementwise(lambda z, s: z * s + c, X * W, b), Y),
     [W, b, c], lambda d: _np_mse(d["X"] @ d["W"] * d["b"] + d["c"], d["Y"])),
    ("-softmax(Z) + b", lambda: sb.mse(-sb.softmax(X * W) + b, Y), [W, b],
     lambda d: _np_mse(-_softmax(d["X"] @ d["W"]) + d["b"], d["Y"])),
    # constant matrices
    ("||W W^T - I||^2", lambda: sb.mse(W * W.T, sp.Identity(3)), [W],
     lambda d: _np_mse(d["W"] @ d["W"].T, I3)),
    ("Total((W^T W - I).^2)", lambda: Total(sp.HadamardPower(W.T * W - sp.Identity(2), 2)),
     [W], lambda d: float(np.sum((d["W"].T @ d["W"] - np.eye(2)) ** 2))),
    ("X*(W + M)", lambda: sb.mse(X * (W + sp.ImmutableMatrix(M)), Y), [W],
     lambda d: _np_mse(d["X"] @ (d["W"] + M), d["Y"])),
    ("W - Matrix", lambda: Total(sp.HadamardProduct(W - sp.Matrix(M), W)), [W],
     lambda d: float(np.sum((d["W"] - M) * d["W"]))),
    ("X*I + ones", lambda: sb.mse(X * sp.Identity(3) * W + sp.OneMatrix(N, 2), Y), [W],
     lambda d: _np_mse(d["X"] @ d["W"] + 1, d["Y"])),
    ("Identity(N)", lambda: Total(sp.HadamardProduct(X * X.T, sp.Identity(N))) * b, [b],
     lambda d: float(np.trace(d["X"] @ d["X"].T) * d["b"])),
    ("zero target", lambda: sb.mse(X * W, sp.ZeroMatrix(N, 2)), [W],
     lambda d: _np_mse(d["X"] @ d["W"], 0)),
]


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


DATA["y"] = RNG.normal(size=(4, 1))


def _data(loss):
    names = {s.name for s in loss.atoms(sp.Symbol, sp.MatrixSymbol)}
    return {k: v for k, v in DATA.items() if k in names}


def _numeric_grads(fn, arrays, wrt, eps=1e-6):
    out = {}
    for v in wrt:
        x = np.array(arrays[v.name], dtype=float)
        g = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            vals = []
            for s in (1, -1):
                y = x.copy()
                y[i] += s * eps
                vals.append(fn(**{**arrays, v.name: y})[0])
            g[i] = (vals[0] - vals[1]) / (2 * eps)
        out[v.name] = g
    return out


@pytest.mark.parametrize("name, make, wrt, value", CASES, ids=[c[0] for c in CASES])
def test_reference_matches_numpy_and_central_differences(name, make, wrt, value):
    loss = make()
    arrays = _data(loss)
    fn = sb.compile(loss, wrt)
    v, grads = fn(**arrays)
    assert v == pytest.approx(value(arrays), rel=1e-12)
    num = _numeric_grads(fn, arrays, wrt)
    for x in wrt:
        np.testing.assert_allclose(grads[x.name], num[x.name], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("target", ["cpu", "parallel"])
def test_compiled_targets_match_the_reference(target):
    pytest.importorskip("numba")
    # every case in one loss: one compile per target (Numba compiles are seconds each)
    losses = [make() for _, make, _, _ in CASES]
    wrt = list(dict.fromkeys(x for _, _, ws, _ in CASES for x in ws))
    loss = sp.Add(*[(k + 1) * f for k, f in enumerate(losses)])
    arrays = _data(loss)
    ref_v, ref_g = sb.compile(loss, wrt)(**arrays)
    v, g = sb.compile(loss, wrt, target=target)(**arrays)
    assert v == pytest.approx(ref_v, rel=1e-12)
    for x in wrt:
        np.testing.assert_allclose(g[x.name], ref_g[x.name], rtol=1e-10, atol=1e-12)


def test_scalar_bias_gradient_is_the_total_of_its_adjoint():
    # d/db mean((Xw + b - y)^2) = 2 mean(Xw + b - y): the broadcast adjoint, summed
    y = sp.MatrixSymbol("y", N, 1)
    arrays = {k: DATA[k] for k in ("X", "w", "b")} | {"y": RNG.normal(size=(4, 1))}
    _, g = sb.compile(sb.mse(sb.dense(X, w, b), y), [w, b])(**arrays)
    r = arrays["X"] @ arrays["w"] + arrays["b"] - arrays["y"]
    assert g["b"] == pytest.approx(2 * r.mean(), rel=1e-12)


def test_constant_gradient_reads_as_the_constant():
    g = sb.grad(sb.mse(W * W.T, sp.Identity(3)), W)
    assert g.has(sp.Identity(3)) and "I" in str(g)


def test_forward_with_a_constant_matrix():
    f = sb.compile_forward(X * sp.ImmutableMatrix(M) + sb.fill(b, (N, 2)))
    np.testing.assert_allclose(f(X=DATA["X"], b=DATA["b"]), DATA["X"] @ M + DATA["b"])


def test_the_constant_is_not_an_argument():
    fn = sb.compile(sb.mse(W * W.T, sp.Identity(3)), W)
    assert fn.input_names == ["W"]
    with pytest.raises(sb.InputError, match="unexpected I"):
        fn(W=DATA["W"], I=np.eye(3))


def test_scalar_arithmetic_composes_one_map():
    e = 2 * sb.tanh(X * W) - 1
    assert isinstance(e, Elementwise) and len(e.operands) == 1
    assert str(e) == "2*tanh(X*W) - 1"


def test_sympy_scalar_plus_matrix_symbol_still_refused_and_fill_is_the_idiom():
    with pytest.raises(TypeError, match="Mix of Matrix and Scalar"):
        X * w + b
    assert str(X * w + sb.fill(b, X * w)) in ("X*w + b", "b + X*w")


@pytest.mark.parametrize("bad", [lambda: sb.fill(X, X), lambda: sb.dense(X, W, "b"),
                                 lambda: sb.fill(1, (N,))])
def test_fill_refuses_non_scalars_by_name(bad):
    with pytest.raises(ShapeError):
        bad()


def test_matrix_of_symbols_is_refused_with_the_fix():
    with pytest.raises(UnsupportedError, match="entries must be numbers"):
        sb.compile(Total(W + sp.ImmutableMatrix(3, 2, [b] * 6)), W)


_CUDA_SIM = """
import numpy as np, sympy as sp, symbp as sb
from symbp.matrix import Total
N = sp.Symbol("N")
X, W, Y = sp.MatrixSymbol("X", N, 3), sp.MatrixSymbol("W", 3, 2), sp.MatrixSymbol("Y", N, 2)
b = sp.Symbol("b", real=True)
loss = (sb.mse(2 * sb.tanh(sb.dense(X, W, b)) - 1, Y) + sb.mse(W.T * W, sp.Identity(2))
        + Total(sp.HadamardProduct(W, sp.ImmutableMatrix([[1, 2], [3, 4], [5, 6]]))))
rng = np.random.default_rng(0)
a = dict(X=rng.normal(size=(5, 3)), W=rng.normal(size=(3, 2)), Y=rng.normal(size=(5, 2)), b=0.2)
v0, g0 = sb.compile(loss, [W, b])(**a)
v1, g1 = sb.compile(loss, [W, b], target="cuda", dtype=np.float64)(**a)
assert abs(v0 - v1) < 1e-9 * max(1, abs(v0)), (v0, v1)
for k in g0:
    assert np.allclose(g0[k], g1[k], rtol=1e-9, atol=1e-12), k
print("ok")
"""


def test_cuda_simulator_binds_constants_and_scalar_biases():
    """The CUDA backend needs no rule of its own: a constant is one more input array."""
    pytest.importorskip("numba")
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    r = subprocess.run([sys.executable, "-c", _CUDA_SIM], env=env, capture_output=True,
                       text=True, timeout=600)
    if "cuda" in r.stderr and "not available" in r.stderr:
        pytest.skip("no Numba CUDA support here")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.parametrize("target", ["cpu"])
def test_training_step_with_constants_matches_the_reference(target):
    pytest.importorskip("numba")
    y = sp.MatrixSymbol("y", N, 1)
    gram = sp.HadamardProduct(X * X.T, sp.Identity(N))
    loss = (sb.mse(2 * sb.sigmoid(sb.dense(X, w, b)) - 1, y)
            + sb.mse(W.T * W, sp.Identity(2)) / 10 + Total(gram) * c)
    data = {"X": DATA["X"], "y": DATA["y"], "c": 0.01}
    init = {"w": DATA["w"], "b": np.array(0.1), "W": DATA["W"]}
    losses = {}
    for t in ("numpy", target):
        params = {k: v.copy() for k, v in init.items()}
        step = sb.compile_step(loss, [w, b, W], sb.SGD(0.1), target=t)
        losses[t] = [step(params, **data) for _ in range(3)]
        with pytest.raises(sb.InputError, match="unexpected I"):  # never taken from the user
            step(params, **data, I=np.eye(2))
    np.testing.assert_allclose(losses[target], losses["numpy"], rtol=1e-12)
