"""One class is a whole function row.

Two rows are defined here and nowhere in symbp: ``mish`` (x·tanh(softplus(x)), with a
stable ``rule`` that reuses softplus's) and ``hardtanh`` (x clipped to [lo, hi], three
arguments, two of them optional, and no ``rule``: its formula is what code computes).  With
no other edit they differentiate (``sb.grad`` against ``sympy.diff`` of the formula),
compile on every target (values against NumPy written here by hand, gradients against its
central differences), print in ``derive``, LaTeX and plain text, parse, choose their layer's
initialisation, and are listed by ``symbp derive --help``.

The rows are defined inside a fixture and removed afterwards, so the other test modules
see symbp's own table.  CUDA runs on Numba's simulator in a subprocess (``python
tests/test_function_rows.py cuda`` with NUMBA_ENABLE_CUDASIM=1), as tests/test_nan.py does.
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
from conftest import have, need

import symbp as sb
from symbp import functions as F

N = sp.Symbol("N")
x, lo, hi, w = sp.symbols("x lo hi w", real=True)


def define_rows():
    """The two new rows: class statements, nothing else."""

    class mish(F.Activation):
        """x·tanh(softplus(x)) (Misra 2019)."""

        latex_name, text, init = r"\operatorname{Mish}", "Mish", "he"
        nargs = 1

        @staticmethod
        def formula(x):
            return x * sp.tanh(sp.log(1 + sp.exp(x)))

        @staticmethod
        def rule(x):
            return x * sp.tanh(F.softplus(x))  # softplus's own stable rule: no e^x overflow

        def fdiff(self, argindex=1):
            x = self.args[0]
            t = sp.tanh(F.softplus(x))
            return t + x * (1 - t**2) * F.sigmoid(x)

    class hardtanh(F.Activation):
        """x clipped to [lo, hi]."""

        latex_name = r"\operatorname{HardTanh}"
        nargs, cost = 3, 1

        def __new__(cls, x, lo=-1, hi=1):
            return super().__new__(cls, x, lo, hi)

        @staticmethod
        def formula(x, lo, hi):
            return sp.Max(lo, sp.Min(hi, x))

        def fdiff(self, argindex=1):
            x, lo, hi = self.args
            return [sp.Piecewise((0, x <= lo), (0, x >= hi), (1, True)),
                    sp.Piecewise((1, x <= lo), (0, True)),
                    sp.Piecewise((0, x <= lo), (1, x >= hi), (0, True))][argindex - 1]

    return mish, hardtanh


def forget(*rows):
    for row in rows:
        F.ROWS.pop(row.__name__, None)
        F.FUNCTIONS.pop(row.__name__, None)


@pytest.fixture(scope="module")
def rows():
    made = define_rows()
    yield made
    forget(*made)


# --- the network every target compiles, and its reference in NumPy by hand ---------------

X, W, T = sp.MatrixSymbol("X", N, 3), sp.MatrixSymbol("W", 3, 2), sp.MatrixSymbol("T", N, 2)


def loss(mish, hardtanh):
    Z = X * W
    return sb.mse(mish(Z), T) + sb.Total(hardtanh(Z, lo, hi)) + mish(lo) * hi


def reference(W_, lo_, hi_, X_, T_):
    """The loss in NumPy from the rows' definitions (softplus through logaddexp)."""
    Z = X_ @ W_
    mish_ = lambda z: z * np.tanh(np.logaddexp(0.0, z))  # noqa: E731
    return (np.mean((mish_(Z) - T_) ** 2) + np.sum(np.clip(Z, lo_, hi_))
            + mish_(lo_) * hi_)


def arrays(scale=1.0):
    rng = np.random.default_rng(7)
    return {"X": scale * rng.normal(size=(5, 3)), "W": rng.normal(size=(3, 2)),
            "T": rng.normal(size=(5, 2)), "lo": -0.4, "hi": 0.6}


def central_differences(a, h=1e-6):
    """∂reference/∂(W, lo, hi) by central differences in float64."""
    def f(W_, lo_, hi_):
        return reference(W_, lo_, hi_, a["X"], a["T"])
    gW = np.zeros_like(a["W"])
    for i in np.ndindex(a["W"].shape):
        up, dn = a["W"].copy(), a["W"].copy()
        up[i] += h
        dn[i] -= h
        gW[i] = (f(up, a["lo"], a["hi"]) - f(dn, a["lo"], a["hi"])) / (2 * h)
    glo = (f(a["W"], a["lo"] + h, a["hi"]) - f(a["W"], a["lo"] - h, a["hi"])) / (2 * h)
    ghi = (f(a["W"], a["lo"], a["hi"] + h) - f(a["W"], a["lo"], a["hi"] - h)) / (2 * h)
    return {"W": gW, "lo": glo, "hi": ghi}


def run(target, mish, hardtanh, scale=1.0):
    """(value, grads) of the loss compiled for ``target``, float64, as plain lists."""
    opts = {"tile": 4, "block": 8} if target == "cuda" else {}
    fn = sb.compile(loss(mish, hardtanh), [W, lo, hi], target=target, dtype=np.float64, **opts)
    v, g = fn(**arrays(scale))
    return {"value": float(v), "source": fn.source,
            **{k: np.asarray(g[k], dtype=np.float64).tolist() for k in ("W", "lo", "hi")}}


def check_against_reference(got):
    a = arrays()
    want = reference(a["W"], a["lo"], a["hi"], a["X"], a["T"])
    assert got["value"] == pytest.approx(want, rel=1e-12)
    for k, d in central_differences(a).items():
        np.testing.assert_allclose(got[k], d, rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("target", ["numpy", "cpu", "parallel"])
def test_new_rows_compile_and_match_central_differences(rows, target):
    got = run(target, *rows)
    check_against_reference(got)
    if target != "numpy":
        src = got["source"]
        # mish's routine is its rule (softplus's routine, also in the module), hardtanh's
        # its formula
        assert "def _mish(x):" in src and "_softplus(x)" in src and "def _softplus(x):" in src
        assert "def _hardtanh(x, lo, hi):" in src and "_max(lo, _min(hi, x))" in src
    else:
        assert "log1p" in got["source"]  # softplus's rule inside mish's, not log(1 + e^x)


def _cuda_results() -> dict:
    need(have("numba.cuda"), "cuda-simulator")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    p = subprocess.run([sys.executable, __file__, "cuda"], cwd=Path(__file__).parent.parent,
                       env=env, text=True, capture_output=True, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"tests/test_function_rows.py cuda failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_new_rows_on_the_cuda_simulator(rows):
    got = _cuda_results()
    check_against_reference(got["moderate"])
    assert "def _mish(x):" in got["moderate"]["source"]
    assert np.isfinite(got["large"]["value"]), got["large"]


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_mish_stays_finite_at_plus_minus_800(rows, target):
    mish, _ = rows
    Z = sp.MatrixSymbol("Z", N, 2)
    fn = sb.compile(sb.Total(mish(Z)), [Z], target=target, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the rule overflows nowhere
        v, g = fn(Z=np.array([[800.0, -800.0], [30.0, -30.0]]))
    assert v == pytest.approx(800 + 30 - 30 * math.tanh(math.log1p(math.exp(-30))), rel=1e-12)
    np.testing.assert_allclose(g["Z"], [[1.0, 0.0], [1.0, 0.0]], atol=1e-11)


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_nan_reaches_the_new_rows(rows, target):
    mish, hardtanh = rows
    Z = sp.MatrixSymbol("Z", N, 2)
    fn = sb.compile(sb.Total(mish(Z) + hardtanh(Z)), [Z], target=target, dtype=np.float64)
    v, g = fn(Z=np.array([[math.nan, 0.5]]))
    assert math.isnan(v) and math.isnan(g["Z"][0, 0]) and not math.isnan(g["Z"][0, 1])


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_a_rule_that_calls_itself_is_refused_by_name(target):
    class ouroboros(F.Activation):
        nargs = 1

        @staticmethod
        def formula(x):
            return x

        @staticmethod
        def rule(x):
            return 2 * ouroboros(x) - x

    try:
        with pytest.raises(sb.SymbpError, match=r"rule of ouroboros calls itself"):
            sb.compile(ouroboros(w) * w, [w], target=target)
    finally:
        forget(ouroboros)


# --- symbolic: derivatives, printing, parsing, layers, help --------------------------------

POINTS = [-2.3, -0.7, -0.05, 0.3, 0.8, 1.9]  # off hardtanh's kinks at lo = -1, hi = 1


def test_grad_matches_sympy_diff_of_the_formula(rows):
    mish, hardtanh = rows
    for e in (mish(w * x), hardtanh(w * x, lo, hi)):
        ref = type(e).formula(*e.args)
        for v in sorted(e.free_symbols, key=str):
            mine, theirs = sb.grad(e, v), sp.diff(ref, v)
            for p in POINTS:
                at = {x: p, w: 1.0, lo: -1.0, hi: 1.0}
                assert float(mine.subs(at)) == pytest.approx(float(theirs.subs(at)),
                                                             rel=1e-12, abs=1e-14), (e, v, p)


def test_latex_text_and_derive(rows):
    from symbp.printing.tex import TextPrinter

    mish, hardtanh = rows
    assert sp.latex(mish(x)) == r"\operatorname{Mish}\left(x\right)"
    assert sp.latex(hardtanh(x)) == r"\operatorname{HardTanh}\left(x, -1, 1\right)"
    assert TextPrinter().doprint(mish(x)) == "Mish(x)"
    d = sb.derive(mish(w * x), [w], at={w: 0.5, x: 2.0})
    assert "Mish(" in d.text() and r"\operatorname{Mish}" in d.latex()


def test_parse_knows_the_new_rows_and_their_arity(rows):
    from symbp.errors import SymbpError
    from symbp.parse import parse_expr

    mish, hardtanh = rows
    e, s = parse_expr("mish(w*x) + hardtanh(x, -2, 2) + hardtanh(w)")
    assert e == mish(s["w"] * s["x"]) + hardtanh(s["x"], -2, 2) + hardtanh(s["w"])
    with pytest.raises(SymbpError, match="mish takes 1 argument"):
        parse_expr("mish(x, 2)")
    with pytest.raises(SymbpError, match="hardtanh takes 1 to 3 argument"):
        parse_expr("hardtanh(x, 1, 2, 3)")


def test_layer_initialisation_comes_from_the_row(rows):
    from symbp import nn

    def first_weights(act):
        return nn.mlp([4, 64, 3], act, seed=3).params["W1"]

    assert np.array_equal(first_weights("mish"), first_weights("relu"))  # He
    assert np.array_equal(first_weights("hardtanh"), first_weights("sigmoid"))  # Glorot


def test_cost_comes_from_the_row(rows):
    from symbp.backends import numba_cpu

    mish, hardtanh = rows
    assert numba_cpu._cost(hardtanh(x)) == 1 and numba_cpu._cost(mish(x)) == 20


def test_cli_help_lists_the_new_rows(rows, capsys):
    from symbp import cli

    with pytest.raises(SystemExit):
        cli.main(["derive", "--help"])
    out = capsys.readouterr().out
    assert " mish " in out and "hardtanh(x, lo, hi)" in out


if __name__ == "__main__":  # the CUDA simulator's run: python tests/test_function_rows.py cuda
    assert sys.argv[1:] == ["cuda"] and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    sys.path.insert(0, str(Path(__file__).parent))
    import simulator
    from cuda_numerics import _ieee

    simulator.fast()

    # the simulator runs kernels with Python's math, which raises where a GPU overflows
    math.exp, math.expm1 = _ieee(math.exp), _ieee(math.expm1)
    math.log, math.log1p = _ieee(math.log, at_zero=-math.inf), _ieee(math.log1p)
    made = define_rows()
    print(json.dumps({"moderate": run("cuda", *made), "large": run("cuda", *made, scale=300.0)}))
