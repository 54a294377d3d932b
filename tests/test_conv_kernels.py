"""Convolution and pooling kernels (symbp.backends.conv_*) against independent references.

    conv_numpy  vs PyTorch float64 (torch.nn.functional and autograd), and vs central
                finite differences of a random linear functional L = Σ δ ⊙ Y
    conv_numba  (serial and prange) vs conv_numpy: float64 to 1e-12, float32 to 1e-5
    conv_cuda   vs conv_numpy in Numba's CUDA simulator, in a subprocess (the simulator must
                be switched on before numba is imported): ``python tests/test_conv_kernels.py
                sim`` prints one JSON object

Each check runs over the tables CONV and POOL; max-pool ties and NaN have their own inputs
with the expected gradient written out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from conftest import have, need

from symbp.backends import conv_numpy as ref
from symbp.errors import SymbpError

# (N, C, H, W, F, kh, kw, stride, padding)
CONV = {
    "1x1": (2, 3, 5, 5, 4, 1, 1, 1, 0),
    "digits-3x3-p1": (2, 1, 8, 8, 4, 3, 3, 1, 1),
    "3x3-s2-p1-odd": (3, 3, 8, 7, 4, 3, 3, 2, 1),  # (8+2−3)/2 is not whole: a row unread
    "2x5-s2-p2": (2, 3, 6, 10, 1, 2, 5, 2, 2),  # non-square kernel, F=1
    "5x5-p2": (1, 3, 9, 9, 4, 5, 5, 1, 2),
    "5x3-s2": (2, 1, 9, 8, 4, 5, 3, 2, 0),
    "C8-N7": (7, 8, 6, 6, 2, 3, 3, 1, 0),
    "kernel-fills-padded": (1, 2, 3, 3, 3, 5, 5, 1, 1),  # one output pixel
    "stride-gt-kernel": (2, 2, 7, 7, 3, 2, 2, 3, 0),  # pixels no window reads
    "pad-2-C1-F1": (1, 1, 4, 4, 1, 3, 3, 1, 2),  # corner windows read only padding
    "N17": (17, 2, 5, 5, 3, 3, 3, 1, 1),  # more images than one tile of the batch copy
}
# (N, C, H, W, size, stride)
POOL = {
    "2": (2, 3, 8, 8, 2, None),
    "2-odd": (2, 1, 7, 7, 2, None),  # the last row and column fall out
    "3-s2-overlap": (1, 3, 7, 8, 3, 2),
    "3-s1-overlap": (2, 2, 6, 5, 3, 1),
    "1": (3, 1, 5, 5, 1, None),
    "2-s3-gaps": (1, 2, 9, 9, 2, 3),
    "N17": (17, 2, 4, 6, 2, None),
}
POOLS = ("max", "avg")
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b), initial=0) / max(np.max(np.abs(b), initial=0), 1e-30))


def conv_inputs(case: str, dtype=np.float64, seed=0):
    """X, K, b and δ (the adjoint of the output) of a CONV case."""
    n, c, h, w, f, kh, kw, s, p = CONV[case]
    rng = np.random.default_rng(seed)
    X, K, b = rng.normal(size=(n, c, h, w)), rng.normal(size=(f, c, kh, kw)), rng.normal(size=f)
    G = rng.normal(size=ref.conv2d_shape(X.shape, K.shape, s, p))
    return tuple(a.astype(dtype) for a in (X, K, b, G)) + (s, p)


def pool_inputs(case: str, dtype=np.float64, seed=0):
    """X and δ of a POOL case, with its size and stride."""
    n, c, h, w, k, s = POOL[case]
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, c, h, w))
    G = rng.normal(size=ref.pool2d_shape(X.shape, k, s))
    return X.astype(dtype), G.astype(dtype), k, s


def conv_all(mod, X, K, b, G, s, p, **kw) -> dict:
    """Value and the three gradients of conv2d by the module ``mod``."""
    return {"Y": mod.conv2d(X, K, b, s, p, **kw),
            "dX": mod.conv2d_grad_input(G, K, X.shape, s, p, **kw),
            "dK": mod.conv2d_grad_kernel(G, X, K.shape, s, p, **kw),
            "db": mod.conv2d_grad_bias(G, **kw)}


def pool_all(mod, kind, X, G, k, s, **kw) -> dict:
    """Value and input gradient of max- or avg-pooling by the module ``mod``."""
    if kind == "max":
        return {"Y": mod.max_pool2d(X, k, s, **kw), "dX": mod.max_pool2d_grad(G, X, k, s, **kw)}
    return {"Y": mod.avg_pool2d(X, k, s, **kw), "dX": mod.avg_pool2d_grad(G, X.shape, k, s, **kw)}


# --- the NumPy reference vs PyTorch float64 -------------------------------------------------


def _torch():
    need(have("torch"), "pytorch", "no comparison with torch.nn.functional")
    import torch

    return torch


@pytest.mark.parametrize("case", CONV)
def test_conv_numpy_matches_torch(case):
    torch = _torch()
    X, K, b, G, s, p = conv_inputs(case)
    tX, tK, tb = (torch.tensor(a, requires_grad=True) for a in (X, K, b))
    tY = torch.nn.functional.conv2d(tX, tK, tb, stride=s, padding=p)
    tY.backward(torch.tensor(G))
    want = {"Y": tY.detach(), "dX": tX.grad, "dK": tK.grad, "db": tb.grad}
    got = conv_all(ref, X, K, b, G, s, p)
    for k in want:
        assert rel_err(got[k], want[k].numpy()) < 1e-13, (case, k)
    # no bias: the value of the bare correlation
    tY0 = torch.nn.functional.conv2d(torch.tensor(X), torch.tensor(K), stride=s, padding=p)
    assert rel_err(ref.conv2d(X, K, None, s, p), tY0.numpy()) < 1e-13


@pytest.mark.parametrize("kind", POOLS)
@pytest.mark.parametrize("case", POOL)
def test_pool_numpy_matches_torch(case, kind):
    torch = _torch()
    X, G, k, s = pool_inputs(case)
    tX = torch.tensor(X, requires_grad=True)
    pool = getattr(torch.nn.functional, f"{kind}_pool2d")
    tY = pool(tX, k, s)
    tY.backward(torch.tensor(G))
    got = pool_all(ref, kind, X, G, k, s)
    assert rel_err(got["Y"], tY.detach().numpy()) < 1e-14
    assert rel_err(got["dX"], tX.grad.numpy()) < 1e-14


# --- Numba serial and parallel vs the NumPy reference ---------------------------------------

VARIANTS = [(np.float64, False), (np.float64, True), (np.float32, False), (np.float32, True)]
VIDS = ["float64-serial", "float64-parallel", "float32-serial", "float32-parallel"]


def _numba():
    need(have("numba"), "numba")
    from symbp.backends import conv_numba

    return conv_numba


@pytest.mark.parametrize("dtype, par", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("case", CONV)
def test_conv_numba_matches_numpy(case, dtype, par):
    cb = _numba()
    exact = conv_all(ref, *conv_inputs(case))
    X, K, b, G, s, p = conv_inputs(case, dtype)
    got = conv_all(cb, X, K, b, G, s, p, parallel=par)
    for k in exact:
        assert got[k].dtype == dtype, (k, got[k].dtype)
        assert rel_err(got[k], exact[k]) <= TOL[dtype], (case, k, rel_err(got[k], exact[k]))
    assert rel_err(cb.conv2d(X, K, None, s, p, parallel=par),
                   ref.conv2d(*conv_inputs(case)[:2], None, s, p)) <= TOL[dtype]


@pytest.mark.parametrize("dtype, par", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("kind", POOLS)
@pytest.mark.parametrize("case", POOL)
def test_pool_numba_matches_numpy(case, kind, dtype, par):
    cb = _numba()
    exact = pool_all(ref, kind, *pool_inputs(case))
    got = pool_all(cb, kind, *pool_inputs(case, dtype), parallel=par)
    for k in exact:
        assert got[k].dtype == dtype
        assert rel_err(got[k], exact[k]) <= TOL[dtype], (case, kind, k)


# Every kernel overwrites its `out` (a workspace buffer holds the last step's values).
OUT_CALLS = {
    "conv2d": lambda m, X, K, b, G, s, p, **o: m.conv2d(X, K, b, s, p, **o),
    "conv2d_grad_input": lambda m, X, K, b, G, s, p, **o: m.conv2d_grad_input(
        G, K, X.shape, s, p, **o),
    "conv2d_grad_kernel": lambda m, X, K, b, G, s, p, **o: m.conv2d_grad_kernel(
        G, X, K.shape, s, p, **o),
    "conv2d_grad_bias": lambda m, X, K, b, G, s, p, **o: m.conv2d_grad_bias(G, **o),
    "max_pool2d": lambda m, X, K, b, G, s, p, **o: m.max_pool2d(X, 2, 1, **o),
    "max_pool2d_grad": lambda m, X, K, b, G, s, p, **o: m.max_pool2d_grad(
        m.max_pool2d(X, 2, 1), X, 2, 1, **o),
    "avg_pool2d": lambda m, X, K, b, G, s, p, **o: m.avg_pool2d(X, 3, 2, **o),
    "avg_pool2d_grad": lambda m, X, K, b, G, s, p, **o: m.avg_pool2d_grad(
        m.avg_pool2d(X, 3, 2), X.shape, 3, 2, **o),
}


@pytest.mark.parametrize("par", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("fn", OUT_CALLS)
def test_numba_overwrites_out(fn, par):
    cb = _numba()
    args = conv_inputs("3x3-s2-p1-odd")
    want = OUT_CALLS[fn](ref, *args)
    out = np.full(want.shape, np.nan)  # stale contents must not leak into the result
    got = OUT_CALLS[fn](cb, *args, out=out, parallel=par)
    assert got is out
    assert rel_err(out, want) <= 1e-12


# --- gradients vs central differences of L = Σ δ ⊙ Y (float64) ------------------------------

IMPLS = ["numpy", "cpu", "parallel"]


def _impl(name):
    return (ref, {}) if name == "numpy" else (_numba(), {"parallel": name == "parallel"})


def _central(L, A, h=1e-6):
    """∂L/∂A entry by entry, (L(A + h e) − L(A − h e)) / 2h."""
    g = np.zeros_like(A)
    for idx in np.ndindex(A.shape):
        a = A[idx]
        A[idx] = a + h
        up = L()
        A[idx] = a - h
        g[idx] = (up - L()) / (2 * h)
        A[idx] = a
    return g


@cache
def conv_fd(case):
    X, K, b, G, s, p = conv_inputs(case, seed=1)
    L = lambda: float(np.sum(G * ref.conv2d(X, K, b, s, p)))
    return {"dX": _central(L, X), "dK": _central(L, K), "db": _central(L, b)}


@cache
def pool_fd(case, kind):
    X, G, k, s = pool_inputs(case, seed=1)
    L = lambda: float(np.sum(G * pool_all(ref, kind, X, G, k, s)["Y"]))
    return _central(L, X)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CONV)
def test_conv_gradients_match_central_differences(case, impl):
    mod, kw = _impl(impl)
    got = conv_all(mod, *conv_inputs(case, seed=1), **kw)
    for k, fd in conv_fd(case).items():
        # L is linear in each argument: the difference quotient is exact up to rounding
        assert rel_err(got[k], fd) < 1e-7, (case, k)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", POOLS)
@pytest.mark.parametrize("case", POOL)
def test_pool_gradients_match_central_differences(case, kind, impl):
    mod, kw = _impl(impl)
    # random normal entries: no ties, and no window's maximum changes within ±h
    got = pool_all(mod, kind, *pool_inputs(case, seed=1), **kw)["dX"]
    assert rel_err(got, pool_fd(case, kind)) < 1e-7


# --- max-pool ties and NaN: the expected gradients written out ------------------------------

nan, inf = np.nan, np.inf
# (X as one 2-D image, size, stride, pooled value, ∂L/∂X for δ = 1, 2, 3, ... in the windows)
TIES = {
    # a constant window: the first entry takes the gradient
    "constant": ([[3, 3], [3, 3]], 2, None, [[3]], [[1, 0], [0, 0]]),
    # two maxima: the first in row-major order
    "two-maxima": ([[1, 5], [5, 2]], 2, None, [[5]], [[0, 1], [0, 0]]),
    # overlapping constant windows each give their first entry (stride 1)
    "overlap": ([[0, 0, 0], [0, 0, 0], [0, 0, 0]], 2, 1, [[0, 0], [0, 0]],
                [[1, 2, 0], [3, 4, 0], [0, 0, 0]]),
    # a maximum shared by two overlapping windows gets both δ
    "shared-max": ([[1, 9, 2], [0, 0, 0]], 2, 1, [[9, 9]], [[0, 3, 0], [0, 0, 0]]),
    "all-minus-inf": ([[-inf, -inf], [-inf, -inf]], 2, None, [[-inf]], [[1, 0], [0, 0]]),
    # NaN propagates: the max is NaN and its δ goes to the NaN
    "nan": ([[1, 7], [nan, 2]], 2, None, [[nan]], [[0, 0], [1, 0]]),
    "nan-first": ([[nan, 7], [8, 2]], 2, None, [[nan]], [[1, 0], [0, 0]]),
    # two NaNs: PyTorch's scan (`v > m or isnan(v)`) lets the later one take it
    "two-nans": ([[1, nan], [nan, 2]], 2, None, [[nan]], [[0, 0], [1, 0]]),
}


def tie_case(name, dtype=np.float64):
    x, k, s, y, dx = TIES[name]
    X = np.array(x, dtype=dtype)[None, None]
    Y = np.array(y, dtype=dtype)[None, None]
    G = np.arange(1, Y.size + 1, dtype=dtype).reshape(Y.shape)
    return X, G, k, s, Y, np.array(dx, dtype=dtype)[None, None]


@pytest.mark.parametrize("impl", ["numpy", "cpu", "parallel", "torch"])
@pytest.mark.parametrize("name", TIES)
def test_max_pool_ties_and_nan(name, impl):
    X, G, k, s, Y, dX = tie_case(name)
    if impl == "torch":
        torch = _torch()
        tX = torch.tensor(X, requires_grad=True)
        tY = torch.nn.functional.max_pool2d(tX, k, s)
        tY.backward(torch.tensor(G))
        got = {"Y": tY.detach().numpy(), "dX": tX.grad.numpy()}
    else:
        mod, kw = _impl(impl)
        got = pool_all(mod, "max", X, G, k, s, **kw)
    np.testing.assert_array_equal(got["Y"], Y)  # NaN equals NaN here
    np.testing.assert_array_equal(got["dX"], dX)


# --- bad input: each error names the culprit ------------------------------------------------

X4, K4 = np.zeros((2, 3, 5, 5)), np.zeros((4, 3, 3, 3))
ERRORS = [
    ("stride 0", lambda m: m.conv2d(X4, K4, None, 0, 0), "stride must be an integer ≥ 1"),
    ("negative padding", lambda m: m.conv2d(X4, K4, None, 1, -1), "padding must be"),
    ("channels", lambda m: m.conv2d(X4, np.zeros((4, 2, 3, 3))), "2 input channels.*has 3"),
    ("kernel too large", lambda m: m.conv2d(X4, np.zeros((4, 3, 8, 3)), None, 1, 1),
     "8×3 window is larger than the padded image"),
    ("3-D image", lambda m: m.conv2d(X4[0], K4), r"N×C×H×W image.*\(3, 5, 5\)"),
    ("pool stride 0", lambda m: m.max_pool2d(X4, 2, 0), "pooling stride must be"),
    ("pool too large", lambda m: m.avg_pool2d(X4, 6), "6×6 window is larger than the 5×5"),
    ("3-D pool", lambda m: m.max_pool2d_grad(X4[0], X4[0], 2), r"N×C×H×W image"),
    ("float size", lambda m: m.max_pool2d(X4, 2.0), "pooling size must be an integer"),
]


@pytest.mark.parametrize("impl", ["numpy", "cpu"])
@pytest.mark.parametrize("what, call, match", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_is_named(what, call, match, impl):
    mod, _ = _impl(impl)
    with pytest.raises(SymbpError, match=match):
        call(mod)


NUMBA_ERRORS = [
    ("mixed dtypes", lambda m: m.conv2d(X4.astype(np.float32), K4),
     "one dtype.*X: float32, K: float64"),
    ("int image", lambda m: m.max_pool2d(X4.astype(np.int64), 2), "float32 or float64"),
    ("bias length", lambda m: m.conv2d(X4, K4, np.zeros(3)), r"one entry per filter.*\(4,\)"),
    ("out shape", lambda m: m.conv2d(X4, K4, out=np.zeros((2, 4, 3, 4))),
     r"out must be .*\(2, 4, 3, 3\)"),
    ("out dtype", lambda m: m.conv2d_grad_bias(np.zeros((2, 4, 3, 3)),
                                               out=np.zeros(4, np.float32)), "out must be"),
    ("δ shape", lambda m: m.conv2d_grad_input(np.zeros((2, 4, 4, 4)), K4, X4.shape),
     r"δ must have the output's shape \(2, 4, 3, 3\)"),
    ("strided view", lambda m: m.max_pool2d(X4[:, :, ::2], 2), "X must be C-contiguous"),
]


@pytest.mark.parametrize("what, call, match", NUMBA_ERRORS, ids=[e[0] for e in NUMBA_ERRORS])
def test_numba_bad_arrays_are_named(what, call, match):
    with pytest.raises(SymbpError, match=match):
        call(_numba())


# --- CUDA kernels in Numba's simulator (a subprocess) ---------------------------------------
# tiny shapes: the simulator runs every thread as Python
SIM_CONV = ["3x3-s2-p1-odd", "2x5-s2-p2", "5x3-s2", "pad-2-C1-F1", "stride-gt-kernel"]
SIM_POOL = ["2-odd", "3-s1-overlap", "2-s3-gaps"]
SIM_DTYPES = {"float32": np.float32, "float64": np.float64}
SIM_KEYS = ([f"conv/{c}/{d}" for c in SIM_CONV for d in SIM_DTYPES]
            + [f"{kind}/{c}/{d}" for c in SIM_POOL for kind in POOLS for d in SIM_DTYPES]
            + [f"ties/{t}/float32" for t in TIES])


def sim() -> dict:
    """Errors of every SIM case against the float64 NumPy reference (run in the simulator)."""
    from numba import config

    assert config.ENABLE_CUDASIM, "run with NUMBA_ENABLE_CUDASIM=1 set before numba loads"
    from symbp.backends import conv_cuda

    host = lambda d: {k: v.copy_to_host() for k, v in d.items()}
    out = {}
    for case in SIM_CONV:
        exact = conv_all(ref, *conv_inputs(case))
        for dname, dt in SIM_DTYPES.items():
            got = host(conv_all(conv_cuda, *conv_inputs(case, dt)))
            X, K, _, _, s, p = conv_inputs(case, dt)
            got["Y0"] = conv_cuda.conv2d(X, K, None, s, p).copy_to_host()
            want = {**exact, "Y0": ref.conv2d(*conv_inputs(case)[:2], None, s, p)}
            out[f"conv/{case}/{dname}"] = {k: rel_err(got[k], want[k]) for k in want}
    for case in SIM_POOL:
        for kind in POOLS:
            exact = pool_all(ref, kind, *pool_inputs(case))
            for dname, dt in SIM_DTYPES.items():
                got = host(pool_all(conv_cuda, kind, *pool_inputs(case, dt)))
                out[f"{kind}/{case}/{dname}"] = {k: rel_err(got[k], exact[k]) for k in exact}
    for name in TIES:
        X, G, k, s, Y, dX = tie_case(name, np.float32)
        got = host(pool_all(conv_cuda, "max", X, G, k, s))
        out[f"ties/{name}/float32"] = {
            "Y": 0.0 if np.array_equal(got["Y"], Y, equal_nan=True) else 1.0,
            "dX": 0.0 if np.array_equal(got["dX"], dX) else 1.0}
    return out


@cache
def _sim_result() -> dict:
    need(_has_numba_cuda(), "cuda-simulator")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    here = Path(__file__)
    p = subprocess.run([sys.executable, str(here), "sim"], cwd=here.parent.parent, env=env,
                       text=True, capture_output=True, timeout=400)
    if p.returncode != 0:
        pytest.fail(f"the simulator run failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _has_numba_cuda() -> bool:
    try:
        import numba.cuda  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("key", SIM_KEYS)
def test_cuda_simulator_matches_numpy(key):
    errs = _sim_result()[key]
    tol = 0.0 if key.startswith("ties/") else TOL[SIM_DTYPES[key.rsplit("/", 1)[1]]]
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{key}: relative errors {bad} over the tolerance {tol:.0e}"


def test_cuda_launchers_check_their_arrays():
    # the launchers check before they copy or launch anything: no simulator is needed
    need(_has_numba_cuda(), "cuda-simulator")
    from symbp.backends import conv_cuda

    with pytest.raises(SymbpError, match="one dtype.*X: float32, K: float64"):
        conv_cuda.conv2d(X4.astype(np.float32), K4)
    with pytest.raises(SymbpError, match="stride must be"):
        conv_cuda.conv2d(X4, K4, None, 0)
    with pytest.raises(SymbpError, match=r"δ must have the output's shape"):
        conv_cuda.max_pool2d_grad(np.zeros((2, 3, 3, 3)), X4, 2)


def test_simulator_reports_every_key():
    # a key the simulator names differently would leave a case unchecked
    assert sorted(_sim_result()) == sorted(SIM_KEYS)


if __name__ == "__main__":
    if sys.argv[1:] != ["sim"]:
        raise SystemExit("usage: NUMBA_ENABLE_CUDASIM=1 python tests/test_conv_kernels.py sim")
    import simulator  # tests/, this script's directory

    simulator.fast()
    print(json.dumps(sim()))
