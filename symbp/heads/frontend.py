"""SymPy's own matrix forms that a user writes but a Program never holds: each lowers to
the heads above (a sum of matrices is a map, ``OneMatrix·b`` a broadcast, ...)."""

from __future__ import annotations

import sympy as sp
from sympy.matrices.expressions.applyfunc import ElementwiseApplyFunction
from sympy.matrices.expressions.matexpr import MatrixExpr

from ..errors import UnsupportedError
from ..matrix import is_matrix, placeholders
from . import register


def bias_row(term):
    """``b`` for a term ``1·b`` of a sum (the bias, broadcast by the map), else the term."""
    if (isinstance(term, sp.MatMul) and len(term.args) == 2
            and isinstance(term.args[0], sp.OneMatrix) and term.args[0].shape[1] == 1
            and is_matrix(term.args[1]) and term.args[1].shape[0] == 1):
        return term.args[1]
    return term


def _sum(lw, e):
    # A + B + 1·b: one map, the bias row broadcast down the rows
    args = [lw.L(bias_row(a)) for a in e.args]
    v = placeholders(len(args))
    return lw.map(sp.Lambda(v, sp.Add(*v)), tuple(e.shape), args)


def _hadamard(lw, e):
    args = [lw.L(a) for a in e.args]
    v = placeholders(len(args))
    return lw.map(sp.Lambda(v, sp.Mul(*v)), tuple(e.shape), args)


def _power(lw, e):
    v = placeholders(2)
    return lw.map(sp.Lambda(v, v[0] ** v[1]), tuple(e.shape), [lw.L(e.args[0]), lw.L(e.args[1])])


def _apply(lw, e):
    f = e.function
    v = placeholders(1)
    lam = f if isinstance(f, sp.Lambda) else sp.Lambda(v, f(v[0]))
    return lw.map(lam, tuple(e.shape), [lw.L(e.expr)])


def _filled(value):
    return lambda lw, e: lw.map(sp.Lambda((), sp.Integer(value)), tuple(e.shape), [])


def _unsupported(lw, e):
    raise UnsupportedError(
        f"symbp cannot differentiate the matrix head {type(e).__name__} in {e}: "
        "write it with products, sums, elementwise functions, softmax or transposes"
    )


_none = lambda e: []  # noqa: E731
register(sp.MatAdd, front_end=True, lower=_sum, children=lambda e: [bias_row(a) for a in e.args])
register(sp.HadamardProduct, front_end=True, lower=_hadamard, children=lambda e: list(e.args))
register(sp.HadamardPower, front_end=True, lower=_power, children=lambda e: list(e.args))
register(ElementwiseApplyFunction, front_end=True, lower=_apply, children=lambda e: [e.expr])
register(sp.OneMatrix, front_end=True, lower=_filled(1), children=_none)
register(sp.ZeroMatrix, front_end=True, lower=_filled(0), children=_none,
         entry=lambda ix, e, i, j: sp.Integer(0))
# constants the compiled function binds itself (a map's body sees entries, not indices,
# so it cannot write a diagonal)
register(sp.Identity, front_end=True, lower=lambda lw, e: lw.constant(e), children=_none)
register(sp.MatrixBase, front_end=True, lower=lambda lw, e: lw.constant(e), children=_none)
register(MatrixExpr, front_end=True, lower=_unsupported, children=_none)
