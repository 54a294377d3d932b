"""A map written over a dead operand (numba_cpu._Gen.over_operand): ``t3 = tanh(b0 + t1)``
takes t1's rows when nothing after it reads t1.  The kernels must compute the same bits as
with every value in rows of its own (``IN_PLACE = False``), and a value still read later
must keep its rows."""

import re

import numpy as np
import pytest
import sympy as sp
from conftest import dense_net, have

import symbp as sb

pytestmark = pytest.mark.needs(have("numba"), "numba")

N = sp.Symbol("N")


def mlp_ce():
    H, T, params = dense_net([4, 6, 6, 3], sb.tanh)
    return sb.softmax_cross_entropy(H, T), params, [4, 6, 6, 3]


def relu_mse():
    H, T, params = dense_net([4, 7, 5, 2], sb.relu)
    return sb.mse(H, T), params, [4, 7, 5, 2]


def read_later():
    # Z is read by tanh(Z) and again by the map after it: tanh may not write over Z
    X, T = sp.MatrixSymbol("X", N, 4), sp.MatrixSymbol("T", N, 3)
    W0, b0 = sp.MatrixSymbol("W0", 4, 6), sp.MatrixSymbol("b0", 1, 6)
    W1, b1 = sp.MatrixSymbol("W1", 6, 3), sp.MatrixSymbol("b1", 1, 3)
    Z = sb.dense(X, W0, b0)
    H = sb.tanh(Z)
    M = sb.elementwise(lambda h, z: h + z * z / 2, H, Z)
    Y = sb.dense(M, W1, b1)
    return sb.softmax_cross_entropy(Y, T), [W0, b0, W1, b1], [4, 6, 3]


def squared_twice():
    # one operand read twice by the map that may write over it
    H, T, params = dense_net([4, 6, 3], sb.sigmoid)
    return sb.mse(sb.elementwise(lambda a, b: a * b + a, H, H), T), params, [4, 6, 3]


def prelu_net():
    X, T = sp.MatrixSymbol("X", N, 4), sp.MatrixSymbol("T", N, 3)
    W0, b0 = sp.MatrixSymbol("W0", 4, 6), sp.MatrixSymbol("b0", 1, 6)
    W1, b1 = sp.MatrixSymbol("W1", 6, 3), sp.MatrixSymbol("b1", 1, 3)
    a = sp.Symbol("a")
    H = sb.prelu(sb.dense(X, W0, b0), a)
    return sb.softmax_cross_entropy(sb.dense(H, W1, b1), T), [W0, b0, W1, b1, a], [4, 6, 3]


NETS = {"mlp_ce": mlp_ce, "relu_mse": relu_mse, "read_later": read_later,
        "squared_twice": squared_twice, "prelu": prelu_net}


def init(params, dtype, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for w in params:
        if isinstance(w, sp.MatrixSymbol):
            a, b = (int(d) for d in w.shape)
            out[w.name] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype)
        else:
            out[w.name] = np.array(0.25, dtype)
    return out


def batches(sizes, dtype, ns=(9, 9, 4)):
    rng = np.random.default_rng(3)
    for n in ns:  # a second batch size: other rows of the workspace
        X = rng.standard_normal((n, sizes[0])).astype(dtype)
        if n == 4:
            X[1, 2] = np.nan  # NaN goes where it went without the in-place writes
        yield X, np.eye(sizes[-1], dtype=dtype)[rng.integers(0, sizes[-1], n)]


def run(step, params, sizes, dtype):
    """The losses, and the parameters after each step (the last batch holds a NaN)."""
    p, losses, seen = init(params, dtype), [], {}
    for X, T in batches(sizes, dtype):
        losses.append(step(p, X=X, T=T))
        for k, w in p.items():
            seen[f"{k} after step {len(losses)}"] = w.copy()
    return losses, seen


def both(monkeypatch, build):
    from symbp.backends import numba_cpu

    monkeypatch.setattr(numba_cpu, "IN_PLACE", False)
    own = build()
    monkeypatch.setattr(numba_cpu, "IN_PLACE", True)
    return own, build()


def bindings(source):
    """Scratch name -> the rows it is bound to (``t3 = _rows(_w0, N, 2*N)``)."""
    return {m[1]: m[2] for m in re.finditer(r"(?m)^\s+(\w+) = (_rows\(_w\d+, .*\))$", source)}


def same_bits(a, b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("lower", ["native", "numba"])
@pytest.mark.parametrize("target", ["cpu", "parallel"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("net", sorted(NETS))
def test_in_place_steps_compute_the_same_bits(monkeypatch, net, dtype, target, lower):
    monkeypatch.setenv("SYMBP_LOWER", lower)
    f, params, sizes = NETS[net]()
    own, over = both(monkeypatch, lambda: sb.compile_step(f, params, sb.Adam(0.01),
                                                          target=target, dtype=dtype))
    (l1, p1), (l2, p2) = run(own, params, sizes, dtype), run(over, params, sizes, dtype)
    same_bits(l1, l2)
    for k in p1:
        same_bits(p1[k], p2[k])
    ref = sb.compile_step(f, params, sb.Adam(0.01), target="numpy", dtype=dtype)
    l3, p3 = run(ref, params, sizes, dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(l2, l3, rtol=tol, atol=tol)
    for k in p3:
        np.testing.assert_allclose(p2[k], p3[k], rtol=tol, atol=tol, err_msg=k)


@pytest.mark.parametrize("net", sorted(NETS))
def test_in_place_gradients_compute_the_same_bits(monkeypatch, net):
    # a gradient kernel: its outputs are the caller's arrays, never written over
    f, params, sizes = NETS[net]()
    own, over = both(monkeypatch, lambda: sb.compile(f, params, target="cpu"))
    ref = sb.compile(f, params)
    p = init(params, np.float64)
    for X, T in batches(sizes, np.float64):
        (l1, g1), (l2, g2), (l3, g3) = (c(**p, X=X, T=T) for c in (over, own, ref))
        assert l1 == l2 or np.isnan(l1) and np.isnan(l2)
        np.testing.assert_allclose(l1, l3, rtol=1e-10)
        assert g1.keys() == g3.keys()
        for k in g1:
            same_bits(g1[k], g2[k])
            np.testing.assert_allclose(g1[k], g3[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_a_deep_split_step_writes_in_place_and_computes_the_same_bits(monkeypatch):
    from symbp.backends import numba_cpu

    monkeypatch.setattr(numba_cpu, "SPLIT_MIN_BLOCKS", 0)
    monkeypatch.setattr(numba_cpu, "SPLIT_MAX_DISTINCT", 1.0)
    sizes = [4, 5, 5, 5, 5, 5, 3]
    H, T, params = dense_net(sizes, sb.tanh)
    f = sb.softmax_cross_entropy(H, T)
    own, over = both(monkeypatch, lambda: sb.compile_step(f, params, sb.SGD(0.1),
                                                          target="cpu", dtype=np.float32))
    assert "def _stage" in over.source
    (l1, p1), (l2, p2) = (run(s, params, sizes, np.float32) for s in (own, over))
    same_bits(l1, l2)
    for k in p1:
        same_bits(p1[k], p2[k])
    assert over._ws.get((9,)).size < own._ws.get((9,)).size


def test_an_activation_takes_the_rows_of_the_product_it_reads(monkeypatch):
    f, params, _ = mlp_ce()
    own, over = both(monkeypatch, lambda: sb.compile_step(f, params, sb.SGD(0.1),
                                                          target="cpu", dtype=np.float32))
    rows = bindings(over.source)
    y, x = re.search(r"(?m)^\s+(\w+)\[_i, _j\] = _tanh\((\w+)\[_i, _j\]", over.source).groups()
    assert rows[y] == rows[x]  # tanh(b0 + t1) over t1
    assert len(set(rows.values())) < len(rows)
    own_rows = bindings(own.source)
    assert len(set(own_rows.values())) == len(own_rows)
    # one value per distinct range: the workspace of a batch of 64 is smaller
    assert over._ws.get((64,)).size < own._ws.get((64,)).size


def test_a_value_read_after_the_map_keeps_its_rows(monkeypatch):
    f, params, _ = read_later()
    step = sb.compile_step(f, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
    rows = bindings(step.source)
    y, x = re.search(r"(?m)^\s+(\w+)\[_i, _j\] = _tanh\((\w+)\[_i, _j\]\)", step.source).groups()
    assert x in rows and rows[y] != rows[x]  # Z is read by the map after tanh(Z)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("net", sorted(NETS))
def test_in_place_steps_whose_update_reads_the_values_compute_the_same_bits(
        monkeypatch, net, dtype, optimizer):
    # SGD and momentum add a weight's gradient product H.T @ G into the update by BLAS
    # (never stored), after every map: H and G must still hold their values there
    f, params, sizes = NETS[net]()
    rule = {"sgd": lambda: sb.SGD(0.05), "momentum": lambda: sb.Momentum(0.05, 0.9)}[optimizer]
    own, over = both(monkeypatch, lambda: sb.compile_step(f, params, rule(), target="cpu",
                                                          dtype=dtype))
    assert "_gemm(" in over.source and "added into the update" in over.source
    (l1, p1), (l2, p2) = run(own, params, sizes, dtype), run(over, params, sizes, dtype)
    same_bits(l1, l2)
    for k in p1:
        same_bits(p1[k], p2[k])
    l3, p3 = run(sb.compile_step(f, params, rule(), target="numpy", dtype=dtype), params,
                 sizes, dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(l2, l3, rtol=tol, atol=tol)
    for k in p3:
        np.testing.assert_allclose(p2[k], p3[k], rtol=tol, atol=tol, err_msg=k)
