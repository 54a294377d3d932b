"""Pooling over k×k windows with stride s (k by default), no padding, on N×C×H×W images:
``MaxPool2d``, ``AvgPool2d`` and their gradient heads.

    max-pool   Y[n,c,i,j] = max_{u,v<k} X[n,c,i·s+u,j·s+v]
               X̄ = δ routed to each window's first maximum (row-major), PyTorch's tie rule;
                   a window holding NaN routes to its NaN, so NaN propagates
    avg-pool   Y[n,c,i,j] = Σ_{u,v<k} X[n,c,i·s+u,j·s+v] / k²
               X̄ = δ/k² spread over the window

Overlapping windows (s < k) add their shares.  The gradient of max-pool reads X again
(its argmax), not a stored index: one buffer less, and the scan costs k² compares."""

from __future__ import annotations

import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr

from ..errors import ShapeError
from ..matrix import _ScalarArith, as_array, is_matrix, shape_text
from ..vjp import broadcast
from . import register
from .conv import (
    NUMPY,
    _fixed,
    _operand,
    _pretty_text,
    _same,
    _Worded,
    integer,
    kernel,
    lowered,
)


def pool_shape(xs, k, s, who: str, X="the image") -> tuple:
    """(N, C, H_out, W_out) of a k×k pooling with stride s, H_out = ⌊(H − k)/s⌋ + 1."""
    xs = tuple(xs)
    if len(xs) != 4:
        raise ShapeError(f"{who}: {X} must be N×C×H×W (rank 4), got {shape_text(xs)} "
                         f"(rank {len(xs)}): make it with sb.tensor(name, N, C, H, W)")
    _fixed(xs, (1, 2, 3), who, X)
    n, c, h, w = xs
    if k > h or k > w:
        raise ShapeError(f"{who}: the {k}×{k} window is larger than the {h}×{w} image {X}")
    return (n, c, (h - k) // s + 1, (w - k) // s + 1)


class _Pool(_ScalarArith, MatrixExpr):
    name = api = ""  # printed name, public name

    def __new__(cls, X, size, stride=None):
        who = cls.api
        X = as_array(sp.sympify(X))
        if not is_matrix(X):
            raise ShapeError(f"{who}: the image must be an array, got the scalar {X}")
        k = integer(size, f"{who}: the window size", 1)
        s = k if stride is None else integer(stride, f"{who}: the stride", 1)
        pool_shape(X.shape, k, s, who, X)
        return super().__new__(cls, X, k, s)

    @property
    def size(self) -> int:
        return int(self.args[1])

    @property
    def stride(self) -> int:
        return int(self.args[2])

    @property
    def shape(self):
        return pool_shape(self.args[0].shape, self.size, self.stride, self.api)

    def _op(self) -> str:
        return f"{self.name}{self.size}" + (f"[s={self.stride}]" if self.stride != self.size
                                            else "")

    def _sympystr(self, printer):
        return f"{self._op()}({printer._print(self.args[0])})"

    def _pretty(self, printer):
        return _pretty_text(self)

    def _latex(self, printer):
        sub = f"{self.size}" + (rf",\,s={self.stride}" if self.stride != self.size else "")
        return r"\operatorname{%s}_{%s}\left(%s\right)" % (self.name, sub,
                                                            printer._print(self.args[0]))


class MaxPool2d(_Pool):
    """The largest entry of each k×k window."""

    name, api = "maxpool", "max_pool2d"


class AvgPool2d(_Pool):
    """The mean of each k×k window."""

    name, api = "avgpool", "avg_pool2d"


class MaxPool2dGrad(_Worded):
    """X̄ of ``MaxPool2d(X, k, s)`` from δ: each δ[n,c,i,j] goes to the first maximum of
    window (i, j) of X."""

    def __new__(cls, G, X, size, stride):
        return super().__new__(cls, G, X, sp.Integer(size), sp.Integer(stride))

    @property
    def shape(self):
        return tuple(self.args[1].shape)

    def _text(self, printer, tex):
        G, X, k, s = self.args
        where = f"{k}×{k}" + (f", s={s}" if s != k else "")
        if tex:
            return (r"\operatorname{route}_{%s}\left(%s \to \text{first argmax of } %s\right)"
                    % (where.replace("×", r"\times "), printer._print(G), printer._print(X)))
        return f"route{where}({printer._print(G)} → first argmax of {printer._print(X)})"


class AvgPool2dGrad(_Worded):
    """X̄ of ``AvgPool2d`` from δ: δ/k² on every entry of its window; ``shape`` is X's."""

    def __new__(cls, G, shape, size, stride):
        return super().__new__(cls, G, sp.Tuple(*shape), sp.Integer(size), sp.Integer(stride))

    @property
    def shape(self):
        return tuple(self.args[1])

    def _text(self, printer, tex):
        G, _, k, s = self.args
        where = f"{k}×{k}" + (f", s={s}" if s != k else "")
        g = _operand(printer, G)
        if tex:
            return r"\operatorname{spread}_{%s}\left(%s / %s\right)" % (
                where.replace("×", r"\times "), g, k * k)
        return f"spread{where}({g}/{k * k})"


def max_pool2d(X, size, stride=None) -> MaxPool2d:
    """The maximum of each ``size``×``size`` window of N×C×H×W images (``stride`` defaults to
    ``size``), as PyTorch's ``max_pool2d``; its gradient goes to the first maximum."""
    return MaxPool2d(X, size, stride)


def avg_pool2d(X, size, stride=None) -> AvgPool2d:
    """The mean of each ``size``×``size`` window of N×C×H×W images (``stride`` defaults to
    ``size``), as PyTorch's ``avg_pool2d``."""
    return AvgPool2d(X, size, stride)


# --- rules -------------------------------------------------------------------------------


def _check(e, where) -> None:
    if isinstance(e, _Pool):
        return  # checked when made; verify compares its shape with its name
    G, X, k, s = e.args
    xs = X.shape if is_matrix(X) else tuple(X)
    out = pool_shape(xs, int(k), int(s), type(e).__name__)
    if not _same(G.shape, out):
        raise ShapeError(f"{type(e).__name__}: δ {G} is {shape_text(G.shape)}, the pooling's "
                         f"output is {shape_text(out)} {where}")


def _kernel(gen, name, e):
    # k² compares (adds) per output entry, each about one _cost unit
    N, C, ho, wo = e.args[0].shape if not isinstance(e, _Pool) else e.shape
    k = int(e.args[-2])
    return kernel(gen, name, gen.est(N) * int(C * ho * wo) * k * k)


def pool_cpu(gen, a):
    gen.head(a)
    X, k, s = a.expr.args
    f = _kernel(gen, f"{a.expr.name[:3]}_pool2d", a.expr)
    gen.emit(f"{f}({gen.ids[X]}, {k}, {s}, {gen.buffer(a.name)})")


def max_grad_cpu(gen, a):
    gen.head(a)
    G, X, k, s = a.expr.args
    f = _kernel(gen, "max_pool2d_grad", a.expr)
    gen.emit(f"{f}({gen.ids[G]}, {gen.ids[X]}, {k}, {s}, {gen.buffer(a.name)})")


def avg_grad_cpu(gen, a):
    gen.head(a)
    G, _, k, s = a.expr.args
    f = _kernel(gen, "avg_pool2d_grad", a.expr)
    gen.emit(f"{f}({gen.ids[G]}, {k}, {s}, {gen.buffer(a.name)})")


def pool_numpy(ctx, a):
    X, k, s = a.expr.args
    return f"{ctx.use(NUMPY, a.expr.name[:3] + '_pool2d')}({ctx.op(X)}, {k}, {s})"


def max_grad_numpy(ctx, a):
    G, X, k, s = a.expr.args
    return f"{ctx.use(NUMPY, 'max_pool2d_grad')}({ctx.op(G)}, {ctx.op(X)}, {k}, {s})"


def avg_grad_numpy(ctx, a):
    G, shape, k, s = a.expr.args
    return f"{ctx.use(NUMPY, 'avg_pool2d_grad')}({ctx.op(G)}, {ctx.shape(shape)}, {k}, {s})"


def max_vjp(e, y, g, wants, local=None):
    X, k, s = e.args
    return [(X, MaxPool2dGrad(broadcast(g, e.shape), X, k, s))]


def avg_vjp(e, y, g, wants, local=None):
    X, k, s = e.args
    return [(X, AvgPool2dGrad(broadcast(g, e.shape), X.shape, k, s))]


def avg_grad_entry(ix, e, n, c, r, q):
    # X̄[n,c,r,q] = Σ_i Σ_j δ[n,c,i,j]/k² · [i·s ≤ r < i·s + k] · [j·s ≤ q < j·s + k]
    from ..printing.formulas import Iverson

    G, _, k, s = e.args
    ho, wo = G.shape[2:]
    i, j = ix.letter(ho, ("i",)), ix.letter(wo, ("j",))
    inside = Iverson(sp.And(i * s <= r, r < i * s + k, j * s <= q, q < j * s + k,
                            evaluate=False))
    return sp.Sum(ix.entry(G, n, c, i, j) / k**2 * inside, (i, 0, ho - 1), (j, 0, wo - 1))


class FirstMax(sp.Expr):
    """[x is the first maximum of window (i, j)] in an index form: PyTorch's tie rule."""

    is_commutative = True

    def _sympystr(self, printer):
        x, i, j = (printer._print(a) for a in self.args)
        return f"[{x} is the first max of window ({i},{j})]"

    def _latex(self, printer):
        x, i, j = (printer._print(a) for a in self.args)
        return r"\left[%s = \max{}_{\text{first}}\ \text{of window } (%s,%s)\right]" % (x, i, j)


def max_grad_entry(ix, e, n, c, r, q):
    # X̄[n,c,r,q] = Σ_i Σ_j δ[n,c,i,j] · [X[n,c,r,q] is the first maximum of window (i, j)]
    G, X = e.args[:2]
    ho, wo = G.shape[2:]
    i, j = ix.letter(ho, ("i",)), ix.letter(wo, ("j",))
    hit = FirstMax(ix.entry(X, n, c, r, q), i, j)
    return sp.Sum(ix.entry(G, n, c, i, j) * hit, (i, 0, ho - 1), (j, 0, wo - 1))


def avg_entry(ix, e, n, c, i, j):
    X, k, s = e.args
    u, v = ix.letter(k, ("u",)), ix.letter(k, ("v",))
    return sp.Sum(ix.entry(X, n, c, i * s + u, j * s + v) / k**2, (u, 0, k - 1), (v, 0, k - 1))


def _pool(cls, vjp, entry):
    return dict(lower=lambda lw, e: lw.emit(cls(lw.L(e.args[0]), *e.args[1:]), tuple(e.shape)),
                children=lambda e: [e.args[0]], operands=lambda e: [e.args[0]],
                rebuild=lambda e, ops: cls(ops[0], *e.args[1:]), check=_check, vjp=vjp,
                numpy=pool_numpy, cpu=pool_cpu, label=lambda e: e._op(), entry=entry,
                # named in derivations, as an activation is: P = maxpool₂(H)
                function=True, extra={"letters": ("n", "c", "i", "j")})


register(MaxPool2d, doc="the maximum of each window", **_pool(MaxPool2d, max_vjp, None))
register(AvgPool2d, doc="the mean of each window", **_pool(AvgPool2d, avg_vjp, avg_entry))
register(MaxPool2dGrad, **lowered(2), check=_check,
         numpy=max_grad_numpy, cpu=max_grad_cpu, label=lambda e: "route to argmax",
         entry=max_grad_entry, extra={"letters": ("n", "c", "r", "q")},
         doc="∂/∂X of max-pooling: δ to each window's first maximum")
register(AvgPool2dGrad, **lowered(1), check=_check,
         numpy=avg_grad_numpy, cpu=avg_grad_cpu, label=lambda e: "spread δ/k²",
         entry=avg_grad_entry, extra={"letters": ("n", "c", "r", "q")},
         doc="∂/∂X of average pooling: δ/k² over each window")
