"""Hostile input: each case is a clear symbp error naming the culprit, never a deep
SymPy/NumPy traceback; plus the documented conversions and zero gradients."""

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from conftest import have, need

import symbp as sb
from symbp.errors import InputError, ShapeError, SymbpError, UnsupportedError

SYMBP_DIR = Path(sb.__file__).resolve().parent
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
    # raised by symbp itself, not bubbled up from deep inside SymPy / NumPy: the innermost
    # frame (the raise) is in symbp's own source
    raised_in = Path(info.traceback[-1].path).resolve()
    assert raised_in.is_relative_to(SYMBP_DIR), f"raised in {raised_in}, not in symbp"
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


# --- the same hostile inputs on every compiled target, and the fused steps ------------------
# Numba kernels are typed C-contiguous arrays of one dtype: everything else must be
# converted or named before Numba runs (a raw Numba TypeError lists 60 argument types).

TARGETS = ["numpy", "cpu", "parallel"]


@cache
def compiled(target, dtype=np.float64):
    if target != "numpy":
        need(have("numba"), "numba")
    return sb.compile(LOSS, W, target=target, dtype=dtype)


def call_on(target, dtype=np.float64, **change):
    arrays = {**OK, **change}
    return compiled(target, dtype)(**{k: v for k, v in arrays.items() if v is not None})


# (case id, changed arrays, error class, words): each also one of CASES above, on numpy
INPUTS = [
    ("wrong columns", dict(X=np.ones((5, 4))), ShapeError, ["X", "4 columns", "3"]),
    ("batch disagrees", dict(T=np.ones((6, 2))), ShapeError, ["N", "5", "6"]),
    ("1-D array", dict(X=np.ones(3)), ShapeError, ["X", "2-D"]),
    ("3-D array", dict(X=np.ones((5, 3, 1))), ShapeError, ["X", "2-D"]),
    ("missing array", dict(T=None), InputError, ["missing T"]),
    ("extra array", dict(Q=np.ones(2)), InputError, ["unexpected Q"]),
    ("complex array", dict(X=OK["X"] + 1j), InputError, ["X", "complex128"]),
    ("object array", dict(X=np.empty((5, 3), object)), InputError, ["X", "object"]),
    ("string", dict(X="abc"), InputError, ["X", "str"]),
    ("dict", dict(X={"a": 1}), InputError, ["X", "dict"]),
    ("None entries", dict(W=[[None, 1], [2, 3], [4, 5]]), InputError, ["W", "object"]),
    ("ragged list", dict(W=[[1, 2], [3]]), InputError, ["W", "rectangular"]),
    ("empty batch", dict(X=np.ones((0, 3)), T=np.ones((0, 2))), ShapeError, ["N", "empty"]),
    ("datetime array", dict(X=np.zeros((5, 3), "datetime64[s]")), InputError, ["X"]),
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("change,cls,words", [c[1:] for c in INPUTS], ids=[c[0] for c in INPUTS])
def test_bad_input_on_every_target(target, change, cls, words):
    with pytest.raises(cls) as info:
        call_on(target, **change)
    msg = str(info.value)
    assert all(w in msg for w in words), msg
    assert type(info.value).__module__ == "symbp.errors"


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


# documented conversions: any numeric dtype, any layout, views, read-only, lists
CONVERSIONS = {
    "int64": lambda a: np.round(a * 3).astype(np.int64),
    "bool": lambda a: a > 0,
    "float32": lambda a: a.astype(np.float32),
    "float16": lambda a: a.astype(np.float16),
    "list": lambda a: a.tolist(),
    "Fortran order": np.asfortranarray,
    "every other row": lambda a: np.repeat(a, 2, axis=0)[::2],
    "every other column": lambda a: np.repeat(a, 2, axis=1)[:, ::2],
    "transposed view": lambda a: np.ascontiguousarray(a.T).T,
    "broadcast (0 strides)": lambda a: np.broadcast_to(a[:1], a.shape),
    "read-only": _readonly,
    "big-endian": lambda a: a.astype(">f8"),
    "misaligned": lambda a: _misaligned(a),
}


def _misaligned(a):
    """``a`` as float64 entries one byte off their alignment (a view into a byte buffer)."""
    raw = np.zeros(a.size * 8 + 1, np.uint8)
    x = raw[1:].view(np.float64).reshape(a.shape)
    x[...] = a
    assert not x.flags.aligned
    return x


@pytest.mark.parametrize("target,dtype", [("numpy", np.float64), ("cpu", np.float64),
                                          ("cpu", np.float32), ("parallel", np.float64)])
@pytest.mark.parametrize("conv", list(CONVERSIONS))
def test_conversions_on_every_target(conv, target, dtype):
    f = CONVERSIONS[conv]
    arrays = {"X": f(OK["X"]), "W": f(OK["W"])}
    v, g = call_on(target, dtype, **arrays)
    # the reference: the same numbers, converted by hand, on NumPy in float64
    plain = {k: np.array(np.asarray(a), dtype=np.float64) for k, a in arrays.items()}
    rv, rg = compiled("numpy")(**{**OK, **plain})
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert g["W"].dtype == dtype and g["W"].flags.c_contiguous
    assert v == pytest.approx(rv, rel=tol)
    np.testing.assert_allclose(g["W"], rg["W"], rtol=tol, atol=tol)


# --- fused steps (sb.compile_step on cpu/parallel): data and parameters ---------------------

@cache
def step_of(target):
    need(have("numba"), "numba")
    return sb.compile_step(LOSS, [W], sb.optim.SGD(0.1), target=target)


def fresh_step(target, warm):
    """The compiled step with fresh optimizer state; `warm` calls it once with good data
    first, so the next call takes the fast path (shapes seen, arrays passed as they come)."""
    step = step_of(target)
    step.state = None
    if warm:
        step({"W": OK["W"].copy()}, X=OK["X"], T=OK["T"])
        step.state = None
    return step


STEP_TARGETS = ["cpu", "parallel"]


@pytest.mark.parametrize("warm", [False, True], ids=["first call", "after a good call"])
@pytest.mark.parametrize("target", STEP_TARGETS)
@pytest.mark.parametrize("conv", list(CONVERSIONS))
def test_step_converts_data(conv, target, warm):
    step = fresh_step(target, warm)
    W0 = OK["W"].copy()
    X = CONVERSIONS[conv](OK["X"])
    loss = step({"W": W0}, X=X, T=OK["T"])
    # reference: the NumPy step on the same numbers
    ref = sb.compile_step(LOSS, [W], sb.optim.SGD(0.1), target="numpy")
    W1 = OK["W"].copy()
    want = ref({"W": W1}, X=np.array(np.asarray(X), dtype=np.float64), T=OK["T"])
    assert loss == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(W0, W1, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("target", STEP_TARGETS)
def test_big_endian_after_misaligned_arrays_is_converted_not_misread(target):
    # Numba remembers an array's type by a fingerprint without byte order or alignment:
    # once a misaligned float64 array was typed, a big-endian one passed its dispatch as
    # native float64 and was read as garbage (a wrong loss, silently).  The calls that
    # skip the full check must convert it as the full check does.
    need(have("numba"), "numba")
    fn = sb.compile(LOSS, [W], target=target)
    step = sb.compile_step(LOSS, [W], sb.optim.SGD(0.1), target=target)
    rv, rg = compiled("numpy")(**OK)
    for X in (OK["X"], _misaligned(OK["X"]), OK["X"].astype(">f8"), OK["X"]):
        v, g = fn(**{**OK, "X": X})
        assert v == pytest.approx(rv, rel=1e-12)
        np.testing.assert_allclose(g["W"], rg["W"], rtol=1e-12, atol=1e-14)
        step.state = None
        W0 = OK["W"].copy()
        loss = step({"W": W0}, X=X, T=OK["T"])
        assert loss == pytest.approx(rv, rel=1e-12)
        np.testing.assert_allclose(W0, OK["W"] - 0.1 * rg["W"], rtol=1e-12, atol=1e-14)


BAD_STEP = [
    ("missing data", {}, dict(T=None), InputError, ["missing T"]),
    ("extra data", {}, dict(Q=np.ones(2)), InputError, ["unexpected Q"]),
    ("wrong columns", {}, dict(X=np.ones((5, 4))), ShapeError, ["X", "4 columns"]),
    ("empty batch", {}, dict(X=np.ones((0, 3)), T=np.ones((0, 2))), ShapeError, ["empty"]),
    ("string data", {}, dict(X="abc"), InputError, ["X", "str"]),
    ("complex data", {}, dict(X=OK["X"] + 1j), InputError, ["X", "complex"]),
    ("missing param", dict(W=None), {}, InputError, ["W", "missing"]),
    ("param twice", {}, dict(W=OK["W"]), InputError, ["W", "both"]),
    ("float32 param", dict(W=OK["W"].astype(np.float32)), {}, InputError, ["W", "float64"]),
    ("int param", dict(W=np.ones((3, 2), int)), {}, InputError, ["W", "float64"]),
    ("Fortran param", dict(W=np.asfortranarray(np.ones((3, 4))[:, :2])), {}, InputError,
     ["W", "C-contiguous"]),
    ("read-only param", dict(W=_readonly(OK["W"])), {}, InputError, ["W", "writeable"]),
    ("list param", dict(W=OK["W"].tolist()), {}, InputError, ["W", "list"]),
    ("param shape", dict(W=np.ones((2, 3))), {}, ShapeError, ["W"]),
]


@pytest.mark.parametrize("warm", [False, True], ids=["first call", "after a good call"])
@pytest.mark.parametrize("target", STEP_TARGETS)
@pytest.mark.parametrize("pchange,dchange,cls,words", [c[1:] for c in BAD_STEP],
                         ids=[c[0] for c in BAD_STEP])
def test_step_names_bad_input(pchange, dchange, cls, words, target, warm):
    step = fresh_step(target, warm)
    params = {k: v for k, v in {"W": OK["W"].copy(), **pchange}.items() if v is not None}
    data = {k: v for k, v in {"X": OK["X"], "T": OK["T"], **dchange}.items() if v is not None}
    before = {k: np.array(v, copy=True) for k, v in params.items()
              if isinstance(v, np.ndarray)}
    with pytest.raises(cls) as info:
        step(params, **data)
    msg = str(info.value)
    assert all(w in msg for w in words), msg
    assert type(info.value).__module__ == "symbp.errors"
    for k, v in before.items():  # nothing was updated
        assert np.array_equal(params[k], v)
