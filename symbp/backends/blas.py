"""One BLAS matrix product for generated njit kernels: ``gemm(A, B, C, alpha, beta)``.

Computes ``C = alpha * A @ B + beta * C`` in place, on the same BLAS that Numba's
``np.dot`` calls (SciPy's OpenBLAS through Numba's ``numba_xxgemm`` helper).  Why not
``np.dot(A, B, out)``:

- ``beta`` lets a kernel add a product into an array: the SGD update ``W -= lr * A @ B``
  is one call with ``alpha = -lr, beta = 1``; no gradient buffer is written and read back.
- ``np.dot`` compiles a separate implementation for every layout combination of its
  operands (C @ C, C @ F for ``W.T``, F @ C for ``X.T``): ~0.15 s of compile time each.
  This is an intrinsic: its few instructions are emitted inline, for every layout.

``A`` and ``B`` are 2-D arrays of one float dtype in C or F layout (``X.T`` of a C array
is F: transposed for free); ``C`` is C-contiguous.  Sizes are checked: a mismatch raises
ValueError.  ``alpha`` and ``beta`` are cast to the arrays' dtype.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

_KIND = {types.float32: "s", types.float64: "d"}


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
        flag = {"C": ir.Constant(char, ord("n")), "F": ir.Constant(char, ord("t"))}
        void_p = ir.IntType(8).as_pointer()
        scal = [cgutils.alloca_once_value(builder, context.cast(builder, v, t, dt))
                for v, t in zip(args[3:], (alty, bety))]
        fnty = ir.FunctionType(ir.IntType(32), [char, char, char, k.type, k.type, k.type,
                                                void_p, void_p, k.type, void_p, k.type,
                                                void_p, void_p, k.type])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        res = builder.call(fn, (
            ir.Constant(char, ord(_KIND[dt])), flag[bty.layout], flag[aty.layout], n, m, k,
            builder.bitcast(scal[0], void_p),
            builder.bitcast(B.data, void_p), lead(bty, B.shape),
            builder.bitcast(A.data, void_p), lead(aty, A.shape),
            builder.bitcast(scal[1], void_p),
            builder.bitcast(C.data, void_p), lead(cty, C.shape)))
        with builder.if_then(cgutils.is_not_null(builder, res), likely=False):
            context.call_conv.return_user_exc(
                builder, RuntimeError, ("symbp gemm: BLAS could not be loaded (SciPy)",))
        return context.get_dummy_value()

    return sig, codegen
