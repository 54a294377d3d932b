"""The warm start (symbp.warm): a step found by its expression's record equals the step
built through every pass, a changed definition misses the record, damage is ignored."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sympy as sp
from conftest import have, need

import symbp as sb
from symbp import warm
from symbp.functions import Activation
from symbp.ir import Program

need(have("numba"), "numba")

N = sp.Symbol("N")
X, T = sp.MatrixSymbol("X", N, 4), sp.MatrixSymbol("T", N, 3)
W0, b0 = sp.MatrixSymbol("W0", 4, 5), sp.MatrixSymbol("b0", 1, 5)
W1, b1 = sp.MatrixSymbol("W1", 5, 3), sp.MatrixSymbol("b1", 1, 3)
PARAMS = [W0, b0, W1, b1]


def mlp(act=sb.tanh):
    return sb.softmax_cross_entropy(sb.dense(act(sb.dense(X, W0, b0)), W1, b1), T)


def data(dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = {w.name: rng.standard_normal(w.shape).astype(dtype) for w in PARAMS}
    y = rng.integers(0, 3, 7)
    return params, {"X": rng.standard_normal((7, 4)).astype(dtype),
                    "T": np.eye(3, dtype=dtype)[y]}


def train(step, dtype, n=5):
    """The losses of ``n`` steps and the parameters after them."""
    params, batch = data(dtype)
    losses = [step(params, **batch) for _ in range(n)]
    return losses, params


def compile_step(f, dtype, target="cpu", opt=None):
    return sb.compile_step(f, PARAMS, opt or sb.SGD(0.1), target=target, dtype=dtype)


def same(a, b):
    (la, pa), (lb, pb) = a, b
    assert la == lb
    for k in pa:
        assert pa[k].tobytes() == pb[k].tobytes(), k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("target", ["cpu", "parallel"])
def test_the_second_compile_is_found_by_its_record_and_equals_the_first(cache_dir, dtype,
                                                                        target):
    full = compile_step(mlp(), dtype, target)
    assert not full.warm and list(cache_dir.glob("warm_*.json"))
    found = compile_step(mlp(), dtype, target)
    assert found.warm
    assert not isinstance(found._p, Program)  # no pass ran
    same(train(full, dtype), train(found, dtype))
    ref_losses, ref_params = train(compile_step(mlp(), dtype, "numpy"), dtype)
    losses, params = train(found, dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(losses, ref_losses, rtol=tol)
    for k in params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=tol, atol=tol)
    # the Program, for whoever reads it, is built when asked and is the full path's
    assert str(found.program) == str(full.program)
    assert found.source == full.source


def test_the_hyperparameters_are_the_optimizer_s_not_the_record_s(cache_dir):
    compile_step(mlp(), np.float64, opt=sb.Adam(0.01))
    found = compile_step(mlp(), np.float64, opt=sb.Adam(0.5))
    assert found.warm
    full = sb.compile_step(mlp(), PARAMS, sb.Adam(0.5), target="cpu", dtype=np.float64,
                           cache=False)
    assert not full.warm
    same(train(full, np.float64), train(found, np.float64))


def test_another_optimizer_kind_or_dtype_or_options_misses(cache_dir):
    compile_step(mlp(), np.float32)
    assert not compile_step(mlp(), np.float64).warm
    assert not compile_step(mlp(), np.float32, opt=sb.Momentum(0.1)).warm
    assert not sb.compile_step(mlp(), PARAMS, sb.SGD(0.1), target="cpu", dtype=np.float32,
                               boundscheck=True).warm
    assert not compile_step(mlp(sb.sigmoid), np.float32).warm


def swish_row(body):
    """A user's activation named ``swish`` whose value is ``body(x)``."""

    class swish(Activation):
        nargs = 1

        @staticmethod
        def formula(x):
            return body(x)

        def fdiff(self, argindex=1):
            d = sp.Dummy()
            return sp.diff(body(d), d).subs(d, self.args[0])

    return swish


def test_an_edited_function_under_the_same_name_misses_and_gives_the_new_result(cache_dir):
    old = swish_row(lambda x: x * sb.sigmoid(x))
    compile_step(mlp(old), np.float64)
    assert compile_step(mlp(old), np.float64).warm
    new = swish_row(lambda x: x * sb.tanh(x))  # same name, another formula
    step = compile_step(mlp(new), np.float64)
    assert not step.warm
    ref = train(compile_step(mlp(lambda Z: sb.elementwise(lambda x: x * sb.tanh(x), Z)),
                             np.float64, "numpy"), np.float64)
    losses, params = train(step, np.float64)
    np.testing.assert_allclose(losses, ref[0], rtol=1e-12)
    # the old class's expression prints the row now registered under its name: its record
    # (filed before the new row existed) must not be used either
    assert not compile_step(mlp(old), np.float64).warm


def _swish_key(**attrs):
    """The key of ``mlp`` over a row named swish, x·σ(x), with ``attrs`` changed."""
    row = type("swish", (Activation,), {
        "nargs": 1, "formula": staticmethod(lambda x: x * sb.sigmoid(x)),
        "fdiff": lambda self, argindex=1: sb.sigmoid(self.args[0]) * (
            1 + self.args[0] * (1 - sb.sigmoid(self.args[0]))), **attrs})
    return warm.key(mlp(row), tuple(PARAMS), sb.SGD(), np.dtype(np.float64), "cpu", {})


def test_every_part_of_a_row_is_in_the_key():
    base = _swish_key()
    assert base is not None and base == _swish_key()
    edits = [_swish_key(cost=1),
             _swish_key(fdiff=lambda self, argindex=1: sp.Integer(1)),
             _swish_key(rule=staticmethod(lambda x: x / (1 + sp.exp(-x)))),
             _swish_key(formula=staticmethod(lambda x: x * sb.tanh(x)))]
    assert len({base, *edits}) == 5


def test_a_row_with_methods_of_its_own_takes_the_full_path(cache_dir):
    class odd(Activation):
        nargs = 1

        @staticmethod
        def formula(x):
            return x * sb.sigmoid(x)

        def fdiff(self, argindex=1):
            return sb.sigmoid(self.args[0]) * (1 + self.args[0] * (1 - sb.sigmoid(self.args[0])))

        def _eval_is_positive(self):  # code the key cannot see
            return None

    assert warm.key(mlp(odd), tuple(PARAMS), sb.SGD(), np.dtype(np.float64), "cpu", {}) is None
    compile_step(mlp(odd), np.float64)
    assert not list(cache_dir.glob("warm_*.json"))
    assert not compile_step(mlp(odd), np.float64).warm


def _record(cache_dir):
    (path,) = cache_dir.glob("warm_*.json")
    return path


@pytest.mark.parametrize("damage", ["truncate", "edit", "kernel", "no kernel"])
def test_a_damaged_record_or_kernel_is_ignored(cache_dir, damage):
    full = compile_step(mlp(), np.float32)
    path = _record(cache_dir)
    rec = json.loads(path.read_text())
    kernel = cache_dir / f"gen_{rec['body']['kernel']}.py"
    if damage == "truncate":
        path.write_text(path.read_text()[:100])
    elif damage == "edit":  # valid JSON, a wrong workspace: its seal no longer fits
        rec["body"]["layout"]["dict"]["f64"] = 0
        path.write_text(json.dumps(rec))
    elif damage == "kernel":
        kernel.write_text(kernel.read_text() + "\nx = 1\n")
    else:  # moved away, and back afterwards: the module it held is loaded in this process
        kernel.rename(cache_dir / "away")
    try:
        step = compile_step(mlp(), np.float32)
    finally:
        if damage == "no kernel":
            (cache_dir / "away").rename(kernel)
    assert not step.warm
    same(train(full, np.float32), train(step, np.float32))


SCRIPT = textwrap.dedent('''
    import numpy as np, sympy as sp, symbp as sb
    from symbp.functions import Activation
    N = sp.Symbol("N")
    X, T = sp.MatrixSymbol("X", N, 4), sp.MatrixSymbol("T", N, 3)
    W, b = sp.MatrixSymbol("W", 4, 3), sp.MatrixSymbol("b", 1, 3)

    class act(Activation):
        nargs = 1

        @staticmethod
        def formula(x):
            return FORMULA

        def fdiff(self, argindex=1):
            d = sp.Dummy()
            return sp.diff(self.formula(d), d).subs(d, self.args[0])

    L = sb.softmax_cross_entropy(act(sb.dense(X, W, b)), T)
    step = sb.compile_step(L, [W, b], sb.SGD(0.1), target="cpu", dtype=np.float32)
    rng = np.random.default_rng(0)
    p = {"W": rng.standard_normal((4, 3)).astype(np.float32),
         "b": rng.standard_normal((1, 3)).astype(np.float32)}
    x = rng.standard_normal((6, 4)).astype(np.float32)
    t = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]
    losses = [step(p, X=x, T=t) for _ in range(3)]
    print(step.warm, repr(losses), p["W"].tobytes().hex())
''')


def _process(cache_dir, formula):
    env = {**os.environ, "SYMBP_CACHE_DIR": str(cache_dir)}
    r = subprocess.run([sys.executable, "-c", SCRIPT.replace("FORMULA", formula)], env=env,
                       capture_output=True, text=True, check=True)
    return r.stdout.split(maxsplit=1)


def test_a_fresh_process_starts_from_the_record_and_an_edited_file_does_not(tmp_path):
    cold = _process(tmp_path, "x*sb.sigmoid(x)")
    hot = _process(tmp_path, "x*sb.sigmoid(x)")
    assert (cold[0], hot[0]) == ("False", "True")
    assert cold[1] == hot[1]  # losses and weights, bit for bit
    edited = _process(tmp_path, "x*sb.tanh(x)")  # the user edits the formula, same name
    assert edited[0] == "False" and edited[1] != cold[1]
    assert _process(tmp_path, "x*sb.tanh(x)")[0] == "True"


def test_a_scalar_parameter_and_its_state_come_back_from_the_record(cache_dir):
    s = sp.Symbol("s", real=True)
    f = sb.softmax_cross_entropy(s * sb.dense(sb.tanh(sb.dense(X, W0, b0)), W1, b1), T)
    params, batch = data(np.float64)

    def run(step):
        p = {k: v.copy() for k, v in params.items()} | {"s": np.array(0.7)}
        losses = [step(p, **batch) for _ in range(4)]
        return losses, p

    full = sb.compile_step(f, [s, *PARAMS], sb.Adam(0.01), target="cpu", dtype=np.float64)
    found = sb.compile_step(f, [s, *PARAMS], sb.Adam(0.01), target="cpu", dtype=np.float64)
    assert found.warm and not full.warm
    same(run(full), run(found))
    assert found.state["m"]["s"].shape == ()
