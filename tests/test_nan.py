"""NaN in, NaN out: every target gives NaN wherever the NumPy reference does.

A NaN input (or a probability out of range) must reach the loss, or a training loop's
NaN guard never fires.  For every function of ``symbp.functions.FUNCTIONS`` (plus exp,
log, softmax, log_softmax) under a sum, and every loss, a NaN is put in one entry of one
input at a time; the value and every gradient must equal the NumPy reference's, NaN for
NaN (finite entries to rounding).  The tables are read here, so a new function gets the
test for free.  The CUDA backend runs the same table on Numba's simulator in a subprocess
(``python tests/test_nan.py cuda`` with NUMBA_ENABLE_CUDASIM=1), which reports its results
as JSON.

One compiled function per (case, target), float64, 3×4 arrays: Numba compile time stays
about a second per kernel.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

import symbp as sb
from symbp.backends import numba_cpu, numba_cuda
from symbp.backends.numpy import NumpyPrinter
from symbp.functions import FUNCTIONS
from symbp.matrix import Total, elementwise

N = sp.Symbol("N")
ROWS, COLS = 3, 4
X = sp.MatrixSymbol("X", N, COLS)
A = sp.MatrixSymbol("A", 1, COLS)  # a per-unit parameter (PReLU's slope)
Y, T = sp.MatrixSymbol("Y", N, COLS), sp.MatrixSymbol("T", N, COLS)


def _of_x(f):
    """f applied to X, with a (1, C) parameter row where f needs a second argument."""
    try:
        return f(X)
    except TypeError:
        return f(X, A)


# name -> (builder of a scalar loss, inputs in (0, 1): log and probabilities need them)
CASES: dict = {}
for _name, _f in FUNCTIONS.items():
    CASES[_name] = (lambda f=_f: Total(_of_x(f)), False)
for _name, _f in {"exp": sb.exp, "log": sb.log, "softmax": sb.softmax,
                  "log_softmax": sb.log_softmax}.items():
    CASES[_name] = (lambda f=_f: Total(f(X)), _name == "log")
for _name, _f, _unit in [("mse", sb.mse, False),
                         ("binary_cross_entropy", sb.binary_cross_entropy, True),
                         ("bce_with_logits", sb.bce_with_logits, False),
                         ("cross_entropy", sb.cross_entropy, True),
                         ("softmax_cross_entropy", sb.softmax_cross_entropy, False)]:
    CASES[_name] = (lambda f=_f: f(Y, T), _unit)

# heads a user writes in a formula: NaN-propagating Max/Min, Abs (its derivative is sign),
# a Piecewise whose conditions all fail at NaN (undefined there: NaN, as NumPy's select)
for _name, _body in [
    ("Max_Min_Abs", lambda x: sp.Max(x, sp.Rational(1, 4)) + sp.Min(x, -x / 2) + sp.Abs(x)),
    ("Piecewise_without_default", lambda x: sp.Piecewise((x, x > 0), (x**2, x < 0))),
]:
    CASES[_name] = (lambda b=_body: Total(elementwise(b, X)), False)
# Max/Min of two inputs: SymPy puts a number first, so only here can the NaN stand first
# (Python's max(NaN, y) is y)
for _name, _head in [("Max_of_two", sp.Max), ("Min_of_two", sp.Min)]:
    CASES[_name] = (lambda h=_head: Total(elementwise(h, X, Y)), False)

TARGETS = ["numpy", "cpu", "parallel", "cuda"]
AT = (1, 1)  # the entry that gets the NaN (row 0 of a 1×C parameter)


def build(name):
    f = CASES[name][0]()
    wrt = sorted(f.atoms(sp.MatrixSymbol), key=lambda s: s.name)
    return f, wrt


def inputs(program, name, seed=0):
    """Arrays for every input: (0.1, 0.9) where the case needs it, else (−1, 1)."""
    rng = np.random.default_rng(seed)
    lo = 0.1 if CASES[name][1] else -1.0
    out = {}
    for s in program.inputs:
        shape = tuple(int(sp.sympify(d).subs(N, ROWS)) for d in s.shape)
        out[s.name] = rng.uniform(lo, 0.9, shape)
    return out


def variants(program, name):
    """(label, arrays): a NaN in one entry of each input in turn; for BCE also p = 1.5."""
    base = inputs(program, name)
    for k in base:
        arrays = {n: v.copy() for n, v in base.items()}
        arrays[k][min(AT[0], arrays[k].shape[0] - 1), AT[1]] = math.nan
        yield f"nan in {k}", arrays
    if name == "binary_cross_entropy":
        arrays = {n: v.copy() for n, v in base.items()}
        arrays["Y"][AT] = 1.5  # log(1 − p) of a negative number
        yield "p = 1.5", arrays


def run(fn, arrays) -> dict:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        v, g = fn(**arrays)
    return {"value": float(v), **{k: np.asarray(x, dtype=np.float64).tolist()
                                  for k, x in g.items()}}


def results(name, target) -> dict:
    """label -> {value, gradient by name} of case ``name`` compiled for ``target``."""
    f, wrt = build(name)
    opts = {"tile": 4, "block": 8} if target == "cuda" else {}
    fn = sb.compile(f, wrt, target=target, dtype=np.float64, **opts)
    ref = sb.compile(f, wrt, target="numpy", dtype=np.float64)
    return {label: run(fn, arrays) for label, arrays in variants(ref.program, name)}


_reference: dict = {}


def reference(name) -> dict:
    if name not in _reference:
        _reference[name] = results(name, "numpy")
    return _reference[name]


_cuda: dict = {}


def cuda_results() -> dict:
    """Every case on the CUDA simulator, from one subprocess (numba must load with it on)."""
    if not _cuda:
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
        p = subprocess.run([sys.executable, __file__, "cuda"], cwd=Path(__file__).parent.parent,
                           env=env, text=True, capture_output=True, timeout=600)
        if p.returncode != 0:
            pytest.fail(f"tests/test_nan.py cuda failed:\n{p.stderr[-3000:]}")
        _cuda.update(json.loads(p.stdout.strip().splitlines()[-1]))
    return _cuda


def _same(got, want, what):
    # NaN exactly where the reference has NaN; other entries equal to rounding
    np.testing.assert_allclose(np.asarray(got, float), np.asarray(want, float), rtol=1e-9,
                               atol=1e-12, equal_nan=True, err_msg=what)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(CASES))
def test_nan_reaches_value_and_gradients_as_in_numpy(name, target):
    want = reference(name)
    got = cuda_results()[name] if target == "cuda" else results(name, target)
    assert set(got) == set(want)
    for label, w in want.items():
        for key in w:
            _same(got[label][key], w[key], f"{name} on {target}, {label}: {key}")
        arg = "Y" if name in ("mse", "binary_cross_entropy", "bce_with_logits",
                              "cross_entropy", "softmax_cross_entropy") else "X"
        if label in (f"nan in {arg}", "p = 1.5"):  # the function's own input: the loss is NaN
            assert math.isnan(got[label]["value"]), (name, target, label, got[label]["value"])


# --- the printed rules themselves, evaluated as Python at NaN (no compiling) -------------

_x = sp.Symbol("x", real=True)
HEADS = {
    "Heaviside": sp.Heaviside(_x), "Heaviside(x, 0)": sp.Heaviside(_x, 0),
    "Heaviside(x, 1)": sp.Heaviside(_x, 1), "sign": sp.sign(_x), "Abs": sp.Abs(_x),
    "Max": sp.Max(_x, -100), "Min": sp.Min(1, _x), "Max of 3": sp.Max(_x, 0, _x**2 - 1),
    "Piecewise": sp.Piecewise((1, _x > 0), (2, _x < 0)),
}


def _printed(printer: str, e):
    """The text a backend prints for ``e`` and the namespace it runs in."""
    import types

    ns = {"math": math, "numpy": np, "DT": np.float64, "_DT": np.float64,
          "float64": np.float64, "cuda": types.SimpleNamespace(jit=lambda *a, **k: lambda f: f)}
    if printer == "numpy":
        return NumpyPrinter({"fully_qualified_modules": True}).doprint(e), ns
    if printer == "cpu":
        table, pr = numba_cpu.HELPERS, numba_cpu.NumbaPrinter({_x: "x"})
    else:
        table, pr = numba_cuda._HELPERS, numba_cuda.CudaPrinter("float64", set())
    for src in table.values():
        exec(src, ns)  # the backend's own helper table, not user text
    return pr.doprint(e), ns


@pytest.mark.parametrize("printer", ["numpy", "cpu", "cuda"])
@pytest.mark.parametrize("head", list(HEADS))
def test_printed_heads_pass_nan_through(head, printer):
    code, ns = _printed(printer, HEADS[head])
    got = eval(code, dict(ns, x=np.float64(math.nan)))  # our printer's output
    assert math.isnan(got), (head, printer, code, got)


TABLES = {
    ("cpu", "float64"): numba_cpu.HELPERS,
    ("cpu", "float32"): {**numba_cpu.HELPERS, **numba_cpu.HELPERS_F32},  # Eigen's tanh
    ("cuda", "float32"): numba_cuda._HELPERS,
}


@pytest.mark.parametrize("backend, dtype", list(TABLES))
def test_every_helper_passes_nan_through(backend, dtype):
    # each routine of the backend's table, as Python, with NaN in each argument in turn
    import inspect

    table = TABLES[backend, dtype]
    _, ns = _printed(backend, _x)
    ns.update(DT=getattr(np, dtype), _DT=getattr(np, dtype))
    for name, src in table.items():
        exec(src, ns)  # the backend's own table, not user text
        f = ns[f"_{name}"]
        k = len(inspect.signature(f).parameters)
        for i in range(k):
            args = [getattr(np, dtype)(0.5)] * k
            args[i] = getattr(np, dtype)(math.nan)
            with np.errstate(all="ignore"):
                got = f(*args)
            # a slope argument is read only below 0: leaky_relu(0.5, NaN) = 0.5 in NumPy too
            if i == 0 or name in ("max", "min"):
                assert math.isnan(got), (backend, dtype, name, i, got)


def test_every_function_row_has_a_case():
    assert set(FUNCTIONS) <= set(CASES)


if __name__ == "__main__":  # the CUDA simulator's run: python tests/test_nan.py cuda
    assert sys.argv[1:] == ["cuda"] and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    sys.path.insert(0, str(Path(__file__).parent))
    import simulator
    from cuda_numerics import _ieee

    simulator.fast()

    # the simulator runs kernels with Python's math, which raises where a GPU returns
    # NaN or ±inf (log(1 − 1.5), exp(1000))
    math.exp, math.expm1 = _ieee(math.exp), _ieee(math.expm1)
    math.log, math.log1p = _ieee(math.log, at_zero=-math.inf), _ieee(math.log1p)
    print(json.dumps({name: results(name, "cuda") for name in CASES}))
