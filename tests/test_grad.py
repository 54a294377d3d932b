"""sb.grad against sympy.diff, MLP gradchecks, and the shape of the gradient program."""

import itertools

import numpy as np
import pytest
import sympy as sp

import symbp as sb
from symbp import functions as F
from symbp.matrix import AxisSum, Elementwise, Softmax, SoftmaxCrossEntropy

x, y, z, a = sp.symbols("x y z a", real=True)
N = sp.Symbol("N")
POINT = {x: 0.37, y: -1.21, z: 0.83, a: 0.2}

_s = sp.sin(x * y)  # a shared subexpression, used twice below
BATTERY = [
    x + y,  # the textbook graph p = x + y
    x * y + z, (x + y) * (y + z), x**3 * y**-2, sp.sqrt(x**2 + y**2), x**y,
    sp.exp(x) * sp.log(z), sp.exp(sp.exp(x * z)), sp.log(1 + sp.exp(x)),
    sp.tanh(sp.tanh(sp.tanh(x * y + z))), F.sigmoid(F.sigmoid(x) * y),
    _s * _s + sp.cos(_s), _s / (1 + _s**2),
    sp.Piecewise((x**2, x > 0), (y * x, True)), sp.Max(x, y) * z, sp.Abs(x - y) * x,
    sp.Min(x * y, z), x * F.sigmoid(x),  # user's own swish: nothing registered
    *[f(x * y + z) for f in (F.sigmoid, F.relu, F.softplus, F.selu, F.gelu, F.gelu_tanh,
                             F.silu, sp.tanh)],
    F.leaky_relu(x * y, a), F.prelu(x - z, a), F.elu(x * y + z, a), F.elu(x + 2),
    F.bce(F.sigmoid(x), z / 2),
]


@pytest.mark.parametrize("f", BATTERY, ids=[str(i) for i in range(len(BATTERY))])
def test_grad_equals_sympy_diff(f):
    wrt = sorted(f.free_symbols, key=str)
    got = sb.grad(f, wrt)
    for v, g in zip(wrt, got):
        want = sp.diff(f, v)
        gv, wv = float(g.subs(POINT).evalf()), float(want.subs(POINT).evalf())
        assert gv == pytest.approx(wv, rel=1e-12, abs=1e-12), (f, v)
    # and the compiled NumPy reference agrees with the same numbers
    _, grads = sb.compile(f, wrt)(**{s.name: POINT[s] for s in wrt})
    for v in wrt:
        want = float(sp.diff(f, v).subs(POINT).evalf())
        assert grads[v.name] == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_textbook_sum_is_symbolically_exact():
    assert sb.grad(x + y, [x, y]) == (1, 1)
    assert sb.grad(x * y, [x, y]) == (y, x)
    assert sp.simplify(sb.grad(sp.tanh(x * y), x) - sp.diff(sp.tanh(x * y), x)) == 0


def test_shared_subexpression_is_lowered_once():
    s = sp.sin(x * y)  # (exp(u)*exp(u) would fold to exp(2u))
    p = sb.lower(s * s + s)
    assert sum(isinstance(asg.expr, sp.sin) for asg in p.body) == 1


# --- matrix MLPs: every activation x every loss x depth, gradcheck in float64 ----------------

ACTS = ["sigmoid", "tanh", "relu", "leaky_relu", "prelu", "softplus", "elu", "selu", "gelu",
        "gelu_tanh", "silu", "identity"]
LOSSES = ["sce", "ce_softmax", "mse", "bce", "bce_logits"]


def mlp(depth, act, loss, widths=(3, 4, 3, 4), classes=2):
    """Loss, params and random data of a depth-hidden-layer MLP."""
    X, T = sp.MatrixSymbol("X", N, widths[0]), sp.MatrixSymbol("T", N, classes)
    H, params = X, []
    sizes = list(widths[: depth + 1]) + [classes]
    for i, (m, n) in enumerate(itertools.pairwise(sizes)):
        W, b = sp.MatrixSymbol(f"W{i}", m, n), sp.MatrixSymbol(f"b{i}", 1, n)
        params += [W, b]
        H = sb.dense(H, W, b)
        if i < depth:
            if act == "prelu":
                al = sp.MatrixSymbol(f"a{i}", 1, n)
                params.append(al)
                H = F.prelu(H, al)
            else:
                H = F.FUNCTIONS[act](H)
    Z = H
    f = {"sce": lambda: sb.softmax_cross_entropy(Z, T),
         "ce_softmax": lambda: sb.cross_entropy(sb.softmax(Z), T),
         "mse": lambda: sb.mse(Z, T),
         "bce": lambda: sb.binary_cross_entropy(sb.sigmoid(Z), T),
         "bce_logits": lambda: sb.bce_with_logits(Z, T)}[loss]()
    return f, params, X, T


def mlp_data(params, X, T, n, loss, rng):
    arrays = {X.name: rng.normal(size=(n, X.shape[1]))}
    c = T.shape[1]
    if loss in ("sce", "ce_softmax"):
        arrays[T.name] = np.eye(c)[rng.integers(0, c, n)]
    elif loss == "mse":
        arrays[T.name] = rng.normal(size=(n, c))
    else:
        arrays[T.name] = rng.uniform(size=(n, c))
    for p in params:
        shape = tuple(int(d) for d in p.shape)
        arrays[p.name] = rng.uniform(0.05, 0.3, size=shape) if p.name.startswith("a") \
            else rng.normal(scale=0.8, size=shape)
    return arrays


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_gradcheck(depth, act, loss, rng):
    f, params, X, T = mlp(depth, act, loss)
    arrays = mlp_data(params, X, T, 3, loss, rng)
    r = sb.gradcheck(f, params, arrays, eps=1e-6, tol=1e-6)
    assert r.ok, f"\n{r}"


def test_softmax_ce_gradient_is_Y_times_rowsum_T_minus_T_over_N():
    Z, T = sp.MatrixSymbol("Z", N, 3), sp.MatrixSymbol("T", N, 3)
    for f in (sb.softmax_cross_entropy(Z, T), sb.cross_entropy(sb.softmax(Z), T)):
        p = sb.gradient_program(f, [Z])
        assert isinstance(p.body[0].expr, SoftmaxCrossEntropy)
        gZ = p.outputs[1]
        (asg,) = [s for s in p.body if s.name == gZ]
        # Z̄ = g (Y ⊙ T𝟏 − T)/N with Y = softmax(Z) computed once; g = 1 is folded into the map
        assert isinstance(asg.expr, Elementwise)
        Yn, Rn, Tn, nn = asg.expr.operands
        defs = {s.name: s.expr for s in p.body}
        assert defs[Yn] == Softmax(Z) and defs[Rn] == AxisSum(T, 1) and Tn == T and nn == N
        v = asg.expr.lam.variables
        assert sp.simplify(asg.expr.lam.expr - (v[0] * v[1] - v[2]) / v[3]) == 0
    fn = sb.compile(sb.softmax_cross_entropy(Z, T), [Z])
    Zv = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    Tv = np.eye(3)[[2, 0]]
    _, g = fn(Z=Zv, T=Tv)
    Y = np.exp(Zv) / np.exp(Zv).sum(1, keepdims=True)
    assert np.allclose(g["Z"], (Y - Tv) / 2, rtol=1e-14, atol=1e-16)  # rows of T sum to 1


def test_grad_of_matrix_symbol_is_a_matrix_expression_and_round_trips(rng):
    f, params, X, T = mlp(2, "tanh", "mse")
    grads = sb.grad(f, params)
    arrays = mlp_data(params, X, T, 4, "mse", rng)
    _, ref = sb.compile(f, params)(**arrays)
    for w, g in zip(params, grads):
        assert g.is_Matrix and tuple(g.shape) == tuple(w.shape)
        fw = sb.compile_forward(g)
        names = {s.name for s in fw.program.inputs}
        got = fw(**{k: v for k, v in arrays.items() if k in names})
        assert np.allclose(got, ref[w.name], rtol=1e-12, atol=1e-14)


def test_gradient_size_is_constant_factor_of_forward():
    for depth in (1, 3):
        f, params, *_ = mlp(depth, "tanh", "sce")
        p = sb.gradient_program(f, params)
        assert len(p.body) - p.meta["forward"] <= 3 * p.meta["forward"]


def test_gradient_program_independent_of_width():
    def size(w):
        X, T = sp.MatrixSymbol("X", N, w), sp.MatrixSymbol("T", N, 10)
        W1, b1 = sp.MatrixSymbol("W1", w, w), sp.MatrixSymbol("b1", 1, w)
        W2, b2 = sp.MatrixSymbol("W2", w, 10), sp.MatrixSymbol("b2", 1, 10)
        f = sb.softmax_cross_entropy(sb.dense(sb.relu(sb.dense(X, W1, b1)), W2, b2), T)
        return len(sb.gradient_program(f, [W1, b1, W2, b2]).body)

    assert size(16) == size(4096)
