"""Model builders: expressions checked against hand-written NumPy, initialisation
statistics, every activation's gradient against central differences."""

import numpy as np
import pytest
import scipy.special
import sympy as sp

import symbp as sb
from symbp import nn
from symbp.errors import SymbpError
from symbp.functions import FUNCTIONS


def data(model, n=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, model.X.shape[1]))
    C = model.T.shape[1]
    y = rng.integers(0, C, n) if model.loss_name == "softmax_ce" else rng.integers(0, 2, (n, C))
    return X, y


def test_mlp_matches_numpy_by_hand():
    # The independent reference: the same network written directly in NumPy.
    m = nn.mlp([4, 6, 5, 3], activations=["tanh", "relu"], seed=3)
    X, y = data(m)
    P = m.params
    H1 = np.tanh(X @ P["W1"] + P["b1"])
    H2 = np.maximum(H1 @ P["W2"] + P["b2"], 0)
    Z = H2 @ P["W3"] + P["b3"]
    T = np.eye(3)[y]
    loss = np.mean(scipy.special.logsumexp(Z, axis=1) - np.sum(T * Z, axis=1))
    fwd = sb.compile_forward(m.prediction)
    np.testing.assert_allclose(fwd(**P, X=X), scipy.special.softmax(Z, axis=1), rtol=1e-12)
    value, _ = sb.compile(m.loss, m.wrt)(**P, X=X, T=m.targets(y))
    assert value == pytest.approx(loss, rel=1e-12)
    assert [w.name for w in m.wrt] == list(P) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert m.data_names == ["X", "T"]


def _bce(P, T):
    return -np.mean(T * np.log(P) + (1 - T) * np.log(1 - P))


@pytest.mark.parametrize("loss,link,metric,reference", [
    ("bce", lambda Z: scipy.special.expit(Z), "threshold", _bce),
    ("mse", lambda Z: Z, None, lambda Y, T: np.mean((Y - T) ** 2)),
])
def test_other_losses(loss, link, metric, reference):
    m = nn.mlp([3, 4, 2], activations="sigmoid", loss=loss, seed=1)
    X, y = data(m)
    P = m.params
    Z = scipy.special.expit(X @ P["W1"] + P["b1"]) @ P["W2"] + P["b2"]
    np.testing.assert_allclose(sb.compile_forward(m.prediction)(**P, X=X), link(Z), rtol=1e-12)
    assert m.metric == metric
    # the loss: PyTorch's mean over all N×C entries (a sum, or a mean over rows, is wrong)
    T = m.targets(y)
    value, _ = sb.compile(m.loss, m.wrt)(**P, X=X, T=T)
    assert value == pytest.approx(reference(link(Z), T), rel=1e-12)


@pytest.mark.parametrize("act,init", [("tanh", "glorot"), ("sigmoid", "glorot"),
                                      ("relu", "he"), ("elu", "he"), ("selu", "lecun")])
def test_initialisation(act, init):
    m = nn.mlp([400, 300, 10], activations=act, seed=0)
    W, fan_in, fan_out = m.params["W1"], 400, 300
    if init == "glorot":
        a = np.sqrt(6 / (fan_in + fan_out))
        assert np.abs(W).max() <= a and np.abs(W).max() > 0.99 * a
        assert W.std() == pytest.approx(a / np.sqrt(3), rel=0.02)
    else:
        std = np.sqrt((2 if init == "he" else 1) / fan_in)
        assert W.std() == pytest.approx(std, rel=0.02)
    assert W.mean() == pytest.approx(0, abs=0.01 * W.std())
    assert np.all(m.params["b1"] == 0)
    # the linear output layer: Glorot
    assert np.abs(m.params["W2"]).max() <= np.sqrt(6 / 310)


def test_seeded():
    a, b, c = (nn.mlp([5, 7, 2], seed=s).params for s in (0, 0, 1))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["W1"], c["W1"])


ACTS = sorted(set(FUNCTIONS) - {"swish"})


@pytest.mark.parametrize("act", ACTS)
def test_every_activation_trains_with_a_correct_gradient(act):
    m = nn.mlp([3, 4, 2], activations=[act], seed=2)
    X, y = data(m)
    arrays = {**m.params, "X": X, "T": m.targets(y), **m.slopes(len(X), np.float64,
                                                               np.random.default_rng(0))}
    r = sb.gradcheck(m.loss, m.wrt, arrays, tol=1e-6)
    assert r.ok, f"{act}\n{r}"


def test_user_formula_matches_the_library_function():
    # x*sigmoid(x) derived by SymPy vs silu's own hand-written derivative.
    f = nn.mlp([3, 4, 2], activations=[lambda x: x * sb.sigmoid(x)], seed=4)
    g = nn.mlp([3, 4, 2], activations=["silu"], seed=4)
    X, y = data(f)
    vf, gf = sb.compile(f.loss, f.wrt)(**f.params, X=X, T=f.targets(y))
    vg, gg = sb.compile(g.loss, g.wrt)(**f.params, X=X, T=g.targets(y))  # same numbers
    assert vf == pytest.approx(vg, rel=1e-12)
    for k in gf:
        np.testing.assert_allclose(gf[k], gg[k], rtol=1e-10, atol=1e-14)
    assert f.layers[1] == "<lambda>"
    # a formula gets Glorot, silu (relu-like) He
    assert nn._init_for(nn.Activation(lambda x: x)) == "glorot" and nn._init_for("silu") == "he"


@pytest.mark.parametrize("per_unit,shape", [(True, (1, 4)), (False, (1, 1))])
def test_prelu_alpha_is_a_parameter(per_unit, shape):
    m = nn.Sequential([nn.Dense(4), nn.PReLU(per_unit=per_unit), nn.Dense(2)], inputs=3,
                      seed=5).build()
    assert m.params["alpha1"].shape == shape and np.all(m.params["alpha1"] == 0.25)
    assert "alpha1" in [w.name for w in m.wrt]
    X, y = data(m, n=8)
    X[:, 0] -= 3  # make sure some pre-activations are negative: alpha matters
    r = sb.gradcheck(m.loss, m.wrt, {**m.params, "X": X, "T": m.targets(y)})
    assert r.ok, str(r)
    _, g = sb.compile(m.loss, m.wrt)(**m.params, X=X, T=m.targets(y))
    assert np.abs(g["alpha1"]).max() > 0
    # the Dense before a PReLU gets He initialisation
    assert nn._init_for(nn.PReLU()) == "he"


def test_rrelu_slopes():
    m = nn.mlp([3, 6, 2], activations=["rrelu"], seed=0)
    assert m.random == {"rrelu_1": (1 / 8, 1 / 3, 6)}
    assert m.data_names == ["X", "T", "rrelu_1"]
    assert "rrelu_1" in sb.compile(m.loss, m.wrt).input_names
    rng = np.random.default_rng(0)
    a, b = m.slopes(5, np.float32, rng)["rrelu_1"], m.slopes(5, np.float32, rng)["rrelu_1"]
    assert a.shape == (5, 6) and a.dtype == np.float32
    assert a.min() >= 1 / 8 and a.max() <= 1 / 3 and not np.array_equal(a, b)
    ev = m.slopes(5, np.float64)["rrelu_1"]
    assert np.all(ev == (1 / 8 + 1 / 3) / 2)


def test_sequential_mixes_layers():
    m = nn.Sequential([nn.Dense(4, "tanh"), nn.Dense(4), nn.PReLU(per_unit=False),
                       nn.Dense(3, activation=lambda x: x / (1 + sp.Abs(x))), nn.RReLU(0.1, 0.2),
                       nn.Dense(2, bias=False)], inputs=3, loss="mse", seed=0).build()
    assert list(m.params) == ["W1", "b1", "W2", "b2", "alpha1", "W3", "b3", "W4"]
    assert m.layers == ["Dense(4)", "tanh", "Dense(4)", "PReLU", "Dense(3)", "<lambda>",
                        "RReLU", "Dense(2)"]
    assert m.random == {"rrelu_1": (0.1, 0.2, 3)}
    X, y = data(m, n=6)
    arrays = {**m.params, "X": X, "T": m.targets(y), **m.slopes(6, np.float64)}
    assert sb.gradcheck(m.loss, m.wrt, arrays).ok


def test_targets():
    m = nn.mlp([2, 3], loss="ce")
    assert m.loss_name == "softmax_ce"
    np.testing.assert_array_equal(m.targets([2, 0]), [[0, 0, 1], [1, 0, 0]])
    with pytest.raises(SymbpError, match="0..2"):
        m.targets([3])
    with pytest.raises(SymbpError, match="integer class labels"):
        m.targets([0.5])
    b = nn.mlp([2, 1], loss="bce")
    assert b.targets([1, 0]).shape == (2, 1)


@pytest.mark.parametrize("call,message", [
    (lambda: nn.mlp([2, 3], loss="hinge"), "unknown loss 'hinge'"),
    (lambda: nn.mlp([2, 3, 3], activations="swoosh"), "unknown activation 'swoosh'"),
    (lambda: nn.mlp([2, 3, 4, 3], activations=["tanh"]), "2 hidden layers but 1"),
    (lambda: nn.mlp([2]), "at least input and output"),
    (lambda: nn.Sequential([nn.Dense(3, init="zeros")], inputs=2).build(), "unknown init"),
])
def test_errors_name_the_culprit(call, message):
    with pytest.raises(SymbpError, match=message):
        call()


def test_model_expression_stays_small():
    # Graph size depends on depth, not width: a 784-256-10 net is a few nodes.
    m = nn.mlp([784, 256, 10], activations="relu")
    assert sp.count_ops(m.loss) < 30
    assert "Dense(256)" in repr(m)
