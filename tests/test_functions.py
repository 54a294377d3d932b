"""The function library: every derivative row against sympy.diff of its own formula."""

import numpy as np
import pytest
import sympy as sp

import symbp as sb
from symbp import functions as F

x, y, a, t = sp.symbols("x y a t", real=True)
N = sp.Symbol("N")

# (name, expression in x (and a, t), extra symbols) -- one row per function
ROWS = [
    ("sigmoid", F.sigmoid(x)), ("relu", F.relu(x)), ("leaky_relu", F.leaky_relu(x)),
    ("leaky_relu_a", F.leaky_relu(x, a)), ("prelu", F.prelu(x, a)), ("softplus", F.softplus(x)),
    ("elu", F.elu(x)), ("elu_a", F.elu(x, a)), ("selu", F.selu(x)), ("gelu", F.gelu(x)),
    ("gelu_tanh", F.gelu_tanh(x)), ("silu", F.silu(x)), ("bce", F.bce(x, t)),
]
POINTS = [-2.3, -0.7, -0.05, 0.05, 0.4, 1.9]  # away from the kink at 0


def _formula(e):
    return type(e).formula(*e.args)


@pytest.mark.parametrize("name,e", ROWS, ids=[r[0] for r in ROWS])
def test_fdiff_matches_diff_of_formula(name, e):
    ref = _formula(e)
    for v in [s for s in (x, a, t) if s in e.free_symbols]:
        mine, theirs = sp.diff(e, v), sp.diff(ref, v)
        for p in POINTS:
            # bce's probability must be in (0, 1); slopes and targets anywhere
            px = abs(p) / 3 if name == "bce" else p
            sub = {x: px, a: 0.17, t: 0.3}
            got = complex(mine.subs(sub).evalf())
            want = complex(theirs.subs(sub).evalf())
            assert abs(got - want) <= 1e-12 * max(1, abs(want)), (name, v, p, got, want)


@pytest.mark.parametrize("name,e", ROWS, ids=[r[0] for r in ROWS])
def test_value_matches_formula_and_prints(name, e):
    sub = {x: 0.31, a: 0.17, t: 0.3}
    assert abs(float(e.subs(sub).evalf()) - float(_formula(e).subs(sub).evalf())) < 1e-12
    # every row typesets as its operator name applied to its arguments, also under a power
    assert sp.latex(e) == LATEX[name]
    assert sp.latex(e**2) == LATEX[name] + "^{2}"


# the stable rule every backend prints computes the formula: at moderate points, and far out
# where the formula's own terms are still finite in 30 digits
RULE_POINTS = POINTS + [-300.0, -30.0, 30.0, 300.0]


@pytest.mark.parametrize("name", sorted(F.ROWS))
def test_rule_computes_the_formula(name):
    row = F.ROWS[name]
    args = [sp.Symbol(n, real=True) for n in F.parameters(row)]
    rule = (row.rule or row.formula)(*args)
    for p in RULE_POINTS:
        if name == "bce" and abs(p) > 30:
            continue  # its probability σ(p) is 1 to 30 digits
        # bce's probability σ(p) in (0, 1); slopes and targets anywhere
        v = sp.Float(p, 30)
        sub = dict(zip(args, [1 / (1 + sp.exp(-v)) if name == "bce" else v, 0.17, 0.3]))
        got, want = sp.N(rule.subs(sub), 30), sp.N(row.formula(*args).subs(sub), 30)
        assert abs(got - want) <= 1e-15 * max(1, abs(want)), (name, p, got, want)


_OP = r"\operatorname"
LATEX = {
    "sigmoid": r"\sigma\left(x\right)", "relu": _OP + r"{ReLU}\left(x\right)",
    "leaky_relu": _OP + r"{LeakyReLU}\left(x, \frac{1}{100}\right)",
    "leaky_relu_a": _OP + r"{LeakyReLU}\left(x, a\right)",
    "prelu": _OP + r"{PReLU}\left(x, a\right)", "softplus": _OP + r"{softplus}\left(x\right)",
    "elu": _OP + r"{ELU}\left(x, 1\right)", "elu_a": _OP + r"{ELU}\left(x, a\right)",
    "selu": _OP + r"{SELU}\left(x\right)", "gelu": _OP + r"{GELU}\left(x\right)",
    "gelu_tanh": _OP + r"{GELU}_{\tanh}\left(x\right)", "silu": _OP + r"{SiLU}\left(x\right)",
    "bce": _OP + r"{BCE}\left(x, t\right)",
}


# kink conventions, as documented in symbp/functions.py (PyTorch's choices)
KINKS = [
    (F.relu(x), 0), (F.leaky_relu(x), sp.Rational(1, 100)), (F.leaky_relu(x, a), a),
    (F.elu(x), 1), (F.elu(x, a), a), (F.prelu(x, a), a),
]


@pytest.mark.parametrize("e,slope", KINKS, ids=[str(k[0]) for k in KINKS])
def test_kink_conventions(e, slope):
    d = sp.diff(e, x).subs({x: 0, a: sp.Rational(1, 4)})
    assert d == sp.sympify(slope).subs(a, sp.Rational(1, 4))
    # and the compiled NumPy reference agrees
    fn = sb.compile(e, [x])
    args = {s.name: 0.0 if s == x else 0.25 for s in fn.program.inputs}
    _, g = fn(**args)
    assert g["x"] == pytest.approx(float(sp.sympify(slope).subs(a, 0.25)))


def test_prelu_scalar_and_per_unit_alpha(rng):
    X = sp.MatrixSymbol("X", N, 3)
    T = sp.MatrixSymbol("T", N, 3)
    A = sp.MatrixSymbol("A", 1, 3)  # one slope per unit, broadcast down the rows
    s = sp.Symbol("s", real=True)
    data = dict(X=rng.normal(size=(5, 3)), T=rng.normal(size=(5, 3)))
    r = sb.gradcheck(sb.mse(sb.prelu(X, A), T), [X, A], {**data, "A": [[0.1, 0.2, 0.3]]})
    assert r.ok, str(r)
    r = sb.gradcheck(sb.mse(sb.prelu(X, s), T), [X, s], {**data, "s": 0.2})
    assert r.ok, str(r)
    # the per-unit slope gradient is Σ_n over negative entries of ḡ·x
    fn = sb.compile(sb.mse(sb.prelu(X, A), T), [A])
    _, g = fn(**data, A=np.full((1, 3), 0.1))
    Xv, Tv = data["X"], data["T"]
    Y = np.where(Xv > 0, Xv, 0.1 * Xv)
    want = np.sum(2 * (Y - Tv) / Y.size * np.where(Xv > 0, 0, Xv), axis=0, keepdims=True)
    assert np.allclose(g["A"], want)


def test_rrelu_is_leaky_relu_of_a_random_slope_input():
    e = F.rrelu(x, 0.1, 0.3, name="r1")
    assert isinstance(e, F.leaky_relu)
    slope = e.args[1]
    assert isinstance(slope, sp.Symbol) and slope.name == "r1"
    assert F.random_slopes()["r1"] == (0.1, 0.3)
    Z = sp.MatrixSymbol("Z", N, 4)
    m = F.rrelu(Z, name="r2")
    (A,) = [s for s in m.operands if isinstance(s, sp.MatrixSymbol) and s.name == "r2"]
    assert A.shape == Z.shape  # one slope per entry
    # derivative exact for the drawn slope
    assert sp.diff(e, x).subs({x: -1, slope: 0.2}) == 0.2


def test_functions_apply_elementwise_on_matrices():
    Z = sp.MatrixSymbol("Z", N, 4)
    for name, f in F.FUNCTIONS.items():
        if name in ("identity", "prelu"):
            continue
        m = f(Z)
        assert tuple(m.shape) == (N, 4), name


def test_user_formula_needs_nothing_registered():
    f = x * F.sigmoid(x)
    assert sp.simplify(sb.grad(f, x) - sp.diff(f, x)) == 0
