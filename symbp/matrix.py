"""Matrix vocabulary that SymPy lacks: elementwise maps with broadcasting, sums, softmax.

Every class here is a genuine SymPy expression (a ``MatrixExpr`` or a scalar ``Expr``), so
it composes with ``MatrixSymbol``, ``MatMul``, ``MatAdd`` and prints with ``sympy.latex``.
The IR reuses the same classes as its heads: a lowered ``Elementwise`` is the fused map a
backend turns into one loop.

Broadcasting follows NumPy for 2-D shapes: an argument of shape (1, C) repeats down the
rows, (R, 1) across the columns, and a scalar everywhere.  A scalar added to or multiplying
one of these classes stays a map (``1 + sb.exp(Z)``, ``2*sb.tanh(Z) - 1``), where SymPy's
own MatAdd refuses it.  ``Constant`` is a constant matrix (Identity, numbers) as a program
input.  Each class prints itself in str, pretty and latex as the formula it stands for.
"""

from __future__ import annotations

import sys

import numpy as np
import sympy as sp
from sympy.core.symbol import Str
from sympy.matrices.expressions.matexpr import MatrixExpr
from sympy.printing.precedence import PRECEDENCE, precedence
from sympy.printing.pretty.stringpict import prettyForm, stringPict

from .errors import ShapeError, UnsupportedError

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
    """Whether ``e`` is array-valued: a matrix, or an array of another rank."""
    if not isinstance(e, sp.Basic):
        return False
    if getattr(e, "is_Matrix", False):
        return True
    A = _array_symbol_class()
    return A is not None and isinstance(e, A)


def _array_symbol_class():
    # SymPy's ArraySymbol, if the user has imported it: importing it here would add
    # ~0.1 s to `import symbp`, and nobody can hold one without importing it
    m = sys.modules.get("sympy.tensor.array.expressions.array_expressions")
    return getattr(m, "ArraySymbol", None)


def same_dim(a, b) -> bool:
    """Whether two symbolic sizes are equal (``N`` and ``N``, ``2*N`` and ``N + N``)."""
    a, b = sp.sympify(a), sp.sympify(b)
    return a == b or sp.expand(a - b) == 0


def broadcast_shape(shapes, culprit: str = "elementwise map") -> tuple:
    """NumPy's broadcast of symbolic shapes of one rank; ``None`` stands for a scalar.

    A size 1 stretches to the other's size: a (1, C) row repeats down the rows, a
    (1, F, 1, 1) bias over a batch of images.  Shapes of different ranks are an error
    (reshape first): NumPy's silent right-alignment would hide a transposed operand."""
    shapes = [tuple(s) for s in shapes if s is not None]
    if not shapes:
        return (sp.Integer(1), sp.Integer(1))
    rank = len(shapes[0])
    if any(len(s) != rank for s in shapes):
        raise ShapeError(f"{culprit}: operands of shapes {', '.join(map(str, shapes))} have "
                         "different ranks; reshape one (sb.flatten, sb.reshape) first")
    out = [sp.Integer(1)] * rank
    for s in shapes:
        for k, d in enumerate(s):
            if d != 1:
                if out[k] != 1 and not same_dim(out[k], d):
                    what = {0: "row counts", 1: "column counts"}.get(k, f"sizes of axis {k}") \
                        if rank == 2 else f"sizes of axis {k}"
                    raise ShapeError(f"{culprit}: {what} {out[k]} and {d} disagree")
                out[k] = d
    return tuple(out)


def rank(e) -> int:
    """The number of axes of an array-valued expression (2 for a matrix, 0 for a scalar)."""
    return len(e.shape) if is_matrix(e) else 0


def shape_text(shape) -> str:
    """``3×N``, ``N×1×8×8``."""
    return "×".join(str(d) for d in shape)


def _as_scalar(x):
    """``x`` as a SymPy scalar, or None when it is a matrix or not a number/expression."""
    try:
        x = sp.sympify(x, strict=True)
    except sp.SympifyError:
        return None
    return x if isinstance(x, sp.Expr) and not is_matrix(x) else None


def _nd(M, other) -> bool:
    """Whether ``M op other`` involves an array that is not a matrix (rank other than 2)."""
    return is_matrix(other) and (len(M.shape) != 2 or len(other.shape) != 2)


class _ScalarArith:
    """``1 + M``, ``M - c`` for symbp's matrix expressions: the scalar is added to every
    entry (a map), where SymPy's own MatAdd refuses a scalar ("Mix of Matrix and Scalar
    symbols").  SymPy's classes (MatrixSymbol, MatMul) keep SymPy's rule; write
    ``sb.elementwise(lambda z: z + c, Z)`` or ``Z + sb.fill(c, Z)`` for those.

    Between arrays of other ranks (images N×C×H×W), ``+ - * /`` are entrywise maps with
    broadcasting (a (1, F, 1, 1) bias over a batch): SymPy's matrix algebra is 2-D only."""

    def __add__(self, other):
        if _nd(self, other):
            return elementwise(sp.Add, self, other)
        c = _as_scalar(other)
        return super().__add__(other) if c is None else with_scalar(self, c, sp.Add)

    def __radd__(self, other):
        if _nd(self, other):
            return elementwise(sp.Add, other, self)
        c = _as_scalar(other)
        return super().__radd__(other) if c is None else with_scalar(self, c, sp.Add)

    def __sub__(self, other):
        if _nd(self, other):
            return elementwise(lambda a, b: a - b, self, other)
        c = _as_scalar(other)
        return super().__sub__(other) if c is None else with_scalar(self, -c, sp.Add)

    def __rsub__(self, other):
        if _nd(self, other):
            return elementwise(lambda a, b: a - b, other, self)
        c = _as_scalar(other)
        return super().__rsub__(other) if c is None else \
            with_scalar(self, c, lambda x, k: k - x)

    # c*M stays a map (SymPy would make it a MatMul, to which no scalar can then be added):
    # so 2*sb.tanh(Z) - 1 reads as written
    def __mul__(self, other):
        if _nd(self, other):  # entrywise: there is no matrix product of images
            return elementwise(sp.Mul, self, other)
        c = _as_scalar(other)
        return super().__mul__(other) if c is None else with_scalar(self, c, sp.Mul)

    def __rmul__(self, other):
        if _nd(self, other):
            return elementwise(sp.Mul, other, self)
        c = _as_scalar(other)
        return super().__rmul__(other) if c is None else with_scalar(self, c, sp.Mul)

    def __truediv__(self, other):
        if _nd(self, other):
            return elementwise(lambda a, b: a / b, self, other)
        c = _as_scalar(other)
        return super().__truediv__(other) if c is None else \
            with_scalar(self, 1 / c, sp.Mul)

    def __neg__(self):
        return with_scalar(self, sp.Integer(-1), sp.Mul)


def with_scalar(M, c, f):
    """The map ``f(m, c)`` entry by entry: one map, composed into ``M`` when it is one."""
    if isinstance(M, Elementwise):
        n = len(M.operands)
        vs = placeholders(n + 1)
        body = M.lam.expr.xreplace(dict(zip(M.lam.variables, vs[:n])))
        if c.is_number:  # a constant joins the body: exp(Z) + 1, not a second operand
            return Elementwise(sp.Lambda(vs[:n], f(body, c)), M.shape, *M.operands)
        return Elementwise(sp.Lambda(vs, f(body, vs[n])), M.shape, *M.operands, c)
    return elementwise(f, M, c)


def _varies(a) -> bool:
    """Whether operand ``a`` differs between entries (a scalar spread by a map does not)."""
    if isinstance(a, Elementwise):
        return any(_varies(o) for o in a.operands)
    return is_matrix(a)


class _Shown(sp.Dummy):
    """Stands for a map's operand inside its body while printing: prints as the operand,
    with the operand's precedence, so ``2*(X*W + b)`` keeps its parentheses."""

    def __new__(cls, operand):
        # named by the operand's own name only: printing the operand here to name it would
        # print every layer of a deep network twice per level, 2^depth times in all
        obj = super().__new__(cls, getattr(operand, "name", "M"), real=True)
        obj.operand = operand
        obj.precedence = _precedence(operand)
        return obj

    def _sympystr(self, printer):
        return printer._print(self.operand)

    def _latex(self, printer, exp=None):
        tex = printer._print(self.operand)
        if exp is None:
            return tex
        return r"\left(%s\right)^{%s}" % (tex, exp) if self.precedence < PRECEDENCE["Atom"] \
            else r"%s^{%s}" % (tex, exp)

    def _pretty(self, printer):
        return printer._print(self.operand)


def _precedence(e) -> int:
    # products of matrices read like products, sums like sums; calls (tanh(Z),
    # softmax(Z)) and names are atoms; a map says how its body binds
    if isinstance(e, sp.MatAdd):
        return PRECEDENCE["Add"]
    if isinstance(e, (sp.MatMul, sp.HadamardProduct)):
        return PRECEDENCE["Mul"]
    if isinstance(e, sp.Transpose):
        return PRECEDENCE["Pow"]
    return precedence(e)


def _pretty_call(printer, name: str, *args):
    """``name(a, b)`` as a pretty form: the name beside its parenthesized arguments."""
    parts = [printer._print(a) for a in args]
    inner = parts[0]
    for p in parts[1:]:
        inner = prettyForm(*stringPict.next(inner, ", ", p))
    inner = prettyForm(*inner.parens())
    return prettyForm(*stringPict.next(prettyForm(name), inner), binding=prettyForm.FUNC)


class Elementwise(_ScalarArith, MatrixExpr):
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
        if not all(same_dim(x, y) for x, y in zip(full, shape)):
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

    # Printed as its body over its operands: tanh(X*W1 + b1), 2*(Y - T)/N.  A broadcast
    # operand prints as itself (the bias row b1 of 1·b1), a map of no operands as its
    # constant, as SymPy prints ZeroMatrix and OneMatrix ("0", "1").
    # A product of two matrix-valued factors is a Hadamard product and prints as SymPy
    # prints one (A.*B, A∘B, A \circ B): a plain * would read as a matrix product.
    def shown(self):
        return self.lam.expr.xreplace(
            {v: _Shown(a) for v, a in zip(self.lam.variables, self.operands)})

    def _hadamard(self):
        """``(scalar coefficient, matrix factors)`` of a Hadamard body, else None."""
        body = self.shown()
        if not body.is_Mul:
            return None
        mats = [f for f in body.args if any(_varies(d.operand) for d in f.atoms(_Shown))]
        if len(mats) < 2:
            return None
        return sp.Mul(*[f for f in body.args if f not in mats]), mats

    def _sympystr(self, printer):
        h = self._hadamard()
        if h is None:
            return printer._print(self.shown())
        coef, mats = h
        out = ".*".join(printer.parenthesize(f, PRECEDENCE["Mul"]) for f in mats)
        return out if coef == 1 else f"{printer.parenthesize(coef, PRECEDENCE['Mul'])}*{out}"

    def _pretty(self, printer):
        h = self._hadamard()
        if h is None:
            return printer._print(self.shown())
        coef, mats = h
        parts = [printer._print(f) for f in mats]
        parts = [prettyForm(*p.parens()) if f.is_Add else p for p, f in zip(parts, mats)]
        if coef != 1:
            parts.insert(0, printer._print(coef))
        dot = " ∘ " if printer._use_unicode else ".*"
        out = parts[0]
        for p in parts[1:]:
            out = prettyForm(*stringPict.next(out, dot, p))
        out.binding = prettyForm.ADD  # bracketed as a factor of a matrix product
        return out

    @property
    def precedence(self) -> int:
        """How the printed body binds: ``Y - T`` as a sum, ``A.*B`` as a product."""
        body = self.lam.expr
        if body in self.lam.variables:  # a broadcast prints as its operand
            return _precedence(self.operands[self.lam.variables.index(body)])
        if body.is_Add:
            return PRECEDENCE["Add"]
        if body.is_Mul:
            return PRECEDENCE["Mul"]
        if body.is_Pow:
            return PRECEDENCE["Pow"]
        return PRECEDENCE["Atom"]

    def _latex(self, printer, exp=None):
        h = self._hadamard()
        if h is None:
            tex = printer._print(self.shown())
        else:
            coef, mats = h
            tex = r" \circ ".join(printer.parenthesize(f, PRECEDENCE["Mul"]) for f in mats)
            if coef != 1:
                tex = printer.parenthesize(coef, PRECEDENCE["Mul"]) + " " + tex
        return tex if exp is None else r"\left(%s\right)^{%s}" % (tex, exp)


def elementwise(f, *args):
    """Apply scalar function ``f`` (a callable of SymPy scalars) entry by entry.

    Arguments broadcast as in NumPy: a matrix, a (1, C) row, an (R, 1) column or a scalar
    (a Symbol or a number, the same in every entry).  ``elementwise(lambda z: 1 + z, Z)``
    adds 1 to every entry of Z; ``elementwise(lambda z, b: z + b, X*W, b)`` adds a scalar
    bias.  Without a matrix argument it is ``f(*args)``, a scalar.
    """
    args = [as_array(sp.sympify(a)) for a in args]
    if not any(is_matrix(a) for a in args):
        return f(*args)
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

    def _sympystr(self, printer):
        return f"sum({printer._print(self.args[0])})"

    def _pretty(self, printer):
        return _pretty_call(printer, "sum", self.args[0])

    def _latex(self, printer, exp=None):
        tex = r"\textstyle\sum %s" % _latex_operand(printer, self.args[0])
        return tex if exp is None else r"\left(%s\right)^{%s}" % (tex, exp)


def _latex_operand(printer, M) -> str:
    """``M`` as an operand of a sum or product: bracketed unless it is an atom or a call."""
    tex = printer._print(M)
    return tex if _precedence(M) >= PRECEDENCE["Atom"] else r"\left(%s\right)" % tex


class AxisSum(_ScalarArith, MatrixExpr):
    """Sum over one axis, keeping it: on a matrix, axis 0 gives a (1, C) row, axis 1 an
    (R, 1) column; on an array of any rank, that axis becomes 1.

    ``AxisSum(G, 0)`` is the textbook ``1ᵀ G`` (the bias gradient)."""

    def __new__(cls, M, axis):
        axis = sp.Integer(axis)
        n = len(M.shape) if is_matrix(M) else 2
        if not 0 <= axis < n:
            raise ShapeError(f"AxisSum axis must be one of 0..{n - 1} for {M}, got {axis}")
        return super().__new__(cls, M, axis)

    @property
    def axis(self) -> int:
        return int(self.args[1])

    @property
    def shape(self):
        s = list(self.args[0].shape)
        s[self.axis] = sp.Integer(1)
        return tuple(s)

    def _sympystr(self, printer):
        return f"sum({printer._print(self.args[0])}, axis={self.axis})"

    def _pretty(self, printer):
        return _pretty_call(printer, "sum", self.args[0], sp.Symbol(f"axis={self.axis}"))

    def _latex(self, printer):
        M = _latex_operand(printer, self.args[0])
        return r"\mathbf{1}^{\top} %s" % M if self.axis == 0 else r"%s\,\mathbf{1}" % M


class Softmax(_ScalarArith, MatrixExpr):
    """Row-wise softmax of an N×C matrix: every row is a probability distribution."""

    def __new__(cls, Z):
        if not is_matrix(Z):
            raise ShapeError(f"softmax needs an N×C matrix expression, got {Z}")
        return super().__new__(cls, Z)

    @property
    def shape(self):
        return self.args[0].shape

    def _sympystr(self, printer):
        return f"softmax({printer._print(self.args[0])})"

    def _pretty(self, printer):
        return _pretty_call(printer, "softmax", self.args[0])

    def _latex(self, printer):
        return r"\operatorname{softmax}\left(%s\right)" % printer._print(self.args[0])


class LogSoftmax(_ScalarArith, MatrixExpr):
    """Row-wise log-softmax, ``Z − logsumexp(Z)``: primitive for numerical stability."""

    def __new__(cls, Z):
        if not is_matrix(Z):
            raise ShapeError(f"log_softmax needs an N×C matrix expression, got {Z}")
        return super().__new__(cls, Z)

    @property
    def shape(self):
        return self.args[0].shape

    def _sympystr(self, printer):
        return f"log_softmax({printer._print(self.args[0])})"

    def _pretty(self, printer):
        return _pretty_call(printer, "log_softmax", self.args[0])

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

    def _sympystr(self, printer):
        Z, T = (printer._print(a) for a in self.args)
        return f"softmax_cross_entropy({Z}, {T})"

    def _pretty(self, printer):
        return _pretty_call(printer, "softmax_cross_entropy", *self.args)

    def _latex(self, printer, exp=None):
        Z, T = (printer._print(a) for a in self.args)
        tex = r"\operatorname{CE}\left(\operatorname{softmax}(%s), %s\right)" % (Z, T)
        return tex if exp is None else r"\left(%s\right)^{%s}" % (tex, exp)


class Constant(sp.MatrixSymbol):
    """A constant matrix (``Identity(k)``, a Matrix of numbers) as an input of a Program.

    A map cannot say "1 on the diagonal" (its body sees entries, not indices) nor hold a
    table of numbers, and every backend already takes matrix inputs: so lowering names each
    constant as an input, and the compiled function binds its array itself
    (``array``); the user never passes it.  ``value`` is the SymPy constant, put back when
    a gradient is raised to SymPy.
    """

    def __new__(cls, name: str, value):
        if not (isinstance(value, sp.Identity) or (
                isinstance(value, sp.MatrixBase) and all(x.is_number for x in value))):
            raise UnsupportedError(
                f"{value} is not a constant matrix: its entries must be numbers "
                "(pass a matrix of symbols as a MatrixSymbol input instead)"
            )
        value = value if isinstance(value, sp.Identity) else sp.ImmutableMatrix(value)
        return sp.Basic.__new__(cls, Str(name), *value.shape, value)

    @property
    def value(self):
        return self.args[3]

    def doit(self, **hints):
        return self

    def array(self, dims: dict, dtype) -> np.ndarray:
        """The constant's entries, its sizes bound by ``dims`` (``Identity(N)``)."""
        v = self.value
        if isinstance(v, sp.Identity):
            return np.eye(int(sp.sympify(v.shape[0]).xreplace(dims)), dtype=dtype)
        return np.array([[float(x) for x in row] for row in v.tolist()], dtype=dtype)


def is_constant(e) -> bool:
    return isinstance(e, sp.Basic) and not is_matrix(e) and e.is_number


def make_map(lam: sp.Lambda, shape, args) -> Elementwise:
    """An Elementwise map with constant arguments folded into its body."""
    body, keep, keep_vars = lam.expr, [], []
    used = body.free_symbols
    for v, a in zip(lam.variables, args):
        if v not in used:  # an argument the body does not read
            continue
        if is_constant(a):
            body = body.xreplace({v: a})
        else:
            keep.append(a)
            keep_vars.append(v)
    new = placeholders(len(keep))
    body = body.xreplace(dict(zip(keep_vars, new)))
    return Elementwise(sp.Lambda(new, body), shape, *keep)


class Tensor(_ScalarArith, sp.MatrixSymbol):
    """A named array of any rank: ``Tensor("X", N, 1, 8, 8)`` is a batch of 8×8 images.

    A ``MatrixSymbol`` with more (or fewer) axes, so everything that names, binds and
    passes a matrix by name does the same for it; ``sb.tensor`` makes one, and a SymPy
    ``ArraySymbol`` given to a symbp operation becomes one of the same name and shape."""

    def __new__(cls, name, *shape):
        shape = tuple(sp.sympify(d) for d in shape)
        if isinstance(name, str):
            name = Str(name)
        return sp.Basic.__new__(cls, name, *shape)

    @property
    def shape(self):
        return tuple(self.args[1:])

    def _sympystr(self, printer):
        return self.name

    def _pretty(self, printer):  # else SymPy's pretty printer takes it for a tensor.Tensor
        return printer._print(sp.Symbol(self.name))

    def _latex(self, printer):
        return printer._print(sp.Symbol(self.name))


def tensor(name: str, *shape) -> sp.MatrixSymbol:
    """A named input array: ``tensor("X", N, 1, 8, 8)``; two sizes give a MatrixSymbol."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return sp.MatrixSymbol(name, *shape) if len(shape) == 2 else Tensor(name, *shape)


def array_symbol(name: str, shape) -> sp.MatrixSymbol:
    """The IR's name for a value of ``shape``: a MatrixSymbol, or a Tensor of other rank."""
    shape = tuple(shape)
    return sp.MatrixSymbol(name, *shape) if len(shape) == 2 else Tensor(name, *shape)


def as_array(x):
    """A SymPy ``ArraySymbol`` as the Tensor of its name and shape; anything else as is."""
    A = _array_symbol_class()
    if A is not None and isinstance(x, A):
        return Tensor(x.name, *x.shape)
    return x
