"""Any valid SymPy name works on every target; one name for two symbols is a clear error.

The generated modules have globals of their own (``numpy``, ``scipy``, ``DTYPE``; ``np``,
``math``, ``DT``, ``_gemm``; ``cuda``, ...) and Python has builtins: a user symbol spelled
like one of them must not shadow it.  Each name is tried in every role a name has (a
scalar, a matrix, a size in a shape) on every CPU target, against the same program with
plain names on the NumPy reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import sympy as sp

import symbp as sb
from symbp.backends import identifiers
from symbp.backends import numpy as numpy_backend
from symbp.errors import SymbpError
from symbp.matrix import Total

pytest.importorskip("numba")
from symbp.backends import numba_cpu, numba_cuda  # noqa: E402

# every global of each target's generated module, builtins the generated code calls,
# keywords, and the names the call itself takes (fn(self=..), step(params, ...))
COMMON = {"self", "params", "lambda", "sum", "print", "exp", "loss_and_grad", "forward"}
NAMES = {
    "numpy": sorted(numpy_backend.RESERVED | numba_cuda._RESERVED | COMMON),
    "cpu": sorted(numba_cpu._RESERVED | COMMON),
    "parallel": sorted(numba_cpu._RESERVED | COMMON),
}
TARGETS = list(NAMES)


def _program(role: str, names):
    """A loss that reads every name in ``role``, beside functions whose code calls module
    globals (erf -> scipy.special / math, sigmoid, tanh, softmax-CE, np.zeros, a mean)."""
    R = sp.Symbol("R")
    W = sp.MatrixSymbol("W", 2, 2)
    X, T = sp.MatrixSymbol("X", R, 2), sp.MatrixSymbol("T", R, 2)
    a = sp.Symbol("a", real=True)
    params, terms = [W, a], []
    for k, n in enumerate(names):
        if role == "scalar":
            s = sp.Symbol(n, real=True)
            params.append(s)
            terms.append((k + 1) * s**2)
        elif role == "matrix":
            M = sp.MatrixSymbol(n, R, 2)
            params.append(M)
            terms.append(Total(M) * (k + 1))
        else:  # a size
            d = sp.Symbol(n)
            terms.append(Total(sp.MatrixSymbol(f"A{k}", d, 2)) * a / d)
    Z = X * W
    loss = sb.softmax_cross_entropy(sb.gelu(Z), T) + sb.mse(sb.sigmoid(Z), sb.tanh(T))
    return loss + sp.Add(*terms), params


def _arrays(role, names, rng):
    out = {"W": rng.normal(size=(2, 2)), "X": rng.normal(size=(3, 2)),
           "T": np.eye(3, 2), "a": 0.5}
    for k, n in enumerate(names):
        if role == "scalar":
            out[n] = float(rng.normal())
        elif role == "matrix":
            out[n] = rng.normal(size=(3, 2))
        else:
            out[f"A{k}"] = rng.normal(size=(k % 3 + 2, 2))
    return out


@pytest.mark.parametrize("role", ["scalar", "matrix", "size"])
@pytest.mark.parametrize("target", TARGETS)
def test_reserved_names_work_on_every_target(target, role):
    names = NAMES[target]
    plain = [f"q{k}" for k in range(len(names))]
    got_arrays = _arrays(role, names, np.random.default_rng(0))
    ref_arrays = dict(zip(_arrays(role, plain, np.random.default_rng(0)),
                          got_arrays.values()))
    loss, params = _program(role, names)
    ref_loss, ref_params = _program(role, plain)
    value, grads = sb.compile(loss, params, target=target)(**got_arrays)
    ref_value, ref_grads = sb.compile(ref_loss, ref_params)(**ref_arrays)
    assert value == pytest.approx(ref_value, rel=1e-12)
    for w, r in zip(params, ref_params):
        np.testing.assert_allclose(grads[w.name], ref_grads[r.name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("target", TARGETS)
def test_forward_takes_a_symbol_named_self(target):
    s = sp.MatrixSymbol("self", sp.Symbol("N"), 2)
    fn = sb.compile_forward(sb.tanh(s), target=target)
    x = np.linspace(-1, 1, 6).reshape(3, 2)
    np.testing.assert_allclose(fn(self=x), np.tanh(x))


@pytest.mark.parametrize("reserved", [numpy_backend.RESERVED, numba_cpu._RESERVED,
                                      numba_cuda._RESERVED])
def test_identifiers_avoid_reserved_and_builtin_names(reserved):
    names = [sp.Symbol(n) for n in sorted(reserved | {"max", "lambda", "x"})]
    ids = identifiers(names, reserved)
    assert len(set(ids.values())) == len(names)
    for s in ids.values():
        assert s.isidentifier() and s not in reserved and s not in ("max", "lambda")
    assert ids[sp.Symbol("x")] == "x"  # an ordinary name stays as written


# --- one name, two symbols ----------------------------------------------------------------

N = sp.Symbol("N")
X = sp.MatrixSymbol("X", N, 2)
W = sp.MatrixSymbol("W", 2, 1)


@pytest.mark.parametrize("make, shown", [
    # a size in the shapes and a positive N in the formula
    (lambda: (Total(sb.tanh(X * W)) / sp.Symbol("N", positive=True), W),
     ["Symbol('N')", "Symbol('N', positive=True)", "shape of X"]),
    # two shapes with different N
    (lambda: (Total(X * W) + Total(sp.MatrixSymbol("Y", sp.Symbol("N", integer=True), 1)), W),
     ["Symbol('N', integer=True)", "shape of Y"]),
    # a scalar and a matrix of one name
    (lambda: (Total(X * W) * sp.Symbol("X"), W), ["X: a N×2 matrix", "Symbol('X')"]),
    # a parameter the loss does not read, whose shape has another N
    (lambda: (Total(X * W), [W, sp.MatrixSymbol("V", sp.Symbol("N", integer=True), 1)]),
     ["Symbol('N', integer=True)", "shape of V"]),
])
@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_two_symbols_one_name_is_an_error_naming_both(make, shown, target):
    loss, wrt = make()
    with pytest.raises(SymbpError, match="two different symbols are both named") as err:
        sb.compile(loss, wrt, target=target)
    assert "rename one" in str(err.value)
    for s in shown:
        assert s in str(err.value)
