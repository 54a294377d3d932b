"""One BLAS matrix product for generated njit kernels: ``gemm(A, B, C, alpha, beta)``.

Computes ``C = alpha * A @ B + beta * C`` in place with one BLAS ``?gemm`` call (which
library: below).  Why not ``np.dot(A, B, out)``:

- ``beta`` lets a kernel add a product into an array: the SGD update ``W -= lr * A @ B``
  is one call with ``alpha = -lr, beta = 1``; no gradient buffer is written and read back.
- ``np.dot`` compiles a separate implementation for every layout combination of its
  operands (C @ C, C @ F for ``W.T``, F @ C for ``X.T``): ~0.15 s of compile time each.
  This is an intrinsic: its few instructions are emitted inline, for every layout.

``A`` and ``B`` are 2-D arrays of one float dtype in C or F layout (``X.T`` of a C array
is F: transposed for free); ``C`` is C-contiguous.  Sizes are checked: a mismatch raises
ValueError.  ``alpha`` and ``beta`` are cast to the arrays' dtype.

Which BLAS: NumPy's own OpenBLAS when its wheel bundles one (``scipy_sgemm_64_`` in
``numpy.libs``), else SciPy's, as ``np.dot`` in njit code.  Both are OpenBLAS with the same
kernels for this CPU, but NumPy's build is the newer one: on one core, called from njit
code, it took 1.83 ms against 2.92 ms for the forward product of a batch-64 layer
1024 -> 1024 (float32), within 10 % either way on the other shapes of bench/where.py, and a
depth-1 training step ran 11 % fewer instructions on it (callgrind).  ``LIBRARY`` names the
choice; ``SYMBP_BLAS=scipy`` forces SciPy's.  NumPy's library is the user's too:
``symbp.runtime.threads.BLAS`` gives back the user's thread count after every kernel call.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

_KIND = {types.float32: "s", types.float64: "d"}


def _numpy_openblas():
    """NumPy's bundled OpenBLAS, ILP64 (``ctypes.CDLL``), or None: not bundled (a conda or
    Accelerate build of NumPy), not the ILP64 scipy-openblas, or ``SYMBP_BLAS=scipy``."""
    choice = os.environ.get("SYMBP_BLAS", "").lower()
    if choice not in ("", "numpy", "scipy"):
        from ..errors import SymbpError

        raise SymbpError(f"SYMBP_BLAS={choice!r}: the kernels' BLAS is 'numpy' (NumPy's "
                         "bundled OpenBLAS, the default) or 'scipy' (SciPy's)")
    if choice == "scipy":
        return None
    root = os.path.dirname(os.path.dirname(np.__file__))
    found = sorted(glob.glob(os.path.join(root, "numpy.libs", "libscipy_openblas64_*"))
                   + glob.glob(os.path.join(os.path.dirname(np.__file__), ".dylibs",
                                            "libscipy_openblas64_*")))
    for path in found:
        try:
            lib = ctypes.CDLL(path)  # NumPy loaded it already: this is the same copy
            for kind in "sd":
                binding.add_symbol(f"symbp_{kind}gemm64",
                                   ctypes.cast(getattr(lib, f"scipy_{kind}gemm_64_"),
                                               ctypes.c_void_p).value)
            lib.scipy_openblas_get_num_threads64_.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _arraymath_without_scipy_linalg() -> None:
    """Import ``numba.np.arraymath`` without importing the ``scipy.linalg`` package.

    At import, ``numba.np.arraymath`` asks ``numba.np.linalg.ensure_blas()`` whether BLAS is
    there (only ``np.dot`` of two vectors uses the answer), and that imports
    ``scipy.linalg.cython_blas``: the whole ``scipy.linalg`` package with its array-API
    layer, 0.1 s of a warm start's 0.4 s (bench/warm_floor.py).  The kernels call NumPy's
    OpenBLAS (below), so nothing here needs SciPy's.  Same answer, asked without the
    import: SciPy's ``linalg/cython_blas`` extension is on disk, and Numba's own check of
    its integer width passes (a mismatch raises as it would).  Numba's code that calls
    SciPy's BLAS (``np.dot`` in njit code, ``SYMBP_BLAS=scipy``) still calls the real
    ``ensure_blas`` when it compiles, which imports the module then.  Nothing is done when
    either module is already imported, or when Numba no longer has these names."""
    import importlib.util
    import sys

    if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return
    from numba.np import linalg

    real, width = getattr(linalg, "ensure_blas", None), getattr(
        linalg, "_check_lapack_int_width", None)
    if real is None or width is None:
        return

    def ensure_blas():
        spec = importlib.util.find_spec("scipy")
        where = (os.path.join(os.path.dirname(spec.origin), "linalg")
                 if spec is not None and spec.origin else None)
        if where is None or not glob.glob(os.path.join(where, "cython_blas.*")):
            raise ImportError("scipy.linalg.cython_blas is missing")
        width()

    linalg.ensure_blas = ensure_blas
    try:
        from numba.np import arraymath
    finally:
        linalg.ensure_blas = real
    if getattr(arraymath, "ensure_blas", None) is ensure_blas:
        arraymath.ensure_blas = real


_arraymath_without_scipy_linalg()
NUMPY_OPENBLAS = _numpy_openblas()
LIBRARY = ("NumPy's OpenBLAS (scipy_?gemm_64_)" if NUMPY_OPENBLAS is not None
           else "SciPy's OpenBLAS (numba_xxgemm)")


@intrinsic
def gemm(typingctx, a, b, c, alpha, beta):
    arrays = (a, b, c)
    if not all(isinstance(x, types.Array) and x.ndim == 2 for x in arrays):
        raise TypingError("symbp gemm: A, B and C must be 2-D arrays")
    if len({x.dtype for x in arrays}) != 1 or a.dtype not in _KIND:
        raise TypingError(f"symbp gemm: one float dtype for A, B, C, got "
                          f"{a.dtype}, {b.dtype}, {c.dtype}")
    if a.layout not in "CF" or b.layout not in "CF" or c.layout != "C":
        raise TypingError(f"symbp gemm: A and B must be C or F contiguous and C C-contiguous, "
                          f"got layouts {a.layout}, {b.layout}, {c.layout}")
    if not all(isinstance(x, (types.Float, types.Integer)) for x in (alpha, beta)):
        raise TypingError("symbp gemm: alpha and beta must be numbers")
    if NUMPY_OPENBLAS is None:
        from numba.np.linalg import ensure_blas

        ensure_blas()
    sig = types.none(a, b, c, alpha, beta)

    def codegen(context, builder, sig, args):
        aty, bty, cty, alty, bety = sig.args
        dt = aty.dtype
        A, B, C = (make_array(t)(context, builder, v) for t, v in zip(sig.args[:3], args[:3]))
        m, k = cgutils.unpack_tuple(builder, A.shape)
        k2, n = cgutils.unpack_tuple(builder, B.shape)
        cm, cn = cgutils.unpack_tuple(builder, C.shape)
        bad = builder.or_(builder.icmp_signed("!=", k, k2),
                          builder.or_(builder.icmp_signed("!=", m, cm),
                                      builder.icmp_signed("!=", n, cn)))
        with builder.if_then(bad, likely=False):
            context.call_conv.return_user_exc(
                builder, ValueError, ("symbp gemm: the sizes of A @ B and C disagree",))
        one = ir.Constant(k.type, 1)

        def lead(ty, shape):  # BLAS's leading dimension, at least 1 (an empty batch)
            rows, cols = cgutils.unpack_tuple(builder, shape)
            ld = cols if ty.layout == "C" else rows
            return builder.select(builder.icmp_signed("<", ld, one), one, ld)

        # Row-major C = A @ B is column-major C^T = B^T @ A^T: a C-layout operand read
        # column-major is its own transpose (no flag), an F-layout one needs 't'.
        char = ir.IntType(8)
        flag = {"C": ord("n"), "F": ord("t")}
        scal = [cgutils.alloca_once_value(builder, context.cast(builder, v, t, dt))
                for v, t in zip(args[3:], (alty, bety))]
        operands = (flag[bty.layout], flag[aty.layout], n, m, k, scal[0],
                    B.data, lead(bty, B.shape), A.data, lead(aty, A.shape), scal[1],
                    C.data, lead(cty, C.shape))
        call = _numpy_gemm if NUMPY_OPENBLAS is not None else _scipy_gemm
        call(context, builder, _KIND[dt], operands, char, k.type)
        return context.get_dummy_value()

    return sig, codegen


def _numpy_gemm(context, builder, kind, operands, char, intp):
    """The call into NumPy's OpenBLAS: Fortran ``?gemm_`` with 64-bit integers, every
    argument by reference."""
    ta, tb, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc = operands
    ref = lambda v: cgutils.alloca_once_value(builder, v)  # noqa: E731
    fl = lambda x: ref(ir.Constant(char, x))  # noqa: E731
    void_p = ir.IntType(8).as_pointer()
    i64 = ir.IntType(64)
    fnty = ir.FunctionType(ir.VoidType(), [void_p] * 13 + [i64, i64])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"symbp_{kind}gemm64")
    one = ir.Constant(i64, 1)  # the hidden lengths of the two 'n'/'t' strings
    builder.call(fn, [builder.bitcast(x, void_p) for x in (
        fl(ta), fl(tb), ref(n), ref(m), ref(k), alpha, b, ref(ldb), a, ref(lda), beta, c,
        ref(ldc))] + [one, one])


def _scipy_gemm(context, builder, kind, operands, char, intp):
    """The call into SciPy's OpenBLAS through Numba's ``numba_xxgemm`` helper."""
    ta, tb, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc = operands
    void_p = ir.IntType(8).as_pointer()
    fnty = ir.FunctionType(ir.IntType(32), [char, char, char, intp, intp, intp, void_p,
                                            void_p, intp, void_p, intp, void_p, void_p,
                                            intp])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
    res = builder.call(fn, (
        ir.Constant(char, ord(kind)), ir.Constant(char, ta), ir.Constant(char, tb), n, m, k,
        builder.bitcast(alpha, void_p), builder.bitcast(b, void_p), ldb,
        builder.bitcast(a, void_p), lda, builder.bitcast(beta, void_p),
        builder.bitcast(c, void_p), ldc))
    with builder.if_then(cgutils.is_not_null(builder, res), likely=False):
        context.call_conv.return_user_exc(
            builder, RuntimeError, ("symbp gemm: BLAS could not be loaded (SciPy)",))
