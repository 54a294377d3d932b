"""The public call ``fn(**arrays)``: repeated calls skip the full input check, and never
skip what it does.

The reference for "what the check does" is a fresh function object over the same
program and kernel: its first call always runs the full check (``bind_inputs``).
"""

import numpy as np
import pytest
import sympy as sp

import symbp as sb
from symbp import api
from symbp.backends import Kernel
from symbp.errors import InputError, ShapeError

N = sp.Symbol("N")
X, T = sp.MatrixSymbol("X", N, 3), sp.MatrixSymbol("T", N, 2)
W, b = sp.MatrixSymbol("W", 3, 2), sp.MatrixSymbol("b", 1, 2)
a = sp.Symbol("a")
F = sb.mse(sb.tanh(sb.dense(X, W, b)), T)
# a scalar input and a constant (the 1x2 matrix of numbers) between the matrices
F_MIXED = a * sb.mse(sb.tanh(sb.dense(X, W, b) + sp.OneMatrix(N, 1) * sp.ImmutableMatrix(
    [[1.0, -2.0]])), T) + a**2
TARGETS = ["numpy", "cpu"]
MANY = 30  # good calls before the one under test


def data(rng, n=4, dtype=np.float64):
    return {k: v.astype(dtype) for k, v in dict(
        X=rng.normal(size=(n, 3)), T=rng.normal(size=(n, 2)), W=rng.normal(size=(3, 2)),
        b=rng.normal(size=(1, 2))).items()}


def fresh(fn):
    """The same compiled program, with no binding remembered: it checks in full."""
    return type(fn)(fn.program, fn.target, fn.dtype, fn.kernel)


def same(r1, r2):
    """Two (value, grads) results agree exactly, NaNs in the same places."""
    (v1, g1), (v2, g2) = r1, r2
    np.testing.assert_array_equal(v1, v2)
    assert g1.keys() == g2.keys()
    for k in g1:
        assert type(g1[k]) is type(g2[k]) and np.asarray(g1[k]).dtype == np.asarray(g2[k]).dtype
        np.testing.assert_array_equal(g1[k], g2[k])


@pytest.fixture(scope="module", params=TARGETS)
def fn(request):
    return sb.compile(F, [W, b], target=request.param, dtype=np.float32)


@pytest.fixture
def warm(fn, rng):
    """``fn`` after many good calls, and the arrays of those calls."""
    good = data(rng, dtype=np.float32)
    for _ in range(MANY):
        fn(**good)
    return fn, good


@pytest.fixture
def checks(monkeypatch):
    calls = []
    full = api.bind_inputs

    def counted(*args):
        calls.append(1)
        return full(*args)

    monkeypatch.setattr(api, "bind_inputs", counted)
    return calls


def test_repeated_good_calls_skip_the_full_check(fn, rng, checks):
    d = data(rng, dtype=np.float32)
    first = fn(**d)
    checks.clear()  # the first call checks (unless an earlier test bound these shapes)
    for _ in range(MANY):
        same(fn(**d), first)
    assert not checks
    assert type(first[0]) is float and type(fn(**d)[0]) is float
    # in-place updates of the same arrays (a training loop) are read, not remembered
    d["W"] += 1
    same(fn(**d), fresh(fn)(**d))


@pytest.mark.parametrize("bad, culprit", [
    (dict(X=np.ones((4, 4))), "X"),          # another column count than the symbol's
    (dict(T=np.ones((5, 2))), "T"),          # N = 4 from X, 5 from T
    (dict(W=np.ones((3, 2, 1))), "W"),       # another rank
    (dict(b=np.ones(2)), "b"),
    (dict(X=np.ones((0, 3)), T=np.ones((0, 2))), "N"),  # an empty batch
    (dict(X=np.array([["a"] * 3] * 4)), "X"),  # not numbers
    (dict(X=[[1.0, 2.0], [3.0]]), "X"),      # ragged
    (dict(W=None), "W"),
])
def test_a_bad_array_after_good_calls_is_named_as_by_the_full_check(warm, bad, culprit):
    fn, good = warm
    arrays = {**good, **bad}
    with pytest.raises((InputError, ShapeError)) as fast:
        fn(**arrays)
    with pytest.raises((InputError, ShapeError)) as full:
        fresh(fn)(**arrays)
    assert type(fast.value) is type(full.value) and str(fast.value) == str(full.value)
    assert culprit in str(fast.value)
    same(fn(**good), fresh(fn)(**good))  # a refused call leaves the good binding usable


@pytest.mark.parametrize("change, culprit", [
    (lambda d: d.pop("T"), "missing T"),
    (lambda d: d.update(Z=np.ones(1)), "unexpected Z"),
    (lambda d: d.update(Z=d.pop("T")), "missing T; unexpected Z"),  # same count of names
])
def test_missing_or_extra_names_after_good_calls(warm, change, culprit):
    fn, good = warm
    arrays = dict(good)
    change(arrays)
    with pytest.raises(InputError, match=culprit) as fast:
        fn(**arrays)
    with pytest.raises(InputError) as full:
        fresh(fn)(**arrays)
    assert str(fast.value) == str(full.value)


def _int(d):
    return {**d, "X": np.round(d["X"] * 4).astype(np.int64)}


def _f64(d):
    return {**d, "W": d["W"].astype(np.float64)}


def _strided(d):  # every other column of a wider array: not C-contiguous
    wide = np.zeros((4, 6), np.float32)
    wide[:, ::2] = d["X"]
    return {**d, "X": wide[:, ::2]}


def _fortran(d):
    return {**d, "X": np.asfortranarray(d["X"])}


def _readonly(d):
    x = d["X"].copy()
    x.flags.writeable = False
    return {**d, "X": x}


def _list(d):
    return {**d, "T": d["T"].tolist()}


def _subclass(d):  # the full check reads a masked array's data, mask or not
    return {**d, "X": np.ma.masked_array(d["X"], mask=d["X"] > 0)}


def _byteswapped(d):
    return {**d, "X": d["X"].astype(">f4")}


def _misaligned(d):  # float32 entries one byte off their alignment
    raw = np.zeros(d["X"].nbytes + 1, np.uint8)
    x = raw[1:].view(np.float32).reshape(d["X"].shape)
    x[...] = d["X"]
    assert not x.flags.aligned
    return {**d, "X": x}


def _nan(d):
    x = d["X"].copy()
    x[1, 2] = np.nan
    return {**d, "X": x}


def _batch(d):
    return {**d, "X": np.ones((7, 3), np.float32), "T": np.ones((7, 2), np.float32)}


@pytest.mark.parametrize("convert", [_int, _f64, _strided, _fortran, _readonly, _list,
                                     _subclass, _byteswapped, _misaligned, _nan, _batch])
def test_converted_or_unusual_arrays_after_good_calls_match_the_full_check(warm, convert):
    fn, good = warm
    arrays = convert(good)
    got, want = fn(**arrays), fresh(fn)(**arrays)
    same(got, want)
    if convert is _nan:
        assert np.isnan(got[0])
    same(fn(**good), fresh(fn)(**good))  # and back to the remembered arrays


@pytest.mark.parametrize("convert, error", [
    (_batch, ValueError), (lambda d: {**d, "W": np.ones((2, 2), np.float32)}, ValueError),
    (_strided, TypeError), (_fortran, TypeError), (_readonly, TypeError), (_list, TypeError),
])
def test_the_prepared_call_refuses_what_python_no_longer_checks(rng, convert, error):
    # A repeated call checks only dtypes in Python (api.Forward._again): the compiled
    # call must itself refuse every other array the full check would convert or name.
    # (A misaligned array is read where it lies: the conversion test above checks it.)
    fn = sb.compile(F, [W, b], target="cpu", dtype=np.float32)
    good = data(rng, dtype=np.float32)
    fn(**good)
    call = fn._last.call
    call(*fn._take(good))  # the checked arrays pass
    with pytest.raises(error):
        call(*fn._take(convert(good)))


def test_an_array_changed_in_place_after_good_calls_is_checked_again(warm):
    fn, good = warm
    # same objects, other flags or shape: a cache keyed on identity would pass them
    good["X"].flags.writeable = False
    same(fn(**good), fresh(fn)(**good))
    good["X"].flags.writeable = True
    x = good["X"]
    x.shape = (2, 6)
    with pytest.raises(ShapeError, match="X has 6 columns"):
        fn(**good)


def test_batch_sizes_alternating_past_the_kept_sizes(fn, rng):
    ref = sb.compile(F, [W, b], target="numpy")  # float64 reference
    for n in [4, 3, 4, 1, 9, 5, 2, 4, 3, 7, 4]:
        d = data(rng, n, np.float32)
        v, g = fn(**d)
        rv, rg = ref(**d)
        assert v == pytest.approx(rv, rel=1e-5)
        for k in g:
            np.testing.assert_allclose(g[k], rg[k], rtol=1e-4, atol=1e-6)


def test_returned_gradients_are_fresh_arrays(warm, rng):
    fn, good = warm
    v1, g1 = fn(**good)
    kept = {k: x.copy() for k, x in g1.items()}
    v2, g2 = fn(**data(rng, dtype=np.float32))
    for k in g1:
        assert g1[k] is not g2[k] and not np.shares_memory(g1[k], g2[k])
        np.testing.assert_array_equal(g1[k], kept[k])  # the next call wrote elsewhere
        assert not any(np.shares_memory(g1[k], x) for x in good.values())


@pytest.mark.parametrize("target", TARGETS)
def test_scalars_and_constants_between_the_matrices(target, rng):
    fn = sb.compile(F_MIXED, [W, a], target=target)
    d = {**data(rng), "a": 0.7}
    first = fn(**d)
    for _ in range(MANY):
        same(fn(**d), first)
    for a_ in (0.7, np.float64(0.7), np.float32(0.7), 1, True, np.array(0.7)):
        same(fn(**{**d, "a": a_}), fresh(fn)(**{**d, "a": a_}))
    wrong = {**{k: v for k, v in d.items() if k != "a"}, "z": 0.7}  # as many names
    with pytest.raises(InputError, match="missing a; unexpected z"):
        fn(**wrong)
    with pytest.raises(ShapeError, match="a is a scalar symbol") as fast:
        fn(**{**d, "a": np.array([0.7])})
    with pytest.raises(ShapeError) as full:
        fresh(fn)(**{**d, "a": np.array([0.7])})
    assert str(fast.value) == str(full.value)
    # the constant's array is the kernel's input, never shared between calls
    consts = []
    kern = fn.kernel.fn

    def spy(*args):
        consts.extend(x for x in args if isinstance(x, np.ndarray) and x.shape == (1, 2)
                      and x[0, 1] == -2)
        return kern(*args)

    spied = type(fn)(fn.program, fn.target, fn.dtype, Kernel(spy, fn.source))
    for _ in range(3):
        spied(**d)
    assert len(consts) == 3 and len({id(c) for c in consts}) == 3


@pytest.mark.parametrize("target", TARGETS)
def test_compile_forward_after_good_calls(target, rng, checks):
    fwd = sb.compile_forward(sb.tanh(sb.dense(X, W, b)), target=target, dtype=np.float32)
    d = {k: v for k, v in data(rng, dtype=np.float32).items() if k != "T"}
    first = fwd(**d)
    for _ in range(MANY):
        np.testing.assert_array_equal(fwd(**d), first)
    assert len(checks) == 1
    kept = first.copy()
    fwd(**{**d, "X": d["X"] + 1})
    np.testing.assert_array_equal(first, kept)  # the value is a fresh array
    for bad in (dict(X=np.ones((4, 2))), dict(W=np.ones((3, 3))), dict(T=np.ones((4, 2)))):
        with pytest.raises((InputError, ShapeError)) as fast:
            fwd(**{**d, **bad})
        with pytest.raises((InputError, ShapeError)) as full:
            fresh(fwd)(**{**d, **bad})
        assert str(fast.value) == str(full.value)
    for convert in (_int, _strided, _readonly, _nan, _batch):
        arrays = {k: v for k, v in convert({**d, "T": None}).items() if k != "T"}
        np.testing.assert_array_equal(fwd(**arrays), fresh(fwd)(**arrays))


C_ = sp.Symbol("c")


@pytest.mark.parametrize("f,wrt", [
    (F, [W, b]),                  # every gradient is one of the kernel's output buffers
    (F + a**2, [a, W, b]),        # a scalar's gradient: a value the kernel returns
    (F + a * C_, [W, b, a]),      # a gradient that is an input (c)
    (F + 3 * a, [W, a]),          # a constant gradient
], ids=["buffers", "scalar", "input", "constant"])
def test_gradients_written_into_a_buffer_match_the_call(f, wrt, rng):
    # Data-parallel training reduces one buffer of all gradients: into() writes them there
    # (raveled, in wrt order) instead of fresh arrays; the call is the reference.
    fn = sb.compile(f, wrt, target="cpu")
    into = fn.kernel.fn.into
    size = sum(int(np.prod(w.shape)) if hasattr(w, "shape") else 1 for w in wrt)
    buf = np.full(size + 1, np.nan)
    for n in (4, 7, 4):  # another batch size cuts the buffer anew, and back
        d = {**data(rng, n=n), "a": 0.7, "c": -1.5}
        d = {k: v for k, v in d.items() if k in fn.input_names}
        value, grads = fn(**d)
        assert into(buf, *fresh(fn).bind(d)) == value
        np.testing.assert_array_equal(
            buf[:-1], np.concatenate([np.ravel(grads[w.name]) for w in wrt]))
        assert np.isnan(buf[-1])  # past the gradients: left alone
    other = np.zeros(size)
    into(other, *fn.bind(d))
    np.testing.assert_array_equal(other, buf[:-1])


def test_into_a_fresh_view_each_call_writes_that_view(rng):
    # The MPI shared-memory sum hands into() a fresh view of its window each step, the two
    # halves in turn.  A view freed after one call and the next one made often share an
    # id(): slices cached by id alone wrote a step's gradient into the other half (the
    # ranks then summed stale rows and ended with different parameters).
    fn = sb.compile(F, [W, b], target="cpu")
    into = fn.kernel.fn.into
    size = int(np.prod(W.shape)) + int(np.prod(b.shape))
    d = {k: v for k, v in data(rng, n=4).items() if k in fn.input_names}
    _, grads = fn(**d)
    want = np.concatenate([np.ravel(grads["W"]), np.ravel(grads["b"])])
    rows = np.zeros((2, size))
    for step in range(6):
        rows[...] = 0
        into(rows[step % 2], *fn.bind(d))  # a temporary view: freed when the call returns
        np.testing.assert_array_equal(rows[step % 2], want, err_msg=f"step {step}")
        np.testing.assert_array_equal(rows[1 - step % 2], 0, err_msg=f"step {step}")


def test_a_kernel_with_blas_products_after_good_calls(rng):
    """Repeated calls of a kernel that calls BLAS (the prepared call on its thread count)
    give the full check's results and leave the user's BLAS thread count as they found
    it."""
    from symbp.backends import blas
    from symbp.runtime.threads import BLAS

    Xw, Tw = sp.MatrixSymbol("X", N, 20), sp.MatrixSymbol("T", N, 4)
    W1, W2 = sp.MatrixSymbol("W1", 20, 160), sp.MatrixSymbol("W2", 160, 4)
    loss = sb.softmax_cross_entropy(sb.tanh(Xw * W1) * W2, Tw)
    fn = sb.compile(loss, [W1, W2], target="cpu", blas_threads=1)
    assert "_gemm(" in fn.source
    d = dict(X=rng.normal(size=(64, 20)), T=np.eye(4)[rng.integers(0, 4, 64)],
             W1=rng.normal(size=(20, 160)) / 5, W2=rng.normal(size=(160, 4)) / 5)
    lib = blas._numpy_openblas()  # the user's library, whichever the kernels call
    before = lib.scipy_openblas_get_num_threads64_() if lib is not None else None
    try:
        if lib is not None:
            lib.scipy_openblas_set_num_threads64_(2)
        for _ in range(MANY):
            same(fn(**d), fresh(fn)(**d))
        if lib is not None:
            assert lib.scipy_openblas_get_num_threads64_() == 2
            assert BLAS.user is None and BLAS.user_np is None
        same(fn(**{**d, "X": np.asfortranarray(d["X"])}), fresh(fn)(**d))
    finally:
        if lib is not None:
            lib.scipy_openblas_set_num_threads64_(before)
