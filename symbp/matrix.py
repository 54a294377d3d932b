"""Matrix vocabulary that SymPy lacks: elementwise maps with broadcasting, sums, softmax.

Every class here is a genuine SymPy expression (a ``MatrixExpr`` or a scalar ``Expr``), so
it composes with ``MatrixSymbol``, ``MatMul``, ``MatAdd`` and prints with ``sympy.latex``.
The IR reuses the same classes as its heads: a lowered ``Elementwise`` is the fused map a
backend turns into one loop.

Broadcasting follows NumPy for 2-D shapes: an argument of shape (1, C) repeats down the
rows, (R, 1) across the columns, and a scalar everywhere.
"""

from __future__ import annotations

import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr

from .errors import ShapeError

# Placeholders for the arguments of an elementwise body: Lambda((_e0, _e1), _e0*_e1).
# Fixed names (not Dummies) so equal maps compare equal and share in the graph.
_PLACEHOLDERS = [sp.Symbol(f"_e{i}", real=True) for i in range(64)]


def placeholders(n: int) -> tuple[sp.Symbol, ...]:
    """The first ``n`` placeholder symbols used as Lambda variables of maps."""
    while len(_PLACEHOLDERS) < n:
        _PLACEHOLDERS.append(sp.Symbol(f"_e{len(_PLACEHOLDERS)}", real=True))
    return tuple(_PLACEHOLDERS[:n])


def is_placeholder(s) -> bool:
    return s in _PLACEHOLDER_SET or (isinstance(s, sp.Symbol) and s.name.startswith("_e")
                                     and s.name[2:].isdigit())


_PLACEHOLDER_SET = set(_PLACEHOLDERS)


def is_matrix(e) -> bool:
    return isinstance(e, sp.Basic) and getattr(e, "is_Matrix", False)


def same_dim(a, b) -> bool:
    """Whether two symbolic sizes are equal (``N`` and ``N``, ``2*N`` and ``N + N``)."""
    a, b = sp.sympify(a), sp.sympify(b)
    return a == b or sp.expand(a - b) == 0


def broadcast_shape(shapes, culprit: str = "elementwise map") -> tuple:
    """NumPy's broadcast of 2-D symbolic shapes; ``None`` stands for a scalar."""
    rows, cols = sp.Integer(1), sp.Integer(1)
    for s in shapes:
        if s is None:
            continue
        r, c = s
        if r != 1:
            if rows != 1 and not same_dim(rows, r):
                raise ShapeError(f"{culprit}: row counts {rows} and {r} disagree")
            rows = r
        if c != 1:
            if cols != 1 and not same_dim(cols, c):
                raise ShapeError(f"{culprit}: column counts {cols} and {c} disagree")
            cols = c
    return rows, cols


class Elementwise(MatrixExpr):
    """``f`` applied entry by entry: ``Elementwise(Lambda((a, b), body), shape, A, B)``.

    Arguments are matrices of ``shape``, rows (1, C), columns (R, 1) or scalars; the
    Lambda's variables stand for their entries.  ``shape`` is stored (a ``Tuple``) so a
    map of broadcast arguments alone, such as ``1·b``, still knows its size.
    """

    def __new__(cls, lam, shape, *args):
        args = tuple(sp.sympify(a) for a in args)
        if not isinstance(lam, sp.Lambda):
            raise TypeError("Elementwise needs a sympy.Lambda")
        if len(lam.variables) != len(args):
            raise ShapeError(
                f"map {lam} takes {len(lam.variables)} arguments but got {len(args)}"
            )
        shape = sp.Tuple(*shape)
        full = broadcast_shape([a.shape if is_matrix(a) else None for a in args] + [tuple(shape)])
        if not (same_dim(full[0], shape[0]) and same_dim(full[1], shape[1])):
            raise ShapeError(f"map {lam}: arguments broadcast to {full}, not {tuple(shape)}")
        return super().__new__(cls, lam, shape, *args)

    @property
    def lam(self) -> sp.Lambda:
        return self.args[0]

    @property
    def shape(self):
        return tuple(self.args[1])

    @property
    def operands(self) -> tuple:
        return self.args[2:]

    def _latex(self, printer):
        body = self.lam.expr.xreplace(
            {v: _LatexName(printer._print(a)) for v, a in zip(self.lam.variables, self.operands)}
        )
        return r"\left[%s\right]_{\odot}" % printer._print(body)


class _LatexName(sp.Symbol):
    """A symbol whose LaTeX is given verbatim (used to print map bodies over matrices)."""

    def __new__(cls, tex):
        obj = super().__new__(cls, f"_tex_{abs(hash(tex))}")
        obj.tex = tex
        return obj

    def _latex(self, printer):
        return self.tex


def elementwise(f, *args):
    """Apply scalar function ``f`` (a callable of SymPy scalars) entry by entry."""
    shapes = [a.shape if is_matrix(a) else None for a in args]
    shape = broadcast_shape(shapes, culprit=getattr(f, "__name__", str(f)))
    vs = placeholders(len(args))
    return Elementwise(sp.Lambda(vs, f(*vs)), shape, *args)


class Total(sp.Expr):
    """The sum of all entries of a matrix expression: a scalar."""

    is_commutative = True
    is_real = True

    def __new__(cls, M):
        if not is_matrix(M):
            raise ShapeError(f"Total needs a matrix expression, got {M}")
        return super().__new__(cls, M)

    def _latex(self, printer):
        return r"\textstyle\sum %s" % printer.parenthesize(self.args[0], 1000)


class AxisSum(MatrixExpr):
    """Sum over one axis, keeping it: axis 0 gives a (1, C) row, axis 1 an (R, 1) column.

    ``AxisSum(G, 0)`` is the textbook ``1ᵀ G`` (the bias gradient)."""

    def __new__(cls, M, axis):
        axis = sp.Integer(axis)
        if axis not in (0, 1):
            raise ShapeError(f"AxisSum axis must be 0 or 1, got {axis}")
        return super().__new__(cls, M, axis)

    @property
    def axis(self) -> int:
        return int(self.args[1])

    @property
    def shape(self):
        r, c = self.args[0].shape
        return (sp.Integer(1), c) if self.axis == 0 else (r, sp.Integer(1))

    def _latex(self, printer):
        M = printer.parenthesize(self.args[0], 1000)
        return r"\mathbf{1}^{\top} %s" % M if self.axis == 0 else r"%s\,\mathbf{1}" % M


class Softmax(MatrixExpr):
    """Row-wise softmax of an N×C matrix: every row is a probability distribution."""

    def __new__(cls, Z):
        if not is_matrix(Z):
            raise ShapeError(f"softmax needs an N×C matrix expression, got {Z}")
        return super().__new__(cls, Z)

    @property
    def shape(self):
        return self.args[0].shape

    def _latex(self, printer):
        return r"\operatorname{softmax}\left(%s\right)" % printer._print(self.args[0])


class LogSoftmax(MatrixExpr):
    """Row-wise log-softmax, ``Z − logsumexp(Z)``: primitive for numerical stability."""

    def __new__(cls, Z):
        if not is_matrix(Z):
            raise ShapeError(f"log_softmax needs an N×C matrix expression, got {Z}")
        return super().__new__(cls, Z)

    @property
    def shape(self):
        return self.args[0].shape

    def _latex(self, printer):
        return r"\log\operatorname{softmax}\left(%s\right)" % printer._print(self.args[0])


class SoftmaxCrossEntropy(sp.Expr):
    """``−Σ T ⊙ log softmax(Z) / N`` from logits ``Z``, for every target ``T``.

    Row by row it is ``r_n·logsumexp(Z_n) − Σ_c T_nc Z_nc`` with ``r_n = Σ_c T_nc``, so
    masked (all-zero), label-smoothed and unnormalised rows are exact too.  Primitive for
    stability: it never takes the log of a 0, and its gradients are the short
    ``∂/∂Z = (softmax(Z) ⊙ r − T)/N`` (the textbook ``(Y − T)/N`` where rows of T sum
    to 1) and ``∂/∂T = −log softmax(Z)/N``.
    """

    is_commutative = True
    is_real = True

    def __new__(cls, Z, T):
        if not (is_matrix(Z) and is_matrix(T)):
            raise ShapeError("softmax_cross_entropy needs matrices Z (logits) and T (targets)")
        if not (same_dim(Z.shape[0], T.shape[0]) and same_dim(Z.shape[1], T.shape[1])):
            raise ShapeError(
                f"softmax_cross_entropy: logits {Z} have shape {Z.shape} "
                f"but targets {T} have shape {T.shape}"
            )
        return super().__new__(cls, Z, T)

    def _latex(self, printer):
        Z, T = (printer._print(a) for a in self.args)
        return r"\operatorname{CE}\left(\operatorname{softmax}(%s), %s\right)" % (Z, T)
