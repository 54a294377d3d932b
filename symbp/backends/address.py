"""An array of a deep step's parameters, seen from its address: ``array(a, shape, DT)``.

A deep training step takes its parameters (and their optimizer state) as one int64 array
of addresses instead of one argument each, and makes each array itself with
``array(_pa[k], shape, DT)``.  Numba spells every array argument out as
nine machine words, unboxes each in its wrapper and LLVM's scalar passes (SROA first) go
over all of them: a 32-layer step's 70 array arguments were a third to a half of its cold
compile time (``bench/RESULTS.md``).  The caller keeps the arrays alive, checks their dtype, shape
and layout once, and hands the same address table back while they stay the same objects
(``symbp.runtime.step.FusedStep``).

``array`` is ``numba.carray`` of the address in a few instructions: ``carray`` compiles a
helper for each shape type it meets (~45 ms each, two in an MLP step).
"""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic

from .views import c_array, shape_types, shape_values


@intrinsic
def array(typingctx, address, shape, dtype):
    """(int64, an int or a tuple of ints, a dtype such as ``np.float32``) -> the C array
    of that shape and dtype at that address, owning nothing (the caller keeps it alive)."""
    sizes = shape_types(shape)
    if not (address == types.int64 and isinstance(dtype, types.NumberClass)
            and sizes is not None):
        return None
    aty = types.Array(dtype.instance_type, len(sizes), "C")

    def codegen(context, builder, sig, args):
        dims = shape_values(context, builder, args[1], shape)
        data = builder.inttoptr(args[0], context.get_data_type(aty.dtype).as_pointer())
        return c_array(context, builder, aty, data, dims)

    return aty(address, shape, dtype), codegen


array.symbp_native = "array"  # lowered by symbp.backends.native too
