"""A deep step compiles as a sequence of stage calls: each head's block is its own small njit
function, and blocks equal up to their variables' names (the layers of an MLP) share one.
The machine code Numba and LLVM make is then about constant in the depth; the step must
compute what the one-function kernel and the NumPy reference compute."""

import sys

import numpy as np
import pytest
from conftest import dense_net, have

import symbp as sb
from symbp import cache

pytestmark = pytest.mark.needs(have("numba"), "numba")


def mlp(depth, width=5, nin=4, nout=3, act=sb.tanh, sizes=None):
    sizes = sizes or [nin] + [width] * depth + [nout]
    H, T, params = dense_net(sizes, act)
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
    """Split every kernel, however small (a small one is one function by default), into
    stage calls (a rolled-up kernel that is small again is one function by default)."""
    from symbp.backends import numba_cpu

    monkeypatch.setattr(numba_cpu, "SPLIT_MIN_BLOCKS", 0)
    monkeypatch.setattr(numba_cpu, "SPLIT_MAX_DISTINCT", 1.0)
    return numba_cpu


@pytest.fixture
def unrolled(monkeypatch):
    """One call per block: no loops over repeated ones."""
    from symbp.backends import numba_cpu

    monkeypatch.setattr(numba_cpu, "ROLL_MIN_REPS", 10**9)
    return numba_cpu


def test_stage_functions_do_not_grow_with_depth(split, unrolled):
    # 4 and 9 hidden layers of one width: the same stage functions, more calls
    counts = []
    for depth in (4, 9):
        f, params, _ = mlp(depth)
        step = sb.compile_step(f, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
        counts.append(len(stage_defs(step.source)))
        kernel = step.source.split("def train_step(")[1]
        assert kernel.count("_stage") >= 6 * depth  # every layer calls, forward and back
    assert counts[0] == counts[1] > 0


def test_each_stage_compiles_once(split, unrolled, monkeypatch):
    # a row number printed as a bare int is a Literal type to Numba: one compilation per
    # value (symbp's own lowering types every int as int64, tests/test_native.py)
    monkeypatch.setenv("SYMBP_LOWER", "numba")
    cache._loaded.clear()
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


def test_deep_networks_split_by_default(monkeypatch):
    from symbp.backends import numba_cpu

    f, params, _ = mlp(8)
    src = numba_cpu.generate(sb.gradient_program(f, params), np.float32, "cpu")[0]
    assert "for _l in range(" in src and not stage_defs(src)  # rolled: one function again
    f, params, _ = mlp(1)  # a small kernel stays one function: no calls to pay for
    src = numba_cpu.generate(sb.gradient_program(f, params), np.float32, "cpu")[0]
    assert not stage_defs(src) and "for _l in range(" not in src
    monkeypatch.setattr(numba_cpu, "ROLL_MIN_REPS", 10**9)  # no runs: the calls stay
    f, params, _ = mlp(8)
    src = numba_cpu.generate(sb.gradient_program(f, params), np.float32, "cpu")[0]
    assert stage_defs(src)


def test_a_kernel_of_distinct_stages_stays_one_function(monkeypatch):
    # stage functions pay only where calls share them: every layer of a different width
    # makes every stage distinct, and the kernel stays one function however many blocks
    from symbp.backends import numba_cpu

    monkeypatch.setattr(numba_cpu, "SPLIT_MIN_BLOCKS", 0)
    monkeypatch.setattr(numba_cpu, "ROLL_MIN_REPS", 10**9)
    f, params, _ = mlp(4, sizes=[4, 5, 6, 7, 8, 3])
    p = sb.gradient_program(f, params)
    assert not stage_defs(numba_cpu.generate(p, np.float32, "cpu")[0])
    f, params, _ = mlp(4)  # one width: the layers share their stages, the kernel splits
    assert stage_defs(numba_cpu.generate(sb.gradient_program(f, params), np.float32, "cpu")[0])
    monkeypatch.setattr(numba_cpu, "SPLIT_MAX_DISTINCT", 1.0)  # and split if told to
    assert stage_defs(numba_cpu.generate(p, np.float32, "cpu")[0])


# --- loops over repeated layers ---------------------------------------------------------------


def kernel_lines(source):
    """The kernel's body below its input check (which grows with the number of inputs)."""
    return source.split("def train_step(")[1].split("# scratch arrays")[1].splitlines()


def batches(sizes, dtype, seed, ns=(9, 9, 4)):
    rng = np.random.default_rng(seed)
    for n in ns:  # a second batch size: the loops' row numbers change
        X = rng.standard_normal((n, sizes[0])).astype(dtype)
        yield X, np.eye(sizes[-1], dtype=dtype)[rng.integers(0, sizes[-1], n)]


def run_steps(steps, sizes, dtype):
    """Losses and final parameters of each step function over the same batches."""
    out = []
    for step in steps:
        p = init(sizes, dtype)
        losses = [step(p, X=X, T=T) for X, T in batches(sizes, dtype, 3)]
        out.append((losses, p))
    return out


def test_a_deep_kernel_is_the_same_size_at_any_depth():
    from symbp.backends import numba_cpu

    sizes = []
    for depth in (8, 16):
        f, params, _ = mlp(depth)
        src = numba_cpu.generate(sb.gradient_program(f, params), np.float32, "cpu",
                                 sb.SGD(0.1).rule)[0]
        assert not stage_defs(src) and "for _l in range(" in src  # rolled, then one function
        sizes.append(len(kernel_lines(src)))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rolled_step_is_bit_identical_to_the_unrolled_one(monkeypatch, dtype):
    # widths change twice: runs of 5 and 4 layers roll, the layers between them do not
    sizes = [4] + [6] * 5 + [5] * 4 + [3]
    f, params, _ = mlp(0, sizes=sizes)
    rolled = sb.compile_step(f, params, sb.SGD(0.1), target="cpu", dtype=dtype)
    assert rolled.source.count("for _l in range(") >= 4 and not stage_defs(rolled.source)
    assert "_pa[" in rolled.source  # the parameters come as a table of addresses
    from symbp.backends import numba_cpu

    monkeypatch.setattr(numba_cpu, "ADDRESS_TABLE", False)  # one argument per parameter
    args = sb.compile_step(f, params, sb.SGD(0.1), target="cpu", dtype=dtype)
    assert "_pa" not in args.source and "for _l in range(" in args.source
    monkeypatch.setattr(numba_cpu, "ADDRESS_TABLE", True)
    monkeypatch.setattr(numba_cpu, "ROLL_MIN_REPS", 10**9)
    calls = sb.compile_step(f, params, sb.SGD(0.1), target="cpu", dtype=dtype)
    assert "for _l in range(" not in calls.source and stage_defs(calls.source)
    ref = sb.compile_step(f, params, sb.SGD(0.1), target="numpy", dtype=dtype)
    (l1, p1), (l2, p2), (l3, p3), (l4, p4) = run_steps([rolled, calls, ref, args], sizes,
                                                       dtype)
    assert l1 == l2 == l4  # the same code on the same rows: the same bits
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)
        np.testing.assert_array_equal(p1[k], p4[k], err_msg=k)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(l1, l3, rtol=tol)
    for k in p1:
        np.testing.assert_allclose(p1[k], p3[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize("target", ["cpu", "parallel"])
def test_rolled_stage_calls_match_the_reference(split, monkeypatch, target):
    # loops of calls (a kernel still too big for one function), prange inside them
    monkeypatch.setattr(split, "PAR_MIN_WORK", 0)
    f, params, sizes = mlp(0, act=sb.relu, sizes=[4, 5, 5, 5, 5, 3])
    step = sb.compile_step(f, params, sb.Adam(0.01), target=target, dtype=np.float64)
    ref = sb.compile_step(f, params, sb.Adam(0.01), target="numpy", dtype=np.float64)
    assert stage_defs(step.source) and "for _l in range(" in step.source
    (l1, p1), (l2, p2) = run_steps([step, ref], sizes, np.float64)
    np.testing.assert_allclose(l1, l2, rtol=1e-12)
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-11, atol=1e-13, err_msg=k)


def test_rolled_parallel_step_matches_the_reference(monkeypatch):
    # the default path of a deep step (rolled, one function), with a prange in every loop
    from symbp.backends import numba_cpu

    monkeypatch.setattr(numba_cpu, "PAR_MIN_WORK", 0)
    f, params, sizes = mlp(7, act=sb.relu)
    step = sb.compile_step(f, params, sb.Adam(0.01), target="parallel", dtype=np.float64)
    ref = sb.compile_step(f, params, sb.Adam(0.01), target="numpy", dtype=np.float64)
    assert "for _l in range(" in step.source and not stage_defs(step.source)
    assert "in prange(" in step.source.split("for _l in range(")[1]
    (l1, p1), (l2, p2) = run_steps([step, ref], sizes, np.float64)
    np.testing.assert_allclose(l1, l2, rtol=1e-12)
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-11, atol=1e-13, err_msg=k)


def test_a_rolled_gradient_function_matches_the_reference():
    # no optimizer: sizes are arguments and the gradients output arrays the loops write
    f, params, sizes = mlp(0, sizes=[4] + [6] * 5 + [5] * 4 + [3])
    fn = sb.compile(f, params, target="cpu", dtype=np.float64)
    ref = sb.compile(f, params, target="numpy", dtype=np.float64)
    assert "for _l in range(" in fn.source and not stage_defs(fn.source)
    for X, T in batches(sizes, np.float64, 6, ns=(5, 9)):
        args = {**init(sizes, np.float64), "X": X, "T": T}
        (v, g), (rv, rg) = fn(**args), ref(**args)
        np.testing.assert_allclose(v, rv, rtol=1e-12)
        for k in rg:
            np.testing.assert_allclose(g[k], rg[k], rtol=1e-10, atol=1e-13, err_msg=k)


def test_only_rows_that_step_evenly_roll(split):
    from symbp.backends.numba_cpu import _Call, _Loop, _roll

    def call(*values):
        return _Call("_stage1", list(values), [], [], [])

    kinds = {"W1": "a", "W2": "a", "W3": "a", "W4": "a", "T": "b", "N": "int64", "x": "f"}
    # rows 0, N, 2N step evenly; 5N does not: three repetitions roll, the fourth stays
    items = [call("W1", "np.int64(0)"), call("W2", "N"), call("W3", "2*N"), call("W4", "5*N")]
    out = _roll(items[:3] + [call("W4", "5*N", "x")], kinds)
    assert isinstance(out[0], _Loop) and out[0].reps == 3 and len(out) == 2
    assert out[0].calls[0][1] == ["_r0_0_0[_l]", "(_l)*N"]
    # two by two they would step evenly (a loop of 2): 4 calls in a loop beat 3
    assert [type(x) for x in _roll(items, kinds)] == [_Loop]
    # an array of another type cannot join a tuple, nor be a row number
    items = [call("W1", "N"), call("T", "N")]
    assert _roll(items, kinds) == items
    items = [call("N", "x"), call("2*N", "x + 1")]  # a float is never a row number
    assert _roll(items, kinds) == items


def test_a_rolled_step_still_names_a_wrong_shape():
    # a table step's parameters are checked in Python; a mismatch names the parameter
    from symbp.errors import ShapeError

    sizes = [4] + [6] * 5 + [5] * 4 + [3]
    f, params, _ = mlp(0, sizes=sizes)
    step = sb.compile_step(f, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
    assert "_pa[" in step.source
    p = init(sizes, np.float32)
    X, T = next(batches(sizes, np.float32, 5))
    step(p, X=X, T=T)  # the table is made for these arrays; the next call has another W3
    p["W3"] = np.zeros((6, 5), np.float32)  # one of the four 6×6 layers
    with pytest.raises(ShapeError, match="W3"):
        step(p, X=X, T=T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_address_table_follows_the_arrays_it_is_given(monkeypatch, dtype):
    # Adam: the table holds the parameters and both moment buffers.  Fresh parameter
    # arrays on every call, and a state replaced between calls, give the bits of the
    # one-argument-each kernel updating one set of arrays in place
    from symbp.backends import numba_cpu
    from symbp.errors import InputError

    sizes = [4] + [6] * 5 + [5] * 4 + [3]
    f, params, _ = mlp(0, sizes=sizes)
    step = sb.compile_step(f, params, sb.Adam(0.01), target="cpu", dtype=dtype)
    assert "_pa[" in step.source and "_m_" in step.source
    monkeypatch.setattr(numba_cpu, "ADDRESS_TABLE", False)
    args = sb.compile_step(f, params, sb.Adam(0.01), target="cpu", dtype=dtype)
    assert "_pa" not in args.source
    (want, p_want), = run_steps([args], sizes, dtype)
    p, got = init(sizes, dtype), []
    for k, (X, T) in enumerate(batches(sizes, dtype, 3)):
        p = {n: w.copy() for n, w in p.items()}  # other objects, same values
        if k == 1:
            step.state = {b: (v if b == "t" else {n: a.copy() for n, a in v.items()})
                          for b, v in step.state.items()}
        got.append(step(p, X=X, T=T))
    assert got == want
    for k in p:
        np.testing.assert_array_equal(p[k], p_want[k], err_msg=k)
    step.state["m"]["W5"] = np.zeros((5, 5), dtype)  # a 5×5 where 6×5 belongs
    with pytest.raises(InputError, match=r"optimizer state m\['W5'\]"):
        step(p, X=X, T=T)
