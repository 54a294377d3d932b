"""Convolutional models: the nn layers (shapes, initialisation, gradients against central
differences), training on N×C×H×W arrays, the fused step of every optimizer against a
NumPy step written here, checkpoints with 4-D parameters, and the CNN demo."""

import numpy as np
import pytest
from conftest import have

import symbp as sb
from symbp import checkpoint as ckpt
from symbp import nn, train
from symbp.errors import SymbpError
from symbp.matrix import Tensor

NEEDS_CPU = pytest.mark.needs(have("numba"), "numba")
CPU = pytest.param("cpu", marks=NEEDS_CPU)
PARALLEL = pytest.param("parallel", marks=NEEDS_CPU)


def images(n=24, c=2, hw=6, classes=3, seed=0):
    """Images whose class lights one quadrant: learnable by a small CNN."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.normal(size=(n, c, hw, hw)) * 0.5
    h = hw // 2
    for i, k in enumerate(y):
        r, q = divmod(int(k), 2)
        X[i, :, r * h:(r + 1) * h, q * h:(q + 1) * h] += 1.5
    return X, y


def small(seed=0, act="tanh", c=2, hw=6):
    return nn.Sequential([nn.conv2d(3, 3, padding=1, activation=act), nn.max_pool2d(2),
                          nn.conv2d(4, 2, stride=1), nn.PReLU(), nn.avg_pool2d(2),
                          nn.flatten(), nn.Dense(3)], inputs=(c, hw, hw), seed=seed).build()


def copy(params):
    return {k: v.copy() for k, v in params.items()}


# --- layers -------------------------------------------------------------------------------


def test_shapes_names_and_labels():
    m = nn.Sequential([nn.conv2d(8, 3, padding=1, activation="relu"), nn.max_pool2d(2),
                       nn.conv2d(5, 3, stride=2, padding=2), nn.avg_pool2d(2, stride=1),
                       nn.flatten(), nn.Dense(7, "tanh"), nn.Dense(4)],
                      inputs=(3, 10, 10)).build()
    assert isinstance(m.X, Tensor) and m.X.shape[1:] == (3, 10, 10)
    assert m.sample_shape == (3, 10, 10)
    # 10 -conv p1-> 10 -pool 2-> 5 -conv s2 p2-> ⌊(5+4−3)/2⌋+1 = 4 -avg 2, s1-> 3: 5·3·3 = 45
    assert {k: v.shape for k, v in m.params.items()} == {
        "K1": (8, 3, 3, 3), "b1": (8,), "K2": (5, 8, 3, 3), "b2": (5,),
        "W3": (45, 7), "b3": (1, 7), "W4": (7, 4), "b4": (1, 4)}
    assert [w.name for w in m.wrt] == list(m.params)
    assert m.layers == ["Conv2d(8, 3×3, pad 1)", "relu", "MaxPool2d(2)",
                        "Conv2d(5, 3×3, stride 2, pad 2)", "AvgPool2d(2, stride 1)", "Flatten",
                        "Dense(7)", "tanh", "Dense(4)"]
    # the same network written with the heads directly gives the same value
    X, y = images(n=4, c=3, hw=10)
    P = m.params
    H = sb.max_pool2d(sb.relu(sb.conv2d(m.X, _sym(m, "K1"), _sym(m, "b1"), padding=1)), 2)
    H = sb.avg_pool2d(sb.conv2d(H, _sym(m, "K2"), _sym(m, "b2"), stride=2, padding=2), 2, 1)
    Z = sb.dense(sb.tanh(sb.dense(sb.flatten(H), _sym(m, "W3"), _sym(m, "b3"))),
                 _sym(m, "W4"), _sym(m, "b4"))
    np.testing.assert_allclose(sb.compile_forward(Z)(**P, X=X),
                               sb.compile_forward(m.output)(**P, X=X), rtol=1e-14)


def _sym(m, name):
    return next(w for w in m.wrt if w.name == name)


@pytest.mark.parametrize("act,init", [("relu", "he"), ("tanh", "glorot"), ("selu", "lecun"),
                                      (None, "glorot")])
def test_initialisation_by_fan_in(act, init):
    # fan_in = C·k² = 16·9, fan_out = F·k² = 64·9; biases start at 0
    m = nn.Sequential([nn.conv2d(64, 3, activation=act), nn.flatten(), nn.Dense(2)],
                      inputs=(16, 5, 5), seed=2).build()
    K = m.params["K1"]
    fan_in, fan_out = 16 * 9, 64 * 9
    want = {"he": np.sqrt(2 / fan_in), "lecun": np.sqrt(1 / fan_in),
            "glorot": np.sqrt(6 / (fan_in + fan_out)) / np.sqrt(3)}[init]
    assert K.std() == pytest.approx(want, rel=0.03)  # 9,216 draws: ±1.5 % at 2σ
    if init == "glorot":
        assert np.abs(K).max() <= np.sqrt(6 / (fan_in + fan_out))
    else:
        assert abs(K.mean()) < 0.05 * want
    assert not m.params["b1"].any()


def test_init_reads_the_activation_layer_that_follows():
    m = nn.Sequential([nn.conv2d(32, 3), nn.Activation("relu"), nn.flatten(), nn.Dense(2)],
                      inputs=(8, 4, 4), seed=0).build()
    assert m.params["K1"].std() == pytest.approx(np.sqrt(2 / 72), rel=0.05)


@pytest.mark.parametrize("target", ["numpy", CPU])
def test_gradient_of_a_small_cnn_against_central_differences(target):
    m = small(seed=4)
    X, y = images(n=5)
    T = m.targets(y)
    P = m.params
    value, grads = sb.compile(m.loss, m.wrt, target=target, dtype=np.float64)(**P, X=X, T=T)

    def loss(Q):
        return sb.compile_forward(m.loss)(**Q, X=X, T=T)

    assert value == pytest.approx(float(loss(P)), rel=1e-12)
    h = 1e-6
    for k, w in P.items():
        num = np.zeros_like(w)
        for i in np.ndindex(w.shape):
            up, dn = copy(P), copy(P)
            up[k][i] += h
            dn[k][i] -= h
            num[i] = (float(loss(up)) - float(loss(dn))) / (2 * h)
        assert grads[k].shape == w.shape
        np.testing.assert_allclose(grads[k], num, rtol=1e-6, atol=1e-8, err_msg=k)


def test_rrelu_draws_a_slope_per_image_entry():
    m = nn.Sequential([nn.conv2d(2, 3, padding=1), nn.RReLU(), nn.flatten(), nn.Dense(3)],
                      inputs=(1, 4, 4)).build()
    (name,) = m.random
    s = m.slopes(5, np.float64, np.random.default_rng(0))[name]
    assert s.shape == (5, 2, 4, 4) and 1 / 8 <= s.min() and s.max() <= 1 / 3
    assert np.all(m.slopes(5, np.float64)[name] == (1 / 8 + 1 / 3) / 2)


@pytest.mark.parametrize("layers,inputs,message", [
    ([nn.conv2d(2, 3), nn.Dense(3)], (1, 5, 5), r"Dense\(3\).*images.*nn.flatten\(\)"),
    ([nn.Dense(4), nn.conv2d(2, 3)], 16, r"Conv2d\(2, 3\) reads images.*inputs=\(C, H, W\)"),
    ([nn.max_pool2d(2)], 9, r"MaxPool2d\(2\) reads images"),
    ([nn.conv2d(2, 7), nn.flatten(), nn.Dense(3)], (1, 5, 5), "larger than the padded image"),
    ([nn.conv2d(2, 3, stride=0), nn.flatten(), nn.Dense(3)], (1, 5, 5), "stride"),
    ([nn.conv2d(2, 3)], (1, 5, 5), r"last layer gives images.*nn.flatten\(\)"),
    ([nn.Dense(3)], (1, 5), r"inputs=\(1, 5\)"),
])
def test_errors_name_the_layer_and_the_fix(layers, inputs, message):
    with pytest.raises(SymbpError, match=message):
        nn.Sequential(layers, inputs=inputs).build()


# --- training -------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["numpy", CPU, PARALLEL])
def test_fit_learns_from_images(target):
    X, y = images(n=48)
    m = small(act="relu")
    h = train.fit(m, X, y, epochs=12, batch_size=8, optimizer=sb.Adam(0.02), target=target,
                  progress=False)
    assert h.loss[-1] < 0.5 * h.loss[0]
    assert h.accuracy[-1] >= 0.9
    p = train.predict(m, X[:7], target=target)
    assert p.shape == (7, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    assert train.evaluate(m, X, y, target=target)["accuracy"] == h.accuracy[-1]


def test_images_of_the_wrong_shape_are_named():
    m = small()
    X, y = images(n=6)
    with pytest.raises(SymbpError, match=r"images N×2×6×6.*got shape \(6, 2, 6, 5\)"):
        train.fit(m, X[..., :5], y, progress=False)
    with pytest.raises(SymbpError, match=r"X.reshape\(-1, 2, 6, 6\)"):
        train.predict(m, X.reshape(6, -1))


def test_nan_in_an_image_names_its_row():
    m = small()
    X, y = images(n=12)
    X[9, 1, 2, 3] = np.nan
    with pytest.raises(sb.TrainingError, match=r"data X has NaN/Inf in rows \[9\]"):
        train.fit(m, X, y, batch_size=12, shuffle=False, progress=False, dtype=np.float64)


def reference_step(opt, w, g, s, t):
    """One update written out in NumPy (PyTorch's formulas), independent of symbp.optim."""
    if isinstance(opt, sb.Adam):
        s["m"] = opt.beta1 * s["m"] + (1 - opt.beta1) * g
        s["v"] = opt.beta2 * s["v"] + (1 - opt.beta2) * g * g
        mh, vh = s["m"] / (1 - opt.beta1**t), s["v"] / (1 - opt.beta2**t)
        return w - opt.lr * mh / (np.sqrt(vh) + opt.eps)
    if isinstance(opt, sb.Momentum):
        s["m"] = opt.beta * s["m"] + g
        return w - opt.lr * s["m"]
    return w - opt.lr * g


@pytest.mark.parametrize("target", [CPU, PARALLEL])
@pytest.mark.parametrize("opt", [sb.SGD(0.2), sb.Momentum(0.05, 0.9), sb.Adam(0.01)],
                         ids=["sgd", "momentum", "adam"])
def test_fused_step_equals_the_reference_step(opt, target):
    # The compiled step updates 4-D kernels, 1-D biases and a 1×C×1×1 PReLU slope in
    # place; six steps of it against the reference gradient and the update written above.
    m = small(seed=5)
    X, y = images(n=18, seed=1)
    T = m.targets(y)
    w = copy(m.params)
    step = sb.compile_step(m.loss, m.wrt, opt, target=target, dtype=np.float64)
    grad = sb.compile(m.loss, m.wrt, dtype=np.float64)  # the NumPy reference backend
    state = {k: {"m": np.zeros_like(v), "v": np.zeros_like(v)} for k, v in w.items()}
    for t in range(1, 7):
        rows = slice(3 * (t - 1), 3 * t)
        loss = step(m.params, X=X[rows], T=T[rows])
        value, g = grad(**w, X=X[rows], T=T[rows])
        assert loss == pytest.approx(value, rel=1e-12)
        for k in w:
            w[k] = reference_step(opt, w[k], g[k], state[k], t)
    for k in w:
        np.testing.assert_allclose(m.params[k], w[k], rtol=1e-12, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("target", ["numpy", CPU])
def test_checkpoint_resume_with_4d_parameters(tmp_path, target):
    X, y = images(n=20)
    kw = dict(epochs=4, batch_size=6, optimizer=sb.Adam(0.02), seed=3, progress=False,
              target=target, dtype=np.float64)
    full = small(seed=1)
    train.fit(full, X, y, **kw)
    part, path = small(seed=1), tmp_path / "cnn.npz"
    train.fit(part, X, y, **{**kw, "epochs": 2}, checkpoint=path)
    c = ckpt.load(path)
    assert c.arrays["param/K1"].shape == (3, 2, 3, 3) and c.arrays["param/b1"].shape == (3,)
    assert c.arrays["opt/v/K2"].shape == (4, 3, 2, 2) and c.meta["params"]["K1"] == [3, 2, 3, 3]
    np.testing.assert_array_equal(c.arrays["param/K1"], part.params["K1"])
    fresh = small(seed=1)
    train.fit(fresh, X, y, **kw, checkpoint=path, resume=True)
    for k in full.params:
        np.testing.assert_array_equal(fresh.params[k], full.params[k], err_msg=k)
    # a checkpoint of another architecture is refused by name
    other = nn.Sequential([nn.conv2d(2, 3, padding=1), nn.flatten(), nn.Dense(3)],
                          inputs=(2, 6, 6)).build()
    with pytest.raises(sb.TrainingError, match="different model"):
        train.fit(other, X, y, **kw, checkpoint=path, resume=True)


# --- the demo ------------------------------------------------------------------------------


@NEEDS_CPU
def test_cnn_demo_learns_the_digits_quickly(capsys):
    # `symbp demo --model cnn` on a budget of one epoch (of the images and their shifts)
    pytest.importorskip("sklearn")
    from symbp import cli

    assert cli.main(["demo", "--model", "cnn", "--epochs", "1", "--quiet"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("final accuracy: "), out
    assert float(out.split()[-1]) >= 0.95, out


def test_shifted_digits_move_by_one_pixel():
    from symbp import demo

    X = np.arange(2 * 12.0).reshape(2, 1, 3, 4)
    S, y = demo.shifted(X, np.array([7, 8]))
    assert S.shape == (10, 1, 3, 4) and list(y) == [7, 8] * 5
    np.testing.assert_array_equal(S[:2], X)
    np.testing.assert_array_equal(S[2:4, :, 1:], X[:, :, :-1])  # down one row
    np.testing.assert_array_equal(S[4:6, :, :-1], X[:, :, 1:])  # up one row
    np.testing.assert_array_equal(S[6:8, :, :, 1:], X[:, :, :, :-1])  # right one column
    np.testing.assert_array_equal(S[8:10, :, :, :-1], X[:, :, :, 1:])  # left one column
    np.testing.assert_array_equal(S[2:4, :, 0], X[:, :, 0])  # the edge repeats
