"""Property-based tests (hypothesis): random expression DAGs and random MLPs.

Profiles (chosen with HYPOTHESIS_PROFILE, applied to these tests only):
  ci   (default)  60 DAGs, 30 MLPs, derandomized: the same cases on every run
  long            500 DAGs, 200 MLPs, random: a longer local run
Backends: a second MLP property compiles each network for every target named in
SYMBP_PROPERTY_TARGETS (comma-separated, default "cpu,parallel") and compares it with the
NumPy reference: few examples (4; 40 in the long profile), since every example is a new
program (~2-4 s to compile per target).  Without Numba it is skipped, or fails where
SYMBP_REQUIRE=numba.
"""

import math
import os

import numpy as np
import pytest
import sympy as sp
from conftest import have, need
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import symbp as sb
from symbp import functions as F

_common = dict(deadline=None, suppress_health_check=list(HealthCheck))
settings.register_profile("ci", max_examples=60, derandomize=True, **_common)
settings.register_profile("long", max_examples=500, **_common)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
MLP_EXAMPLES = {"ci": 30, "long": 200}.get(os.environ.get("HYPOTHESIS_PROFILE", "ci"), 20)
TARGETS = [t for t in os.environ.get("SYMBP_PROPERTY_TARGETS", "cpu,parallel").split(",")
           if t and t != "numpy"]
_LONG = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "long"
NUMBA_EXAMPLES = 40 if _LONG else 4

XS = sp.symbols("x0:3", real=True)

# every supported scalar head: sympy's and symbp's functions, powers, Piecewise, Max/Min/Abs
UNARY = [sp.sin, sp.cos, sp.tanh, F.sigmoid, F.relu, F.softplus, F.elu, F.selu, F.gelu,
         F.gelu_tanh, F.silu, lambda u: F.leaky_relu(u, sp.Rational(1, 10)), sp.Abs,
         lambda u: sp.exp(sp.tanh(u)), lambda u: sp.log(1 + u**2), lambda u: u**3,
         lambda u: sp.sqrt(1 + u**2), lambda u: sp.Piecewise((u**2, u > 0), (-u, True)),
         lambda u: sp.erf(u)]
BINARY = [sp.Add, sp.Mul, lambda u, v: u - v, lambda u, v: u / (1 + v**2), sp.Max, sp.Min,
          lambda u, v: F.prelu(u, v), lambda u, v: F.elu(u, 1 + v**2)]


@st.composite
def dags(draw):
    """A random DAG: each node applies a head to earlier nodes, so nodes get shared."""
    nodes = list(XS)
    for _ in range(draw(st.integers(2, 9))):
        if draw(st.booleans()):
            f = draw(st.sampled_from(UNARY))
            nodes.append(f(draw(st.sampled_from(nodes))))
        else:
            f = draw(st.sampled_from(BINARY))
            nodes.append(f(draw(st.sampled_from(nodes)), draw(st.sampled_from(nodes))))
    # the root sums the last few nodes, so earlier ones are reused through several paths
    root = sp.Add(*nodes[-draw(st.integers(1, 3)):])
    mag = st.floats(1e-3, 2)  # away from 0, where most kinks are
    point = [draw(mag) * draw(st.sampled_from((-1, 1))) for _ in XS]
    return root, dict(zip(XS, point))


def _num(e, point):
    try:
        v = complex(sp.sympify(e).xreplace({k: sp.Float(p) for k, p in point.items()}).evalf(30))
    except (TypeError, ValueError, ZeroDivisionError):
        return math.nan
    return v.real if abs(v.imag) < 1e-12 else math.nan


@settings(PROFILE)
@given(dags())
def test_dag_grad_matches_sympy_diff_and_central_differences(case):
    f, point = case
    wrt = [s for s in XS if s in f.free_symbols]
    assume(wrt)
    value = _num(f, point)
    assume(math.isfinite(value) and abs(value) < 1e6)
    got = sb.grad(f, wrt)
    fn = sb.compile(f, wrt)
    arrays = {s.name: point[s] for s in f.free_symbols}
    _, grads = fn(**arrays)
    for s, g in zip(wrt, got):
        want = _num(sp.diff(f, s), point)
        assume(math.isfinite(want))
        assert _num(g, point) == pytest.approx(want, rel=1e-9, abs=1e-9), (f, s)
        assert grads[s.name] == pytest.approx(want, rel=1e-8, abs=1e-8), (f, s)
        # float64 central differences; a point at or within h of a kink (the one-sided
        # slopes disagree, e.g. prelu(x0 + x1, x0) at x0 = -x1) is rejected: there the
        # gradient follows the documented convention, not the average slope
        h = 1e-6
        f0 = fn(**arrays)[0]
        up = fn(**{**arrays, s.name: point[s] + h})[0]
        dn = fn(**{**arrays, s.name: point[s] - h})[0]
        fwd, bwd = (up - f0) / h, (f0 - dn) / h
        assume(abs(fwd - bwd) <= 1e-3 * max(1, abs(fwd)))
        assert grads[s.name] == pytest.approx((up - dn) / (2 * h), rel=1e-5, abs=1e-6), (f, s)


# --- random MLPs: gradcheck and every target against the NumPy reference ----------------------

N = sp.Symbol("N")
ACTS = ["sigmoid", "tanh", "relu", "leaky_relu", "softplus", "elu", "selu", "gelu",
        "gelu_tanh", "silu", "identity"]
# activations whose slope jumps at 0 (elu's α = 1 makes it C¹, but keep a margin there too)
KINKED = {"relu", "leaky_relu", "elu", "selu"}
LOSSES = ["sce", "ce_softmax", "mse", "bce", "bce_logits"]


@st.composite
def mlps(draw):
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 4), min_size=depth + 2, max_size=depth + 2))
    acts = draw(st.lists(st.sampled_from(ACTS), min_size=depth, max_size=depth))
    loss = draw(st.sampled_from(LOSSES))
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    return widths, acts, loss, batch, seed


def build_mlp(widths, acts, loss):
    """The loss, its parameters, X, T and the pre-activations that enter a kinked function."""
    X, T = sp.MatrixSymbol("X", N, widths[0]), sp.MatrixSymbol("T", N, widths[-1])
    H, params, kinks = X, [], []
    for i in range(len(widths) - 1):
        W = sp.MatrixSymbol(f"W{i}", widths[i], widths[i + 1])
        b = sp.MatrixSymbol(f"b{i}", 1, widths[i + 1])
        params += [W, b]
        H = sb.dense(H, W, b)
        if i < len(acts):
            if acts[i] in KINKED:
                kinks.append(H)
            H = F.FUNCTIONS[acts[i]](H)
    f = {"sce": lambda: sb.softmax_cross_entropy(H, T),
         "ce_softmax": lambda: sb.cross_entropy(sb.softmax(H), T),
         "mse": lambda: sb.mse(H, T),
         "bce": lambda: sb.binary_cross_entropy(sb.sigmoid(H), T),
         "bce_logits": lambda: sb.bce_with_logits(H, T)}[loss]()
    return f, params, X, T, kinks


def mlp_arrays(params, X, T, loss, batch, seed):
    rng = np.random.default_rng(seed)
    c = int(T.shape[1])
    arrays = {"X": rng.normal(size=(batch, int(X.shape[1])))}
    if loss in ("sce", "ce_softmax"):
        arrays["T"] = np.eye(c)[rng.integers(0, c, batch)]
    else:
        arrays["T"] = rng.uniform(size=(batch, c))
    for p in params:
        arrays[p.name] = rng.normal(scale=0.8, size=tuple(int(d) for d in p.shape))
    return arrays


KINK_MARGIN = 1e-2  # ≫ eps·|∂z/∂θ| for the largest step (1e-4) and these small weights


def smooth_point(params, X, T, loss, batch, seed, kinks):
    """Arrays whose kinked pre-activations are all at least KINK_MARGIN from 0.

    Central differences straddling a kink measure the average of two slopes, not the
    gradient; so the point moves (deterministically: the next seed) rather than the
    check being dropped.  Seeds are tried in order; ~5 % of points get moved."""
    for k in range(100):
        arrays = mlp_arrays(params, X, T, loss, batch, seed + k)
        near = False
        for Z in kinks:
            fwd = sb.compile_forward(Z)
            z = fwd(**{s.name: arrays[s.name] for s in fwd.program.inputs})
            near = near or np.min(np.abs(z)) < KINK_MARGIN
        if not near:
            return arrays
    raise AssertionError(f"no point away from the kinks in 100 seeds from {seed}")


def compare_targets(f, params, arrays, targets=TARGETS, dtype=np.float64, rtol=1e-9):
    """Compile for each target and compare value and gradients with the NumPy reference."""
    assert targets, "no target to compare with the NumPy reference"
    ref_v, ref_g = sb.compile(f, params, target="numpy", dtype=dtype)(**arrays)
    for target in targets:
        need(have("numba"), "numba")  # every compiled target is Numba's
        fn = sb.compile(f, params, target=target, dtype=dtype)
        v, g = fn(**arrays)
        assert v == pytest.approx(ref_v, rel=rtol, abs=rtol), target
        for k in ref_g:
            np.testing.assert_allclose(g[k], ref_g[k], rtol=rtol, atol=rtol, err_msg=target)


@settings(PROFILE, max_examples=MLP_EXAMPLES)
@given(mlps())
def test_random_mlp_gradcheck(arch):
    """The reference gradient equals central differences, at a point away from any kink."""
    widths, acts, loss, batch, seed = arch
    f, params, X, T, kinks = build_mlp(widths, acts, loss)
    arrays = smooth_point(params, X, T, loss, batch, seed, kinks)
    r = sb.gradcheck(f, params, arrays, eps=1e-6, tol=1e-6)
    for eps in (1e-5, 1e-4):
        if r.ok:
            break
        # central differences round off ~1e-16·|L|/eps: a gradient 1e5x smaller than the
        # loss (width-1 sigmoid stacks) needs a larger step (long runs: W0 ~1e-5, L ~2;
        # [1, 1, 1, 2] sigmoid-silu: W0 = -8.7e-7, L = 2, equal to differences at 1e-3)
        r = sb.gradcheck(f, params, arrays, eps=eps, tol=1e-6)
    assert r.ok, f"{arch}\n{r}"


@settings(PROFILE, max_examples=NUMBA_EXAMPLES)
@given(mlps(), st.sampled_from([np.float64, np.float32]))
def test_random_mlp_targets_match_numpy(arch, dtype):
    """Random MLPs compiled for each target agree with the NumPy reference in the same dtype."""
    need(have("numba"), "numba")
    widths, acts, loss, batch, seed = arch
    f, params, X, T, _ = build_mlp(widths, acts, loss)
    arrays = mlp_arrays(params, X, T, loss, batch, seed)
    rtol = 1e-9 if dtype == np.float64 else 2e-4  # float32: two roundings of a deep net
    compare_targets(f, params, arrays, dtype=dtype, rtol=rtol)
