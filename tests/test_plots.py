"""Plots: every activation with its derivative, and training histories in every shape."""

import numpy as np
import pytest
import sympy as sp
from conftest import have, need

import symbp as sb
from symbp.errors import SymbpError
from symbp.functions import FUNCTIONS
from symbp.printing.plots import (
    activation_curves,
    activation_figure,
    history_columns,
    plot_activation,
    plot_history,
)

need(have("matplotlib"), "matplotlib")

PLOTTABLE = sorted(n for n in FUNCTIONS if n != "rrelu")  # rrelu's slope is random


def _png_is_drawn(path):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    img = imread(path)
    assert img.std() > 0.01  # not a blank canvas


@pytest.mark.parametrize("name", ["sigmoid", "relu", "tanh"])
def test_plot_activation_writes_a_picture(tmp_path, name):
    _png_is_drawn(plot_activation(name, tmp_path / f"{name}.png"))


@pytest.mark.parametrize("name", PLOTTABLE)
def test_derivative_curve_matches_central_differences(name):
    _, xs, ys, dys, _, _ = activation_curves(name)
    h = xs[1] - xs[0]
    num = (ys[2:] - ys[:-2]) / (2 * h)
    smooth = np.abs(xs[1:-1]) > 3 * h  # away from the kinks at 0
    np.testing.assert_allclose(dys[1:-1][smooth], num[smooth], atol=1e-3)


def test_sigmoid_derivative_peaks_at_a_quarter():
    _, xs, _, dys, _, d = activation_curves("sigmoid")
    assert dys.max() == pytest.approx(0.25, abs=1e-6) and abs(xs[dys.argmax()]) < 1e-2
    x = sp.Symbol("x", real=True)
    assert sp.simplify(d.subs(x, 0)) == sp.Rational(1, 4)


def test_relu_derivative_is_a_step():
    _, xs, _, dys, _, _ = activation_curves("relu")
    assert set(np.unique(dys)) == {0.0, 1.0}
    assert np.all(dys[xs < 0] == 0) and np.all(dys[xs > 0] == 1)


def test_functions_and_expressions_are_accepted(tmp_path):
    x = sp.Symbol("z")
    _png_is_drawn(plot_activation(x * sb.sigmoid(x), tmp_path / "swish.png"))
    _png_is_drawn(plot_activation(sb.softplus, tmp_path / "softplus.png"))


def test_bad_activations_are_refused(tmp_path):
    with pytest.raises(SymbpError, match="unknown activation 'nope'"):
        plot_activation("nope", tmp_path / "a.png")
    with pytest.raises(SymbpError, match="free parameters"):
        plot_activation(lambda z: sp.Symbol("a") * z, tmp_path / "a.png")


HISTORIES = {
    "list_of_dicts": [{"epoch": i + 1, "loss": 1 / (i + 1), "accuracy": 0.5 + 0.04 * i}
                      for i in range(8)],
    "dict_of_lists": {"loss": [1.0, 0.6, 0.4, 0.3], "val_loss": [1.1, 0.7, 0.5, 0.45],
                      "accuracy": [0.5, 0.7, 0.8, 0.85]},
    "loss_only": {"loss": [2.0, 1.0, 0.5]},
}


@pytest.mark.parametrize("name", HISTORIES)
def test_plot_history_shapes(tmp_path, name):
    _png_is_drawn(plot_history(HISTORIES[name], tmp_path / "h.png"))


def test_history_object_from_train(tmp_path):
    from symbp import train

    h = train.History(epoch=[1, 2, 3], loss=[1.0, 0.5, 0.25], accuracy=[None, None, None],
                      time=[0.1, 0.1, 0.1])
    assert history_columns(h)["loss"] == [1.0, 0.5, 0.25]
    _png_is_drawn(plot_history(h, tmp_path / "h.png"))


def test_history_without_metrics_is_refused(tmp_path):
    with pytest.raises(SymbpError, match="no 'loss' or 'accuracy'"):
        plot_history({"time": [1, 2]}, tmp_path / "h.png")
    with pytest.raises(SymbpError, match="one dict per epoch"):
        plot_history([1, 2, 3], tmp_path / "h.png")


# --- pictures for slides: no text on text, notes off the title and the curves --------------


def _boxes(fig):
    """Pixel boxes of the figure's texts: title, axis labels, legend, notes (annotations)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    ax = fig.axes[0]
    named = {"title": ax.title, "xlabel": ax.xaxis.label, "ylabel": ax.yaxis.label}
    boxes = {k: t.get_window_extent(r) for k, t in named.items() if t.get_text()}
    boxes["legend"] = ax.get_legend().get_window_extent(r)
    notes = {f"note {i}: {t.get_text()}": t.get_bbox_patch().get_window_extent(r)
             for i, t in enumerate(ax.texts)}
    return ax, boxes, notes


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_texts_do_not_overlap(name):
    fig = activation_figure(name)
    ax, boxes, notes = _boxes(fig)
    assert boxes["ylabel"] and ax.get_ylabel() and ax.get_xlabel() == "x"
    every = {**boxes, **notes}
    keys = sorted(every)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not every[a].overlaps(every[b]), (name, a, b, every[a], every[b])
    inner = ax.get_window_extent()
    curves = np.vstack([ax.transData.transform(np.column_stack(ln.get_data()))
                        for ln in ax.get_lines() if len(ln.get_xdata()) > 2])
    for k, box in notes.items():
        # inside the axes (so below the title), on no curve
        assert inner.x0 <= box.x0 and box.x1 <= inner.x1 and box.y1 <= inner.y1, (name, k)
        on = (curves[:, 0] > box.x0) & (curves[:, 0] < box.x1) & \
             (curves[:, 1] > box.y0) & (curves[:, 1] < box.y1)
        assert not on.any(), (name, k, curves[on][:3])


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "prelu", "rrelu", "selu"])
def test_kink_convention_is_marked(name):
    # the derivative jumps at 0; the value the rule takes there is marked, as the function's
    # own fdiff says (PyTorch's conventions), checked here against sympy.diff at 0
    _, xs, _, dys, expr, _ = activation_curves(name)
    x = sp.Symbol("x", real=True)
    want = float(sp.diff(expr, x).subs(x, 0))
    ax, _, notes = _boxes(activation_figure(name))
    kink = [t.get_text() for t in ax.texts if "(0) = " in t.get_text()]
    assert len(kink) == 1 and kink[0].startswith(f"{name}′(0) = "), [t.get_text() for t in ax.texts]
    shown = kink[0].split(" = ")[1].split()[0]
    value = float(sp.Rational(shown)) if "/" in shown else float(shown)
    assert value == pytest.approx(want, rel=5e-3), (kink, want)
    dots = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert any(np.allclose(ln.get_data(), [[0.0], [want]]) for ln in dots)


def test_relu_kink_shows_zero():
    ax, _, _ = _boxes(activation_figure("relu"))
    assert [t.get_text() for t in ax.texts] == ["relu′(0) = 0 at the kink"]


def test_smooth_functions_have_no_kink_note():
    for name in ("sigmoid", "tanh", "gelu", "softplus", "elu"):
        ax, _, _ = _boxes(activation_figure(name))
        assert not any("kink" in t.get_text() for t in ax.texts), name


def test_plot_is_slide_sized(tmp_path):
    from matplotlib.image import imread

    assert imread(plot_activation("tanh", tmp_path / "t.png")).shape[1] >= 1000


def test_formula_is_named_f_with_its_formula_in_the_title():
    x = sp.Symbol("x", real=True)
    ax, _, _ = _boxes(activation_figure(x * sb.sigmoid(x)))
    assert ax.get_title() == "f(x) = x·σ(x) and its derivative"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["f(x)", "f′(x)"]
