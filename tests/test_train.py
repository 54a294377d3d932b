"""fit / evaluate / predict: learning, optimizers against hand-written updates, RReLU
draws, NaN faults, Ctrl-C, checkpoints and exact resume."""

import signal

import numpy as np
import pytest
from conftest import have, need

import symbp as sb
from symbp import checkpoint as ckpt
from symbp import nn, train
from symbp.errors import SymbpError, TrainingError

NEEDS_CPU = pytest.mark.needs(have("numba"), "numba")
TARGETS = ["numpy", pytest.param("cpu", marks=NEEDS_CPU)]


def blobs(n=60, d=4, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    X = rng.normal(size=(n, d)) + 2.5 * np.eye(c, d)[y]
    return X, y


def copy(params):
    return {k: v.copy() for k, v in params.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("target", TARGETS)
def test_training_reduces_loss(target):
    X, y = blobs()
    m = nn.mlp([4, 5, 3], activations="relu", seed=1)  # as below: compiled once for cpu
    before = train.evaluate(m, X, y, target=target, dtype=np.float32)
    h = train.fit(m, X, y, epochs=15, batch_size=8, target=target, progress=False)
    after = train.evaluate(m, X, y, target=target)
    assert after["loss"] < 0.5 * before["loss"]
    assert h.loss[-1] < h.loss[0]
    assert after["accuracy"] >= 0.9 and h.accuracy[-1] == after["accuracy"]
    assert len(h.epoch) == len(h.loss) == len(h.time) == 15 and h.steps == 15 * 8
    assert m.params["W1"].dtype == np.float32  # fit's default dtype, converted in place


def test_xor_is_learned():
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], float)
    y = np.array([0, 1, 1, 0])
    m = nn.mlp([2, 2, 1], activations="sigmoid", loss="bce", seed=0)
    h = train.fit(m, X, y, epochs=1500, batch_size=4, optimizer=sb.Momentum(0.5),
                  dtype=np.float64, progress=False)
    p = train.predict(m, X)[:, 0]
    assert h.accuracy[-1] == 1.0
    assert np.all(np.abs(p - y) < 0.1), p


def test_digits_short_run():
    need(have("sklearn"), "scikit-learn")
    from symbp import demo

    r = demo.run(epochs=5, target="numpy", progress=False, verbose=False)
    assert r["accuracy"] >= 0.95, r["accuracy"]
    assert r["history"].loss[-1] < 0.3


# --- optimizers: fit against hand-written updates on the compiled gradient ---------------


def reference_updates(opt, w, g, m, v, t):
    """SGD / momentum / Adam written out here, independent of symbp.optim."""
    if isinstance(opt, sb.SGD):
        return w - opt.lr * g, m, v
    if isinstance(opt, sb.Momentum):
        m = opt.beta * m + g
        return w - opt.lr * m, m, v
    m = opt.beta1 * m + (1 - opt.beta1) * g
    v = opt.beta2 * v + (1 - opt.beta2) * g**2
    mh, vh = m / (1 - opt.beta1**t), v / (1 - opt.beta2**t)
    return w - opt.lr * mh / (np.sqrt(vh) + opt.eps), m, v


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("opt", [sb.SGD(0.3), sb.Momentum(0.1, 0.8), sb.Adam(0.01)],
                         ids=["sgd", "momentum", "adam"])
def test_optimizer_matches_reference(opt, target):
    X, y = blobs(n=10)
    m = nn.mlp([4, 5, 3], activations="relu", seed=1)
    p0 = copy(m.params)
    train.fit(m, X, y, epochs=2, batch_size=4, optimizer=opt, shuffle=False,
              dtype=np.float64, target=target, progress=False)

    fn = sb.compile(m.loss, m.wrt)
    w, T = copy(p0), m.targets(y)
    mm = {k: np.zeros_like(v) for k, v in w.items()}
    vv = {k: np.zeros_like(v) for k, v in w.items()}
    t = 0
    for _ in range(2):
        for i in range(0, 10, 4):  # batches of 4, 4, 2 in order (shuffle=False)
            t += 1
            _, g = fn(**w, X=X[i:i + 4], T=T[i:i + 4])
            for k in w:
                w[k], mm[k], vv[k] = reference_updates(opt, w[k], g[k], mm[k], vv[k], t)
    for k in w:
        np.testing.assert_allclose(m.params[k], w[k], rtol=1e-10, atol=1e-12, err_msg=k)


# --- PReLU and RReLU ----------------------------------------------------------------------


def test_prelu_alpha_trains():
    X, y = blobs()
    X -= 2  # negative pre-activations, so the slope matters
    m = nn.mlp([4, 6, 3], activations=["prelu"], seed=2)
    a0 = m.params["alpha1"].copy()
    train.fit(m, X, y, epochs=5, batch_size=10, dtype=np.float64, progress=False)
    assert not np.allclose(m.params["alpha1"], a0)
    assert len(np.unique(m.params["alpha1"])) > 1  # one slope per unit, each its own
    r = sb.gradcheck(m.loss, m.wrt, {**m.params, "X": X, "T": m.targets(y)})
    assert r.ok, str(r)


class Recorder:
    """Wraps a compiled callable and keeps copies of the arrays it was given."""

    def __init__(self, fn, name):
        self.fn, self.name, self.seen = fn, name, []

    def __call__(self, *args, **data):
        self.seen.append(data[self.name].copy())
        return self.fn(*args, **data)

    def __getattr__(self, k):
        return getattr(self.fn, k)

    def __setattr__(self, k, v):
        if k in ("fn", "name", "seen"):
            object.__setattr__(self, k, v)
        else:
            setattr(self.fn, k, v)


def test_rrelu_draws_per_step_and_uses_the_mean_at_eval(monkeypatch):
    X, y = blobs(n=20)
    m = nn.mlp([4, 6, 3], activations=["rrelu"], seed=0)
    lo, hi, _ = m.random["rrelu_1"]
    steps, forwards = [], []
    real_step, real_forward = train._step, train._forward

    def step(*a):
        steps.append(Recorder(real_step(*a), "rrelu_1"))
        return steps[-1]

    def forward(*a):
        forwards.append(Recorder(real_forward(*a), "rrelu_1"))
        return forwards[-1]

    monkeypatch.setattr(train, "_step", step)
    monkeypatch.setattr(train, "_forward", forward)
    train.fit(m, X, y, epochs=2, batch_size=8, dtype=np.float64, progress=False)
    drawn = steps[0].seen
    assert len(drawn) == 6 and [len(a) for a in drawn] == [8, 8, 4] * 2
    for a in drawn:
        assert a.min() >= lo and a.max() <= hi and a.std() > 0.03
    assert not np.array_equal(drawn[0], drawn[1])  # fresh slopes every step
    # every evaluation (accuracy after each epoch) saw the mean slope
    assert forwards and all(np.all(a == (lo + hi) / 2) for f in forwards for a in f.seen)
    train.evaluate(m, X, y)
    assert all(np.all(a == (lo + hi) / 2) for a in forwards[-1].seen)


# --- faults: NaN, Inf, Ctrl-C -------------------------------------------------------------


@pytest.mark.parametrize("guard", [True, False])
def test_nan_in_data_stops_with_epoch_step_and_keeps_params(tmp_path, guard):
    X, y = blobs(n=16)
    X[13, 2] = np.nan  # in the 4th batch of 4 of every epoch (shuffle=False)
    m = nn.mlp([4, 5, 3], seed=0)
    path = tmp_path / "run.npz"
    # first a clean run writes the checkpoint; then the poisoned data
    train.fit(m, X[:12], y[:12], epochs=2, batch_size=4, checkpoint=path, progress=False)
    saved = ckpt.load(path).arrays["param/W1"].copy()
    start, after = copy(m.params), []
    with pytest.raises(TrainingError) as err:
        train.fit(m, X, y, epochs=3, batch_size=4, shuffle=False, checkpoint=path,
                  progress=False, guard=guard,
                  callback=lambda e, s, loss: after.append(copy(m.params)))
    e = err.value
    assert (e.epoch, e.step) == (1, 4)
    assert "epoch 1, step 4" in str(e) and "rows [13]" in str(e) and "data X" in str(e)
    assert set(e.params) == set(m.params)  # every parameter went NaN in that update
    # restored: the values before the failing step (guard) or at the epoch's start
    assert_same(m.params, after[-1] if guard else start)
    assert all(np.isfinite(v).all() for v in m.params.values())
    np.testing.assert_array_equal(ckpt.load(path).arrays["param/W1"], saved)  # untouched


@pytest.mark.parametrize("guard", [True, False])
def test_divergence_names_the_parameter(guard):
    # Clean data, but a learning rate so large that the parameters overflow.
    X, y = blobs(n=16)
    m = nn.mlp([4, 5, 1], activations="relu", loss="mse", seed=0)
    with pytest.raises(TrainingError, match=r"epoch \d+, step \d+") as err:
        train.fit(m, X * 1e3, y, epochs=50, batch_size=4, optimizer=sb.SGD(1e3),
                  progress=False, dtype=np.float32, guard=guard)
    assert err.value.params, "the overflowing parameter is named"
    assert all(np.isfinite(v).all() for v in m.params.values())
    assert "learning rate" in str(err.value)


def test_keyboard_interrupt_is_deferred_to_a_step_boundary(tmp_path):
    X, y = blobs(n=20)
    m = nn.mlp([4, 5, 3], seed=0)
    seen = []

    def cb(epoch, step, loss):
        seen.append(copy(m.params))
        if (epoch, step) == (1, 2):
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C delivers

    path = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        train.fit(m, X, y, epochs=4, batch_size=6, checkpoint=path, callback=cb,
                  optimizer=sb.Adam(0.01), progress=False)
    assert len(seen) == 4 + 3
    assert_same(m.params, seen[-1])  # nothing half-updated
    c = ckpt.load(path)
    assert (c.meta["epoch"], c.meta["row"], c.meta["t"]) == (1, 18, 7)
    assert_same({k[6:]: v for k, v in c.arrays.items() if k.startswith("param/")}, m.params)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


# --- resume -------------------------------------------------------------------------------


def rrelu_model():
    return nn.mlp([4, 6, 3], activations=["rrelu"], seed=7)


@pytest.mark.parametrize("target,how", [("numpy", "epoch"), ("numpy", "ctrl-c"),
                                        pytest.param("cpu", "epoch", marks=NEEDS_CPU)])
def test_resume_equals_an_uninterrupted_run(tmp_path, target, how):
    # Adam (buffers and step count) and RReLU (random draws) both must resume exactly.
    X, y = blobs(n=30)
    kw = dict(epochs=4, batch_size=7, optimizer=sb.Adam(0.02), seed=3, progress=False,
              target=target)
    full = rrelu_model()
    h_full = train.fit(full, X, y, **kw)

    part, path = rrelu_model(), tmp_path / "run.npz"
    if how == "epoch":
        train.fit(part, X, y, **{**kw, "epochs": 2}, checkpoint=path)
    else:
        def cb(epoch, step, loss):
            if (epoch, step) == (2, 1):
                signal.raise_signal(signal.SIGINT)

        with pytest.raises(KeyboardInterrupt):
            train.fit(part, X, y, **kw, checkpoint=path, callback=cb)
    fresh = rrelu_model()  # a new process would start from the initialisation
    h = train.fit(fresh, X, y, **kw, checkpoint=path, resume=True)
    assert_same(fresh.params, full.params)
    assert h.loss == h_full.loss and h.accuracy == h_full.accuracy and h.steps == h_full.steps
    assert h.epoch == [1, 2, 3, 4]


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    X, y = blobs(n=12)
    a, b = nn.mlp([4, 3]), nn.mlp([4, 3])
    train.fit(a, X, y, epochs=2, progress=False)
    train.fit(b, X, y, epochs=2, progress=False, checkpoint=tmp_path / "new.npz", resume=True)
    assert_same(a.params, b.params)
    assert ckpt.load(tmp_path / "new.npz").meta["epoch"] == 2


@pytest.mark.parametrize("other,message", [
    (lambda: nn.mlp([4, 5, 3]), "different model"),
    (lambda: nn.mlp([4, 3]), "Momentum"),
])
def test_resume_refuses_a_foreign_checkpoint(tmp_path, other, message):
    X, y = blobs(n=12)
    path = tmp_path / "run.npz"
    train.fit(nn.mlp([4, 3]), X, y, epochs=1, progress=False, checkpoint=path)
    with pytest.raises(TrainingError, match=message):
        train.fit(other(), X, y, epochs=2, progress=False, optimizer=sb.Momentum(0.1),
                  resume=path)


def test_corrupt_checkpoint_on_resume(tmp_path):
    path = tmp_path / "run.npz"
    path.write_bytes(b"PK\x03\x04 not really")
    X, y = blobs(n=12)
    with pytest.raises(TrainingError, match="run.npz"):
        train.fit(nn.mlp([4, 3]), X, y, epochs=1, progress=False, checkpoint=path, resume=True)


# --- the rest of the surface --------------------------------------------------------------


def test_target_loss_stops_early_and_validation():
    X, y = blobs()
    m = nn.mlp([4, 8, 3], seed=0)
    h = train.fit(m, X, y, epochs=200, batch_size=10, target_loss=0.2, progress=False,
                  validation=blobs(n=30, seed=9))
    assert h.stopped == "target_loss" and len(h.epoch) < 200
    assert h.loss[-1] <= 0.2 < h.loss[-2]
    assert len(h.val_loss) == len(h.val_accuracy) == len(h.epoch)
    assert h.val_loss[-1] < h.val_loss[0] and h.val_accuracy[-1] > 0.6


def test_predict_and_evaluate_agree_with_the_compiled_loss():
    X, y = blobs(n=9)
    m = nn.mlp([4, 5, 3], seed=0)
    p = train.predict(m, X)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-12)
    np.testing.assert_allclose(train.predict(m, X, batch_size=4), p, rtol=1e-12)
    r = train.evaluate(m, X, y)
    value, _ = sb.compile(m.loss, m.wrt)(**m.params, X=X, T=m.targets(y))
    assert r["loss"] == pytest.approx(value, rel=1e-12)
    assert r["accuracy"] == np.mean(p.argmax(axis=1) == y)


@pytest.mark.parametrize("kw,message", [
    (dict(batch_size=0), "batch_size"),
    (dict(dtype=np.int32), "float32 or float64"),
    (dict(resume=True), "checkpoint=PATH"),
])
def test_bad_arguments(kw, message):
    X, y = blobs(n=6)
    with pytest.raises(SymbpError, match=message):
        train.fit(nn.mlp([4, 3]), X, y, progress=False, **kw)


def test_bad_data():
    X, y = blobs(n=6)
    with pytest.raises(SymbpError, match="6 rows but y has 5"):
        train.fit(nn.mlp([4, 3]), X, y[:5], progress=False)
    with pytest.raises(SymbpError, match="non-empty"):
        train.fit(nn.mlp([4, 3]), X[:0], y[:0], progress=False)


def test_progress_bar_or_lines(capsys):
    X, y = blobs(n=6)
    train.fit(nn.mlp([4, 3]), X, y, epochs=2, progress=True)
    err = capsys.readouterr()
    assert "2/2" in err.err + err.out


# --- learning-rate schedule ---------------------------------------------------------------


def halving(lr0):
    return lambda epoch: lr0 * 0.5**epoch


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("opt", [sb.SGD(0.3), sb.Adam(0.02)], ids=["sgd", "adam"])
def test_schedule_equals_epochs_run_one_at_a_time(tmp_path, opt, target):
    # Reference: each epoch its own fit with the halved lr fixed, continued from the
    # checkpoint of the epoch before (parameters, Adam's buffers and step count, batch order)
    X, y = blobs(n=30)
    kw = dict(batch_size=7, seed=3, progress=False, target=target, dtype=np.float64)
    one, path = rrelu_model(), tmp_path / "run.npz"
    for e in range(3):
        train.fit(one, X, y, epochs=e + 1, optimizer=type(opt)(lr=opt.lr * 0.5**e), **kw,
                  checkpoint=path, resume=True)
    sched = rrelu_model()
    train.fit(sched, X, y, epochs=3, optimizer=opt, lr_schedule=halving(opt.lr), **kw)
    for k in one.params:
        np.testing.assert_allclose(sched.params[k], one.params[k], rtol=1e-12, atol=0,
                                   err_msg=k)
    fixed = rrelu_model()  # and the schedule did change something
    train.fit(fixed, X, y, epochs=3, optimizer=opt, **kw)
    assert not np.allclose(fixed.params["W1"], sched.params["W1"], rtol=1e-6)


@pytest.mark.parametrize("target", TARGETS)
def test_resume_continues_the_schedule(tmp_path, target):
    # interrupted in epoch 3 (lr 0.02/4) and resumed: the schedule goes on at that epoch
    X, y = blobs(n=30)
    kw = dict(epochs=4, batch_size=7, optimizer=sb.Adam(0.02), seed=3, progress=False,
              target=target, lr_schedule=halving(0.02))
    full = rrelu_model()
    train.fit(full, X, y, **kw)

    def cb(epoch, step, loss):
        if (epoch, step) == (2, 1):
            signal.raise_signal(signal.SIGINT)

    part, path = rrelu_model(), tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        train.fit(part, X, y, **kw, checkpoint=path, callback=cb)
    fresh = rrelu_model()
    train.fit(fresh, X, y, **kw, checkpoint=path, resume=True)
    assert_same(fresh.params, full.params)


@NEEDS_CPU
def test_a_cached_step_forgets_the_last_schedule():
    # fit caches the compiled step on the model: a later fit without a schedule must not
    # keep the learning rate the schedule reached
    X, y = blobs(n=20)
    kw = dict(epochs=2, batch_size=5, optimizer=sb.SGD(0.2), seed=1, progress=False,
              target="cpu", dtype=np.float64)
    a, b = nn.mlp([4, 5, 3], seed=2), nn.mlp([4, 5, 3], seed=2)
    train.fit(a, X, y, **kw, lr_schedule=lambda e: 1e-3)
    p0 = copy(a.params)
    train.fit(a, X, y, **kw)
    b.params.update(copy(p0))
    train.fit(b, X, y, **kw)  # a fresh model: compiles its own step
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)


@pytest.mark.parametrize("value", [float("nan"), -0.1, "0.1", None])
def test_a_bad_schedule_value_is_named(value):
    X, y = blobs(n=10)
    with pytest.raises(SymbpError, match=r"lr_schedule\(0\) returned"):
        train.fit(nn.mlp([4, 3, 3], seed=0), X, y, epochs=1, progress=False,
                  lr_schedule=lambda e: value)
