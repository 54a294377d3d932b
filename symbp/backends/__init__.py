"""Backends lower a gradient Program to a callable; each lives in its own module.

The contract every backend keeps: ``build(program, dtype, **options)`` returns a
``Kernel`` whose ``fn(*args)`` takes the program's inputs and then its dims, in order
(arrays already checked, converted to ``dtype`` and C-contiguous; dims as ints), and
returns ``(loss, *gradients)``.  Modules are imported on first use, so ``import symbp``
never imports Numba.
"""

from __future__ import annotations

import builtins
import importlib
import keyword
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import SymbpError

TARGETS = {
    "numpy": "symbp.backends.numpy",
    "cpu": "symbp.backends.numba_cpu",
    "parallel": "symbp.backends.numba_cpu",
    "cuda": "symbp.backends.numba_cuda",
}


@dataclass
class Kernel:
    fn: Callable
    source: str


def backend(target: str):
    """The backend module for ``target`` ('numpy', 'cpu', 'parallel' or 'cuda')."""
    if target not in TARGETS:
        raise SymbpError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    try:
        return importlib.import_module(TARGETS[target])
    except ImportError as err:
        extra = " (pip install 'symbp[cuda]')" if target == "cuda" else ""
        raise SymbpError(f"target {target!r} is not available: {err}{extra}") from err


# Every generated module may call a builtin (range, max, abs, float, ...): a user symbol
# spelled like one would shadow it inside the generated function.
_PYTHON = frozenset(dir(builtins)) | frozenset(keyword.kwlist)


def identifiers(names, reserved=()) -> dict:
    """Stable Python identifiers for SymPy names: ``W_{1}`` -> ``W_1``, ``α`` stays.

    ``reserved`` are the globals of the generated module (``numpy``, ``DTYPE``, ``np``,
    ``math``, ...): a name spelled like one, or like a Python builtin, is renamed
    (``np`` -> ``np_2``), so any valid SymPy name works on every target.  The generated
    module's own names all start with ``_``, which no identifier made here does.
    """
    taken = _PYTHON | frozenset(reserved)
    out, used = {}, set()
    for n in names:
        s = re.sub(r"\W", "_", str(n)).strip("_") or "v"
        if s[0].isdigit() or s.startswith("_"):
            s = "v_" + s
        base, k = s, 1
        while s in used or s in taken:
            k += 1
            s = f"{base}_{k}"
        used.add(s)
        out[n] = s
    return out
