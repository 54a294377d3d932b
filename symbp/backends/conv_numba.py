"""Convolution and pooling kernels for the Numba CPU targets: direct loops, no im2col.

Every kernel writes into an array its caller allocated (``out``, the last argument), so
generated njit code calls them on workspace buffers; each comes twice:

    <name>_serial     plain loops (the ``cpu`` target)
    <name>_parallel   ``prange`` over the images of the batch (over the filters for the
                      kernel and bias gradients, whose sums run over the batch), for the
                      ``parallel`` target; call it from serial code, not from inside a prange

Both run the same per-image (per-filter) routine, so they cannot drift apart.  ``conv2d``,
``conv2d_grad_input``, ... are Python wrappers with the signatures of
``symbp.backends.conv_numpy`` plus ``out=None, parallel=False``: they check shapes and
dtypes, allocate ``out`` when it is not given and call the kernel.

A bias ``b`` is a length-F array, or a length-0 array for none.  Strides and paddings are
ints; the math is that of conv_numpy's docstring (cross-correlation, PyTorch's shapes and
tie rule).  Why direct loops: on the small images this is for (8×8 digits, 28×28 LeNet)
an im2col matrix costs more to write than the product it feeds; bench/RESULTS.md ("conv
kernels") has the figures.  Padding never becomes a padded copy: for each kernel offset
u the loops run only over the output rows i whose input row i·s+u−p lies inside the
image, so the inner loop has no branch.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..errors import InputError
from .conv_numpy import conv2d_shape, pool2d_shape


@njit(cache=True, inline="always")
def _span(u, p, s, h, ho):
    # output rows i with 0 ≤ i·s + u − p < h: i ≥ ⌈(p−u)/s⌉ and i ≤ ⌊(h−1+p−u)/s⌋
    lo = max(0, -((u - p) // s))
    hi = min(ho, (h - 1 + p - u) // s + 1)
    return lo, max(lo, hi)


# --- conv2d: Y[n,f,i,j] = b[f] + Σ_c Σ_u Σ_v K[f,c,u,v] · X[n,c,i·s+u−p,j·s+v−p] -----------


@njit(cache=True)
def _conv2d_image(X, K, b, s, p, Y, n):
    C, H, W = X.shape[1], X.shape[2], X.shape[3]
    F, kh, kw = K.shape[0], K.shape[2], K.shape[3]
    ho, wo = Y.shape[2], Y.shape[3]
    for f in range(F):
        Y[n, f] = b[f] if b.shape[0] else 0
        for c in range(C):
            for u in range(kh):
                i0, i1 = _span(u, p, s, H, ho)
                for v in range(kw):
                    j0, j1 = _span(v, p, s, W, wo)
                    w = K[f, c, u, v]
                    for i in range(i0, i1):
                        r = i * s + u - p
                        for j in range(j0, j1):
                            Y[n, f, i, j] += w * X[n, c, r, j * s + v - p]


@njit(cache=True)
def conv2d_serial(X, K, b, s, p, out):
    for n in range(X.shape[0]):
        _conv2d_image(X, K, b, s, p, out, n)


@njit(cache=True, parallel=True)
def conv2d_parallel(X, K, b, s, p, out):
    for n in prange(X.shape[0]):
        _conv2d_image(X, K, b, s, p, out, n)


# --- ∂L/∂X: the transposed convolution, δ scattered back along the windows it came from --
# dX[n,c,i·s+u−p, j·s+v−p] += K[f,c,u,v] · δ[n,f,i,j]; one image per task, so no two tasks
# write the same entry.


@njit(cache=True)
def _conv2d_grad_input_image(G, K, s, p, dX, n):
    C, H, W = dX.shape[1], dX.shape[2], dX.shape[3]
    F, kh, kw = K.shape[0], K.shape[2], K.shape[3]
    ho, wo = G.shape[2], G.shape[3]
    dX[n] = 0
    for f in range(F):
        for c in range(C):
            for u in range(kh):
                i0, i1 = _span(u, p, s, H, ho)
                for v in range(kw):
                    j0, j1 = _span(v, p, s, W, wo)
                    w = K[f, c, u, v]
                    for i in range(i0, i1):
                        r = i * s + u - p
                        for j in range(j0, j1):
                            dX[n, c, r, j * s + v - p] += w * G[n, f, i, j]


@njit(cache=True)
def conv2d_grad_input_serial(G, K, s, p, out):
    for n in range(G.shape[0]):
        _conv2d_grad_input_image(G, K, s, p, out, n)


@njit(cache=True, parallel=True)
def conv2d_grad_input_parallel(G, K, s, p, out):
    for n in prange(G.shape[0]):
        _conv2d_grad_input_image(G, K, s, p, out, n)


# --- ∂L/∂K[f,c,u,v] = Σ_n Σ_i Σ_j δ[n,f,i,j] · X[n,c,i·s+u−p,j·s+v−p] -------------------
# A sum over the batch: tasks split the filters, each owns its dK[f].


@njit(cache=True)
def _conv2d_grad_kernel_filter(G, X, s, p, dK, f):
    N, C, H, W = X.shape
    kh, kw = dK.shape[2], dK.shape[3]
    ho, wo = G.shape[2], G.shape[3]
    dK[f] = 0
    for n in range(N):
        for c in range(C):
            for u in range(kh):
                i0, i1 = _span(u, p, s, H, ho)
                for v in range(kw):
                    j0, j1 = _span(v, p, s, W, wo)
                    acc = dK.dtype.type(0)  # a bare 0 would make float32 sums float64
                    for i in range(i0, i1):
                        r = i * s + u - p
                        for j in range(j0, j1):
                            acc += G[n, f, i, j] * X[n, c, r, j * s + v - p]
                    dK[f, c, u, v] += acc


@njit(cache=True)
def conv2d_grad_kernel_serial(G, X, s, p, out):
    for f in range(out.shape[0]):
        _conv2d_grad_kernel_filter(G, X, s, p, out, f)


@njit(cache=True, parallel=True)
def conv2d_grad_kernel_parallel(G, X, s, p, out):
    for f in prange(out.shape[0]):
        _conv2d_grad_kernel_filter(G, X, s, p, out, f)


# --- ∂L/∂b[f] = Σ_n Σ_i Σ_j δ[n,f,i,j] ------------------------------------------------------


@njit(cache=True)
def _conv2d_grad_bias_filter(G, db, f):
    acc = db.dtype.type(0)
    for n in range(G.shape[0]):
        for i in range(G.shape[2]):
            for j in range(G.shape[3]):
                acc += G[n, f, i, j]
    db[f] = acc


@njit(cache=True)
def conv2d_grad_bias_serial(G, out):
    for f in range(G.shape[1]):
        _conv2d_grad_bias_filter(G, out, f)


@njit(cache=True, parallel=True)
def conv2d_grad_bias_parallel(G, out):
    for f in prange(G.shape[1]):
        _conv2d_grad_bias_filter(G, out, f)


# --- max-pool: the window's first maximum (row-major); NaN wins, as in PyTorch ---------------


@njit(cache=True, inline="always")
def _argmax(X, n, c, r0, q0, k):
    # PyTorch's scan: `v > m or v != v`, so a tie keeps the first maximum and a NaN takes
    # over (a later NaN replaces an earlier one)
    m = X[n, c, r0, q0]
    br, bq = r0, q0
    for r in range(r0, r0 + k):
        for q in range(q0, q0 + k):
            v = X[n, c, r, q]
            if v > m or v != v:
                m, br, bq = v, r, q
    return m, br, bq


@njit(cache=True)
def _max_pool2d_image(X, k, s, Y, n):
    for c in range(X.shape[1]):
        for i in range(Y.shape[2]):
            for j in range(Y.shape[3]):
                Y[n, c, i, j] = _argmax(X, n, c, i * s, j * s, k)[0]


@njit(cache=True)
def max_pool2d_serial(X, k, s, out):
    for n in range(X.shape[0]):
        _max_pool2d_image(X, k, s, out, n)


@njit(cache=True, parallel=True)
def max_pool2d_parallel(X, k, s, out):
    for n in prange(X.shape[0]):
        _max_pool2d_image(X, k, s, out, n)


@njit(cache=True)
def _max_pool2d_grad_image(G, X, k, s, dX, n):
    dX[n] = 0
    for c in range(X.shape[1]):
        for i in range(G.shape[2]):
            for j in range(G.shape[3]):
                _, r, q = _argmax(X, n, c, i * s, j * s, k)
                dX[n, c, r, q] += G[n, c, i, j]  # += : overlapping windows add


@njit(cache=True)
def max_pool2d_grad_serial(G, X, k, s, out):
    for n in range(X.shape[0]):
        _max_pool2d_grad_image(G, X, k, s, out, n)


@njit(cache=True, parallel=True)
def max_pool2d_grad_parallel(G, X, k, s, out):
    for n in prange(X.shape[0]):
        _max_pool2d_grad_image(G, X, k, s, out, n)


# --- avg-pool: the window's sum / k²; its gradient spreads δ/k² over the window ----------


@njit(cache=True)
def _avg_pool2d_image(X, k, s, Y, n):
    kk = Y.dtype.type(k * k)  # divide by k², as PyTorch does (not × 1/k²: one rounding)
    for c in range(X.shape[1]):
        for i in range(Y.shape[2]):
            for j in range(Y.shape[3]):
                acc = Y.dtype.type(0)
                for r in range(i * s, i * s + k):
                    for q in range(j * s, j * s + k):
                        acc += X[n, c, r, q]
                Y[n, c, i, j] = acc / kk


@njit(cache=True)
def avg_pool2d_serial(X, k, s, out):
    for n in range(X.shape[0]):
        _avg_pool2d_image(X, k, s, out, n)


@njit(cache=True, parallel=True)
def avg_pool2d_parallel(X, k, s, out):
    for n in prange(X.shape[0]):
        _avg_pool2d_image(X, k, s, out, n)


@njit(cache=True)
def _avg_pool2d_grad_image(G, k, s, dX, n):
    dX[n] = 0
    kk = dX.dtype.type(k * k)
    for c in range(dX.shape[1]):
        for i in range(G.shape[2]):
            for j in range(G.shape[3]):
                g = G[n, c, i, j] / kk
                for r in range(i * s, i * s + k):
                    for q in range(j * s, j * s + k):
                        dX[n, c, r, q] += g


@njit(cache=True)
def avg_pool2d_grad_serial(G, k, s, out):
    for n in range(G.shape[0]):
        _avg_pool2d_grad_image(G, k, s, out, n)


@njit(cache=True, parallel=True)
def avg_pool2d_grad_parallel(G, k, s, out):
    for n in prange(G.shape[0]):
        _avg_pool2d_grad_image(G, k, s, out, n)


# --- Python wrappers: conv_numpy's signatures, plus out= and parallel= ---------------------

_DTYPES = (np.float32, np.float64)


def _arrays(name: str, **arrays) -> np.dtype:
    """The one float dtype of ``arrays`` (all C-contiguous); else an error naming which."""
    dts = {k: a.dtype for k, a in arrays.items() if a is not None}
    dt = next(iter(dts.values()))
    if dt not in _DTYPES or any(d != dt for d in dts.values()):
        raise InputError(f"{name}: the arrays must share one dtype, float32 or float64; got "
                         + ", ".join(f"{k}: {d}" for k, d in dts.items()))
    for k, a in arrays.items():
        if a is not None and not a.flags.c_contiguous:
            raise InputError(f"{name}: {k} must be C-contiguous (np.ascontiguousarray)")
    return dt


def _out(name: str, out, shape, dt):
    if out is None:
        return np.empty(shape, dtype=dt)
    if out.shape != tuple(shape) or out.dtype != dt or not out.flags.c_contiguous:
        raise InputError(f"{name}: out must be a C-contiguous {dt} array of shape "
                         f"{tuple(shape)}, got {out.dtype} {out.shape}")
    return out


def _pick(serial, parallel_, parallel: bool):
    return parallel_ if parallel else serial


def conv2d(X, K, b=None, stride: int = 1, padding: int = 0, out=None, parallel=False):
    """Y = X ⋆ K + b into ``out`` (allocated when None); see conv_numpy.conv2d."""
    shape = conv2d_shape(X.shape, K.shape, stride, padding)
    dt = _arrays("conv2d", X=X, K=K, b=b)
    if b is None:
        b = np.empty(0, dtype=dt)
    elif b.shape != (K.shape[0],):
        raise InputError(f"conv2d: the bias must have one entry per filter, shape "
                         f"({K.shape[0]},), got {b.shape}")
    out = _out("conv2d", out, shape, dt)
    _pick(conv2d_serial, conv2d_parallel, parallel)(X, K, b, stride, padding, out)
    return out


def conv2d_grad_input(G, K, X_shape, stride: int = 1, padding: int = 0, out=None,
                      parallel=False):
    """∂L/∂X from δ = ∂L/∂Y; see conv_numpy.conv2d_grad_input."""
    shape = conv2d_shape(X_shape, K.shape, stride, padding)
    _check_grad("conv2d_grad_input", G, shape)
    dt = _arrays("conv2d_grad_input", G=G, K=K)
    out = _out("conv2d_grad_input", out, X_shape, dt)
    _pick(conv2d_grad_input_serial, conv2d_grad_input_parallel, parallel)(
        G, K, stride, padding, out)
    return out


def conv2d_grad_kernel(G, X, K_shape, stride: int = 1, padding: int = 0, out=None,
                       parallel=False):
    """∂L/∂K; see conv_numpy.conv2d_grad_kernel."""
    shape = conv2d_shape(X.shape, K_shape, stride, padding)
    _check_grad("conv2d_grad_kernel", G, shape)
    dt = _arrays("conv2d_grad_kernel", G=G, X=X)
    out = _out("conv2d_grad_kernel", out, K_shape, dt)
    _pick(conv2d_grad_kernel_serial, conv2d_grad_kernel_parallel, parallel)(
        G, X, stride, padding, out)
    return out


def conv2d_grad_bias(G, out=None, parallel=False):
    """∂L/∂b; see conv_numpy.conv2d_grad_bias."""
    dt = _arrays("conv2d_grad_bias", G=G)
    out = _out("conv2d_grad_bias", out, (G.shape[1],), dt)
    _pick(conv2d_grad_bias_serial, conv2d_grad_bias_parallel, parallel)(G, out)
    return out


def _check_grad(name: str, G, shape):
    if G.shape != tuple(shape):
        raise InputError(f"{name}: δ must have the output's shape {tuple(shape)}, "
                         f"got {G.shape}")


def max_pool2d(X, size: int, stride: int | None = None, out=None, parallel=False):
    """The maximum of each window into ``out``; see conv_numpy.max_pool2d."""
    shape = pool2d_shape(X.shape, size, stride)
    dt = _arrays("max_pool2d", X=X)
    out = _out("max_pool2d", out, shape, dt)
    s = size if stride is None else stride
    _pick(max_pool2d_serial, max_pool2d_parallel, parallel)(X, size, s, out)
    return out


def max_pool2d_grad(G, X, size: int, stride: int | None = None, out=None, parallel=False):
    """∂L/∂X of max-pooling; see conv_numpy.max_pool2d_grad."""
    _check_grad("max_pool2d_grad", G, pool2d_shape(X.shape, size, stride))
    dt = _arrays("max_pool2d_grad", G=G, X=X)
    out = _out("max_pool2d_grad", out, X.shape, dt)
    s = size if stride is None else stride
    _pick(max_pool2d_grad_serial, max_pool2d_grad_parallel, parallel)(G, X, size, s, out)
    return out


def avg_pool2d(X, size: int, stride: int | None = None, out=None, parallel=False):
    """The mean of each window into ``out``; see conv_numpy.avg_pool2d."""
    shape = pool2d_shape(X.shape, size, stride)
    dt = _arrays("avg_pool2d", X=X)
    out = _out("avg_pool2d", out, shape, dt)
    s = size if stride is None else stride
    _pick(avg_pool2d_serial, avg_pool2d_parallel, parallel)(X, size, s, out)
    return out


def avg_pool2d_grad(G, X_shape, size: int, stride: int | None = None, out=None,
                    parallel=False):
    """∂L/∂X of average pooling; see conv_numpy.avg_pool2d_grad."""
    _check_grad("avg_pool2d_grad", G, pool2d_shape(X_shape, size, stride))
    dt = _arrays("avg_pool2d_grad", G=G)
    out = _out("avg_pool2d_grad", out, X_shape, dt)
    s = size if stride is None else stride
    _pick(avg_pool2d_grad_serial, avg_pool2d_grad_parallel, parallel)(G, size, s, out)
    return out
