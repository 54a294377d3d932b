"""Convolution and pooling in NumPy: the reference the compiled kernels are tested against.

Images are N×C×H×W, kernels F×C×kh×kw, as in PyTorch.  A convolution is the
cross-correlation

    Y[n,f,i,j] = b[f] + Σ_c Σ_u Σ_v K[f,c,u,v] · Xp[n,c, i·s+u, j·s+v]

of the zero-padded image Xp (p zeros on every side) with stride s; the output has
H_out = (H + 2p − kh)//s + 1 rows (a last partial window is dropped, as in PyTorch).
Pooling takes k×k windows with stride s (k by default), no padding.

Written to be obviously right, not fast: windows are views (im2col through
``sliding_window_view``), products are ``tensordot``, and the input gradient is the
textbook rule δ_in = dilate_s(δ) ⋆_full rot180(K), computed as exactly that, so it shares
no index arithmetic with the direct loops of the compiled kernels.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import ShapeError, SymbpError


def _positive_int(v, what: str, least: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < least:
        raise SymbpError(f"{what} must be an integer ≥ {least}, got {v!r}")
    return int(v)


def conv2d_shape(x_shape, k_shape, stride: int = 1, padding: int = 0) -> tuple:
    """(N, F, H_out, W_out) of ``conv2d`` on an N×C×H×W image and an F×C×kh×kw kernel;
    every disagreement raises an error that names it."""
    s = _positive_int(stride, "conv2d stride", 1)
    p = _positive_int(padding, "conv2d padding", 0)
    if len(x_shape) != 4 or len(k_shape) != 4:
        raise ShapeError(f"conv2d takes an N×C×H×W image and an F×C×kh×kw kernel, got shapes "
                         f"{tuple(x_shape)} and {tuple(k_shape)}")
    n, c, h, w = x_shape
    f, kc, kh, kw = k_shape
    if kc != c:
        raise ShapeError(f"conv2d: the kernel {tuple(k_shape)} has {kc} input channels, the "
                         f"image {tuple(x_shape)} has {c}")
    if kh > h + 2 * p or kw > w + 2 * p:
        raise ShapeError(f"conv2d: the kernel's {kh}×{kw} window is larger than the padded "
                         f"image ({h}+2·{p})×({w}+2·{p}): pad more or use a smaller kernel")
    return n, f, (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1


def pool2d_shape(x_shape, size: int, stride: int | None = None) -> tuple:
    """(N, C, H_out, W_out) of a k×k pooling with stride s (None: s = k)."""
    k = _positive_int(size, "pooling size", 1)
    s = k if stride is None else _positive_int(stride, "pooling stride", 1)
    if len(x_shape) != 4:
        raise ShapeError(f"pooling takes an N×C×H×W image, got shape {tuple(x_shape)}")
    n, c, h, w = x_shape
    if k > h or k > w:
        raise ShapeError(f"pooling: the {k}×{k} window is larger than the {h}×{w} image")
    return n, c, (h - k) // s + 1, (w - k) // s + 1


def _windows(X, kh: int, kw: int, s: int):
    # W[n,c,i,j,u,v] = X[n,c,i·s+u,j·s+v]: a view, no copy (yet)
    return sliding_window_view(X, (kh, kw), axis=(2, 3))[:, :, ::s, ::s]


def _pad(X, p: int):
    return np.pad(X, ((0, 0), (0, 0), (p, p), (p, p))) if p else X


def conv2d(X, K, b=None, stride: int = 1, padding: int = 0):
    """Y = X ⋆ K + b (cross-correlation, as ``torch.nn.functional.conv2d``)."""
    conv2d_shape(X.shape, K.shape, stride, padding)
    W = _windows(_pad(X, padding), K.shape[2], K.shape[3], stride)
    # Σ over c, u, v: one matrix product of the im2col matrix with the flattened kernel
    Y = np.tensordot(W, K, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    if b is not None:
        Y = Y + b.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(Y)


def conv2d_grad_input(G, K, X_shape, stride: int = 1, padding: int = 0):
    """∂L/∂X from δ = ∂L/∂Y: the full correlation of the stride-dilated δ with the kernel
    rotated by 180° (channels swapped), cropped by the padding."""
    n, f, ho, wo = conv2d_shape(X_shape, K.shape, stride, padding)
    s, p = stride, padding
    _, c, h, w = X_shape
    _, _, kh, kw = K.shape
    # dilate: s−1 zeros between the entries of δ, so one output step is one input step
    D = np.zeros((n, f, (ho - 1) * s + 1, (wo - 1) * s + 1), dtype=G.dtype)
    D[:, :, ::s, ::s] = G
    # 'full': kh−1 zeros above and below; rows of the padded input that no window reached
    # (the stride did not divide) get zeros too, and a zero gradient
    rh = h + 2 * p - ((ho - 1) * s + kh)
    rw = w + 2 * p - ((wo - 1) * s + kw)
    D = np.pad(D, ((0, 0), (0, 0), (kh - 1, kh - 1 + rh), (kw - 1, kw - 1 + rw)))
    R = K[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)  # rot180, C×F×kh×kw
    dXp = conv2d(D, R)  # the gradient w.r.t. the padded image
    return np.ascontiguousarray(dXp[:, :, p:p + h, p:p + w])


def conv2d_grad_kernel(G, X, K_shape, stride: int = 1, padding: int = 0):
    """∂L/∂K[f,c,u,v] = Σ_n Σ_i Σ_j δ[n,f,i,j] · Xp[n,c,i·s+u,j·s+v]."""
    conv2d_shape(X.shape, K_shape, stride, padding)
    W = _windows(_pad(X, padding), K_shape[2], K_shape[3], stride)
    return np.ascontiguousarray(np.tensordot(G, W, axes=([0, 2, 3], [0, 2, 3])))


def conv2d_grad_bias(G):
    """∂L/∂b[f] = Σ_n Σ_i Σ_j δ[n,f,i,j]."""
    return G.sum(axis=(0, 2, 3))


def _argmax(X, size: int, stride: int):
    """The flat index u·k+v of each window's maximum, PyTorch's rule: the first maximum in
    row-major order; if the window holds NaN, the (last) NaN, so NaN propagates."""
    W = _windows(X, size, size, stride)
    flat = W.reshape(W.shape[:4] + (size * size,))
    i = np.argmax(flat, axis=-1)  # first maximum; on NaN, the first NaN
    nan = np.isnan(flat)
    last_nan = size * size - 1 - np.argmax(nan[..., ::-1], axis=-1)
    # PyTorch's scan is `if v > m or isnan(v)`: a later NaN replaces an earlier one
    return np.where(nan.any(axis=-1), last_nan, i), flat


def max_pool2d(X, size: int, stride: int | None = None):
    """The maximum of each size×size window (stride defaults to size)."""
    s = size if stride is None else stride
    pool2d_shape(X.shape, size, stride)
    i, flat = _argmax(X, size, s)
    return np.take_along_axis(flat, i[..., None], axis=-1)[..., 0]


def max_pool2d_grad(G, X, size: int, stride: int | None = None):
    """∂L/∂X: each window's δ goes to its argmax (first maximum; a NaN if there is one);
    overlapping windows (stride < size) add their contributions."""
    s = size if stride is None else stride
    n, c, ho, wo = pool2d_shape(X.shape, size, stride)
    i, _ = _argmax(X, size, s)
    rows = np.arange(ho).reshape(1, 1, ho, 1) * s + i // size
    cols = np.arange(wo).reshape(1, 1, 1, wo) * s + i % size
    nn = np.arange(n).reshape(n, 1, 1, 1)
    cc = np.arange(c).reshape(1, c, 1, 1)
    dX = np.zeros(X.shape, dtype=G.dtype)
    np.add.at(dX, (nn, cc, rows, cols), G)  # add.at: repeated indices accumulate
    return dX


def avg_pool2d(X, size: int, stride: int | None = None):
    """The mean of each size×size window."""
    s = size if stride is None else stride
    pool2d_shape(X.shape, size, stride)
    return _windows(X, size, size, s).sum(axis=(4, 5)) / X.dtype.type(size * size)


def avg_pool2d_grad(G, X_shape, size: int, stride: int | None = None):
    """∂L/∂X: each window spreads δ/k² over its k² entries; overlaps add."""
    s = size if stride is None else stride
    _, _, ho, wo = pool2d_shape(X_shape, size, stride)
    dX = np.zeros(X_shape, dtype=G.dtype)
    g = G / G.dtype.type(size * size)
    for u in range(size):
        for v in range(size):
            dX[:, :, u:u + (ho - 1) * s + 1:s, v:v + (wo - 1) * s + 1:s] += g
    return dX
