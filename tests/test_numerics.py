"""Numerical safety and kink conventions in every backend: numpy, cpu, parallel, cuda.

Inputs of ±1000 and probabilities of exactly 0 and 1 give finite losses and gradients;
relu, leaky_relu, prelu, elu, Heaviside and Piecewise follow the documented convention at
exactly 0.  Numba compile time dominates, so every check lives in ONE program (`CASE`),
compiled once per (backend, dtype): each loss term reads its own input, is weighted by
its own scalar ``c_<name>`` (the gradient w.r.t. ``c_<name>`` is the term's value, so a
non-finite value is named), and values of matrix functions are read out as the gradient
w.r.t. a readout matrix ``R`` of ``Total(f(K) ∘ R)`` (that gradient is f(K); the gradient
w.r.t. K is f'(K) ∘ R = f'(K) with R = 1).  The cuda backend runs on Numba's simulator in a
subprocess (tests/cuda_numerics.py: the simulator must be switched on before numba loads);
'parallel' compiles, at these sizes, the very source 'cpu' does (checked, not compiled).
"""

import json
import os
import subprocess
import sys
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from conftest import have, need

import symbp as sb
from symbp import functions as F
from symbp.matrix import Total, elementwise

N = sp.Symbol("N")
T = sp.MatrixSymbol("T", N, 3)
EXTREME = np.array([[1000.0, -1000.0, 0.0], [-1000.0, -1000.0, -1000.0],
                    [1000.0, 1000.0, 999.0], [0.5, -1000.0, 1000.0]])
ONE_HOT = np.eye(3)[[0, 2, 1, 1]]
# exact zeros of both signs next to values on either side of the kink, and ±1000
KINK = np.array([[0.0, -0.0, 1000.0], [-1000.0, 0.0, 2.0], [0.0, -2.0, -0.0], [3.0, -0.5, 0.0]])
ALPHA, SLOPE = 0.5, 0.25  # elu's α, prelu's learned slope a
# BCE from probabilities: exact 0 and 1 against both targets, and a tiny p
PROB = np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 1e-30], [0.0, 1.0, 0.25], [0.75, 1.0, 0.0]])
PROB_T = np.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])


def _hm(A, B):
    return sp.HadamardProduct(A, B)


# name -> loss of one (N, 3) input at ±1000 and the one-hot T
EXTREMES = {
    "softmax": lambda Z: F.mse(F.softmax(Z), T),
    "log_softmax": lambda Z: -Total(_hm(F.log_softmax(Z), T)) / N,
    "cross_entropy(softmax)": lambda Z: F.cross_entropy(F.softmax(Z), T),
    "softmax_cross_entropy": lambda Z: F.softmax_cross_entropy(Z, T),
    "bce_with_logits": lambda Z: F.bce_with_logits(Z, T),
    "bce(sigmoid)": lambda Z: F.binary_cross_entropy(F.sigmoid(Z), T),
    **{f"mse({name})": (lambda Z, f=f: F.mse(f(Z), T))
       for name, f in [("softplus", F.softplus), ("sigmoid", F.sigmoid), ("tanh", F.tanh),
                       ("elu", F.elu), ("selu", F.selu), ("gelu", F.gelu),
                       ("gelu_tanh", F.gelu_tanh), ("silu", F.silu)]},
    # relu, leaky_relu and elu at ±1000: in KINKS
}

a = sp.Symbol("a", real=True)
# name -> (map of K, its value on KINK, its derivative on KINK or None: not differentiated)
pos, neg = KINK > 0, np.minimum(KINK, 0)
KINKS = {
    "relu": (F.relu, np.where(pos, KINK, 0), np.where(pos, 1.0, 0.0)),
    "leaky_relu": (lambda K: F.leaky_relu(K, sp.Rational(1, 10)),
                   np.where(pos, KINK, 0.1 * KINK), np.where(pos, 1.0, 0.1)),
    "prelu": (lambda K: F.prelu(K, a), np.where(pos, KINK, SLOPE * KINK),
              np.where(pos, 1.0, SLOPE)),
    "elu": (lambda K: F.elu(K, sp.Rational(1, 2)), np.where(pos, KINK, ALPHA * np.expm1(neg)),
            np.where(pos, 1.0, ALPHA * np.exp(neg))),
    # SymPy's Heaviside(0) = 1/2 unless given, Heaviside(0, 1) = 1; symbp's step(0) = 0
    # (relu's derivative).  One map for the three (compile time): H + 2 H(·, 1) + 4 step
    "Heaviside": (lambda K: elementwise(lambda u: sp.Heaviside(u) + 2 * sp.Heaviside(u, 1)
                                        + 4 * F.step(u), K),
                  np.where(pos, 1.0, np.where(KINK == 0, 0.5, 0.0)) + 2.0 * (KINK >= 0)
                  + 4.0 * pos, None),
    "Piecewise(x >= 0)": (lambda K: elementwise(lambda u: sp.Piecewise((2 * u + 1, u >= 0),
                                                                        (-u, True)), K),
                          np.where(KINK >= 0, 2 * KINK + 1, -KINK),
                          np.where(KINK >= 0, 2.0, -1.0)),
}


def _key(name):
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


@cache
def case():
    """The one program: (loss, wrt, arrays, expectations)."""
    terms, wrt, arrays = [], [], {"T": ONE_HOT}
    for name, f in EXTREMES.items():
        Z, c = sp.MatrixSymbol(f"Z_{_key(name)}", N, 3), sp.Symbol(f"c_{_key(name)}", real=True)
        terms.append(c * f(Z))
        wrt += [Z, c]
        arrays |= {Z.name: EXTREME, c.name: 1.0}
    P, TB, c = sp.MatrixSymbol("P", N, 3), sp.MatrixSymbol("TB", N, 3), sp.Symbol("c_bce")
    terms.append(c * F.binary_cross_entropy(P, TB))
    wrt += [P, c]
    arrays |= {"P": PROB, "TB": PROB_T, "c_bce": 1.0}
    # softmax and log-softmax of extreme rows, read out as gradients w.r.t. RS and RL
    ZS, RS, RL = (sp.MatrixSymbol(s, N, 3) for s in ("ZS", "RS", "RL"))
    terms += [Total(_hm(F.softmax(ZS), RS)), Total(_hm(F.log_softmax(ZS), RL))]
    wrt += [ZS, RS, RL]
    arrays |= {"ZS": EXTREME, "RS": np.ones((4, 3)), "RL": np.ones((4, 3))}
    for name, (f, _, deriv) in KINKS.items():
        K, R = sp.MatrixSymbol(f"K_{_key(name)}", N, 3), sp.MatrixSymbol(f"R_{_key(name)}", N, 3)
        terms.append(Total(_hm(f(K), R)))
        wrt += [K, R] if deriv is not None else [R]
        arrays |= {K.name: KINK, R.name: np.ones((4, 3))}
    wrt.append(a)
    arrays["a"] = SLOPE
    return sp.Add(*terms), wrt, arrays


def _quiet(fn, arrays):
    with warnings.catch_warnings():
        # NumPy evaluates both branches of a where/select (one may overflow) and log(0)
        # before BCE's clamp; what matters is the value returned
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(**arrays)


@cache
def reference():
    f, wrt, arrays = case()
    return _quiet(sb.compile(f, wrt, target="numpy", dtype=np.float64), arrays)


@cache
def run(target, dtype):
    """(value, grads) of the one program on ``target`` in ``dtype``."""
    if target == "cuda":
        r = _cuda()[np.dtype(dtype).name]
        if isinstance(r, str):
            pytest.fail(f"cuda_numerics.py failed:\n{r}")
        return r
    f, wrt, arrays = case()
    if target != "numpy":
        need(have("numba"), "numba")
    return _quiet(sb.compile(f, wrt, target=target, dtype=dtype), arrays)


@cache
def _cuda():
    """Both dtypes on the simulator, one subprocess (tests/cuda_numerics.py)."""
    need(_has_numba_cuda(), "cuda-simulator")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    here = Path(__file__).parent
    p = subprocess.run([sys.executable, str(here / "cuda_numerics.py")], cwd=here.parent,
                       env=env, text=True, capture_output=True, timeout=400)
    if p.returncode != 0:  # every cuda test fails with this, without rerunning it
        return {"float32": p.stderr[-3000:], "float64": p.stderr[-3000:]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return {dt: (r["value"], {k: np.asarray(v, dtype=dt) for k, v in r["grads"].items()})
            for dt, r in out.items()}


def _has_numba_cuda():
    try:
        import numba.cuda  # noqa: F401
    except ImportError:
        return False
    return True


# 'parallel' is not compiled here: at these sizes every loop is below PAR_MIN_WORK, so its
# kernel is the 'cpu' text with parallel=True (test_parallel_kernel_is_the_cpu_kernel),
# and compiling the one program again costs ~30 s cold per dtype for the same numbers
GRID = [(t, d) for t in ("numpy", "cpu", "cuda") for d in (np.float32, np.float64)]
IDS = [f"{t}-{np.dtype(d).name}" for t, d in GRID]
TOL = {np.float32: dict(rtol=2e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("target,dtype", GRID, ids=IDS)
def test_finite_at_plus_minus_1000_and_p_0_1(target, dtype):
    v, g = run(target, dtype)
    assert np.isfinite(v)
    bad = [k for k, arr in g.items() if not np.all(np.isfinite(arr))]
    assert not bad, {k: g[k] for k in bad}  # c_<loss> is that loss's value: names it
    assert all(np.asarray(arr).dtype == dtype for arr in g.values())


@pytest.mark.parametrize("target,dtype", GRID, ids=IDS)
def test_extremes_agree_with_the_float64_reference(target, dtype):
    v, g = run(target, dtype)
    rv, rg = reference()
    tol = TOL[dtype]
    # value: a sum of ~10^6-sized terms, so relative to the largest one
    assert v == pytest.approx(rv, rel=tol["rtol"] * 10, abs=tol["atol"] * 10)
    for k, want in rg.items():
        scale = max(1.0, float(np.max(np.abs(want))))
        np.testing.assert_allclose(g[k], want, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   err_msg=f"{target} {k}")


@pytest.mark.parametrize("target,dtype", GRID, ids=IDS)
def test_bce_probabilities_exactly_0_and_1(target, dtype):
    _, g = run(target, dtype)
    # PyTorch's value: per-entry logs clamped at -100, mean over the entries
    with np.errstate(divide="ignore"):
        want = -(PROB_T * np.maximum(np.log(PROB), -100)
                 + (1 - PROB_T) * np.maximum(np.log(1 - PROB), -100)).mean()
    assert g["c_bce"] == pytest.approx(want, rel=1e-6)
    # the confident right answers (p = t = 0 or 1) contribute 0 loss and 0 gradient
    right = (PROB == PROB_T) & ((PROB == 0) | (PROB == 1))
    assert right.sum() == 4 and np.all(g["P"][right] == 0)


@pytest.mark.parametrize("target,dtype", GRID, ids=IDS)
def test_softmax_rows_at_extremes(target, dtype):
    _, g = run(target, dtype)
    Y, ls = g["RS"], g["RL"]
    assert np.all(np.isfinite(Y)) and np.allclose(Y.sum(1), 1)
    assert np.all(np.isfinite(ls)) and ls.max() <= 0
    # exact where the float64 answer is exact: e^-1000 is 0 in both dtypes
    assert np.array_equal(Y[0], [1, 0, 0]) and Y[3, 1] == 0


@pytest.mark.parametrize("target,dtype", GRID, ids=IDS)
@pytest.mark.parametrize("name", list(KINKS))
def test_kink_conventions(name, target, dtype):
    _, g = run(target, dtype)
    _, value, deriv = KINKS[name]
    k = _key(name)
    np.testing.assert_allclose(g[f"R_{k}"], value, rtol=1e-6, atol=0, err_msg="value")
    if deriv is not None:  # at the zeros: exactly the convention
        np.testing.assert_allclose(g[f"K_{k}"], deriv, rtol=1e-6, atol=0, err_msg="derivative")
        zero = KINK == 0
        assert np.array_equal(g[f"K_{k}"][zero], deriv[zero].astype(dtype))
    if name == "prelu":  # d/da is the negative part of the input: 0 at the zeros
        assert g["a"] == pytest.approx(KINK[KINK < 0].sum(), rel=1e-6)


def test_case_covers_every_function_listed_in_the_docs():
    f, wrt, arrays = case()
    names = {type(e).__name__ for e in sp.preorder_traversal(f)}
    for fn in ("relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "gelu_tanh", "silu",
               "softplus", "sigmoid", "Heaviside", "Piecewise"):
        assert fn in names, fn
    assert {s.name for s in f.free_symbols} - {"N"} == set(arrays)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parallel_kernel_is_the_cpu_kernel(dtype):
    """So the cpu results above hold for 'parallel': the sources differ only in the
    header's target name and the parallel=True flag (no prange at these sizes)."""
    from symbp.backends import numba_cpu
    from symbp.passes import optimize

    f, wrt, _ = case()
    p = optimize(sb.compile(f, wrt, target="numpy").program)
    cpu, _ = numba_cpu.generate(p, dtype, "cpu")
    par, _ = numba_cpu.generate(p, dtype, "parallel")
    assert "prange(" not in par.split("def loss_and_grad")[1]
    assert par.replace(", parallel=True", "").replace("target parallel", "target cpu") == cpu
