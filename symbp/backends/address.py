"""An array of a deep step's parameters, seen from its address: ``pointer(a)``.

A deep training step takes its parameters (and their optimizer state) as one int64 array
of addresses instead of one argument each, and cuts each array itself with
``numba.carray(pointer(_pa[k]), shape, DT)``.  Numba spells every array argument out as
nine machine words, unboxes each in its wrapper and LLVM's scalar passes (SROA first) go
over all of them: a 32-layer step's 70 array arguments were a third to a half of its cold
compile time (``bench/RESULTS.md``).  The caller keeps the arrays alive, checks their dtype, shape
and layout once, and hands the same address table back while they stay the same objects
(``symbp.runtime.step.FusedStep``).
"""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def pointer(typingctx, address):
    """int64 -> void*: the address of an array's first element, for ``numba.carray``."""
    if address != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen
