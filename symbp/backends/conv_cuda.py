"""Convolution and pooling kernels for the CUDA target (Numba CUDA).

One thread per output element, and every gradient is a gather: the thread that owns
dX[n,c,y,x] sums the contributions of the windows that cover (y, x), so no two threads
write one entry and no atomics are needed (their order, and so the result, is the same on
every run).  The math is that of conv_numpy's docstring; shapes and the tie rule are
PyTorch's.

``kernels(dtype)`` is the table of raw kernels for float32 or float64, for generated code
that launches them on its own device buffers (every output is an argument, the last); the
functions ``conv2d``, ``conv2d_grad_input``, ... launch them with one thread per output
entry, on device arrays or host arrays (copied to the device), and return the device
array ``out`` (allocated when None).  float32 discipline: every constant is made in the
kernel's dtype (``dt(0)``), so no float64 instruction enters a float32 kernel.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import cuda

from ..errors import InputError
from .conv_numpy import conv2d_shape, pool2d_shape

THREADS = 128  # threads per block: one output entry each


@functools.cache
def kernels(dtype) -> dict:
    """The kernels for ``dtype`` (float32 or float64), by name."""
    dt = numba.from_dtype(np.dtype(dtype))

    @cuda.jit
    def conv2d(X, K, b, s, p, Y):
        # Y[n,f,i,j] = b[f] + Σ_c Σ_u Σ_v K[f,c,u,v] · X[n,c,i·s+u−p,j·s+v−p]
        t = cuda.grid(1)
        N, F, ho, wo = Y.shape
        if t >= N * F * ho * wo:
            return
        j, i, f, n = t % wo, (t // wo) % ho, (t // (wo * ho)) % F, t // (wo * ho * F)
        C, H, W = X.shape[1], X.shape[2], X.shape[3]
        acc = dt(0)
        if b.shape[0] > 0:
            acc = b[f]
        for c in range(C):
            for u in range(K.shape[2]):
                r = i * s + u - p
                if 0 <= r < H:  # outside: a zero of the padding
                    for v in range(K.shape[3]):
                        q = j * s + v - p
                        if 0 <= q < W:
                            acc += K[f, c, u, v] * X[n, c, r, q]
        Y[n, f, i, j] = acc

    @cuda.jit
    def conv2d_grad_input(G, K, s, p, dX):
        # dX[n,c,y,x] = Σ_f Σ_u Σ_v K[f,c,u,v] · δ[n,f,i,j] over the windows (i, j) that
        # read (y, x): i·s + u − p = y, so u ≡ y + p (mod s) and i = (y + p − u)/s
        t = cuda.grid(1)
        N, C, H, W = dX.shape
        if t >= N * C * H * W:
            return
        x, y, c, n = t % W, (t // W) % H, (t // (W * H)) % C, t // (W * H * C)
        F, kh, kw = K.shape[0], K.shape[2], K.shape[3]
        ho, wo = G.shape[2], G.shape[3]
        acc = dt(0)
        # u ≤ y + p keeps i ≥ 0
        for u in range((y + p) % s, min(kh, y + p + 1), s):
            i = (y + p - u) // s
            if i < ho:
                for v in range((x + p) % s, min(kw, x + p + 1), s):
                    j = (x + p - v) // s
                    if j < wo:
                        for f in range(F):
                            acc += K[f, c, u, v] * G[n, f, i, j]
        dX[n, c, y, x] = acc

    @cuda.jit
    def conv2d_grad_kernel(G, X, s, p, dK):
        # dK[f,c,u,v] = Σ_n Σ_i Σ_j δ[n,f,i,j] · X[n,c,i·s+u−p,j·s+v−p]
        t = cuda.grid(1)
        F, C, kh, kw = dK.shape
        if t >= F * C * kh * kw:
            return
        v, u, c, f = t % kw, (t // kw) % kh, (t // (kw * kh)) % C, t // (kw * kh * C)
        N, H, W = X.shape[0], X.shape[2], X.shape[3]
        acc = dt(0)
        for n in range(N):
            for i in range(G.shape[2]):
                r = i * s + u - p
                if 0 <= r < H:
                    for j in range(G.shape[3]):
                        q = j * s + v - p
                        if 0 <= q < W:
                            acc += G[n, f, i, j] * X[n, c, r, q]
        dK[f, c, u, v] = acc

    @cuda.jit
    def conv2d_grad_bias(G, db):
        # db[f] = Σ_n Σ_i Σ_j δ[n,f,i,j]
        f = cuda.grid(1)
        if f >= G.shape[1]:
            return
        acc = dt(0)
        for n in range(G.shape[0]):
            for i in range(G.shape[2]):
                for j in range(G.shape[3]):
                    acc += G[n, f, i, j]
        db[f] = acc

    @cuda.jit(device=True)
    def argmax(X, n, c, r0, q0, k):
        # PyTorch's scan `v > m or v != v`: the first maximum in row-major order; a NaN
        # takes over (a later NaN replaces an earlier one), so NaN propagates
        m = X[n, c, r0, q0]
        br, bq = r0, q0
        for r in range(r0, r0 + k):
            for q in range(q0, q0 + k):
                v = X[n, c, r, q]
                if v > m or v != v:
                    m = v
                    br, bq = r, q
        return m, br, bq

    @cuda.jit
    def max_pool2d(X, k, s, Y):
        t = cuda.grid(1)
        N, C, ho, wo = Y.shape
        if t >= N * C * ho * wo:
            return
        j, i, c, n = t % wo, (t // wo) % ho, (t // (wo * ho)) % C, t // (wo * ho * C)
        m, _, _ = argmax(X, n, c, i * s, j * s, k)
        Y[n, c, i, j] = m

    @cuda.jit
    def max_pool2d_grad(G, X, k, s, dX):
        # dX[n,c,y,x] = Σ of δ over the windows that cover (y, x) and whose argmax it is
        t = cuda.grid(1)
        N, C, H, W = dX.shape
        if t >= N * C * H * W:
            return
        x, y, c, n = t % W, (t // W) % H, (t // (W * H)) % C, t // (W * H * C)
        acc = dt(0)
        # windows i with i·s ≤ y < i·s + k
        for i in range(max(0, (y - k + s) // s), min(G.shape[2], y // s + 1)):
            for j in range(max(0, (x - k + s) // s), min(G.shape[3], x // s + 1)):
                _, r, q = argmax(X, n, c, i * s, j * s, k)
                if r == y and q == x:
                    acc += G[n, c, i, j]
        dX[n, c, y, x] = acc

    @cuda.jit
    def avg_pool2d(X, k, s, Y):
        t = cuda.grid(1)
        N, C, ho, wo = Y.shape
        if t >= N * C * ho * wo:
            return
        j, i, c, n = t % wo, (t // wo) % ho, (t // (wo * ho)) % C, t // (wo * ho * C)
        acc = dt(0)
        for r in range(i * s, i * s + k):
            for q in range(j * s, j * s + k):
                acc += X[n, c, r, q]
        Y[n, c, i, j] = acc / dt(k * k)  # divide by k², as PyTorch does

    @cuda.jit
    def avg_pool2d_grad(G, k, s, dX):
        # dX[n,c,y,x] = Σ of δ/k² over the windows that cover (y, x)
        t = cuda.grid(1)
        N, C, H, W = dX.shape
        if t >= N * C * H * W:
            return
        x, y, c, n = t % W, (t // W) % H, (t // (W * H)) % C, t // (W * H * C)
        kk = dt(k * k)
        acc = dt(0)
        for i in range(max(0, (y - k + s) // s), min(G.shape[2], y // s + 1)):
            for j in range(max(0, (x - k + s) // s), min(G.shape[3], x // s + 1)):
                acc += G[n, c, i, j] / kk
        dX[n, c, y, x] = acc

    return {"conv2d": conv2d, "conv2d_grad_input": conv2d_grad_input,
            "conv2d_grad_kernel": conv2d_grad_kernel, "conv2d_grad_bias": conv2d_grad_bias,
            "max_pool2d": max_pool2d, "max_pool2d_grad": max_pool2d_grad,
            "avg_pool2d": avg_pool2d, "avg_pool2d_grad": avg_pool2d_grad}


# --- launchers: conv_numpy's signatures plus out=; device arrays in and out -----------------


def _device(name: str, **arrays):
    """The arrays on the device (host arrays are copied) and their one float dtype."""
    dts = {k: np.dtype(a.dtype) for k, a in arrays.items()}
    dt = next(iter(dts.values()))
    if dt not in (np.float32, np.float64) or any(d != dt for d in dts.values()):
        raise InputError(f"{name}: the arrays must share one dtype, float32 or float64; got "
                         + ", ".join(f"{k}: {d}" for k, d in dts.items()))
    dev = [cuda.to_device(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
           for a in arrays.values()]
    return dev, dt


def _out(name: str, out, shape, dt):
    if out is None:
        return cuda.device_array(shape, dtype=dt)
    if tuple(out.shape) != tuple(shape) or np.dtype(out.dtype) != dt:
        raise InputError(f"{name}: out must be a {dt} device array of shape {tuple(shape)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out


def _launch(kernel, out, *args):
    blocks = max(1, -(-out.size // THREADS))
    kernel[blocks, THREADS](*args, out)
    return out


def _grad_shape(name, G, shape):
    if tuple(G.shape) != tuple(shape):
        raise InputError(f"{name}: δ must have the output's shape {tuple(shape)}, "
                         f"got {tuple(G.shape)}")


def conv2d(X, K, b=None, stride: int = 1, padding: int = 0, out=None):
    """Y = X ⋆ K + b on the device; see conv_numpy.conv2d."""
    shape = conv2d_shape(X.shape, K.shape, stride, padding)
    if b is not None and tuple(b.shape) != (K.shape[0],):
        raise InputError(f"conv2d: the bias must have one entry per filter, shape "
                         f"({K.shape[0]},), got {tuple(b.shape)}")
    arrays = {"X": X, "K": K} if b is None else {"X": X, "K": K, "b": b}
    dev, dt = _device("conv2d", **arrays)
    X, K = dev[:2]
    b = dev[2] if b is not None else cuda.device_array(0, dtype=dt)  # length 0: no bias
    out = _out("conv2d", out, shape, dt)
    return _launch(kernels(dt)["conv2d"], out, X, K, b, stride, padding)


def conv2d_grad_input(G, K, X_shape, stride: int = 1, padding: int = 0, out=None):
    """∂L/∂X on the device; see conv_numpy.conv2d_grad_input."""
    _grad_shape("conv2d_grad_input", G, conv2d_shape(X_shape, K.shape, stride, padding))
    (G, K), dt = _device("conv2d_grad_input", G=G, K=K)
    out = _out("conv2d_grad_input", out, X_shape, dt)
    return _launch(kernels(dt)["conv2d_grad_input"], out, G, K, stride, padding)


def conv2d_grad_kernel(G, X, K_shape, stride: int = 1, padding: int = 0, out=None):
    """∂L/∂K on the device; see conv_numpy.conv2d_grad_kernel."""
    _grad_shape("conv2d_grad_kernel", G, conv2d_shape(X.shape, K_shape, stride, padding))
    (G, X), dt = _device("conv2d_grad_kernel", G=G, X=X)
    out = _out("conv2d_grad_kernel", out, K_shape, dt)
    return _launch(kernels(dt)["conv2d_grad_kernel"], out, G, X, stride, padding)


def conv2d_grad_bias(G, out=None):
    """∂L/∂b on the device; see conv_numpy.conv2d_grad_bias."""
    (G,), dt = _device("conv2d_grad_bias", G=G)
    out = _out("conv2d_grad_bias", out, (G.shape[1],), dt)
    return _launch(kernels(dt)["conv2d_grad_bias"], out, G)


def max_pool2d(X, size: int, stride: int | None = None, out=None):
    """Window maxima on the device; see conv_numpy.max_pool2d."""
    shape = pool2d_shape(X.shape, size, stride)
    (X,), dt = _device("max_pool2d", X=X)
    out = _out("max_pool2d", out, shape, dt)
    return _launch(kernels(dt)["max_pool2d"], out, X, size, stride or size)


def max_pool2d_grad(G, X, size: int, stride: int | None = None, out=None):
    """∂L/∂X of max-pooling on the device; see conv_numpy.max_pool2d_grad."""
    _grad_shape("max_pool2d_grad", G, pool2d_shape(X.shape, size, stride))
    (G, X), dt = _device("max_pool2d_grad", G=G, X=X)
    out = _out("max_pool2d_grad", out, X.shape, dt)
    return _launch(kernels(dt)["max_pool2d_grad"], out, G, X, size, stride or size)


def avg_pool2d(X, size: int, stride: int | None = None, out=None):
    """Window means on the device; see conv_numpy.avg_pool2d."""
    shape = pool2d_shape(X.shape, size, stride)
    (X,), dt = _device("avg_pool2d", X=X)
    out = _out("avg_pool2d", out, shape, dt)
    return _launch(kernels(dt)["avg_pool2d"], out, X, size, stride or size)


def avg_pool2d_grad(G, X_shape, size: int, stride: int | None = None, out=None):
    """∂L/∂X of average pooling on the device; see conv_numpy.avg_pool2d_grad."""
    _grad_shape("avg_pool2d_grad", G, pool2d_shape(X_shape, size, stride))
    (G,), dt = _device("avg_pool2d_grad", G=G)
    out = _out("avg_pool2d_grad", out, X_shape, dt)
    return _launch(kernels(dt)["avg_pool2d_grad"], out, G, size, stride or size)
