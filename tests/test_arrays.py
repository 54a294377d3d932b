"""Arrays of any rank: a batch of images N×C×H×W flows through maps, sums and reshapes.

Every program in the table is checked on every CPU target against a plain NumPy formula
written here (float64, independent of symbp's printers), and its gradients against
central differences; the binding of symbolic sizes on any axis and the errors of rank
mistakes are checked too.
"""

import numpy as np
import pytest
import sympy as sp
from sympy.tensor.array.expressions import ArraySymbol

import symbp as sb
from symbp.errors import ShapeError, UnsupportedError
from symbp.matrix import AxisSum, Total

N, H = sp.symbols("N H", integer=True, positive=True)
X = sb.tensor("X", N, 2, 3, 4)
B = sb.tensor("B", 1, 2, 1, 1)  # one bias per channel
S = sb.tensor("S", 1, 2, 3, 4)  # one scale per position, shared over the batch
W = sp.MatrixSymbol("W", 24, 3)
T = sp.MatrixSymbol("T", N, 3)


def _softmax_ce(Z, t):
    z = Z - Z.max(axis=1, keepdims=True)
    return -np.sum(t * (z - np.log(np.exp(z).sum(axis=1, keepdims=True)))) / len(Z)


# (name, loss expression, wrt, NumPy reference of the loss from the arrays)
CASES = [
    ("bias per channel, tanh, total", sb.mse(sb.flatten(sb.tanh(X + B)) * W, T), [X, B, W],
     lambda d: np.mean((np.tanh(d["X"] + d["B"]).reshape(len(d["X"]), -1) @ d["W"]
                        - d["T"]) ** 2)),
    ("relu, scale, softmax-CE", sb.softmax_cross_entropy(sb.flatten(sb.relu(X * S + B)) * W, T),
     [X, S, B, W],
     lambda d: _softmax_ce(np.maximum(d["X"] * d["S"] + d["B"], 0).reshape(len(d["X"]), -1)
                           @ d["W"], d["T"])),
    ("sum over each axis", Total(AxisSum(sb.tanh(X), 0)) + 2 * Total(AxisSum(X * X, 1))
     + Total(AxisSum(AxisSum(sb.sigmoid(X), 2), 3)), [X],
     lambda d: (np.tanh(d["X"]).sum() + 2 * (d["X"] ** 2).sum()
                + (1 / (1 + np.exp(-d["X"]))).sum())),
    ("reshape both ways", Total(sb.reshape(sb.tanh(sb.reshape(X, N, 24)), N, 4, 6) * 3), [X],
     lambda d: 3 * np.tanh(d["X"]).sum()),
]


def _data(seed=0, n=5):
    rng = np.random.default_rng(seed)
    return {"X": rng.normal(size=(n, 2, 3, 4)), "B": rng.normal(size=(1, 2, 1, 1)),
            "S": rng.normal(size=(1, 2, 3, 4)), "W": rng.normal(size=(24, 3)) / 4,
            "T": np.eye(3)[rng.integers(0, 3, n)]}


def _inputs(L, d):
    names = {s.name for s in L.atoms(sp.MatrixSymbol)}
    return {k: v for k, v in d.items() if k in names}


@pytest.mark.parametrize("target", ["numpy", "cpu", "parallel"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_value_and_gradients_of_arrays(case, target):
    _, L, wrt, ref = case
    d = _inputs(L, _data())
    fn = sb.compile(L, wrt, target=target)
    value, grads = fn(**d)
    assert value == pytest.approx(ref(d), rel=1e-12)
    for w in wrt:
        assert grads[w.name].shape == d[w.name].shape
    check = sb.gradcheck(L, wrt, d, target=target, tol=1e-6)
    assert check.ok, str(check)


def test_float32_agrees_with_float64():
    _, L, wrt, _ = CASES[1]
    d = _inputs(L, _data(1))
    v64, g64 = sb.compile(L, wrt, target="cpu")(**d)
    v32, g32 = sb.compile(L, wrt, target="cpu", dtype=np.float32)(**d)
    assert v32 == pytest.approx(v64, rel=1e-5)
    for w in wrt:
        np.testing.assert_allclose(g32[w.name], g64[w.name], rtol=1e-4, atol=1e-5)


def test_symbolic_sizes_bind_on_any_axis():
    Xh = sb.tensor("X", N, 1, H, H)
    L = Total(sb.tanh(Xh) * sb.tensor("M", 1, 1, H, H))
    fn = sb.compile(L, [Xh], target="cpu")
    rng = np.random.default_rng(2)
    for n, h in [(3, 5), (2, 7)]:
        x, m = rng.normal(size=(n, 1, h, h)), rng.normal(size=(1, 1, h, h))
        value, grads = fn(X=x, M=m)
        assert value == pytest.approx(np.sum(np.tanh(x) * m), rel=1e-12)
        np.testing.assert_allclose(grads["X"], (1 - np.tanh(x) ** 2) * m, rtol=1e-12)
    with pytest.raises(ShapeError, match="M says H = 5 but an earlier input bound H = 4|H"):
        fn(X=np.zeros((2, 1, 4, 4)), M=np.zeros((1, 1, 5, 5)))
    with pytest.raises(ShapeError, match="X must be a 4-D array"):
        fn(X=np.zeros((2, 16)), M=np.zeros((1, 1, 4, 4)))


def test_an_array_symbol_is_a_tensor_of_its_name():
    A = ArraySymbol("A", (N, 2, 3, 4))
    L = sb.mse(sb.flatten(sb.tanh(A)) * W, T)
    d = _data()
    fn = sb.compile(L, [W], target="numpy")
    value, _ = fn(A=d["X"], W=d["W"], T=d["T"])
    ref = np.mean((np.tanh(d["X"]).reshape(5, -1) @ d["W"] - d["T"]) ** 2)
    assert value == pytest.approx(ref, rel=1e-12)


def test_rank_mistakes_name_the_culprit():
    with pytest.raises(ShapeError, match="different ranks.*flatten"):
        X + W
    with pytest.raises(ShapeError, match="different ranks"):
        X * W  # entrywise between arrays: there is no matrix product of images
    V = sp.MatrixSymbol("V", 2, 3)  # SymPy's MatMul checks only the first two axes
    with pytest.raises(ShapeError, match="X is a N×2×3×4 array, not a matrix: flatten it"):
        sb.compile(Total(sp.MatMul(X, V)), [V])
    with pytest.raises(ShapeError, match="cannot reshape X of shape N×2×3×4"):
        sb.reshape(X, N, 25)


def test_cuda_refuses_arrays_before_compiling():
    from symbp.backends import numba_cuda

    with pytest.raises(UnsupportedError, match="cannot lower Reshape.*'numpy' or 'cpu'"):
        numba_cuda.generate(sb.gradient_program(CASES[0][1], CASES[0][2]))
    with pytest.raises(UnsupportedError, match="4-D array: compile this program for 'cpu'"):
        numba_cuda.generate(sb.gradient_program(CASES[2][1], CASES[2][2]))


def test_printing_reads_the_reshape():
    _, L, wrt, _ = CASES[0]
    assert "flatten" in str(L)
    assert r"\operatorname{flatten}" in sp.latex(L)
    d = sb.derive(L, wrt)
    assert "flatten" in d.text()
