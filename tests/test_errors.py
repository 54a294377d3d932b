"""Hostile input: each case is a clear symbp error naming the culprit, never a deep
SymPy/NumPy traceback; plus the documented conversions and zero gradients."""

import numpy as np
import pytest
import sympy as sp

import symbp as sb
from symbp.errors import InputError, ShapeError, SymbpError, UnsupportedError

x, y = sp.symbols("x y", real=True)
N = sp.Symbol("N")
X, T = sp.MatrixSymbol("X", N, 3), sp.MatrixSymbol("T", N, 2)
W, W4 = sp.MatrixSymbol("W", 3, 2), sp.MatrixSymbol("W4", 4, 2)
WM = sp.MatrixSymbol("WM", sp.Symbol("M"), 2)
LOSS = sb.mse(X * W, T)
rng = np.random.default_rng(0)
OK = dict(X=rng.normal(size=(5, 3)), W=rng.normal(size=(3, 2)), T=rng.normal(size=(5, 2)))


def call(**change):
    arrays = {**OK, **change}
    return sb.compile(LOSS, W)(**{k: v for k, v in arrays.items() if v is not None})


# (case id, thunk, error class, words the message must contain)
CASES = [
    ("non-scalar loss", lambda: sb.grad(X * W, W), SymbpError, ["scalar", "N×2"]),
    ("non-scalar loss compile", lambda: sb.compile(sb.tanh(X), []), SymbpError, ["scalar"]),
    # SymPy checks X*W only for integer sizes; symbp checks symbolic ones too
    ("matmul mismatch", lambda: sb.grad(sb.mse(X * WM, T), WM), ShapeError,
     ["X", "WM", "3 ≠ M"]),
    ("dense mismatch", lambda: sb.dense(X, W4), ShapeError, ["X", "W4"]),
    ("loss pair mismatch", lambda: sb.mse(X, T), ShapeError, ["X", "T"]),
    ("sce mismatch", lambda: sb.softmax_cross_entropy(X, T), ShapeError, ["X", "T"]),
    ("wrong columns", lambda: call(X=np.ones((5, 4))), ShapeError, ["X", "4 columns", "3"]),
    ("batch disagrees", lambda: call(T=np.ones((6, 2))), ShapeError, ["N", "5", "6"]),
    ("1-D array", lambda: call(X=np.ones(3)), ShapeError, ["X", "2-D"]),
    ("missing array", lambda: call(T=None), InputError, ["missing T"]),
    ("extra array", lambda: call(Q=np.ones(2)), InputError, ["unexpected Q"]),
    ("undefined function", lambda: sb.grad(sp.Function("f")(x), x), UnsupportedError,
     ["f(x)", "undefined", "fdiff"]),
    ("undefined in compile", lambda: sb.compile(sp.Function("g")(x) * y, [y]),
     UnsupportedError, ["g(x)"]),
    ("wrt an expression", lambda: sb.grad(x**2, x**2), SymbpError, ["x**2", "Symbol"]),
    ("wrt a number", lambda: sb.grad(x**2, 3), SymbpError, ["3", "Symbol"]),
    ("wrt a string", lambda: sb.grad(x**2, "x"), SymbpError, ["'x'", "Symbol"]),
    ("wrt an entry", lambda: sb.grad(LOSS, W[0, 0]), SymbpError, ["W[0, 0]"]),
    ("wrt same name", lambda: sb.grad(x**2, sp.Symbol("x")), SymbpError, ["same name"]),
    ("string loss", lambda: sb.grad("x**2", x), SymbpError, ["str", "never parses"]),
    ("list loss", lambda: sb.grad([x], x), SymbpError, ["list"]),
    ("relational loss", lambda: sb.grad(x > 0, x), SymbpError, ["scalar expression"]),
    ("Derivative head", lambda: sb.grad(sp.Derivative(x**2, x), x), UnsupportedError,
     ["Derivative"]),
    ("complex array", lambda: call(X=OK["X"] + 1j), InputError, ["X", "complex128"]),
    ("object array", lambda: call(X=np.empty((5, 3), object)), InputError, ["X", "object"]),
    ("string array", lambda: call(X="abc"), InputError, ["X", "str"]),
    ("None", lambda: call(W=[[None, 1], [2, 3], [4, 5]]), InputError, ["W", "object"]),
    ("ragged list", lambda: call(W=[[1, 2], [3]]), InputError, ["W", "rectangular"]),
    ("empty batch", lambda: call(X=np.ones((0, 3)), T=np.ones((0, 2))), ShapeError,
     ["N", "empty"]),
    ("bad dtype", lambda: sb.compile(LOSS, W, dtype=np.int64), SymbpError, ["float32"]),
    ("nonsense dtype", lambda: sb.compile(LOSS, W, dtype="foo"), SymbpError, ["'foo'"]),
    ("scalar given array", lambda: sb.compile(x * y, x)(x=np.ones(3), y=1.0), ShapeError,
     ["x", "scalar"]),
    ("unknown target", lambda: sb.compile(LOSS, W, target="tpu"), SymbpError, ["tpu"]),
]


@pytest.mark.parametrize("thunk,cls,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_symbp_error(thunk, cls, words):
    with pytest.raises(cls) as info:
        thunk()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    # raised by symbp itself, not bubbled up from deep inside SymPy / NumPy
    assert info.value.__traceback__ is not None
    assert type(info.value).__module__ == "symbp.errors"


def test_plain_x_times_w_mismatch_is_sympy_own_error():
    # X*W with incompatible shapes raises inside SymPy's MatMul before symbp runs; the
    # message already names the sizes. sb.dense and unevaluated products get symbp's.
    with pytest.raises(sp.ShapeError, match="not aligned"):
        X * W4


# documented conversions: ints, bools, other float widths and nested lists become dtype
@pytest.mark.parametrize("conv", [lambda a: a.astype(np.int64), lambda a: a.astype(np.float32),
                                  lambda a: a.tolist(), lambda a: (a > 0)])
def test_numeric_arrays_are_converted(conv):
    Xi = np.round(OK["X"] * 3)
    want = call(X=conv(Xi))
    ref = call(X=np.asarray(conv(Xi), dtype=np.float64))
    assert want[0] == ref[0]
    assert np.array_equal(want[1]["W"], ref[1]["W"])


def test_scalar_inputs_of_any_numeric_kind():
    fn = sb.compile(x**2 * y, [x, y])
    for xv in (2, 2.0, np.float32(2), np.array(2.0), True):
        v, g = fn(x=xv, y=3)
        assert v == 3 * float(xv) ** 2 and g["x"] == 6 * float(xv)


def test_wrt_the_loss_does_not_read_gives_zeros_of_its_shape():
    V, z = sp.MatrixSymbol("V", 2, 5), sp.Symbol("z", real=True)
    assert sb.grad(x**2, y) == 0
    g = sb.grad(LOSS, [W, V, z])
    assert tuple(g[1].shape) == (2, 5) and g[2] == 0
    fn = sb.compile(LOSS, [W, V, z])
    _, grads = fn(**OK, V=np.ones((2, 5)), z=1.0)
    assert grads["V"].shape == (2, 5) and not grads["V"].any() and grads["z"] == 0


def test_integer_batch_size_one_is_fine():
    v, g = call(X=OK["X"][:1], T=OK["T"][:1])
    assert np.isfinite(v) and g["W"].shape == (3, 2)
