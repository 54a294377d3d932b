"""The operation registry: every head of a Program is defined once, in one ``Head`` record.

A head is the operation of one assignment (``y = head(x, ...)``): a matrix product, a map,
a sum, softmax, ...  Its record holds everything the rest of symbp needs to know about it,
so ``ir.verify``, ``grad``, the printers and every backend look it up here instead of
keeping their own ``isinstance`` chains:

    lower, children   how the SymPy front end turns the head into assignments
    check             shape and argument check of an assignment (``verify``)
    vjp               its vector-Jacobian rule (``grad`` and the printed derivations)
    numpy, cpu, cuda  its lowering for each backend (a backend that lacks one says so
                      before it compiles anything)
    label, entry      its graph label and its entry in index form (printing); LaTeX and
                      plain text come from the SymPy class itself (``_latex``, ``_sympystr``)

A new head is one module: its SymPy class plus one ``register(...)`` call (see
``symbp/heads/sums.py`` for a small one).  Records are looked up along the class's MRO, so
every scalar arithmetic head (Add, Mul, Pow, a ``sympy.Function``) shares the record of
``sympy.Expr`` unless it registers its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UnsupportedError

BACKENDS = ("numpy", "cpu", "cuda")


@dataclass(frozen=True)
class Head:
    """The rules of one head.  A rule left ``None`` means "this head does not have it"."""

    cls: type
    # "array": the value is a matrix, "scalar": a number.  A head whose value is a number
    # but reads whole arrays (Total, softmax-CE) is "reduction": backends that group scalar
    # arithmetic into one kernel keep those apart
    kind: str = "array"
    children: Callable | None = None  # e -> operands the front end lowers first
    lower: Callable | None = None  # (lowering, e) -> the lowered value
    # e -> operand expressions, and (e, operands) -> the head over new ones: the reverse
    # pass names each nested head of a contribution (both None: it names none inside)
    operands: Callable | None = None
    rebuild: Callable | None = None
    keeps_transpose: bool = False  # Xᵀ stays an operand (BLAS transposes for free)
    check: Callable | None = None  # (e, where) -> None or raises ShapeError
    vjp: Callable | None = None  # (e, y, g, wants, local) -> [(operand, contribution)]
    numpy: Callable | None = None  # (ctx, assignment) -> NumPy source of the value
    cpu: Callable | None = None  # (gen, assignment) -> prints a block of the Numba kernel
    cuda: Callable | None = None  # (gen, assignment) -> launches kernels
    label: Callable | None = None  # e -> a short graph label (@, Σ, softmax)
    entry: Callable | None = None  # (indexer, e, i, j) -> entry (i, j) in index form
    function: Callable | bool = False  # an activation-like head (derivations name it)
    front_end: bool = False  # only the SymPy front end: never in a Program
    doc: str = ""
    extra: dict = field(default_factory=dict)


REGISTRY: dict[type, Head] = {}


def register(cls: type, **rules) -> Head:
    """Define the head ``cls``: its rules are the fields of ``Head``."""
    h = Head(cls=cls, **rules)
    REGISTRY[cls] = h
    return h


_loaded = False
_loading = threading.RLock()


def _load():
    # The head modules import the IR and the VJP helpers, which import this module: load
    # them at the first lookup, when everything they need exists.  Marked loaded once they
    # are: marked before, a second thread looked up a half-filled REGISTRY ("unknown
    # matrix head AxisSum" when two threads compiled at once).  Reentrant: a head module
    # that looks a head up while it loads gets the records registered so far, as before
    global _loaded
    if not _loaded:
        with _loading:
            if not _loaded:
                from . import (  # noqa: F401
                    conv,
                    frontend,
                    fused,
                    linalg,
                    maps,
                    pool,
                    scalar,
                    shape,
                    softmax,
                    sums,
                )
                _loaded = True


def rule(e) -> Head | None:
    """The record of ``e``'s head (looked up along its class's MRO), or None."""
    _load()
    for k in type(e).__mro__:
        h = REGISTRY.get(k)
        if h is not None:
            return h
    return None


def of_class(cls: type) -> Head | None:
    """The record registered for exactly ``cls``."""
    _load()
    return REGISTRY.get(cls)


def _missing(program, backend: str) -> dict:
    """Head name -> its record (None if it has none), for each head ``backend`` lacks."""
    out: dict = {}
    for a in program.body:
        h = rule(a.expr)
        if h is None or getattr(h, backend) is None:
            out.setdefault(type(a.expr).__name__, h)
    return out


def lacking(program, backend: str) -> list[str]:
    """The heads of ``program`` that ``backend`` cannot lower, by name (empty: it can)."""
    return list(_missing(program, backend))


def require(program, backend: str, target: str | None = None) -> None:
    """Raise before compiling when ``backend`` lacks a head of ``program``."""
    missing = _missing(program, backend)
    if missing:
        others = [b for b in BACKENDS if b != backend and all(
            h is not None and getattr(h, b) is not None for h in missing.values())]
        hint = f"; compile for {' or '.join(repr(b) for b in others)}" if others else ""
        raise UnsupportedError(
            f"the {target or backend} backend cannot lower {', '.join(missing)}: it has no "
            f"rule for {'it' if len(missing) == 1 else 'them'} in symbp/heads{hint}")
