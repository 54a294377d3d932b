"""Convolution: ``Conv2d(X, K, s, p)`` on N×C×H×W images with F×C×kh×kw kernels, and the
two heads of its vector-Jacobian rule.

    Y[n,f,i,j]   = Σ_c Σ_u Σ_v K[f,c,u,v] · X[n,c,i·s+u−p,j·s+v−p]      (X ⋆ K)
    ∂L/∂X        = δ ⋆_full rot180(K)   (δ dilated by s, cropped by p)   Conv2dGradInput
    ∂L/∂K[f,c,u,v] = Σ_n Σ_i Σ_j δ[n,f,i,j] · X[n,c,i·s+u−p,j·s+v−p]    Conv2dGradKernel

a cross-correlation as PyTorch's ``conv2d`` (entries outside the image are the zero
padding).  The bias is no part of the head: ``sb.conv2d`` adds it as a map over a
(1,F,1,1) reshape, so its gradient is the map's own rule (Σ of δ over N, H, W) and a
following activation fuses with the addition into one loop.  The loops are
symbp.backends.conv_numpy (reference) and conv_numba (direct loops, no im2col)."""

from __future__ import annotations

import numpy as np
import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE

from ..errors import ShapeError
from ..matrix import _precedence, _ScalarArith, as_array, is_matrix, same_dim, shape_text
from ..vjp import broadcast
from . import register

NUMPY = "symbp.backends.conv_numpy"
NUMBA = "symbp.backends.conv_numba"


def integer(v, what: str, least: int) -> sp.Integer:
    """A stride, padding or window size: a Python (or NumPy, SymPy) integer ≥ ``least``."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, sp.Integer)) \
            or int(v) < least:
        raise ShapeError(f"{what} must be an integer ≥ {least}, got {v!r}")
    return sp.Integer(int(v))


def _array(x, what: str, who: str):
    x = as_array(sp.sympify(x))
    if not is_matrix(x):
        raise ShapeError(f"{who}: {what} must be an array, got the scalar {x}")
    return x


def _fixed(shape, axes, who: str, name) -> None:
    for k in axes:
        if not sp.sympify(shape[k]).is_Integer:
            raise ShapeError(f"{who}: axis {k} of {name} ({shape_text(shape)}) must be a fixed "
                             f"size, not {shape[k]}: only the batch size N may be a symbol")


def conv_shape(X, K, s, p, who="conv2d") -> tuple:
    """(N, F, H_out, W_out) of ``X ⋆ K``, H_out = ⌊(H + 2p − kh)/s⌋ + 1 (a last partial
    window is dropped, as in PyTorch); every disagreement names its operand."""
    xs, ks = tuple(X.shape), tuple(K.shape)
    if len(xs) != 4:
        raise ShapeError(f"{who}: the image {X} must be N×C×H×W (rank 4), got "
                         f"{shape_text(xs)} (rank {len(xs)}): make it with "
                         "sb.tensor(name, N, C, H, W) or sb.reshape")
    if len(ks) != 4:
        raise ShapeError(f"{who}: the kernel {K} must be F×C×kh×kw (rank 4), got "
                         f"{shape_text(ks)} (rank {len(ks)})")
    _fixed(xs, (1, 2, 3), who, X)
    _fixed(ks, (0, 1, 2, 3), who, K)
    n, c, h, w = xs
    f, kc, kh, kw = ks
    if kc != c:
        raise ShapeError(f"{who}: the kernel {K} ({shape_text(ks)}) has {kc} input channels, "
                         f"the image {X} ({shape_text(xs)}) has {c}")
    if kh > h + 2 * p or kw > w + 2 * p:
        raise ShapeError(f"{who}: the kernel {K}'s {kh}×{kw} window is larger than the "
                         f"padded image {X}, ({h}+2·{p})×({w}+2·{p}): pad more or use a "
                         "smaller kernel")
    return (n, f, (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(same_dim(x, y) for x, y in zip(a, b))


def _sp(e) -> str:
    """The stride and padding of a text formula, when they are not 1 and 0."""
    s, p = e.stride, e.padding
    parts = ([f"s={s}"] if s != 1 else []) + ([f"p={p}"] if p != 0 else [])
    return ", ".join(parts)


def _star(e, printer, tex: bool, full: bool = False) -> str:
    opts = (["full"] if full else []) + ([_sp(e)] if _sp(e) else [])
    if tex:
        sub = r",\,".join(r"\text{%s}" % o for o in opts)
        return r" \star_{%s} " % sub if sub else r" \star "
    return f" ⋆[{', '.join(opts)}] " if opts else " ⋆ "


def _operand(printer, x) -> str:
    # a sum or a product (X + B, B ⊙ X) in brackets, a name or a call (ReLU(Z)) not
    s = printer._print(x)
    if _precedence(x) > PRECEDENCE["Mul"]:
        return s
    return r"\left(%s\right)" % s if isinstance(printer, LatexPrinter) else f"({s})"


def _pretty_text(e):
    # the pretty printer's parts are 2-D pictures, not text: print the one-line form
    from sympy.printing.pretty.stringpict import prettyForm

    return prettyForm(str(e))


class _Worded(_ScalarArith, MatrixExpr):
    """A head printed by its ``_text(printer, tex)``: one line in str, pretty and LaTeX."""

    def _sympystr(self, printer):
        return self._text(printer, False)

    def _pretty(self, printer):
        return _pretty_text(self)

    def _latex(self, printer):
        return self._text(printer, True)


class _ConvHead(_Worded):
    @property
    def stride(self) -> int:
        return int(self.args[-2])

    @property
    def padding(self) -> int:
        return int(self.args[-1])


class Conv2d(_ConvHead):
    """``X ⋆ K``: the cross-correlation of N×C×H×W images with F×C×kh×kw kernels."""

    def __new__(cls, X, K, stride=1, padding=0):
        X, K = _array(X, "the image", "conv2d"), _array(K, "the kernel", "conv2d")
        s = integer(stride, "conv2d: the stride", 1)
        p = integer(padding, "conv2d: the padding", 0)
        conv_shape(X, K, s, p)
        return super().__new__(cls, X, K, s, p)

    @property
    def shape(self):
        X, K, s, p = self.args
        return conv_shape(X, K, s, p)

    def _sympystr(self, printer):
        X, K = self.args[:2]
        return _operand(printer, X) + _star(self, printer, False) + _operand(printer, K)

    def _pretty(self, printer):
        return _pretty_text(self)

    def _latex(self, printer):
        X, K = self.args[:2]
        return _operand(printer, X) + _star(self, printer, True) + _operand(printer, K)


class Conv2dGradInput(_ConvHead):
    """∂L/∂X of ``X ⋆ K`` from δ = ∂L/∂Y: the full correlation of δ (dilated by the
    stride) with rot180(K), channels swapped, cropped by the padding; ``shape`` is X's."""

    def __new__(cls, G, K, shape, stride=1, padding=0):
        return super().__new__(cls, G, K, sp.Tuple(*shape), sp.Integer(stride),
                               sp.Integer(padding))

    @property
    def shape(self):
        return tuple(self.args[2])

    def _text(self, printer, tex):
        G, K = self.args[:2]
        rot = r"\operatorname{rot180}\left(%s\right)" if tex else "rot180(%s)"
        return _operand(printer, G) + _star(self, printer, tex, full=True) + \
            rot % printer._print(K)


class Conv2dGradKernel(_ConvHead):
    """∂L/∂K of ``X ⋆ K`` from δ: the correlation of X with δ, summed over the batch;
    ``shape`` is K's."""

    def __new__(cls, G, X, shape, stride=1, padding=0):
        return super().__new__(cls, G, X, sp.Tuple(*shape), sp.Integer(stride),
                               sp.Integer(padding))

    @property
    def shape(self):
        return tuple(self.args[2])

    def _text(self, printer, tex):
        G, X = self.args[:2]
        return _operand(printer, X) + _star(self, printer, tex) + _operand(printer, G)


def conv2d(X, K, b=None, stride=1, padding=0):
    """``X ⋆ K + b``: the cross-correlation of PyTorch's ``conv2d``.

    ``X`` is N×C×H×W (``sb.tensor("X", N, C, H, W)`` or a SymPy ``ArraySymbol``), ``K``
    F×C×kh×kw, ``b`` one bias per filter (a 1×F MatrixSymbol or an F-vector
    ``sb.tensor("b", F)``) or None; ``stride`` ≥ 1 and ``padding`` ≥ 0 are integers.  The
    output is N×F×H_out×W_out with H_out = ⌊(H + 2p − kh)/s⌋ + 1."""
    from .shape import Reshape

    Y = Conv2d(X, K, stride, padding)
    if b is None:
        return Y
    b = _array(b, "the bias", "conv2d")
    F = Y.shape[1]
    bs = tuple(b.shape)
    if not (len(bs) == 1 and same_dim(bs[0], F) or len(bs) == 2 and bs[0] == 1
            and same_dim(bs[1], F)):
        raise ShapeError(f"conv2d: the bias {b} must hold one entry per filter, shape 1×{F} "
                         f"or {F}, got {shape_text(bs)}")
    # a (1, F, 1, 1) bias broadcasts over the batch and the positions of each filter
    return Y + Reshape(b, (1, F, 1, 1))


# --- rules -------------------------------------------------------------------------------


def _check(e, where) -> None:
    if isinstance(e, Conv2d):
        return  # its constructor checked X and K; verify checks its shape against its name
    G, A, shape, s, p = e.args
    X, K = (A, shape) if isinstance(e, Conv2dGradKernel) else (shape, A)
    Xs = X.shape if is_matrix(X) else tuple(X)
    Ks = K.shape if is_matrix(K) else tuple(K)
    from ..matrix import array_symbol

    out = conv_shape(array_symbol("X", Xs), array_symbol("K", Ks), s, p,
                     who=type(e).__name__)
    if not _same(G.shape, out):
        raise ShapeError(f"{type(e).__name__}: δ {G} is {shape_text(G.shape)}, the "
                         f"convolution's output is {shape_text(out)} {where}")


def conv_vjp(e, y, g, wants, local=None):
    # X̄ = δ ⋆_full rot180(K),  K̄ = X ⋆ δ  (δ = ḡ)
    X, K, s, p = e.args
    G = broadcast(g, e.shape)
    out = []
    if wants(X):
        out.append((X, Conv2dGradInput(G, K, X.shape, s, p)))
    if wants(K):
        out.append((K, Conv2dGradKernel(G, X, K.shape, s, p)))
    return out


def kernel(gen, name: str, work) -> str:
    """conv_numba's ``name``: its prange version where the work pays for threads (a prange
    launch costs about what a digits-sized convolution does: bench/RESULTS.md)."""
    return gen.use(NUMBA, f"{name}_{'parallel' if gen.pays(work) else 'serial'}")


def _macs(e, gen) -> int:
    # multiply-adds of X ⋆ K, its ∂X and its ∂K alike: N·F·H_out·W_out·C·kh·kw; one
    # vectorized over the batch costs about half a _cost unit (~0.12 ns)
    N, F, ho, wo = e.shape if isinstance(e, Conv2d) else e.args[0].shape  # Y, or δ
    _, C, kh, kw = e.shape if isinstance(e, Conv2dGradKernel) else e.args[1].shape  # K
    return gen.est(N) * int(F * ho * wo * C * kh * kw) // 2


def conv_cpu(gen, a):
    gen.head(a)
    X, K, s, p = a.expr.args
    f = kernel(gen, "conv2d", _macs(a.expr, gen))
    gen.emit(f"{f}({gen.ids[X]}, {gen.ids[K]}, np.empty(0, DT), {s}, {p}, "
             f"{gen.buffer(a.name)})")


def grad_input_cpu(gen, a):
    gen.head(a)
    G, K, _, s, p = a.expr.args
    f = kernel(gen, "conv2d_grad_input", _macs(a.expr, gen))
    gen.emit(f"{f}({gen.ids[G]}, {gen.ids[K]}, {s}, {p}, {gen.buffer(a.name)})")


def grad_kernel_cpu(gen, a):
    gen.head(a)
    G, X, _, s, p = a.expr.args
    f = kernel(gen, "conv2d_grad_kernel", _macs(a.expr, gen))
    gen.emit(f"{f}({gen.ids[G]}, {gen.ids[X]}, {s}, {p}, {gen.buffer(a.name)})")


def conv_numpy(ctx, a):
    X, K, s, p = a.expr.args
    return f"{ctx.use(NUMPY, 'conv2d')}({ctx.op(X)}, {ctx.op(K)}, None, {s}, {p})"


def grad_input_numpy(ctx, a):
    G, K, shape, s, p = a.expr.args
    return (f"{ctx.use(NUMPY, 'conv2d_grad_input')}({ctx.op(G)}, {ctx.op(K)}, "
            f"{ctx.shape(shape)}, {s}, {p})")


def grad_kernel_numpy(ctx, a):
    G, X, shape, s, p = a.expr.args
    return (f"{ctx.use(NUMPY, 'conv2d_grad_kernel')}({ctx.op(G)}, {ctx.op(X)}, "
            f"{ctx.shape(shape)}, {s}, {p})")


# --- index form: (n, f, i, j) of Y, (n, c, r, q) of ∂L/∂X, (f, c, u, v) of ∂L/∂K -------------


def _sum(body, *limits):
    return sp.Sum(body, *[(v, 0, n - 1) for v, n in limits])


def conv_entry(ix, e, n, f, i, j):
    X, K, s, p = e.args
    _, C, kh, kw = K.shape
    c, u, v = ix.letter(C, ("c", "k")), ix.letter(kh, ("u",)), ix.letter(kw, ("v",))
    return _sum(ix.entry(K, f, c, u, v) * ix.entry(X, n, c, i * s + u - p, j * s + v - p),
                (c, C), (u, kh), (v, kw))


def grad_input_entry(ix, e, n, c, r, q):
    # X̄[n,c,r,q] = Σ_f Σ_i Σ_j δ[n,f,i,j] K[f,c,r+p−i·s,q+p−j·s]  (K is 0 off its window)
    G, K, _, s, p = e.args
    _, F, ho, wo = G.shape
    f, i, j = ix.letter(F, ("f",)), ix.letter(ho, ("i",)), ix.letter(wo, ("j",))
    return _sum(ix.entry(G, n, f, i, j) * ix.entry(K, f, c, r + p - i * s, q + p - j * s),
                (f, F), (i, ho), (j, wo))


def grad_kernel_entry(ix, e, f, c, u, v):
    G, X, _, s, p = e.args
    N, _, ho, wo = G.shape
    n, i, j = ix.letter(N, ("n",)), ix.letter(ho, ("i",)), ix.letter(wo, ("j",))
    return _sum(ix.entry(G, n, f, i, j) * ix.entry(X, n, c, i * s + u - p, j * s + v - p),
                (n, N), (i, ho), (j, wo))


def lowered(n: int) -> dict:
    """The front-end rules of a head whose first ``n`` args are arrays and the rest its
    constants (shape, stride, ...): printed derivations evaluate gradient heads too."""
    return dict(children=lambda e: list(e.args[:n]), operands=lambda e: list(e.args[:n]),
                lower=lambda lw, e: lw.emit(e.func(*[lw.L(x) for x in e.args[:n]],
                                                   *e.args[n:]), tuple(e.shape)),
                rebuild=lambda e, ops: e.func(*ops, *e.args[n:]))


def _sp_label(e) -> str:
    return f" ({_sp(e)})" if _sp(e) else ""


register(Conv2d, lower=lambda lw, e: lw.emit(Conv2d(lw.L(e.args[0]), lw.L(e.args[1]),
                                                    *e.args[2:]), tuple(e.shape)),
         children=lambda e: list(e.args[:2]), operands=lambda e: list(e.args[:2]),
         rebuild=lambda e, ops: Conv2d(*ops, *e.args[2:]), check=_check, vjp=conv_vjp,
         numpy=conv_numpy, cpu=conv_cpu, label=lambda e: "⋆" + _sp_label(e),
         entry=conv_entry, extra={"letters": ("n", "f", "i", "j")},
         doc="2-D cross-correlation of images with kernels")
register(Conv2dGradInput, **lowered(2), check=_check,
         numpy=grad_input_numpy, cpu=grad_input_cpu,
         label=lambda e: "⋆ rot180" + _sp_label(e), entry=grad_input_entry,
         extra={"letters": ("n", "c", "r", "q")},
         doc="∂/∂X of a convolution: δ ⋆_full rot180(K)")
register(Conv2dGradKernel, **lowered(2), check=_check,
         numpy=grad_kernel_numpy, cpu=grad_kernel_cpu,
         label=lambda e: "⋆ δ" + _sp_label(e), entry=grad_kernel_entry,
         extra={"letters": ("f", "c", "u", "v")},
         doc="∂/∂K of a convolution: X ⋆ δ summed over the batch")
