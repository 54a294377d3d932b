"""passes: every pass keeps the Program's value (checked on the NumPy reference backend;
a program with fused heads, which the reference does not lower, on the cpu target)."""

import numpy as np
import pytest
import sympy as sp
from conftest import N

import symbp as sb
from symbp import passes
from symbp.backends import numpy as ref
from symbp.heads import lacking
from symbp.heads.fused import MapSums, SoftmaxCE, UpdateProduct
from symbp.ir import Assign, verify
from symbp.matrix import AxisSum, Elementwise, Softmax, Total

X = sp.MatrixSymbol("X", N, 3)
W1 = sp.MatrixSymbol("W1", 3, 5)
b1 = sp.MatrixSymbol("b1", 1, 5)
W2 = sp.MatrixSymbol("W2", 5, 2)
b2 = sp.MatrixSymbol("b2", 1, 2)
T = sp.MatrixSymbol("T", N, 2)
x, w, b = sp.symbols("x w b", real=True)


def _mlp(act, loss):
    Z = sb.dense(act(sb.dense(X, W1, b1)), W2, b2)
    return loss(Z, T), [W1, b1, W2, b2]


CASES = {
    "scalar": (sb.sigmoid(w * x + b) ** 2 + sp.exp(w), [w, b]),
    "tanh_ce": _mlp(sb.tanh, sb.softmax_cross_entropy),
    "relu_mse": _mlp(sb.relu, lambda Z, T: sb.mse(sb.sigmoid(Z), T)),
    "elu_bce": _mlp(sb.elu, sb.bce_with_logits),
    "silu_bce": _mlp(sb.silu, lambda Z, T: sb.binary_cross_entropy(sb.sigmoid(Z), T)),
}


def _arrays(rng, prog, n=4):
    out = {}
    for s in prog.inputs:
        if hasattr(s, "shape"):
            shape = tuple(int(d.subs(N, n)) for d in s.shape)
            out[s.name] = rng.uniform(0.1, 0.9, shape)
        else:
            out[s.name] = rng.uniform(0.1, 0.9)
    return out


def _run(prog, arrays):
    if lacking(prog, "numpy"):  # fused heads: the cpu target lowers them
        from symbp.backends import numba_cpu

        fn = numba_cpu.build(prog, np.float64, "cpu").fn
    else:
        fn = ref.build(prog, np.float64).fn
    return fn(*sb.api.bind_inputs(prog, arrays, np.float64))


def _n_maps(p):
    return sum(isinstance(a.expr, Elementwise) for a in p.body)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pipeline", [(passes.dce,), (passes.fuse,), passes.PIPELINE])
def test_pass_keeps_value(case, pipeline, rng):
    f, wrt = CASES[case]
    p = sb.gradient_program(f, wrt)
    q = passes.optimize(p, pipeline)
    verify(q)
    assert q.outputs == p.outputs and q.inputs == p.inputs
    arrays = _arrays(rng, p)
    for u, v in zip(_run(p, arrays), _run(q, arrays)):
        np.testing.assert_allclose(v, u, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("case", ["tanh_ce", "relu_mse", "elu_bce", "silu_bce"])
def test_fuse_merges_maps(case):
    p = sb.gradient_program(*CASES[case])
    q = passes.fuse(p)
    assert _n_maps(q) < _n_maps(p)
    # no map left whose only reader is a same-shape map (a missed fusion)
    n_uses = passes.uses(q)
    defs = {a.name: a.expr for a in q.body}
    for a in q.body:
        if isinstance(a.expr, Elementwise):
            for op in a.expr.operands:
                inner = defs.get(op)
                if isinstance(inner, Elementwise) and n_uses[op] == 1:
                    assert tuple(inner.shape) != tuple(a.expr.shape), f"{op} not fused"


def test_fuse_keeps_outputs_and_shared_values():
    # u is an output and read by v: it must stay; v folds into nothing (its user is Total)
    A = sp.MatrixSymbol("A", N, 2)
    u = sp.MatrixSymbol("u", N, 2)
    v = sp.MatrixSymbol("v", N, 2)
    e0 = sp.Symbol("_e0", real=True)
    p = sb.Program(
        inputs=(A,), dims=(N,),
        body=(Assign(u, Elementwise(sp.Lambda((e0,), sp.exp(e0)), (N, 2), A)),
              Assign(v, Elementwise(sp.Lambda((e0,), 2 * e0), (N, 2), u))),
        outputs=(u, v),
    )
    assert passes.fuse(verify(p)).body == p.body


def test_dce_drops_dead_assignments():
    A = sp.MatrixSymbol("A", N, 2)
    u = sp.MatrixSymbol("u", N, 2)
    s, d = sp.Symbol("s", real=True), sp.Symbol("d", real=True)
    e0 = sp.Symbol("_e0", real=True)
    p = verify(sb.Program(
        inputs=(A,), dims=(N,),
        body=(Assign(u, Elementwise(sp.Lambda((e0,), sp.exp(e0)), (N, 2), A)),
              Assign(d, sb.Total(A)),
              Assign(s, sb.Total(u))),
        outputs=(s,),
    ))
    q = passes.dce(p)
    assert [a.name for a in q.body] == [u, s]


@pytest.mark.parametrize("case", ["tanh_ce", "relu_mse", "elu_bce"])
def test_fuse_sums_makes_one_loop_of_a_map_and_its_sums(case, rng):
    p = passes.fuse(sb.gradient_program(*CASES[case]))
    q = passes.fuse_sums(p)
    fused = [a for a in q.body if isinstance(a.expr, MapSums)]
    assert fused
    names = {a.name for a in q.body}
    for a in fused:
        for s, k in zip(a.also, a.expr.kinds):
            assert s not in names  # the sum's own assignment is gone ...
            orig = next(b.expr for b in p.body if b.name == s)
            assert orig == (Total(a.name) if k < 0 else AxisSum(a.name, k))  # ... it was this
        readers = [b for b in q.body if a.name in passes._names_in(b.expr)]
        assert a.expr.store == bool(readers or a.name in q.outputs)
    arrays = _arrays(rng, p)
    for u, v in zip(_run(p, arrays), _run(q, arrays)):
        np.testing.assert_allclose(v, u, rtol=1e-12, atol=1e-15)


def test_share_softmax_ce_moves_only_later_softmax_and_row_sums(rng):
    p = sb.gradient_program(*CASES["tanh_ce"])
    q = passes.share_softmax_ce(p)
    (a,) = [a for a in q.body if isinstance(a.expr, SoftmaxCE)]
    assert a.expr.extras == ("softmax", "rowsum")
    Z, T_ = a.expr.args[:2]
    gone = {b.name for b in p.body} - {b.name for b in q.body}
    assert gone == set(a.also)
    assert {b.expr for b in p.body if b.name in gone} == {Softmax(Z), AxisSum(T_, 1)}
    arrays = _arrays(rng, p)
    for u, v in zip(_run(p, arrays), _run(q, arrays)):
        np.testing.assert_allclose(v, u, rtol=1e-12, atol=1e-15)
    # a softmax computed before the loss stays where it is (here it is the loss's own
    # targets, read by the loss): only the backward pass's copy moves into the loop
    Zs = sb.dense(X, W1, b1)
    p2 = sb.gradient_program(sb.softmax_cross_entropy(Zs, sb.softmax(Zs)), [W1])
    q2 = passes.share_softmax_ce(p2)
    soft = [b for b in p2.body if isinstance(b.expr, Softmax)]
    assert len(soft) == 2
    assert [b for b in q2.body if isinstance(b.expr, Softmax)] == soft[:1]
    arrays = _arrays(rng, p2)
    for u, v in zip(_run(p2, arrays), _run(q2, arrays)):
        np.testing.assert_allclose(v, u, rtol=1e-12, atol=1e-15)


def test_each_target_runs_the_fusions_it_can_lower():
    p = sb.gradient_program(*CASES["tanh_ce"])
    heads = {t: {type(a.expr) for a in passes.optimize(p, target=t).body}
             for t in ("numpy", "cpu", "parallel", "cuda")}
    assert MapSums not in heads["numpy"] and SoftmaxCE not in heads["numpy"]
    assert {MapSums, SoftmaxCE} <= heads["cpu"] and heads["cpu"] == heads["parallel"]
    assert SoftmaxCE in heads["cuda"] and MapSums not in heads["cuda"]
    assert not lacking(passes.optimize(p, target="cuda"), "cuda")


@pytest.mark.parametrize("opt, fused", [(sb.SGD(0.1), True), (sb.Momentum(0.1, 0.9), True),
                                        (sb.Adam(0.01), False)])
def test_fuse_update_adds_gradient_products_into_the_update(opt, fused):
    # SGD and momentum read g once, as x <- a x + c g: a gradient that is one product read by
    # nothing else goes straight into gemm; Adam reads g twice (m and v): nothing to fuse
    Xb = sp.MatrixSymbol("Xb", N, 40)
    Wa, Wb = sp.MatrixSymbol("Wa", 40, 30), sp.MatrixSymbol("Wb", 30, 2)
    p = sb.gradient_program(sb.softmax_cross_entropy(sb.tanh(Xb * Wa) * Wb, T), [Wa, Wb])
    q = passes.fuse_update(p, opt.rule)
    got = {a.name for a in q.body if isinstance(a.expr, UpdateProduct)}
    if not fused:
        assert not got and q is p
        return
    # Wa's gradient Xbᵀ·Δ reads no parameter; Wb's tanh(Xb Wa)ᵀ·Δ2 neither: both fuse
    assert got == set(q.outputs[1:])
    for a in q.body:
        if a.name in got:
            orig = next(b.expr for b in p.body if b.name == a.name)
            assert a.expr.product == orig
    # only a training step runs it: optimize without the optimizer's rule leaves gradients
    assert not any(isinstance(a.expr, UpdateProduct)
                   for a in passes.optimize(p, target="cpu").body)
    assert not any(isinstance(a.expr, UpdateProduct)
                   for a in passes.optimize(p, target="cuda", rule=opt.rule).body)
