"""The head registry: every head is defined once, and a new one needs nothing else.

``RowMax`` below (the reduction inside max-pooling: the largest entry of each row) is
defined only in this file, as a new contributor would write it: its class, and one
``register`` call with its rules.  With no other edit it must lower, verify,
differentiate, print, draw, compile on numpy and cpu/parallel, and pass a gradient check;
a backend it gives no rule for must say so before compiling anything.
"""

import ast
import pathlib

import numpy as np
import pytest
import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr

import symbp as sb
from symbp.errors import UnsupportedError
from symbp.heads import REGISTRY, lacking, register, rule
from symbp.matrix import Elementwise, make_map

N = sp.Symbol("N", integer=True, positive=True)
_G, _Z, _Y = sp.symbols("_g _z _y", real=True)


class RowMax(MatrixExpr):
    """max_j Z_ij: an N×1 column."""

    def __new__(cls, Z):
        return super().__new__(cls, Z)

    @property
    def shape(self):
        return (self.args[0].shape[0], sp.Integer(1))

    def _sympystr(self, printer):
        return f"rowmax({printer._print(self.args[0])})"

    def _latex(self, printer):
        return rf"\max_j {printer._print(self.args[0])}"


def _vjp(e, y, g, wants, local=None):
    # z̄_ij = ḡ_i [z_ij = y_i]: the adjoint goes to the maximum (no ties in these tests)
    Z = e.args[0]
    Y = e if y is None else y
    hit = sp.Piecewise((1, sp.Eq(_Z, _Y)), (0, True))
    return [(Z, make_map(sp.Lambda((_G, _Z, _Y), _G * hit), Z.shape, [g, Z, Y]))]


def _cpu(gen, a):
    gen.head(a)
    Z = a.expr.args[0]
    R, C = Z.shape
    z, y = gen.ids[Z], gen.buffer(a.name)
    gen.emit(gen.loop("_i", R, 0, 1))
    gen.emit(f"_m = {z}[_i, 0]", 2)
    gen.emit(f"for _j in range(1, {gen.idx(C)}):", 2)
    gen.emit(f"if {z}[_i, _j] > _m or {z}[_i, _j] != {z}[_i, _j]:", 3)
    gen.emit(f"_m = {z}[_i, _j]", 4)
    gen.emit(f"{y}[_i, 0] = _m", 2)


@pytest.fixture(scope="module", autouse=True)
def rowmax_registered():
    register(RowMax, lower=lambda lw, e: lw.emit(RowMax(lw.L(e.args[0])), tuple(e.shape)),
             children=lambda e: [e.args[0]], operands=lambda e: [e.args[0]],
             rebuild=lambda e, ops: RowMax(ops[0]), vjp=_vjp,
             numpy=lambda ctx, a: f"numpy.max({ctx.op(a.expr.args[0])}, axis=1, keepdims=True)",
             cpu=_cpu, label=lambda e: "max", doc="the largest entry of each row")
    yield
    del REGISTRY[RowMax]


def _net():
    X = sp.MatrixSymbol("X", N, 4)
    W = sp.MatrixSymbol("W", 4, 5)
    return sb.mse(RowMax(sb.tanh(X * W)), sp.MatrixSymbol("T", N, 1)), W


def _data(rng):
    return {"X": rng.normal(size=(6, 4)), "W": rng.normal(size=(4, 5)),
            "T": rng.normal(size=(6, 1))}


def test_a_new_head_differentiates_and_prints():
    L, W = _net()
    (g,) = sb.grad(L, [W])
    assert "rowmax" in str(g)
    p = sb.gradient_program(L, [W])
    assert any(isinstance(a.expr, RowMax) for a in p.body)
    assert r"\max_j" in sp.latex(L)
    d = sb.derive(L, [W])
    assert "rowmax" in d.text()
    from symbp.printing.graph import to_dot

    assert '"max"' in to_dot(L, wrt=[W]) or ">max<" in to_dot(L, wrt=[W])


@pytest.mark.parametrize("target", ["numpy", "cpu", "parallel"])
def test_a_new_head_compiles_and_passes_a_gradient_check(target):
    L, W = _net()
    rng = np.random.default_rng(0)
    data = _data(rng)
    fn = sb.compile(L, [W], target=target)
    value, grads = fn(**data)
    ref = np.mean((np.max(np.tanh(data["X"] @ data["W"]), axis=1, keepdims=True)
                   - data["T"]) ** 2)
    assert value == pytest.approx(ref, rel=1e-12)
    num = np.zeros_like(data["W"])
    for idx in np.ndindex(*num.shape):  # central differences in float64
        for s in (1, -1):
            d = dict(data, W=data["W"].copy())
            d["W"][idx] += s * 1e-6
            num[idx] += s * fn(**d)[0] / 2e-6
    np.testing.assert_allclose(grads["W"], num, rtol=1e-5, atol=1e-8)


def test_a_backend_names_the_heads_it_lacks_before_compiling():
    L, W = _net()
    p = sb.gradient_program(L, [W])
    assert lacking(p, "cuda") == ["RowMax"]
    assert lacking(p, "cpu") == []
    from symbp.backends import numba_cuda

    with pytest.raises(UnsupportedError, match="RowMax.*'numpy' or 'cpu'"):
        numba_cuda.generate(p)


def test_every_program_head_has_every_rule():
    # the heads symbp ships: nothing missing for any backend or printer
    from symbp.matrix import AxisSum, LogSoftmax, Softmax, SoftmaxCrossEntropy, Total

    for cls in (sp.MatMul, sp.Transpose, Elementwise, AxisSum, Total, Softmax, LogSoftmax,
                SoftmaxCrossEntropy):
        h = REGISTRY[cls]
        for field in ("lower", "vjp", "numpy", "cpu", "cuda", "label"):
            assert getattr(h, field) is not None, (cls.__name__, field)
    assert rule(sp.Symbol("x") + 1).kind == "scalar"


def test_no_isinstance_chains_on_heads_outside_the_registry():
    # the dispatch sites read the registry: none of them tests a head's class itself
    heads = {"MatMul", "Elementwise", "AxisSum", "Total", "Softmax", "LogSoftmax",
             "SoftmaxCrossEntropy"}
    root = pathlib.Path(sb.__file__).parent
    # allowed: transpose algebra (tr pushes Xᵀ through products), a map's body printed in a
    # CUDA doc comment
    allowed = {("vjp.py", "tr"), ("backends/numba_cuda.py", "_doc")}
    offenders = []
    for path in ["ir.py", "vjp.py", "grad.py", "backends/numpy.py", "backends/numba_cpu.py",
                 "backends/numba_cuda.py", "printing/formulas.py", "printing/graph.py"]:
        tree = ast.parse((root / path).read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or (path, fn.name) in allowed:
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
                    names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", "")
                             for n in ast.walk(node.args[1])}
                    if names & heads:
                        offenders.append(f"{path}:{node.lineno} in {fn.name}")
    assert not offenders, offenders
