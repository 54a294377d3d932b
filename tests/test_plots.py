"""Plots: every activation with its derivative, and training histories in every shape."""

import numpy as np
import pytest
import sympy as sp
from conftest import have, need

import symbp as sb
from symbp.errors import SymbpError
from symbp.functions import FUNCTIONS
from symbp.printing.plots import activation_curves, history_columns, plot_activation, plot_history

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
        plot_activation("rrelu", tmp_path / "a.png")


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
