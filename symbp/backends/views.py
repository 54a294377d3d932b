"""Views of a kernel's workspace for generated njit code: ``view(buf, start, shape)`` and
``rows(a, lo, hi)``.

A kernel's scratch arrays are views of one flat workspace.  Cut with Numba's own slicing
and ``reshape``, each view cost the kernel's compile far more than its work: a slice is
lowered through Numba's general slice arithmetic (start, stop and step normalised for
negative and out-of-range values), a ``reshape`` compiles a helper of its own, and LLVM
then optimises all of it.  A depth-2 MLP step has ~20 views: they were a quarter of its
cold compile (``bench/RESULTS.md``).  These two intrinsics emit the few instructions a
view is (a pointer, its sizes and strides) and check it lies inside its array: a view
that would not raises ValueError, as the slice's mismatch with ``reshape`` did.

Both give C-contiguous arrays that share their array's memory (and hold a reference to
it, as a Numba view does).
"""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic
from numba.np.arrayobj import make_array


def shape_types(shape) -> tuple | None:
    """The integer types of a shape argument (an int or a tuple of ints), or None."""
    if isinstance(shape, types.Integer):
        return (shape,)
    if isinstance(shape, types.BaseTuple) and len(shape) >= 1 and all(
            isinstance(t, types.Integer) for t in shape):
        return tuple(shape)
    return None


def shape_values(context, builder, value, shape) -> list:
    """The sizes of a shape argument (its type ``shape``: an int or a tuple of ints) as
    intp values."""
    sizes = shape_types(shape)
    items = (cgutils.unpack_tuple(builder, value, len(sizes))
             if isinstance(shape, types.BaseTuple) else [value])
    return [context.cast(builder, v, t, types.intp) for v, t in zip(items, sizes)]


def c_array(context, builder, aty, data, dims, source=None):
    """A C-contiguous array of type ``aty`` at ``data`` with sizes ``dims`` (intp values):
    sharing the memory of array ``source`` (a new reference to it), or owning nothing."""
    itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
        context.get_data_type(aty.dtype)))
    strides, step = [], itemsize
    for d in reversed(dims[1:]):
        strides.append(step)
        step = builder.mul(step, d)
    strides.append(step)
    out = make_array(aty)(context, builder)
    context.populate_array(out, data=data, shape=list(dims), strides=strides[::-1],
                           itemsize=itemsize,
                           meminfo=None if source is None else source.meminfo,
                           parent=None if source is None else source.parent)
    if source is None:
        return out._getvalue()
    return impl_ret_borrowed(context, builder, aty, out._getvalue())


def _raise_if(context, builder, bad, message):
    with builder.if_then(bad, likely=False):
        context.call_conv.return_user_exc(builder, ValueError, (message,))


@intrinsic
def view(typingctx, buf, start, shape):
    """``buf[start:start + prod(shape)].reshape(shape)`` of a 1-D C array: ValueError if
    that would reach outside ``buf`` (or a size is negative)."""
    sizes = shape_types(shape)
    if not (isinstance(buf, types.Array) and buf.ndim == 1 and buf.layout == "C"
            and isinstance(start, types.Integer) and sizes is not None):
        return None
    aty = types.Array(buf.dtype, len(sizes), "C")

    def codegen(context, builder, sig, args):
        bty, sty, shty = sig.args
        b = make_array(bty)(context, builder, args[0])
        at = context.cast(builder, args[1], sty, types.intp)
        dims = shape_values(context, builder, args[2], shty)
        zero = context.get_constant(types.intp, 0)
        n, bad = context.get_constant(types.intp, 1), builder.icmp_signed("<", at, zero)
        for d in dims:
            bad = builder.or_(bad, builder.icmp_signed("<", d, zero))
            n = builder.mul(n, d)
        (size,) = cgutils.unpack_tuple(builder, b.shape, 1)
        bad = builder.or_(bad, builder.icmp_signed(">", builder.add(at, n), size))
        _raise_if(context, builder, bad, "symbp: a workspace view reaches outside its array")
        return c_array(context, builder, aty, builder.gep(b.data, [at]), dims, b)

    return aty(buf, start, shape), codegen


# symbp.backends.native lowers calls of this object itself: a change here is one there
view.symbp_native = "view"


@intrinsic
def rows(typingctx, a, lo, hi):
    """``a[lo:hi]`` of a C array (rows ``lo`` to ``hi`` of its first axis), as a C array:
    ValueError unless ``0 <= lo <= hi <= len(a)``."""
    if not (isinstance(a, types.Array) and a.ndim >= 1 and a.layout == "C"
            and isinstance(lo, types.Integer) and isinstance(hi, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        aty, lty, hty = sig.args
        arr = make_array(aty)(context, builder, args[0])
        lo = context.cast(builder, args[1], lty, types.intp)
        hi = context.cast(builder, args[2], hty, types.intp)
        dims = cgutils.unpack_tuple(builder, arr.shape, aty.ndim)
        zero = context.get_constant(types.intp, 0)
        bad = builder.or_(builder.icmp_signed("<", lo, zero),
                          builder.or_(builder.icmp_signed(">", lo, hi),
                                      builder.icmp_signed(">", hi, dims[0])))
        _raise_if(context, builder, bad, "symbp: a workspace view reaches outside its array")
        step = builder.mul(lo, cgutils.unpack_tuple(builder, arr.strides, aty.ndim)[0])
        data = builder.bitcast(
            builder.gep(builder.bitcast(arr.data, cgutils.voidptr_t), [step]), arr.data.type)
        return c_array(context, builder, aty, data, [builder.sub(hi, lo)] + dims[1:], arr)

    return a(a, lo, hi), codegen


rows.symbp_native = "rows"  # lowered by symbp.backends.native too
