"""Convolution and pooling kernels for the Numba CPU targets: direct loops, no im2col.

Every kernel overwrites an array its caller allocated (``out``, the last argument; all
arrays C-contiguous), so generated njit code calls them on workspace buffers; each comes
twice:

    <name>_serial     plain loops (the ``cpu`` target)
    <name>_parallel   ``prange`` over the filters (forward, ∂K, ∂b), the channels (∂X,
                      max-pooling) or the images (avg-pooling), for the ``parallel``
                      target; call it from serial code, not from inside a prange

Both run the same per-filter (per-channel, per-image) routine, so they cannot drift apart.
``conv2d``, ``conv2d_grad_input``, ... are Python wrappers with the signatures of
``symbp.backends.conv_numpy`` plus ``out=None, parallel=False``: they check shapes and
dtypes, allocate ``out`` when it is not given and call the kernel.

A bias ``b`` is a length-F array, or a length-0 array for none.  Strides and paddings are
ints; the math is that of conv_numpy's docstring (cross-correlation, PyTorch's shapes and
tie rule).

Why the convolutions and max-pooling run with the batch innermost: the images are copied batch-last
(X[n,c,h,w] → Xt[c,h,w,n]) and every step of the loops is one multiply-add over all the
images of the batch, a contiguous loop of length N that the compiler vectorizes whatever
the image and kernel sizes.  On the small images these kernels are for, every other
innermost loop is too short to fill a vector register (a row of a 4×4 feature map, 8 or
16 filters), and im2col + BLAS spends its time writing the im2col matrix: on the digits
CNN (N=64, one core) the two forwards take 34 and 61 µs this way, 75 and 126 µs with
im2col + BLAS, 0.9 and 4.3 ms with the output row innermost (bench/RESULTS.md, "conv
kernels").  The copies cost one pass over X and Y each (most of a max-pool's time); a
network that kept its activations batch-last would not need them.  The price: a batch of
one image runs the vector loops one lane wide.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..errors import InputError
from .conv_numpy import conv2d_shape, pool2d_shape

# float sums may be reordered (the bias gradient's sum vectorizes) and a·b + c fused;
# no other fast-math (NaN and inf keep their meaning)
_FM = {"reassoc", "contract"}


@njit(cache=True)
def _transpose(A, B):
    # B = Aᵀ for A (n×m) and B (m×n), in 16×64 tiles.  Untiled, the strided side walks
    # 64 rows at once; with a 2 KB row (an 8×8×8 map) they all fall in the same two L1
    # sets, and the copy took 330 µs instead of 20.  Plain loops also compile in a quarter
    # of a second, np.ascontiguousarray(A.transpose(...)) in 4-7 s.
    n, m = A.shape
    for i0 in range(0, n, 16):
        i1 = min(i0 + 16, n)
        for j0 in range(0, m, 64):
            for j in range(j0, min(j0 + 64, m)):
                for i in range(i0, i1):
                    B[j, i] = A[i, j]


@njit(cache=True)
def _batch_last(A):
    # N×a×b×c → a×b×c×N: the images of the batch side by side in memory
    N, a, b, c = A.shape
    B = np.empty((a, b, c, N), dtype=A.dtype)
    _transpose(A.reshape(N, a * b * c), B.reshape(a * b * c, N))
    return B


@njit(cache=True)
def _batch_first(Bt, out):
    # out = Bt with the batch moved back in front (a×b×c×N → N×a×b×c)
    N = out.shape[0]
    _transpose(Bt.reshape(Bt.size // N, N), out.reshape(N, Bt.size // N))


# --- conv2d: Y[n,f,i,j] = b[f] + Σ_c Σ_u Σ_v K[f,c,u,v] · X[n,c,i·s+u−p,j·s+v−p] -----------
# Xt = X batch-last, Yt = Y batch-last; one task per filter f.


@njit(cache=True, fastmath=_FM)
def _conv2d_filter(Xt, K, b, s, p, Yt, f):
    C, H, W = Xt.shape[0], Xt.shape[1], Xt.shape[2]
    kh, kw = K.shape[2], K.shape[3]
    for i in range(Yt.shape[1]):
        for j in range(Yt.shape[2]):
            y = Yt[f, i, j]
            y[:] = b[f] if b.shape[0] else 0
            for c in range(C):
                for u in range(kh):
                    r = i * s + u - p
                    if r < 0 or r >= H:  # a row of the zero padding
                        continue
                    for v in range(kw):
                        q = j * s + v - p
                        if q < 0 or q >= W:
                            continue
                        w, x = K[f, c, u, v], Xt[c, r, q]
                        for n in range(y.shape[0]):  # every image at once
                            y[n] += w * x[n]


@njit(cache=True)
def conv2d_serial(X, K, b, s, p, out):
    Xt = _batch_last(X)
    Yt = np.empty(out.shape[1:] + out.shape[:1], dtype=out.dtype)
    for f in range(K.shape[0]):
        _conv2d_filter(Xt, K, b, s, p, Yt, f)
    _batch_first(Yt, out)


@njit(cache=True, parallel=True)
def conv2d_parallel(X, K, b, s, p, out):
    Xt = _batch_last(X)
    Yt = np.empty(out.shape[1:] + out.shape[:1], dtype=out.dtype)
    for f in prange(K.shape[0]):
        _conv2d_filter(Xt, K, b, s, p, Yt, f)
    _batch_first(Yt, out)


# --- ∂L/∂X: the transposed convolution, δ scattered back along the windows it came from --
# dX[n,c,i·s+u−p, j·s+v−p] += K[f,c,u,v] · δ[n,f,i,j]; one task per input channel c, so no
# two tasks write the same entry.


@njit(cache=True, fastmath=_FM)
def _conv2d_grad_input_channel(Gt, K, s, p, dXt, c):
    H, W = dXt.shape[1], dXt.shape[2]
    kh, kw = K.shape[2], K.shape[3]
    dXt[c] = 0
    for f in range(Gt.shape[0]):
        for i in range(Gt.shape[1]):
            for j in range(Gt.shape[2]):
                g = Gt[f, i, j]
                for u in range(kh):
                    r = i * s + u - p
                    if r < 0 or r >= H:
                        continue
                    for v in range(kw):
                        q = j * s + v - p
                        if q < 0 or q >= W:
                            continue
                        w, dx = K[f, c, u, v], dXt[c, r, q]
                        for n in range(g.shape[0]):
                            dx[n] += w * g[n]


@njit(cache=True)
def conv2d_grad_input_serial(G, K, s, p, out):
    Gt = _batch_last(G)
    dXt = np.empty(out.shape[1:] + out.shape[:1], dtype=out.dtype)
    for c in range(K.shape[1]):
        _conv2d_grad_input_channel(Gt, K, s, p, dXt, c)
    _batch_first(dXt, out)


@njit(cache=True, parallel=True)
def conv2d_grad_input_parallel(G, K, s, p, out):
    Gt = _batch_last(G)
    dXt = np.empty(out.shape[1:] + out.shape[:1], dtype=out.dtype)
    for c in prange(K.shape[1]):
        _conv2d_grad_input_channel(Gt, K, s, p, dXt, c)
    _batch_first(dXt, out)


# --- ∂L/∂K[f,c,u,v] = Σ_n Σ_i Σ_j δ[n,f,i,j] · X[n,c,i·s+u−p,j·s+v−p] -------------------
# One task per filter; the sum over n is a dot product of two batch-last rows.


@njit(cache=True, fastmath=_FM)
def _conv2d_grad_kernel_filter(Gt, Xt, s, p, dK, f):
    C, H, W = Xt.shape[0], Xt.shape[1], Xt.shape[2]
    kh, kw = dK.shape[2], dK.shape[3]
    # one partial sum per image, added up at the end: the loop over the batch stays a
    # vector multiply-add, with no horizontal sum per window position
    acc = np.empty(Xt.shape[3], dtype=dK.dtype)
    for c in range(C):
        for u in range(kh):
            for v in range(kw):
                acc[:] = 0
                for i in range(Gt.shape[1]):
                    r = i * s + u - p
                    if r < 0 or r >= H:
                        continue
                    for j in range(Gt.shape[2]):
                        q = j * s + v - p
                        if q < 0 or q >= W:
                            continue
                        g, x = Gt[f, i, j], Xt[c, r, q]
                        for n in range(acc.shape[0]):
                            acc[n] += g[n] * x[n]
                dK[f, c, u, v] = acc.sum()


@njit(cache=True)
def conv2d_grad_kernel_serial(G, X, s, p, out):
    Gt, Xt = _batch_last(G), _batch_last(X)
    for f in range(out.shape[0]):
        _conv2d_grad_kernel_filter(Gt, Xt, s, p, out, f)


@njit(cache=True, parallel=True)
def conv2d_grad_kernel_parallel(G, X, s, p, out):
    Gt, Xt = _batch_last(G), _batch_last(X)
    for f in prange(out.shape[0]):
        _conv2d_grad_kernel_filter(Gt, Xt, s, p, out, f)


# --- ∂L/∂b[f] = Σ_n Σ_i Σ_j δ[n,f,i,j] ------------------------------------------------------


@njit(cache=True, fastmath=_FM)
def _conv2d_grad_bias_filter(G, db, f):
    # each image's δ[n,f] as one row of H_out·W_out: a loop long enough to vectorize
    g = G.reshape(G.shape[0], G.shape[1], G.shape[2] * G.shape[3])
    acc = db.dtype.type(0)
    for n in range(g.shape[0]):
        for k in range(g.shape[2]):
            acc += g[n, f, k]
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
# Batch-last like the convolutions; one task per channel.  The scan over a window is
# PyTorch's `v > m or v != v` (a tie keeps the first maximum; a NaN takes over, a later NaN
# replaces an earlier one), written as selects so that it runs over the batch in vectors.


@njit(cache=True)
def _window_argmax(Xt, c, r0, q0, k, m, e):
    # m[n], e[n]: the maximum of image n's window and its position u·k+v in the window
    m[:] = Xt[c, r0, q0]
    e[:] = 0
    for u in range(k):
        for v in range(k):
            x, t = Xt[c, r0 + u, q0 + v], np.int32(u * k + v)
            for n in range(m.shape[0]):
                # `|`, not `or`: the same selects, but `or` costs 6 s more of compiling
                xn, mn = x[n], m[n]
                take = (xn > mn) | (xn != xn)
                m[n] = xn if take else mn
                e[n] = t if take else e[n]


@njit(cache=True)
def _max_pool2d_channel(Xt, k, s, Yt, c):
    e = np.empty(Xt.shape[3], dtype=np.int32)
    for i in range(Yt.shape[1]):
        for j in range(Yt.shape[2]):
            _window_argmax(Xt, c, i * s, j * s, k, Yt[c, i, j], e)


@njit(cache=True)
def max_pool2d_serial(X, k, s, out):
    Xt = _batch_last(X)
    Yt = np.empty(out.shape[1:] + out.shape[:1], dtype=out.dtype)
    for c in range(X.shape[1]):
        _max_pool2d_channel(Xt, k, s, Yt, c)
    _batch_first(Yt, out)


@njit(cache=True, parallel=True)
def max_pool2d_parallel(X, k, s, out):
    Xt = _batch_last(X)
    Yt = np.empty(out.shape[1:] + out.shape[:1], dtype=out.dtype)
    for c in prange(X.shape[1]):
        _max_pool2d_channel(Xt, k, s, Yt, c)
    _batch_first(Yt, out)


@njit(cache=True)
def _max_pool2d_grad_channel(Gt, Xt, k, s, dXt, c):
    N = Xt.shape[3]
    m, e = np.empty(N, dtype=Xt.dtype), np.empty(N, dtype=np.int32)
    zero = dXt.dtype.type(0)
    dXt[c] = 0
    for i in range(Gt.shape[1]):
        for j in range(Gt.shape[2]):
            _window_argmax(Xt, c, i * s, j * s, k, m, e)
            g = Gt[c, i, j]
            for u in range(k):
                for v in range(k):
                    dx, t = dXt[c, i * s + u, j * s + v], np.int32(u * k + v)
                    for n in range(N):  # += : overlapping windows add
                        dx[n] += g[n] if e[n] == t else zero


@njit(cache=True)
def max_pool2d_grad_serial(G, X, k, s, out):
    Gt, Xt = _batch_last(G), _batch_last(X)
    dXt = np.empty(out.shape[1:] + out.shape[:1], dtype=out.dtype)
    for c in range(X.shape[1]):
        _max_pool2d_grad_channel(Gt, Xt, k, s, dXt, c)
    _batch_first(dXt, out)


@njit(cache=True, parallel=True)
def max_pool2d_grad_parallel(G, X, k, s, out):
    Gt, Xt = _batch_last(G), _batch_last(X)
    dXt = np.empty(out.shape[1:] + out.shape[:1], dtype=out.dtype)
    for c in prange(X.shape[1]):
        _max_pool2d_grad_channel(Gt, Xt, k, s, dXt, c)
    _batch_first(dXt, out)


# --- avg-pool: the window's sum / k²; its gradient spreads δ/k² over the window ----------
# Few flops per byte: plain loops in the given layout, one task per image.


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
