"""The Numba CPU backends ('cpu', 'parallel') against the NumPy reference, from tables.

Compilation is the cost here (seconds per program), so each program is compiled once per
module (cached fixtures) and the table is a covering set: every activation, every loss,
1-3 hidden layers, both dtypes; 'parallel' on fewer, wider cases that exercise prange.
"""

import os
import re

import numpy as np
import pytest
import sympy as sp
from conftest import N, have, need

import symbp as sb
from symbp.errors import InputError, ShapeError

need(have("numba"), "numba")
import numba  # noqa: E402

TOL = {np.float64: dict(rtol=1e-12, atol=1e-13), np.float32: dict(rtol=1e-5, atol=1e-6)}
OPTS: dict = {}
# out-of-bounds reads raise instead of passing silently (it doubles compile time: one case)
CHECKED = dict(boundscheck=True)

# --- programs -----------------------------------------------------------------------------

x, w, b = sp.symbols("x w b", real=True)
alpha = sp.Symbol("alpha", real=True)
ACTS = {
    "sigmoid": sb.sigmoid, "tanh": sb.tanh, "relu": sb.relu,
    "leaky_relu": lambda z: sb.leaky_relu(z, sp.Rational(1, 10)),
    "prelu": lambda z: sb.prelu(z, alpha), "elu": sb.elu, "selu": sb.selu, "gelu": sb.gelu,
    "silu": sb.silu, "softplus": sb.softplus,
}
# one scalar expression holding every activation: each term reads w*x + b at its own shift
SCALAR = sum(f(w * x + b + k / 4) * (k + 1) for k, f in enumerate(ACTS.values()))
SCALAR_WRT = [w, b, alpha]

LOSSES = {
    "ce": sb.softmax_cross_entropy,
    "mse": sb.mse,
    "bce": lambda Z, T: sb.binary_cross_entropy(sb.sigmoid(Z), T),
    "bce_logits": sb.bce_with_logits,
}


def mlp(acts, loss, n_in=3, hidden=5, n_out=2):
    """A dense network: len(acts) hidden layers, returning (loss, params, input shapes)."""
    X = sp.MatrixSymbol("X", N, n_in)
    T = sp.MatrixSymbol("T", N, n_out)
    H, params, width = X, [], n_in
    for k, act in enumerate(acts + [None]):
        out = hidden if act is not None else n_out
        W = sp.MatrixSymbol(f"W{k}", width, out)
        bb = sp.MatrixSymbol(f"b{k}", 1, out)
        params += [W, bb]
        H = sb.dense(H, W, bb)
        if act == "prelu":  # PReLU's slope is a (1, C) row of parameters
            a = sp.MatrixSymbol(f"a{k}", 1, out)
            params.append(a)
            H = sb.prelu(H, a)
        elif act is not None:
            H = ACTS[act](H)
        width = out
    return LOSSES[loss](H, T), params


# covering table: every activation, every loss, depths 1-3
MLPS = {
    "1h_sigmoid_ce": (["sigmoid"], "ce"),
    "2h_tanh_relu_mse": (["tanh", "relu"], "mse"),
    "3h_leaky_prelu_elu_bce": (["leaky_relu", "prelu", "elu"], "bce"),
    "3h_selu_gelu_silu_logits": (["selu", "gelu", "silu"], "bce_logits"),
    "2h_softplus_tanh_ce": (["softplus", "tanh"], "ce"),
}


def arrays_for(inputs, n, rng, dtype=np.float64):
    """Random inputs: targets in (0, 1) (rows summing to 1 for a cross-entropy)."""
    out = {}
    for s in inputs:
        if isinstance(s, sp.MatrixSymbol):
            shape = tuple(int(sp.sympify(d).subs(N, n)) for d in s.shape)
            a = rng.standard_normal(shape)
            if s.name == "T":
                a = rng.uniform(0.05, 0.95, shape)
                a /= a.sum(axis=1, keepdims=True) if shape[1] > 2 else 1
            elif s.name.startswith("a"):
                a = rng.uniform(0.05, 0.3, shape)
            out[s.name] = a.astype(dtype)
        else:
            out[s.name] = dtype(rng.uniform(0.1, 0.5) if s == alpha else rng.standard_normal())
    return out


_compiled: dict = {}


def compiled(key, build):
    """Compile once per test session (compilation dominates this file's runtime)."""
    if key not in _compiled:
        _compiled[key] = build()
    return _compiled[key]


def check_same(fn, ref, arrays, dtype, normwise=False):
    """Value and every gradient within TOL of the reference; ``normwise`` measures the
    absolute part against each array's largest entry (float32 products over 100+ terms:
    an entry that cancels to ~0 keeps the rounding of its large terms)."""
    v, g = fn(**arrays)
    v0, g0 = ref(**arrays)
    np.testing.assert_allclose(v, v0, **TOL[dtype])
    assert set(g) == set(g0)
    for k in g0:
        assert np.asarray(g[k]).dtype == dtype, k
        tol = dict(TOL[dtype])
        if normwise:
            tol["atol"] = tol["rtol"] * float(np.max(np.abs(g0[k])))
        np.testing.assert_allclose(g[k], g0[k], **tol, err_msg=k)


# --- every CPU target vs the NumPy reference ---------------------------------------------

DTYPES = [np.float64, np.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_scalar_program_every_activation(dtype):
    fn = compiled(("scalar", dtype), lambda: sb.compile(SCALAR, SCALAR_WRT, target="cpu",
                                                         dtype=dtype, **OPTS))
    ref = sb.compile(SCALAR, SCALAR_WRT, target="numpy", dtype=dtype)
    for xv in (-3.0, -0.4, 0.0, 0.3, 2.5):  # both sides of every kink
        arrays = dict(x=dtype(xv), w=dtype(1.3), b=dtype(-0.2), alpha=dtype(0.2))
        check_same(fn, ref, arrays, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MLPS)
def test_mlp_matches_numpy(case, dtype):
    f, params = mlp(*MLPS[case])
    opts = CHECKED if case == "1h_sigmoid_ce" else OPTS
    fn = compiled((case, dtype), lambda: sb.compile(f, params, target="cpu", dtype=dtype,
                                                    **opts))
    ref = sb.compile(f, params, target="numpy", dtype=dtype)
    rng = np.random.default_rng(7)
    for n in (1, 6):  # a batch of one, and a larger batch (new buffers)
        check_same(fn, ref, arrays_for(fn.program.inputs, n, rng, dtype), dtype)


PAR = {
    "tanh_ce_wide": (["tanh"], "ce", dict(n_in=8, hidden=512, n_out=16)),
    "relu_gelu_mse": (["relu", "gelu"], "mse", dict(n_in=4, hidden=128, n_out=3)),
}


@pytest.mark.parametrize("case", PAR)
def test_parallel_matches_numpy(case):
    acts, loss, shape = PAR[case]
    f, params = mlp(acts, loss, **shape)
    dtype = np.float32
    fn = compiled(("par", case), lambda: sb.compile(f, params, target="parallel", dtype=dtype))
    assert "in prange(" in fn.source  # the wide maps are parallel loops (not the import)
    ref = sb.compile(f, params, target="numpy", dtype=dtype)
    rng = np.random.default_rng(3)
    check_same(fn, ref, arrays_for(fn.program.inputs, 50, rng, dtype), dtype, normwise=True)


@pytest.mark.parametrize("target", ["cpu", "parallel"])
def test_forward_program_logits(target):
    f, params = mlp(["tanh"], "ce", n_in=8, hidden=24, n_out=16)
    X = sp.MatrixSymbol("X", N, 8)
    W0, b0, W1, b1 = params
    Z = sb.dense(sb.tanh(sb.dense(X, W0, b0)), W1, b1)
    fw = compiled(("fw", target), lambda: sb.compile_forward(Z, target=target,
                                                            dtype=np.float32))
    ref = sb.compile_forward(Z, target="numpy", dtype=np.float32)
    rng = np.random.default_rng(5)
    a1 = arrays_for(fw.program.inputs, 9, rng, np.float32)
    a2 = {**a1, "X": rng.standard_normal((9, 8)).astype(np.float32)}
    z1, z2 = fw(**a1), fw(**a2)
    assert z1.shape == (9, 16) and z1.dtype == np.float32
    np.testing.assert_allclose(z1, ref(**a1), **TOL[np.float32])
    np.testing.assert_allclose(z2, ref(**a2), **TOL[np.float32])  # z1 not overwritten:
    np.testing.assert_allclose(z1, ref(**a1), **TOL[np.float32])  # outputs are fresh


def test_stable_for_large_inputs():
    f, params = mlp(["softplus", "tanh"], "ce")
    fn = compiled(("2h_softplus_tanh_ce", np.float64),
                  lambda: sb.compile(f, params, target="cpu", dtype=np.float64, **OPTS))
    rng = np.random.default_rng(1)
    arrays = arrays_for(fn.program.inputs, 4, rng)
    arrays["X"] *= 1e3  # exp would overflow in the naive formulas
    v, g = fn(**arrays)
    assert np.isfinite(v) and all(np.isfinite(a).all() for a in g.values())


# --- fused training steps vs the reference step -------------------------------------------


def params_and_data(program, params, rows, rng, dtype):
    """Random inputs: the parameter names, two equal copies of the parameters (one for the
    compiled step, one for the reference) and the data."""
    arrays = arrays_for(program.inputs, rows, rng, dtype)
    names = {p.name for p in params}
    p1 = {k: v.copy() for k, v in arrays.items() if k in names}
    p2 = {k: v.copy() for k, v in arrays.items() if k in names}
    return names, p1, p2, {k: v for k, v in arrays.items() if k not in names}


OPTIMIZERS = {"sgd": sb.SGD(0.1), "momentum": sb.Momentum(0.05, 0.9), "adam": sb.Adam(0.01)}


@pytest.mark.parametrize("opt, dtype", [("sgd", np.float32), ("momentum", np.float64),
                                        ("adam", np.float32), ("adam", np.float64)])
def test_fused_step_matches_reference(opt, dtype):
    f, params = mlp(["tanh", "relu"], "ce", n_out=3)
    step = compiled(("step", opt, dtype), lambda: sb.compile_step(
        f, params, OPTIMIZERS[opt], target="cpu", dtype=dtype, **OPTS))
    ref = sb.compile_step(f, params, OPTIMIZERS[opt], target="numpy", dtype=dtype)
    rng = np.random.default_rng(11)
    names, p1, p2, data = params_and_data(step.program, params, 8, rng, dtype)
    for _ in range(4):
        l1, l2 = step(p1, **data), ref(p2, **data)
        np.testing.assert_allclose(l1, l2, **TOL[dtype])
    for k in names:
        np.testing.assert_allclose(p1[k], p2[k], **TOL[dtype], err_msg=k)
    assert step.state["t"] == ref.state["t"] == 4
    for buf in OPTIMIZERS[opt].buffers:
        for k in names:
            np.testing.assert_allclose(step.state[buf][k], ref.state[buf][k], **TOL[dtype])
    assert "train_step" in step.source
    # SGD and momentum add W1's gradient product straight into W1 (or its velocity)
    fused = "added into the update by BLAS" in step.source
    assert fused == (opt in ("sgd", "momentum"))


@pytest.mark.parametrize("opt", ["sgd", "momentum"])
def test_fused_update_never_reads_an_updated_parameter(opt):
    """L = mse(A*B, T): A's gradient product reads B and B's reads A, so adding either into
    its parameter would let the other product see the new value.  Both stay stored
    gradients; the steps match the reference."""
    A, B = sp.MatrixSymbol("A", 6, 5), sp.MatrixSymbol("B", 5, 4)
    T = sp.MatrixSymbol("T", 6, 4)
    f = sb.mse(A * B, T)
    step = sb.compile_step(f, [A, B], OPTIMIZERS[opt], target="cpu", dtype=np.float64)
    ref = sb.compile_step(f, [A, B], OPTIMIZERS[opt], target="numpy", dtype=np.float64)
    assert "added into the update" not in step.source and "_gemm(" in step.source
    rng = np.random.default_rng(4)
    p1 = {"A": rng.standard_normal((6, 5)), "B": rng.standard_normal((5, 4))}
    p2 = {k: v.copy() for k, v in p1.items()}
    t = rng.standard_normal((6, 4))
    for _ in range(3):
        np.testing.assert_allclose(step(p1, T=t), ref(p2, T=t), **TOL[np.float64])
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], **TOL[np.float64], err_msg=k)


def test_step_batch_sizes_and_shapes_checked_in_the_kernel():
    """The step binds N from its inputs inside the kernel: batches of 8, 3 (smaller) and 20
    (the workspace grows) all match the reference; a wrong shape anywhere (data rows
    disagreeing, a parameter transposed) is refused before any parameter moves."""
    f, params = mlp(["tanh", "relu"], "ce", n_out=3)
    step = compiled(("step", "sgd", np.float32), lambda: sb.compile_step(
        f, params, OPTIMIZERS["sgd"], target="cpu", dtype=np.float32, **OPTS))
    ref = sb.compile_step(f, params, OPTIMIZERS["sgd"], target="numpy", dtype=np.float32)
    rng = np.random.default_rng(12)
    names = {p.name for p in params}
    arrays = arrays_for(step.program.inputs, 8, rng, np.float32)
    p1 = {k: v.copy() for k, v in arrays.items() if k in names}
    p2 = {k: v.copy() for k, v in arrays.items() if k in names}
    step.state = ref.state = None
    for n in (8, 3, 20, 8):
        data = {k: v for k, v in arrays_for(step.program.inputs, n, rng, np.float32).items()
                if k not in names}
        np.testing.assert_allclose(step(p1, **data), ref(p2, **data), **TOL[np.float32])
    for k in names:
        np.testing.assert_allclose(p1[k], p2[k], **TOL[np.float32], err_msg=k)
    before = {k: v.copy() for k, v in p1.items()}
    with pytest.raises(ShapeError, match="N = 5"):
        step(p1, X=data["X"], T=data["T"][:5])
    with pytest.raises(ShapeError, match="W0"):
        step({**p1, "W0": np.ascontiguousarray(p1["W0"].T)}, **data)
    for k in names:
        np.testing.assert_array_equal(p1[k], before[k], err_msg=k)
    assert step.state["t"] == 4  # refused calls are not steps
    assert len(signatures(step.kernel)) == 1
    step.state = None  # the compiled step is shared with the other tests: fresh state


def test_fused_step_scalar_program():
    opt = sb.Adam(0.1)
    f = sb.sigmoid(w * x + b) ** 2
    step = compiled("scalar_step", lambda: sb.compile_step(f, [w, b], opt, target="cpu"))
    ref = sb.compile_step(f, [w, b], opt, target="numpy")
    p1 = dict(w=np.array(1.0), b=np.array(0.5))
    p2 = {k: v.copy() for k, v in p1.items()}
    for xv in (0.3, -1.0, 2.0):
        np.testing.assert_allclose(step(p1, x=xv), ref(p2, x=xv), rtol=1e-12)
    np.testing.assert_allclose([p1["w"], p1["b"]], [p2["w"], p2["b"]], rtol=1e-12)


def test_parallel_step_matches_reference():
    f, params = mlp(["tanh"], "ce", n_in=8, hidden=512, n_out=16)
    opt = sb.Momentum(0.1, 0.9)
    step = compiled("par_step", lambda: sb.compile_step(f, params, opt, target="parallel",
                                                         dtype=np.float32))
    assert "in prange(" in step.source  # the tanh map is wide enough for threads
    ref = sb.compile_step(f, params, opt, target="numpy", dtype=np.float32)
    rng = np.random.default_rng(2)
    names, p1, p2, data = params_and_data(step.program, params, 40, rng, np.float32)
    for _ in range(3):
        np.testing.assert_allclose(step(p1, **data), ref(p2, **data), rtol=1e-5)
    for k in names:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-5, atol=1e-6, err_msg=k)


# --- float32 discipline, bad input, no recompiles -----------------------------------------


def float64_lines(fn):
    """Source lines of a float32 kernel that compute a float64 scalar, bar accumulators."""
    from numba.core import ir, types

    kern = fn.kernel.fn.kernel
    ann = kern.overloads[kern.signatures[0]].type_annotation  # needs cache=False
    src = fn.source.splitlines()
    bad = set()
    for blk in ann.blocks.values():
        for st in blk.body:
            if isinstance(st.value if isinstance(st, ir.Assign) else None, ir.Const):
                continue  # the float64 literal inside DT(0.5): folded to a float32 constant
            if isinstance(st, ir.Assign) and ann.typemap.get(st.target.name) == types.float64 \
                    and not st.target.name.startswith("_acc"):
                text = src[st.loc.line - 1] if 0 < st.loc.line <= len(src) else "?"
                if "_acc" not in text and "ACC" not in text:
                    bad.add(f"{text.strip()}   <- {st}")
    return bad


def signatures(kern) -> list:
    """The signatures a kernel is compiled for: Numba's dispatcher's, or the one of a
    kernel of symbp's own lowering (symbp.backends.native), which never compiles another."""
    info = getattr(kern, "__self__", None)
    return info.signatures if getattr(info, "native", False) else kern.signatures


def test_float32_code_stays_float32(monkeypatch):
    # Numba's type annotations of the generated source: its typing is the one symbp's own
    # lowering follows (tests/test_native.py checks the two compute the same bits)
    monkeypatch.setenv("SYMBP_LOWER", "numba")
    f, params = mlp(["selu", "gelu", "silu"], "bce_logits")
    fn = compiled("f32check", lambda: sb.compile(f, params, target="cpu", dtype=np.float32,
                                                 cache=False))
    kern = fn.kernel.fn.kernel
    (sig,) = kern.signatures
    # float32 arrays and int64 sizes; float64 only for the accumulators' array _f64
    f64 = kern.py_func.__code__.co_varnames.index("_f64")
    assert sig[f64] == numba.float64[::1]
    assert all(getattr(t, "dtype", t) in (numba.float32, numba.int64)
               for k, t in enumerate(sig) if k != f64)
    assert not float64_lines(fn)
    # every literal in the kernels is typed: DT(…) or ACC(…), or an index
    sfn = compiled(("scalar", np.float32), lambda: sb.compile(
        SCALAR, SCALAR_WRT, target="cpu", dtype=np.float32, **OPTS))
    for src in (fn.source, sfn.source):
        code = [ln.split("#")[0] for ln in src.split("def loss_and_grad", 1)[1].splitlines()]
        assert not re.findall(r"(?<!DT\()(?<!DT\(-)(?<!ACC\()\b\d+\.\d+", "\n".join(code))


def test_bad_input_converts_or_refuses_without_recompiling():
    case, dtype = "2h_tanh_relu_mse", np.float32
    f, params = mlp(*MLPS[case])
    fn = compiled((case, dtype), lambda: sb.compile(f, params, target="cpu", dtype=dtype))
    ref = sb.compile(f, params, target="numpy", dtype=dtype)
    rng = np.random.default_rng(4)
    arrays = arrays_for(fn.program.inputs, 5, rng, np.float64)  # float64 into float32 code
    arrays["X"] = np.asfortranarray(arrays["X"])  # and a foreign layout
    check_same(fn, ref, arrays, dtype)
    assert len(signatures(fn.kernel.fn.kernel)) == 1  # converted first: no recompile
    with pytest.raises(ShapeError, match="X"):
        fn(**{**arrays, "X": np.ones((5, 4))})
    with pytest.raises(InputError, match="dtype"):
        fn(**{**arrays, "X": np.array([["a"] * 3] * 5)})


def test_step_refuses_params_it_cannot_update_in_place():
    f, params = mlp(["tanh", "relu"], "ce", n_out=3)
    opt = OPTIMIZERS["sgd"]
    step = compiled(("step", "sgd", np.float32), lambda: sb.compile_step(
        f, params, opt, target="cpu", dtype=np.float32, **OPTS))
    rng = np.random.default_rng(6)
    arrays = arrays_for(step.program.inputs, 4, rng, np.float32)
    names = {p.name for p in params}
    p = {k: v for k, v in arrays.items() if k in names}
    data = {k: v.astype(np.float64) for k, v in arrays.items() if k not in names}
    step(p, **data)  # float64 data is converted (documented)
    assert len(signatures(step.kernel)) == 1
    with pytest.raises(InputError, match="W0"):
        step({**p, "W0": p["W0"].astype(np.float64)}, **data)
    with pytest.raises(ShapeError):
        step(p, **{**data, "X": np.ones((4, 7))})


def test_unknown_option_is_named():
    with pytest.raises(sb.SymbpError, match="fastmath"):
        sb.compile(sb.sigmoid(w * x), [w], target="cpu", fastmath=True)
    with pytest.raises(sb.SymbpError, match="blas_threads"):
        sb.compile(sb.sigmoid(w * x), [w], target="cpu", blas_threads=0)
    with pytest.raises(sb.SymbpError, match="blas_threads"):
        sb.compile(sb.sigmoid(w * x), [w], target="cpu", blas_threads="many")


# --- blas_threads="auto": the step measures 1 thread against all cores (test_threads.py) --


def test_auto_blas_threads_step_matches_reference():
    """A step with BLAS products (the default "auto") tries 1 and all cores while it
    trains and matches the reference step throughout, so does a loss-and-gradient
    function; a 'parallel' kernel with prange loops keeps one BLAS thread, one without is
    tuned like 'cpu'."""
    from symbp.runtime.threads import cores as _cores

    f, params = mlp(["relu"], "ce", n_in=20, hidden=32, n_out=4)
    step = sb.compile_step(f, params, sb.SGD(0.1), target="cpu", dtype=np.float64)
    ref = sb.compile_step(f, params, sb.SGD(0.1), target="numpy", dtype=np.float64)
    assert "_gemm(" in step.source
    rng = np.random.default_rng(6)
    names, p1, p2, data = params_and_data(step.program, params, 64, rng, np.float64)
    for _ in range(24):
        np.testing.assert_allclose(step(p1, **data), ref(p2, **data), **TOL[np.float64])
    for k in names:
        np.testing.assert_allclose(p1[k], p2[k], **TOL[np.float64], err_msg=k)
    if _cores() > 1:
        # both counts were timed: the first probe of all cores comes after a few steps
        assert step._tuner is not None and step._tuner.probes >= 1
        assert step.blas_threads in (1, _cores())
    grad = sb.compile(f, params, target="cpu", dtype=np.float64)  # a loss-and-gradient call
    gref = sb.compile(f, params, target="numpy", dtype=np.float64)
    for _ in range(24):
        check_same(grad, gref, {**p1, **data}, np.float64)
    tuner = grad.kernel.fn.tuner
    assert (tuner is not None and tuner.probes >= 1) == (_cores() > 1)
    fixed = sb.compile_step(f, params, sb.SGD(0.1), target="cpu", dtype=np.float64,
                            blas_threads=1)
    assert fixed.blas_threads == 1 and fixed._tuner is None
    par = sb.compile_step(f, params, sb.SGD(0.1), target="parallel", dtype=np.float64)
    assert "in prange(" not in par.source and (par._tuner is not None) == (_cores() > 1)
    g, wide = mlp(["tanh"], "ce", n_in=20, hidden=160, n_out=4)
    par = sb.compile_step(g, wide, sb.SGD(0.1), target="parallel", dtype=np.float64)
    assert "in prange(" in par.source and par.blas_threads == 1 and par._tuner is None


# --- the BLAS product the kernels call ----------------------------------------------------


@pytest.fixture(params=["address", "scipy"])
def blas_library(request, monkeypatch):
    """gemm compiled against the OpenBLAS the kernels call by address (symbp's own copy or
    NumPy's: ``blas.LIBRARY``) or against SciPy's through Numba."""
    from symbp.backends import blas

    if request.param == "address" and blas.OPENBLAS is None:
        pytest.skip("no OpenBLAS by address here: the kernels call SciPy's")
    if request.param == "scipy":
        monkeypatch.setattr(blas, "OPENBLAS", None)  # read when a kernel is lowered
    return request.param


def test_gemm_every_layout_alpha_beta_and_empty_sizes(blas_library):
    """symbp.backends.blas.gemm: C = alpha A@B + beta C for C and F (transposed) operands,
    both dtypes, empty sizes, on either library, and on both sides of ``blas.SMALL``
    (64^3 multiply-adds goes to the small-product library, 65 x 64 x 64 to the other);
    a size mismatch is a ValueError, not a wrong answer."""
    from numba import njit

    from symbp.backends.blas import gemm

    kernels = {
        "nn": njit(lambda a, b, c, al, be: gemm(a, b, c, al, be)),
        "tn": njit(lambda a, b, c, al, be: gemm(a.T, b, c, al, be)),
        "nt": njit(lambda a, b, c, al, be: gemm(a, b.T, c, al, be)),
        "tt": njit(lambda a, b, c, al, be: gemm(a.T, b.T, c, al, be)),
    }
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        for m, k, n in [(3, 4, 5), (33, 70, 17), (0, 3, 4), (3, 0, 4), (1, 1, 1),
                        (64, 64, 64), (65, 64, 64), (130, 120, 110)]:
            A = rng.standard_normal((m, k)).astype(dt)
            B = rng.standard_normal((k, n)).astype(dt)
            C0 = rng.standard_normal((m, n)).astype(dt)
            want = -0.5 * (A.astype(np.float64) @ B) + 2.0 * C0
            # a sum of k products in floating point: within a few k * eps of the sum of
            # their magnitudes (any order of summation; a wrong entry is far outside)
            eps = np.finfo(dt).eps
            bound = 4 * eps * ((k + 2) * 0.5 * (np.abs(A.astype(np.float64)) @ np.abs(B))
                               + 2.0 * np.abs(C0)) + np.finfo(dt).tiny
            for form, f in kernels.items():
                a = np.ascontiguousarray(A.T) if form[0] == "t" else A
                b = np.ascontiguousarray(B.T) if form[1] == "t" else B
                C = C0.copy()
                f(a, b, C, -0.5, 2.0)
                err = np.abs(C - want)
                assert (err <= bound).all(), (form, m, k, n, float((err / bound).max()))
    symbols = {"address": ["gemm64(", "gemm64_small("], "scipy": ["@numba_xxgemm("]}
    for symbol in symbols[blas_library]:
        assert all(symbol in llvm for llvm in kernels["tn"].inspect_llvm().values())
    with pytest.raises(ValueError, match="sizes"):
        kernels["nn"](np.zeros((2, 3)), np.zeros((4, 5)), np.zeros((2, 5)), 1.0, 0.0)
    with pytest.raises(ValueError, match="sizes"):
        kernels["nn"](np.zeros((2, 3)), np.zeros((3, 5)), np.zeros((2, 4)), 1.0, 0.0)


def test_an_unknown_blas_choice_is_named():
    """SYMBP_BLAS other than numpy or scipy: an error naming both, not a silent default."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import symbp.backends.blas"],
                       env={**os.environ, "SYMBP_BLAS": "acml"}, capture_output=True, text=True)
    assert r.returncode != 0 and "SYMBP_BLAS='acml'" in r.stderr and "'mkl'" in r.stderr


NUMBA_START = """
import sys
import numpy as np, sympy as sp, symbp as sb
x, w = sp.Symbol("x"), sp.Symbol("w")
fn = sb.compile(sb.tanh(w * x), [w], target="cpu", cache=False)
fn(x=0.5, w=2.0)
print("scipy.linalg imported:", "scipy.linalg" in sys.modules)
import numba, numba.np.arraymath as am, numba.np.linalg as nl
print("arraymath's check:", am._HAVE_BLAS, am.ensure_blas is nl.ensure_blas,
      nl.ensure_blas.__module__)
dots = numba.njit(lambda a, b, A, B: (np.dot(a, b), A @ B))
rng = np.random.default_rng(0)
a, b, A, B = rng.random(7), rng.random(7), rng.random((3, 4)), rng.random((4, 2))
v, M = dots(a, b, A, B)
print("dots:", np.isclose(v, a @ b), np.allclose(M, A @ B), "scipy.linalg" in sys.modules)
import scipy.linalg.cython_blas
print("cython_blas:", "sgemm" in scipy.linalg.cython_blas.__pyx_capi__)
"""


def test_numba_starts_without_importing_scipy_linalg():
    """Loading the CPU backend sets Numba's BLAS check up without importing the
    scipy.linalg package (symbp.backends.blas._arraymath_without_scipy_linalg): a kernel
    compiles and runs, and scipy.linalg is still not imported.  Numba's answer is the one
    its own check gives (BLAS there), its real check is back in place, np.dot in njit code
    (SciPy's BLAS) imports scipy.linalg then and agrees with NumPy, and SciPy's
    cython_blas imports as usual afterwards."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", NUMBA_START], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "scipy.linalg imported: False",
        "arraymath's check: True True numba.np.linalg",
        "dots: True True True",
        "cython_blas: True",
    ], r.stdout


def test_kernels_give_back_the_users_blas_threads():
    """NumPy's OpenBLAS is the user's: a step run on one BLAS thread leaves its thread
    count as it found it, also when the call fails (the count is set for the call and
    given back, whether the kernels call it for every product or, beside symbp's own copy,
    for the float64 and the small ones)."""
    from symbp.backends import blas
    from symbp.runtime.threads import BLAS

    lib = blas._numpy_openblas()
    if lib is None or not (blas.SHARED or blas.SMALL_SHARED):
        pytest.skip("the kernels do not call NumPy's OpenBLAS here "
                    "(test_numpys_openblas_is_left_alone)")
    g, params = mlp(["tanh"], "ce", n_in=20, hidden=160, n_out=4)
    step = sb.compile_step(g, params, sb.SGD(0.1), target="cpu", dtype=np.float64,
                           blas_threads=1)
    assert "_gemm(" in step.source
    rng = np.random.default_rng(0)
    P = {p.name: rng.standard_normal(p.shape) for p in params}
    X, T = rng.standard_normal((64, 20)), np.eye(4)[rng.integers(0, 4, 64)]
    before = lib.scipy_openblas_get_num_threads64_()
    try:
        lib.scipy_openblas_set_num_threads64_(2)
        BLAS.use(1)
        assert lib.scipy_openblas_get_num_threads64_() == 1
        BLAS.done()
        assert lib.scipy_openblas_get_num_threads64_() == 2
        step(P, X=X, T=T)
        assert lib.scipy_openblas_get_num_threads64_() == 2
        with pytest.raises((InputError, ShapeError)):
            step(P, X=X[:, :3], T=T)
        assert lib.scipy_openblas_get_num_threads64_() == 2
    finally:
        lib.scipy_openblas_set_num_threads64_(before)


def test_numpys_openblas_is_left_alone():
    """Where the kernels call symbp's own OpenBLAS or MKL and not NumPy's copy, a step on
    one BLAS thread and on two leaves NumPy's thread count as the user set it, untouched
    (not set and given back)."""
    from symbp.backends import blas

    lib = blas._numpy_openblas()
    if lib is None or blas.SHARED or blas.SMALL_SHARED:
        pytest.skip("the kernels call NumPy's OpenBLAS here "
                    "(test_kernels_give_back_the_users_blas_threads)")
    g, params = mlp(["tanh"], "ce", n_in=20, hidden=160, n_out=4)
    rng = np.random.default_rng(0)
    X, T = rng.standard_normal((64, 20)), np.eye(4)[rng.integers(0, 4, 64)]
    before = lib.scipy_openblas_get_num_threads64_()
    try:
        lib.scipy_openblas_set_num_threads64_(3)
        for dtype in (np.float64, np.float32):
            for threads in (1, 2):
                step = sb.compile_step(g, params, sb.SGD(0.1), target="cpu", dtype=dtype,
                                       blas_threads=threads)
                P = {p.name: rng.standard_normal(p.shape).astype(dtype) for p in params}
                step(P, X=X, T=T)
                assert lib.scipy_openblas_get_num_threads64_() == 3, (dtype, threads)
    finally:
        lib.scipy_openblas_set_num_threads64_(before)


BLAS_CHOICE = """
import numpy as np, symbp.backends.blas as b
user = b._numpy_openblas()
print(b.LIBRARY)
print(b.SHARED, b.OPENBLAS_SMALL is not None, b.OPENBLAS._handle == user._handle)
if b.OPENBLAS is not None:
    get, set_ = b.threads_of(b.OPENBLAS)
    user.scipy_openblas_set_num_threads64_(2)
    set_(1)
    print(user.scipy_openblas_get_num_threads64_(), get())
"""


def _blas_choice(**env):
    """BLAS_CHOICE in a fresh process with ``env`` changed (None: unset)."""
    import subprocess
    import sys

    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    return subprocess.run([sys.executable, "-c", BLAS_CHOICE], env=env, capture_output=True,
                          text=True, timeout=120)


def test_symbps_own_openblas_is_a_copy_of_its_own():
    """SYMBP_BLAS=own: the kernels call the scipy-openblas64 wheel's library, a second
    instance beside NumPy's, whose thread count is its own; with a core type forced,
    NumPy's copy takes the small products; LIBRARY says which kernels run.
    SYMBP_BLAS=numpy: NumPy's copy alone."""
    need(have("scipy_openblas64"), "openblas")
    r = _blas_choice(SYMBP_BLAS="own", SYMBP_OPENBLAS_CORETYPE="Haswell")
    assert r.returncode == 0, r.stderr
    name, flags, threads = r.stdout.splitlines()
    assert name.startswith("symbp's OpenBLAS (Haswell kernels") and "NumPy's (" in name
    assert flags == "False True False"
    assert threads == "2 1"  # one count each: NumPy's copy kept the user's 2
    r = _blas_choice(SYMBP_BLAS="own", SYMBP_OPENBLAS_CORETYPE="default")
    assert r.returncode == 0, r.stderr
    name, flags, _ = r.stdout.splitlines()
    assert name.startswith("symbp's OpenBLAS (") and "NumPy's" not in name
    assert flags == "False False False"  # no core forced: every product on one library
    r = _blas_choice(SYMBP_BLAS="numpy", SYMBP_OPENBLAS_CORETYPE=None)
    assert r.returncode == 0, r.stderr
    name, flags, _ = r.stdout.splitlines()
    assert name.startswith("NumPy's OpenBLAS (") and flags == "True False True"
    r = _blas_choice(SYMBP_BLAS=None, SYMBP_OPENBLAS_CORETYPE=None)  # the default
    assert r.returncode == 0, r.stderr
    name, flags, threads = r.stdout.splitlines()
    if "Math Kernel Library" not in name:  # else test_mkl_chosen_on_intel_cpus_...
        assert name.startswith("symbp's OpenBLAS ("), name  # its own copy, on every CPU
        assert flags in ("False False False", "False True False"), flags  # + Zen 4's
        assert threads == "2 1"


def test_bad_openblas_choices_are_named():
    """A core type OpenBLAS does not know: an error naming it and what to give instead,
    not a silent fallback."""
    need(have("scipy_openblas64"), "openblas")
    r = _blas_choice(SYMBP_BLAS="own", SYMBP_OPENBLAS_CORETYPE="Pentium9")
    assert r.returncode != 0 and "SYMBP_OPENBLAS_CORETYPE='Pentium9'" in r.stderr
    assert "Haswell" in r.stderr and "default" in r.stderr


def test_own_openblas_asked_for_without_its_wheel_is_named(monkeypatch):
    """SYMBP_BLAS=own, or a core type asked for, with the scipy-openblas64 wheel missing:
    an error that says what to install, raised before any symbol is bound."""
    import importlib.util

    from symbp.backends import blas
    from symbp.errors import SymbpError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "scipy_openblas64" else real(name, *a))
    for env in ({"SYMBP_BLAS": "own"}, {"SYMBP_OPENBLAS_CORETYPE": "Haswell"}):
        monkeypatch.delenv("SYMBP_BLAS", raising=False)
        monkeypatch.delenv("SYMBP_OPENBLAS_CORETYPE", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SymbpError, match="pip install 'scipy-openblas64"):
            blas._kernels_openblas()


def test_openblas_core_chosen_for_this_cpu(monkeypatch):
    """Haswell kernels for symbp's copy exactly on AMD family 25 (Zen 4) where NumPy's
    OpenBLAS chose an AVX-512 core; SYMBP_OPENBLAS_CORETYPE overrides; else None."""
    import builtins
    import io

    from symbp.backends import blas

    class Lib:
        def __init__(self, core):
            self.core = core

        def scipy_openblas_get_corename64_(self):
            return self.core

    real = builtins.open

    def cpu(text):
        monkeypatch.setattr(builtins, "open", lambda f, *a, **k: io.StringIO(text)
                            if f == "/proc/cpuinfo" else real(f, *a, **k))

    monkeypatch.delenv("SYMBP_OPENBLAS_CORETYPE", raising=False)
    zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
    cpu(zen4)
    assert blas._core_for_this_cpu(Lib(b"SkylakeX")) == "Haswell"
    assert blas._core_for_this_cpu(Lib(b"Cooperlake")) == "Haswell"
    assert blas._core_for_this_cpu(Lib(b"Zen")) is None  # Zen 3: OpenBLAS chose AVX2 itself
    assert blas._core_for_this_cpu(None) is None
    cpu(zen4.replace("25", "26"))  # Zen 5: not measured
    assert blas._core_for_this_cpu(Lib(b"SkylakeX")) is None
    cpu(zen4.replace("AuthenticAMD", "GenuineIntel").replace("25", "6"))
    assert blas._core_for_this_cpu(Lib(b"SkylakeX")) is None
    monkeypatch.setenv("SYMBP_OPENBLAS_CORETYPE", "SkylakeX")
    assert blas._core_for_this_cpu(None) == "SkylakeX"
    monkeypatch.setenv("SYMBP_OPENBLAS_CORETYPE", "default")
    cpu(zen4)
    assert blas._core_for_this_cpu(Lib(b"SkylakeX")) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inlined_routines_give_the_bits_of_the_routine_alone(dtype):
    # The kernels inline every routine (numba_cpu.INLINE) so map loops vectorise; each
    # routine, run entry by entry as a call and run inlined in a loop, must agree bit for
    # bit on every kind of float: NaN, ±inf, ±0, subnormals, the clamps' edges, randoms.
    from symbp.backends import numba_cpu as nc

    dt = np.dtype(dtype).name
    table = nc.HELPERS_F32 if dtype is np.float32 else nc.HELPERS
    info = np.finfo(dtype)
    rng = np.random.default_rng(3)
    special = [np.nan, np.inf, -np.inf, 0.0, -0.0, info.tiny / 4, -info.tiny / 4, info.tiny,
               info.max, -info.max, 4e-4, -4e-4, 0.5, -0.5, 7.9053111, -7.9053111, 20.0, -20.0]
    values = np.concatenate([special, rng.normal(0, 3, 400), rng.normal(0, 1e-3, 100)])
    header = nc._HEADER.format(target="cpu", dtype=dt)
    for name in table:
        src = table[name]
        callees = "".join(f"\n@njit(error_model='numpy', {nc.INLINE})" + table[h]
                          for h in sorted(table.needs(name) - {name}))
        arity = len(re.search(r"def \w+\((.*?)\)", src).group(1).split(","))
        args = [np.roll(values, 7 * k).astype(dtype) for k in range(arity)]
        names = ", ".join(f"a{k}" for k in range(arity))
        fn = re.search(r"def (\w+)\(", src).group(1)
        module = (header + callees + "\n@njit(error_model='numpy')" + src
                  + f"\n@njit(error_model='numpy', {nc.INLINE})" + src.replace(fn, "_inl")
                  + f"\n@njit(error_model='numpy')\ndef run({names}, out):\n"
                  + "    for i in range(out.size):\n"
                  + f"        out[i] = _inl({', '.join(f'a{k}[i]' for k in range(arity))})\n")
        space: dict = {}
        exec(compile(module, f"<{name}>", "exec"), space)  # noqa: S102 (our own table)
        inlined = np.empty(len(values), dtype)
        space["run"](*args, inlined)
        alone = np.array([space[fn](*(a[i] for a in args)) for i in range(len(values))],
                         dtype)
        np.testing.assert_array_equal(inlined.view(f"u{inlined.itemsize}"),
                                      alone.view(f"u{alone.itemsize}"), err_msg=name)


SPIN = """
import os, resource, sys, time
import numpy as np, sympy as sp
import symbp as sb
N = sp.Symbol("N")
X, T = sp.MatrixSymbol("X", N, 512), sp.MatrixSymbol("T", N, 10)
W0, b0 = sp.MatrixSymbol("W0", 512, 512), sp.MatrixSymbol("b0", 1, 512)
W1, b1 = sp.MatrixSymbol("W1", 512, 10), sp.MatrixSymbol("b1", 1, 10)
L = sb.softmax_cross_entropy(sb.dense(sb.relu(sb.dense(X, W0, b0)), W1, b1), T)
step = sb.compile_step(L, [W0, b0, W1, b1], sb.SGD(0.01), target="cpu", dtype=np.float32,
                       blas_threads=2)
rng = np.random.default_rng(0)
P = {"W0": rng.standard_normal((512, 512), dtype=np.float32) * 0.04,
     "b0": np.zeros((1, 512), np.float32), "b1": np.zeros((1, 10), np.float32),
     "W1": rng.standard_normal((512, 10), dtype=np.float32) * 0.04}
x, t = rng.random((256, 512), dtype=np.float32), np.eye(10, dtype=np.float32)[np.arange(256) % 10]
spun = []
for _ in range(3):
    for _ in range(20):
        step(P, X=x, T=t)
    r = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(0.3)
    q = resource.getrusage(resource.RUSAGE_SELF)
    spun.append(q.ru_utime + q.ru_stime - r.ru_utime - r.ru_stime)
print(min(spun), max(spun), os.environ.get(sys.argv[1]))
"""


def test_own_openblas_threads_stop_spinning_soon_after_their_work():
    """symbp's copy of OpenBLAS is loaded with OPENBLAS_THREAD_TIMEOUT=25: its second
    thread spins ~13 ms after a two-thread step, not OpenBLAS's ~0.1 s, which took a
    core from the one-thread steps after a thread-tuner probe and from any neighbour.  The
    process's CPU time during a 0.3 s sleep after two-thread steps says how long it spun;
    a user's own OPENBLAS_THREAD_TIMEOUT is kept (28, OpenBLAS's default: it spins again),
    and the variable is not left set in the process when symbp set it."""
    need(have("scipy_openblas64"), "openblas")
    out = _spins("own", "OPENBLAS_THREAD_TIMEOUT", "28")
    assert out[None][0] < 0.04, out  # measured 0.015 s
    assert out["28"][1] > 0.06, out  # measured 0.105 s


def _spins(library: str, variable: str, users: str) -> dict:
    """SPIN with ``SYMBP_BLAS=library``, ``variable`` unset and then set to ``users``:
    ``{None or users: (least, most CPU seconds in the sleeps)}``, after checking that the
    variable was left as the user had it.  The least of three sleeps says how short a
    spin is, the most how long: a spinning thread sharing its core with another process
    (a parallel test run) is charged less."""
    import subprocess
    import sys

    from symbp.runtime.threads import cores

    if cores() < 2:
        pytest.skip("two threads need two cores")
    env = {k: v for k, v in os.environ.items() if k != variable}
    env.update(SYMBP_BLAS=library)
    out = {}
    for value in (None, users):
        if value is not None:
            env[variable] = value
        r = subprocess.run([sys.executable, "-c", SPIN, variable], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        least, most, left = r.stdout.split()
        assert left == str(value), (variable, value, left)
        out[value] = float(least), float(most)
    return out


# --- Intel's MKL (the mkl wheel: pip install 'symbp[mkl]') ----------------------------------


def _have_mkl() -> bool:
    from symbp.backends import blas

    return blas._mkl_path() is not None


# the checks of this file that run BLAS products: run again in a process on another BLAS
BLAS_CHECKS = ("gemm_every_layout or mlp_matches_numpy or fused_step_matches_reference or "
               "auto_blas_threads_step or give_back_the_users_blas_threads or left_alone")


def _blas_checks_again(**env) -> None:
    """BLAS_CHECKS in a fresh process with ``env`` added: all pass, at least 10 of them."""
    import subprocess
    import sys

    env = {**os.environ, **env}
    env.pop("PYTEST_XDIST_WORKER", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                        "-p", "no:xdist", __file__, "-k", BLAS_CHECKS], env=env,
                       capture_output=True, text=True, timeout=1200)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-2000:]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in tail and "failed" not in tail, tail
    assert int(tail.split(" passed")[0].split()[-1]) >= 10, tail


def test_kernels_on_mkl_match_the_reference():
    """SYMBP_BLAS=mkl: the kernels call MKL's ``sgemm_64`` for the float32 products of
    more than 64^3 multiply-adds (symbp's own OpenBLAS beside it for the float64 and the
    small ones), and this file's BLAS checks pass on it, run again in a fresh process:
    gemm in every layout, dtype and size against float64 NumPy; MLP programs and fused
    steps against the NumPy reference backend; the thread tuner's step; NumPy's thread
    count left alone."""
    need(_have_mkl(), "mkl")
    r = _blas_choice(SYMBP_BLAS="mkl")
    assert r.returncode == 0, r.stderr
    name, flags, threads = r.stdout.splitlines()
    assert "Math Kernel Library" in name and "symbp's OpenBLAS (" in name, name
    assert flags == "False True False"  # not NumPy's; symbp's own OpenBLAS beside it
    assert threads == "2 1"  # MKL's count apart from NumPy's
    _blas_checks_again(SYMBP_BLAS="mkl")


def test_kernels_on_numpys_openblas_match_the_reference():
    """SYMBP_BLAS=numpy (the library where symbp's own copy is missing: not x86-64): the
    same checks, run again in a fresh process, with NumPy's thread count set for each
    kernel call and given back."""
    from symbp.backends import blas

    if blas._numpy_openblas() is None:
        pytest.skip("NumPy bundles no scipy-openblas here (a conda or Accelerate build)")
    _blas_checks_again(SYMBP_BLAS="numpy")


def test_mkl_chosen_on_intel_cpus_where_installed():
    """With the mkl wheel installed and SYMBP_BLAS unset, the kernels call MKL exactly on
    an Intel CPU (``_mkl_for_this_cpu``: made-up /proc/cpuinfo texts here, and this
    machine in a fresh process); a forced OpenBLAS core type or SYMBP_BLAS=numpy keeps
    OpenBLAS."""
    import builtins
    import io

    from symbp.backends import blas

    real = builtins.open
    for text, want in (("vendor_id\t: GenuineIntel\ncpu family\t: 6\n", True),
                       ("vendor_id\t: AuthenticAMD\ncpu family\t: 25\n", False),
                       ("processor\t: 0\nCPU implementer\t: 0x41\n", False)):
        builtins.open = lambda f, *a, **k: (io.StringIO(text) if f == "/proc/cpuinfo"
                                            else real(f, *a, **k))
        try:
            assert blas._mkl_for_this_cpu() is want, text
        finally:
            builtins.open = real
    need(_have_mkl(), "mkl")
    r = _blas_choice(SYMBP_BLAS=None, SYMBP_OPENBLAS_CORETYPE=None)
    assert r.returncode == 0, r.stderr
    assert ("Math Kernel Library" in r.stdout) is blas._mkl_for_this_cpu(), r.stdout
    for env in ({"SYMBP_BLAS": "numpy"}, {"SYMBP_OPENBLAS_CORETYPE": "SkylakeX"}):
        r = _blas_choice(**{"SYMBP_BLAS": None, "SYMBP_OPENBLAS_CORETYPE": None, **env})
        assert r.returncode == 0, r.stderr
        assert "Math Kernel Library" not in r.stdout and "OpenBLAS (" in r.stdout, r.stdout


STRIDED_CHECK = """
import ctypes, os, sys
import numpy as np, sympy as sp
from numba import njit
import symbp as sb
from symbp.backends import blas

os.environ["SYMBP_LOWER"] = sys.argv[1]
assert blas.MKL_STRIDED is not None, blas.LIBRARY


def fortran(lib, A, B):  # A @ B, row-major, through lib's ILP64 Fortran sgemm
    (m, k), n = A.shape, B.shape[1]
    C = np.zeros((m, n), np.float32)
    ch = lambda v: ctypes.byref(ctypes.c_char(v))
    i = lambda v: ctypes.byref(ctypes.c_int64(v))
    p = lambda x: ctypes.c_void_p(x.ctypes.data)
    f = blas.gemm_of(lib, "s")
    f.restype = None
    f(ch(b"n"), ch(b"n"), i(n), i(m), i(k), ctypes.byref(ctypes.c_float(1)), p(B), i(n),
      p(A), i(k), ctypes.byref(ctypes.c_float(0)), p(C), i(n), ctypes.c_int64(1),
      ctypes.c_int64(1))
    return C


@njit
def numba_gemm(A, B, C):
    blas.gemm(A, B, C, 1.0, 0.0)


rng = np.random.default_rng(0)
N = sp.Symbol("N")
get, set_ = blas.threads_of(blas.OPENBLAS)
blas.threads_of(blas.OPENBLAS_SMALL)[1](1)
for threads in (1, 2):
    set_(threads)  # MKL's count for this thread, the one that runs the kernels
    assert get() == threads
    for m, k, n in ((64, 2048, 2048), (40, 1024, 4096), (64, 2048, 1536), (192, 2048, 2048),
                    (16, 2048, 2048), (64, 1000, 2048)):
        A = rng.standard_normal((m, k)).astype(np.float32)
        B = rng.standard_normal((k, n)).astype(np.float32)
        mkl, openblas = fortran(blas.OPENBLAS, A, B), fortran(blas.OPENBLAS_SMALL, A, B)
        assert not np.array_equal(mkl, openblas), (m, k, n)  # else the check cannot tell
        want = openblas if blas.to_beside("s", "C", "C", m, k, n, threads) else mkl
        C = np.zeros((m, n), np.float32)
        numba_gemm(A, B, C)
        X, W = sp.MatrixSymbol("X", N, k), sp.MatrixSymbol("W", k, n)
        forward = sb.compile_forward(X * W, target="cpu", dtype=np.float32,
                                     blas_threads=threads)
        for got, how in ((C, "njit"), (forward(X=A, W=B), "compile_forward")):
            assert np.array_equal(got, want), (m, k, n, threads, how)
        print(threads, m, k, n, "OpenBLAS" if want is openblas else "MKL")
"""


def test_mkl_strided_products_go_to_openblas():
    """On MKL with one thread, a float32 A @ B of 17-160 rows by a B of 8 MB or more
    whose width is a multiple of 2048 (where MKL took 1.2-2.2x OpenBLAS's time) goes to the
    OpenBLAS beside it, and nothing else does; with two MKL threads, nothing does: each
    product's bits equal that library's own sgemm's, through njit code and through a
    compiled forward, on symbp's lowering and on Numba's."""
    import subprocess
    import sys

    need(_have_mkl(), "mkl")
    for lower in ("native", "numba"):
        env = {**os.environ, "SYMBP_BLAS": "mkl"}
        r = subprocess.run([sys.executable, "-c", STRIDED_CHECK, lower], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        lines = r.stdout.splitlines()
        assert lines == ["1 64 2048 2048 OpenBLAS", "1 40 1024 4096 OpenBLAS",
                         "1 64 2048 1536 MKL", "1 192 2048 2048 MKL", "1 16 2048 2048 MKL",
                         "1 64 1000 2048 MKL", "2 64 2048 2048 MKL", "2 40 1024 4096 MKL",
                         "2 64 2048 1536 MKL", "2 192 2048 2048 MKL", "2 16 2048 2048 MKL",
                         "2 64 1000 2048 MKL"], r.stdout


def test_mkl_asked_for_without_its_wheel_is_named(monkeypatch):
    """SYMBP_BLAS=mkl with the wheel missing: an error that says what to install, raised
    before any symbol is bound; unset, the kernels keep OpenBLAS."""
    from symbp.backends import blas
    from symbp.errors import SymbpError

    monkeypatch.setattr(blas, "_mkl_path", lambda: None)
    monkeypatch.setattr(blas, "_bind", lambda *a: pytest.fail("bound a library"))
    monkeypatch.setenv("SYMBP_BLAS", "mkl")
    with pytest.raises(SymbpError, match=r"pip install 'symbp\[mkl\]'"):
        blas._kernels_openblas()


def test_mkl_threads_stop_spinning_soon_after_their_work():
    """MKL's threads are Intel OpenMP's, which spin KMP_BLOCKTIME (200 ms) after their
    work: symbp loads MKL with KMP_BLOCKTIME=13 unless the user set one, and does not
    leave the variable set.  The process's CPU time during a 0.3 s sleep after two-thread
    steps says how long they spun; the user's 200 is kept."""
    need(_have_mkl(), "mkl")
    out = _spins("mkl", "KMP_BLOCKTIME", "200")
    assert out[None][0] < 0.04, out  # measured 0.013 s
    assert out["200"][1] > 0.1, out  # measured 0.200 s
