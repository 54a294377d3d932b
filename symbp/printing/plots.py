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
    from ..functions import random_slopes

    slopes = random_slopes()  # rrelu's random slope: drawn at its evaluation value, the mean
    expr = expr.xreplace({s: sp.Rational(sp.nsimplify(sum(slopes[s.name]) / 2))
                          for s in expr.free_symbols if s.name in slopes})
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
    stacks vanish), and a jump in the derivative (ReLU's step at 0) is drawn as a step with
    the value the function's rule takes at the kink (relu′(0) = 0, as in PyTorch).  The
    figure is 1280 pixels wide, for a slide.
    """
    path = Path(path)
    activation_figure(name_or_function, lo, hi).savefig(path)
    return path


def activation_figure(name_or_function, lo: float = -6.0, hi: float = 6.0):
    """The matplotlib ``Figure`` that ``plot_activation`` saves (for a notebook, or to
    adjust before saving)."""
    Figure, Canvas = _matplotlib()
    label, xs, ys, dys, expr, dexpr = activation_curves(name_or_function, lo, hi)
    x = sp.Symbol("x", real=True)
    named = isinstance(name_or_function, str) or isinstance(name_or_function, type)
    fname = label if named else "f"
    fig = Figure(figsize=(6.4, 4.0), dpi=200)
    Canvas(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.axhline(0, color="0.8", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    jumps = _jumps(xs, dys)
    dplot = dys.copy()
    dplot[jumps + 1] = np.nan  # a jump is a step, not a steep line
    ax.plot(xs, ys, color="C0", lw=2, label=f"{fname}(x)")
    ax.plot(xs, dplot, color="C3", lw=2, ls="--", label=f"{fname}′(x)")
    notes = []  # (point, text): placed after the axes are final
    for i in jumps:
        # the kink sits where the one-sided limits meet; the rule's own value there is the
        # convention (relu′(0) = 0), shown as a dot
        x0 = float(np.round(xs[i] if abs(xs[i]) <= abs(xs[i + 1]) else xs[i + 1], 6))
        d0 = float(_numeric(dexpr, x, np.array([x0]))[0])
        ax.plot([x0], [d0], "o", color="C3", ms=6, zorder=5)
        ax.plot([x0, x0], [dys[i], dys[i + 1]], ls=":", color="C3", lw=1)
        notes.append(((x0, d0), f"{fname}′({_nice(x0)}) = {_nice(d0)} at the kink"))
    k = int(np.nanargmax(dys))
    peak = dys[k]
    if np.isfinite(peak) and peak > dys[0] + 1e-9 and peak > dys[-1] + 1e-9 and not \
            any(abs(k - i) <= 1 for i in jumps):  # a real peak, not one side of a jump
        ax.plot([xs[k]], [peak], "o", color="C3")
        notes.append(((xs[k], peak), f"max {fname}′ = {_nice(peak)} at x = {_nice(xs[k])}"))
    both = np.concatenate([ys[np.isfinite(ys)], dys[np.isfinite(dys)]])
    bottom, top = float(both.min()), float(both.max())
    pad = 0.08 * max(top - bottom, 1e-9)
    ax.set_ylim(bottom - pad, top + 2.5 * pad)  # headroom for the legend, under the title
    ax.set_xlim(lo, hi)
    ax.set_xlabel("x")
    ax.set_ylabel(f"{fname}(x) and {fname}′(x)")
    title = f"{label} and its derivative" if named else \
        f"f(x) = {_formula(expr)} and its derivative"
    ax.set_title(title)
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _place(fig, ax, notes)
    return fig


def _formula(expr) -> str:
    from . import tex as T

    return T.text(expr)


def _jumps(xs, dys) -> np.ndarray:
    """Indices i where f′ jumps between xs[i] and xs[i + 1] (a kink of f)."""
    d = np.abs(np.diff(dys))
    scale = np.nanmax(np.abs(dys)) if np.isfinite(dys).any() else 1.0
    # a jump moves far more in one step than the curve's steepest smooth stretch
    smooth = np.nanmedian(d) + 1e-12
    return np.flatnonzero((d > 0.05 * max(scale, 1e-9)) & (d > 50 * smooth))


# Where a note may go, in axes fractions (x, y, horizontal alignment): inside the axes, so
# never on the title; each is tried and the one crossing the fewest curve points kept.
_SPOTS = [(0.97, 0.06, "right"), (0.97, 0.30, "right"), (0.50, 0.06, "center"),
          (0.03, 0.30, "left"), (0.97, 0.55, "right"), (0.03, 0.06, "left"),
          (0.50, 0.30, "center"), (0.97, 0.78, "right"), (0.50, 0.55, "center"),
          (0.03, 0.55, "left")]


def _place(fig, ax, notes) -> None:
    """Put each (point, text) note where it overlaps no curve, legend or other note."""
    from matplotlib.text import Text

    if not notes:
        return
    renderer = fig.canvas.get_renderer()
    curves = np.vstack([ax.transData.transform(np.column_stack(ln.get_data()))
                        for ln in ax.get_lines() if len(ln.get_xdata()) > 2])
    curves = curves[np.isfinite(curves).all(axis=1)]
    taken = [ax.get_legend().get_window_extent(renderer), ax.title.get_window_extent(renderer)]
    for point, text in notes:
        best = None
        for fx, fy, ha in _SPOTS:
            ann = ax.annotate(text, point, xytext=(fx, fy), textcoords="axes fraction",
                              ha=ha, va="bottom", color="C3", fontsize=9,
                              bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="0.85"),
                              arrowprops=dict(arrowstyle="->", color="C3", lw=0.8))
            ann.update_positions(renderer)  # the text's place in pixels, without the arrow
            box = Text.get_window_extent(ann, renderer).expanded(1.06, 1.2)
            inside = (curves[:, 0] >= box.x0) & (curves[:, 0] <= box.x1) & \
                (curves[:, 1] >= box.y0) & (curves[:, 1] <= box.y1)
            # curve points under the note, then (a tie-break) the arrow's length
            near = ax.transData.transform([point])[0]
            cost = int(inside.sum()) + float(np.hypot(*(box.p0 + box.size / 2 - near))) / 1e4
            cost += 10_000 * sum(box.overlaps(t) for t in taken)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
        taken.append(best[2])


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
