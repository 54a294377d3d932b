"""A deep step compiles as a sequence of stage calls: each head's block is its own small njit
function, and blocks equal up to their variables' names (the layers of an MLP) share one.
The machine code Numba and LLVM make is then about constant in the depth; the step must
compute what the one-function kernel and the NumPy reference compute."""

import sys

import numpy as np
import pytest
import sympy as sp
from conftest import have

import symbp as sb

pytestmark = pytest.mark.needs(have("numba"), "numba")


def mlp(depth, width=5, nin=4, nout=3, act=sb.tanh):
    N = sp.Symbol("N")
    X, T = sp.MatrixSymbol("X", N, nin), sp.MatrixSymbol("T", N, nout)
    H, params = X, []
    sizes = [nin] + [width] * depth + [nout]
    for k, (a, b) in enumerate(zip(sizes, sizes[1:])):
        W, c = sp.MatrixSymbol(f"W{k}", a, b), sp.MatrixSymbol(f"b{k}", 1, b)
        params += [W, c]
        H = sb.dense(H, W, c)
        if k < depth:
            H = act(H)
    return sb.softmax_cross_entropy(H, T), params, sizes


def init(sizes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    p = {}
    for k, (a, b) in enumerate(zip(sizes, sizes[1:])):
        p[f"W{k}"] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype)
        p[f"b{k}"] = (0.1 * rng.standard_normal((1, b))).astype(dtype)
    return p


def stage_defs(source):
    return [ln for ln in source.splitlines() if ln.startswith("def _stage")]


def module_of(step):
    name = next(m for m in sys.modules if m.startswith("symbp_gen_")
                and sys.modules[m].__file__ and step.source.strip() in
                open(sys.modules[m].__file__).read())
    return sys.modules[name]


@pytest.fixture
def split(monkeypatch):
    """Split every kernel, however small (a small one is one function by default)."""
    from symbp.backends import numba_cpu

    monkeypatch.setattr(numba_cpu, "SPLIT_MIN_BLOCKS", 0)
    return numba_cpu


def test_stage_functions_do_not_grow_with_depth(split):
    # 4 and 9 hidden layers of one width: the same stage functions, more calls
    counts = []
    for depth in (4, 9):
        f, params, _ = mlp(depth)
        step = sb.compile_step(f, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
        counts.append(len(stage_defs(step.source)))
        kernel = step.source.split("def train_step(")[1]
        assert kernel.count("_stage") >= 6 * depth  # every layer calls, forward and back
    assert counts[0] == counts[1] > 0


def test_each_stage_compiles_once(split):
    # a row number printed as a bare int is a Literal type: one compilation per value
    f, params, sizes = mlp(6)
    step = sb.compile_step(f, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((7, 4)).astype(np.float32)
    T = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 7)]
    step(init(sizes, np.float32), X=X, T=T)
    m = module_of(step)
    stages = [getattr(m, ln[4:ln.index("(")]) for ln in stage_defs(step.source)]
    assert stages and all(len(s.overloads) == 1 for s in stages), \
        [(s.__name__, len(s.overloads)) for s in stages]


@pytest.mark.parametrize("target", ["cpu", "parallel"])
@pytest.mark.parametrize("opt", [sb.SGD(0.2), sb.Adam(0.01)], ids=["sgd", "adam"])
def test_split_step_matches_the_reference(split, monkeypatch, target, opt):
    # prange in every loop that may have one: a prange inside a stage must work too
    monkeypatch.setattr(split, "PAR_MIN_WORK", 0)
    f, params, sizes = mlp(3, act=sb.relu)
    step = sb.compile_step(f, params, opt, target=target, dtype=np.float64)
    ref = sb.compile_step(f, params, opt, target="numpy", dtype=np.float64)
    assert stage_defs(step.source)
    if target == "parallel":
        assert "parallel=True)\ndef _stage" in step.source
    rng = np.random.default_rng(2)
    p1 = init(sizes, np.float64)
    p2 = {k: v.copy() for k, v in p1.items()}
    for n in (9, 9, 4):  # a second batch size: the row numbers of the stages change
        X = rng.standard_normal((n, 4))
        T = np.eye(3)[rng.integers(0, 3, n)]
        np.testing.assert_allclose(step(p1, X=X, T=T), ref(p2, X=X, T=T), rtol=1e-12)
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-11, atol=1e-13, err_msg=k)


def test_split_and_whole_kernels_agree_in_float32(split, monkeypatch):
    f, params, sizes = mlp(4)
    step = sb.compile_step(f, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
    monkeypatch.setattr(split, "SPLIT_MIN_BLOCKS", 10**9)
    whole = sb.compile_step(f, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
    assert stage_defs(step.source) and not stage_defs(whole.source)
    rng = np.random.default_rng(4)
    p1 = init(sizes, np.float32)
    p2 = {k: v.copy() for k, v in p1.items()}
    for _ in range(3):
        X = rng.standard_normal((8, 4)).astype(np.float32)
        T = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 8)]
        assert step(p1, X=X, T=T) == whole(p2, X=X, T=T)
    for k in p1:  # the same loops in the same order: the same bits
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)


def test_a_gradient_function_splits_too(split):
    f, params, sizes = mlp(3)
    fn = sb.compile(f, params, target="cpu", dtype=np.float64)
    ref = sb.compile(f, params, target="numpy", dtype=np.float64)
    assert stage_defs(fn.source)
    rng = np.random.default_rng(6)
    args = {**init(sizes, np.float64), "X": rng.standard_normal((5, 4)),
            "T": np.eye(3)[rng.integers(0, 3, 5)]}
    (v, g), (rv, rg) = fn(**args), ref(**args)
    np.testing.assert_allclose(v, rv, rtol=1e-12)
    for k in rg:
        np.testing.assert_allclose(g[k], rg[k], rtol=1e-10, atol=1e-13, err_msg=k)


def test_deep_networks_split_by_default():
    from symbp.backends import numba_cpu

    f, params, _ = mlp(8)
    src = numba_cpu.generate(sb.gradient_program(f, params), np.float32, "cpu")[0]
    assert stage_defs(src)
    f, params, _ = mlp(1)  # a small kernel stays one function: no calls to pay for
    src = numba_cpu.generate(sb.gradient_program(f, params), np.float32, "cpu")[0]
    assert not stage_defs(src)
