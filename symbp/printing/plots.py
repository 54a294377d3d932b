"""Plots for a lecture: an activation with its derivative, and training curves.

matplotlib is an optional extra (``pip install symbp[plot]``) and is imported here, on
first use, never by ``import symbp``.  Figures are drawn on matplotlib's Agg canvas
directly (no pyplot), so a plot never changes the backend of the caller's session.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import sympy as sp

from ..errors import SymbpError


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is installed in the tests
        raise SymbpError(
            "plots need matplotlib: pip install 'symbp[plot]' (or pip install matplotlib)"
        ) from e
    return Figure, FigureCanvasAgg


def activation_curves(name_or_function, lo: float = -6.0, hi: float = 6.0, n: int = 1201):
    """``(label, x, f(x), f′(x), f_expr, df_expr)`` for an activation on [lo, hi].

    ``name_or_function`` is a name from ``symbp.functions.FUNCTIONS`` ("sigmoid", "relu"),
    a symbp/SymPy function class, a callable taking a SymPy symbol, or a SymPy expression
    in ``x``.  f′ comes from SymPy (so from each function's own ``fdiff``).
    """
    from ..functions import FUNCTIONS

    x = sp.Symbol("x", real=True)
    f = name_or_function
    label = f if isinstance(f, str) else getattr(f, "__name__", None) or str(f)
    if isinstance(f, str):
        if f not in FUNCTIONS:
            raise SymbpError(
                f"unknown activation {f!r}: choose one of {', '.join(sorted(FUNCTIONS))}"
            )
        f = FUNCTIONS[f]
        if label == "prelu":  # a learned slope: drawn at PyTorch's initial value 1/4
            f = lambda z: FUNCTIONS["prelu"](z, sp.Rational(1, 4))  # noqa: E731
    if isinstance(f, sp.Basic) and not isinstance(f, type):
        free = sorted(f.free_symbols, key=str)
        if len(free) != 1:
            raise SymbpError(f"plot_activation: {f} must be an expression in one variable")
        expr = f.xreplace({free[0]: x})
    elif callable(f):
        expr = sp.sympify(f(x))
    else:
        raise SymbpError(f"plot_activation: cannot plot {f!r}; pass a name or a function")
    if expr.free_symbols - {x}:
        extra = ", ".join(map(str, expr.free_symbols - {x}))
        raise SymbpError(f"plot_activation: {label} has free parameters ({extra}); fix them")
    dexpr = sp.diff(expr, x)
    xs = np.linspace(lo, hi, n)
    ys = _numeric(expr, x, xs)
    dys = _numeric(dexpr, x, xs)
    return label, xs, ys, dys, expr, dexpr


def _numeric(expr, x, xs):
    # each symbp function lambdifies through its formula (Activation._numpycode)
    fn = sp.lambdify(x, expr, modules=["numpy", "scipy"])  # scipy: erf for GELU
    with np.errstate(all="ignore"):
        y = np.asarray(fn(xs), dtype=float)
    return np.broadcast_to(y, xs.shape).copy()


def plot_activation(name_or_function, path, lo: float = -6.0, hi: float = 6.0) -> Path:
    """Draw an activation and its derivative on one figure and save it to ``path``.

    The derivative's maximum is marked (σ′ peaks at 1/4 at x = 0, the reason deep sigmoid
    stacks vanish), and a jump in the derivative (ReLU's step at 0) is drawn as a step.
    """
    Figure, Canvas = _matplotlib()
    label, xs, ys, dys, _, _ = activation_curves(name_or_function, lo, hi)
    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    Canvas(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.axhline(0, color="0.8", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    ax.plot(xs, ys, color="C0", lw=2, label=f"{label}(x)")
    ax.plot(xs, dys, color="C3", lw=2, ls="--", label=f"{label}′(x)")
    k = int(np.nanargmax(dys))
    peak = dys[k]
    if np.isfinite(peak) and peak > dys[0] + 1e-9 and peak > dys[-1] + 1e-9:  # a real peak
        ax.plot([xs[k]], [peak], "o", color="C3")
        ax.annotate(f"max {label}′ = {_nice(peak)} at x = {_nice(xs[k])}", (xs[k], peak),
                    textcoords="offset points", xytext=(8, 8), color="C3")
    ax.set_xlabel("x")
    ax.set_title(f"{label} and its derivative")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path)
    return path


def _nice(v: float) -> str:
    for num, den in ((1, 4), (1, 2), (1, 1), (0, 1)):
        if abs(v - num / den) < 1e-9:
            return f"{num}/{den}" if den != 1 else str(num)
    return f"{v:.3g}"


def history_columns(history) -> dict[str, list]:
    """A training history as columns: accepts a dict of lists, a list of dicts (one per
    epoch) or an object holding either (``.history``, ``.as_dict()``, ``.to_dict()``)."""
    for attr in ("as_dict", "to_dict"):
        if hasattr(history, attr) and callable(getattr(history, attr)):
            return history_columns(getattr(history, attr)())
    if hasattr(history, "history") and not isinstance(history, Mapping):
        return history_columns(history.history)
    if isinstance(history, Mapping):
        cols = {str(k): list(np.ravel(v)) for k, v in history.items()
                if np.ndim(v) <= 1 and not isinstance(v, str)}
    else:
        try:
            rows = list(history)
        except TypeError as e:
            raise SymbpError(
                f"plot_history: cannot read a history from {type(history).__name__}; pass a "
                "dict of lists or a list of per-epoch dicts"
            ) from e
        if not all(isinstance(r, Mapping) for r in rows):
            raise SymbpError("plot_history: a list history must hold one dict per epoch")
        keys = list(dict.fromkeys(k for r in rows for k in r))
        cols = {str(k): [r.get(k, np.nan) for r in rows] for k in keys}
    return cols


def plot_history(history, path) -> Path:
    """Training curves: every ``*loss*`` column on the left, every ``*acc*`` on the right."""
    Figure, Canvas = _matplotlib()
    cols = history_columns(history)
    def has_data(k):  # History keeps empty val_* lists and None accuracies
        y = np.asarray(cols[k], dtype=float) if cols[k] else np.array([])
        return bool(np.isfinite(y).any())

    losses = [k for k in cols if "loss" in k.lower() and has_data(k)]
    accs = [k for k in cols if "acc" in k.lower() and has_data(k)]
    if not losses and not accs:
        raise SymbpError(
            f"plot_history: no 'loss' or 'accuracy' column in the history (columns: "
            f"{', '.join(cols) or 'none'})"
        )
    n = max(len(cols[k]) for k in losses + accs)
    epochs = cols.get("epoch") or list(range(1, n + 1))
    panels = [p for p in ((losses, "loss"), (accs, "accuracy")) if p[0]]
    fig = Figure(figsize=(5.2 * len(panels), 3.8), dpi=110)
    Canvas(fig)
    for i, (keys, title) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        for k in keys:
            y = np.asarray(cols[k], dtype=float)
            ax.plot(epochs[: len(y)], y, marker="o", ms=3, label=k)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if title == "loss" and all(np.nanmin(np.asarray(cols[k], float)) > 0 for k in keys) \
                and max(np.nanmax(np.asarray(cols[k], float)) for k in keys) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
