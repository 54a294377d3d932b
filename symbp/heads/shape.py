"""Reshape: the same entries, in the same (C, row-major) order, under another shape.
``flatten`` turns a batch of N images, N×C×H×W, into the N×(C·H·W) matrix a dense layer
reads."""

from __future__ import annotations

import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr

from ..errors import ShapeError
from ..matrix import _pretty_call, _ScalarArith, as_array, is_matrix, same_dim, shape_text
from ..vjp import broadcast
from . import register


def _size(shape):
    return sp.Mul(*[sp.sympify(d) for d in shape])


class Reshape(_ScalarArith, MatrixExpr):
    """``Reshape(X, shape)``: X's entries in row-major order, read as an array of ``shape``."""

    def __new__(cls, M, shape):
        M = as_array(sp.sympify(M))
        if not is_matrix(M):
            raise ShapeError(f"reshape needs an array, got the scalar {M}")
        shape = sp.Tuple(*[sp.sympify(d) for d in shape])
        if not same_dim(_size(M.shape), _size(shape)):
            raise ShapeError(f"cannot reshape {M} of shape {shape_text(M.shape)} "
                             f"({_size(M.shape)} entries) to {shape_text(shape)} "
                             f"({_size(shape)} entries)")
        return super().__new__(cls, M, shape)

    @property
    def shape(self):
        return tuple(self.args[1])

    def _is_flatten(self) -> bool:
        return len(self.shape) == 2 and self.shape[0] == self.args[0].shape[0]

    def _name(self) -> str:
        return "flatten" if self._is_flatten() else "reshape"

    def _sympystr(self, printer):
        if self._is_flatten():
            return f"flatten({printer._print(self.args[0])})"
        return f"reshape({printer._print(self.args[0])}, {shape_text(self.shape)})"

    def _pretty(self, printer):
        return _pretty_call(printer, self._name(), self.args[0])

    def _latex(self, printer):
        return r"\operatorname{%s}\left(%s\right)" % (self._name(), printer._print(self.args[0]))


def flatten(X) -> Reshape:
    """N×C×H×W images as the N×(C·H·W) matrix a dense layer reads (row-major, as
    PyTorch's ``flatten(1)``)."""
    X = as_array(sp.sympify(X))
    if not is_matrix(X):
        raise ShapeError(f"flatten needs an array, got the scalar {X}")
    return Reshape(X, (X.shape[0], _size(X.shape[1:])))


def reshape(X, *shape) -> Reshape:
    """X's entries, row-major, as an array of ``shape`` (the same number of entries)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape(X, shape)


def numpy(ctx, a):
    return f"numpy.ascontiguousarray({ctx.op(a.expr.args[0])}).reshape({ctx.shape(a.expr.shape)})"


def cpu(gen, a):
    # a copy through flat views: both sides are C-contiguous, so entry k is entry k
    gen.head(a)
    x, y = gen.ids[a.expr.args[0]], gen.buffer(a.name)
    n = gen.idx(_size(a.expr.shape))
    gen.emit(f"_fx = {x}.reshape({n})")
    gen.emit(f"_fy = {y}.reshape({n})")
    gen.emit(gen.loop("_k", _size(a.expr.shape), 0, 1))
    gen.emit("_fy[_k] = _fx[_k]", 2)


def entry(ix, e, *index):
    # back to N×(C·H·W) (a flatten's adjoint): entry (n, c, i, j) is column c·H·W + i·W + j
    from ..printing.formulas import _NoEntry

    M = e.args[0]
    if len(M.shape) != 2 or not same_dim(M.shape[0], e.shape[0]) or len(index) < 2:
        raise _NoEntry("index form: only a reshape back to a batch of rows has one")
    col, step = sp.Integer(0), sp.Integer(1)
    for k, d in zip(reversed(index[1:]), reversed(e.shape[1:])):
        col, step = col + k * step, step * d
    return ix.entry(M, index[0], col)


register(Reshape, lower=lambda lw, e: lw.emit(Reshape(lw.L(e.args[0]), e.shape), e.shape),
         children=lambda e: [e.args[0]], operands=lambda e: [e.args[0]],
         rebuild=lambda e, ops: Reshape(ops[0], e.shape),
         # the adjoint is reshaped back: entry k of ȳ belongs to entry k of x
         vjp=lambda e, y, g, wants, local=None: [
             (e.args[0], Reshape(broadcast(g, e.shape), e.args[0].shape))],
         numpy=numpy, cpu=cpu, label=lambda e: e._name(), entry=entry,
         doc="reshape (flatten)")
