"""conv2d, max_pool2d and avg_pool2d as symbp operations: heads, gradients, code, printing.

Each operation is the loss L = Σ Y ⊙ R of its output Y and a random R (so ∂L/∂Y = R is an
arbitrary δ), compiled on numpy, cpu and parallel with a symbolic batch size N, and checked

    value and ∂L/∂X, ∂L/∂K, ∂L/∂b   vs PyTorch float64 autograd (skipped without torch)
    gradients                       vs float64 central differences (sb.gradcheck)
    cpu / parallel                  vs the NumPy reference backend, float64 1e-12, float32 1e-5

over strides 1 and 2, paddings 0 and 1, square and non-square kernels, C = 1 and 3,
F = 1 and 4.  A small CNN (conv → ReLU → max-pool → conv → avg-pool → flatten → dense →
softmax-CE) runs end to end; max-pool ties and NaN follow PyTorch; derivations print the
⋆ / rot180 form and the index form; bad input is named.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from conftest import have, need

import symbp as sb
from symbp.errors import ShapeError, UnsupportedError
from symbp.matrix import Total

N = sp.Symbol("N", integer=True, positive=True)
TARGETS = ("numpy", "cpu", "parallel")

# (N, C, H, W, F, kh, kw, stride, padding)
CONV = {
    "3x3-p1": (2, 1, 5, 5, 4, 3, 3, 1, 1),
    "3x3-s2-p1-odd": (2, 3, 7, 6, 4, 3, 3, 2, 1),  # (7+2−3)/2 is whole, (6+2−3)/2 not
    "2x3-s2": (3, 3, 6, 7, 1, 2, 3, 2, 0),  # non-square kernel, F = 1
    "1x1-C3": (2, 3, 4, 4, 4, 1, 1, 1, 0),
    "3x2-p1-s1": (1, 1, 4, 5, 1, 3, 2, 1, 1),
    # work enough for threads (N counts as 128): the parallel target runs the prange kernels
    "3x3-C3-8x8": (2, 3, 8, 8, 4, 3, 3, 1, 1),
}
# (N, C, H, W, size, stride)
POOL = {
    "2": (2, 3, 6, 6, 2, None),
    "2-odd": (2, 1, 5, 7, 2, None),  # the last row and columns fall out
    "3-s1-overlap": (1, 2, 5, 6, 3, 1),
}


def _rng(seed=0):
    return np.random.default_rng(seed)


def conv_case(case, bias="row"):
    n, c, h, w, f, kh, kw, s, p = CONV[case]
    X, K = sb.tensor("X", N, c, h, w), sb.tensor("K", f, c, kh, kw)
    b = sp.MatrixSymbol("b", 1, f) if bias == "row" else sb.tensor("b", f)
    Y = sb.conv2d(X, K, b, stride=s, padding=p)
    R = sb.tensor("R", *Y.shape)
    rng = _rng()
    data = {"X": rng.normal(size=(n, c, h, w)), "K": rng.normal(size=(f, c, kh, kw)),
            "b": rng.normal(size=(1, f) if bias == "row" else (f,))}
    ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    data["R"] = rng.normal(size=(n, f, ho, wo))
    return Total(Y * R), [X, K, b], data, (s, p), Y


def pool_case(kind, case):
    n, c, h, w, k, s = POOL[case]
    X = sb.tensor("X", N, c, h, w)
    Y = (sb.max_pool2d if kind == "max" else sb.avg_pool2d)(X, k, s)
    R = sb.tensor("R", *Y.shape)
    rng = _rng(1)
    ss = k if s is None else s
    data = {"X": rng.normal(size=(n, c, h, w)),
            "R": rng.normal(size=(n, c, (h - k) // ss + 1, (w - k) // ss + 1))}
    return Total(Y * R), [X], data, (k, ss), Y


def _torch():
    need(have("torch"), "pytorch", "no comparison with torch.nn.functional")
    import torch

    return torch


def torch_conv(data, s, p):
    torch = _torch()
    t = {k: torch.tensor(v, requires_grad=k != "R") for k, v in data.items()}
    Y = torch.nn.functional.conv2d(t["X"], t["K"], t["b"].reshape(-1), stride=s, padding=p)
    L = (Y * t["R"]).sum()
    L.backward()
    return float(L.detach()), {k: t[k].grad.numpy() for k in ("X", "K", "b")}


def torch_pool(kind, data, k, s):
    torch = _torch()
    X = torch.tensor(data["X"], requires_grad=True)
    f = torch.nn.functional.max_pool2d if kind == "max" else torch.nn.functional.avg_pool2d
    L = (f(X, k, s) * torch.tensor(data["R"])).sum()
    L.backward()
    return float(L.detach()), {"X": X.grad.numpy()}


def close(a, b, rtol):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.max(np.abs(a - b), initial=0) / max(np.max(np.abs(b), initial=0), 1e-300)
    assert err <= rtol, err


# --- each operation against PyTorch, central differences and the reference ---------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CONV)
def test_conv2d_matches_torch(case, target):
    L, wrt, data, (s, p), _ = conv_case(case)
    value, grads = sb.compile(L, wrt, target=target)(**data)
    want, wgrads = torch_conv(data, s, p)
    assert value == pytest.approx(want, rel=1e-12)
    for k in ("X", "K", "b"):
        close(grads[k], wgrads[k], 1e-12)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", POOL)
@pytest.mark.parametrize("kind", ("max", "avg"))
def test_pooling_matches_torch(kind, case, target):
    L, wrt, data, (k, s), _ = pool_case(kind, case)
    value, grads = sb.compile(L, wrt, target=target)(**data)
    want, wgrads = torch_pool(kind, data, k, s)
    assert value == pytest.approx(want, rel=1e-12)
    close(grads["X"], wgrads["X"], 1e-12)


@pytest.mark.parametrize("case", ["3x3-s2-p1-odd", "2x3-s2"])
@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_conv2d_gradients_match_central_differences(case, target):
    L, wrt, data, *_ = conv_case(case)
    check = sb.gradcheck(L, wrt, data, target=target, tol=1e-6)
    assert check.ok, str(check)


@pytest.mark.parametrize("kind", ("max", "avg"))
def test_pooling_gradients_match_central_differences(kind):
    L, wrt, data, *_ = pool_case(kind, "3-s1-overlap")
    check = sb.gradcheck(L, wrt, data, target="cpu", tol=1e-6)
    assert check.ok, str(check)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("target", ["cpu", "parallel"])
def test_compiled_matches_the_numpy_reference(target, dtype, tol):
    for L, wrt, data, _, Y in [conv_case("3x3-s2-p1-odd"), conv_case("3x3-C3-8x8"),
                               pool_case("max", "3-s1-overlap"), pool_case("avg", "2-odd")]:
        # the output itself: L = Σ Y ⊙ R cancels, and float32 rounding is relative to |Y|
        x = {k: v for k, v in data.items() if k != "R"}
        y0 = sb.compile_forward(Y, target="numpy", dtype=dtype)(**x)
        y1 = sb.compile_forward(Y, target=target, dtype=dtype)(**x)
        assert y1.dtype == dtype
        close(y1, y0, tol)
        _, g0 = sb.compile(L, wrt, target="numpy", dtype=dtype)(**data)
        _, g1 = sb.compile(L, wrt, target=target, dtype=dtype)(**data)
        for k in g0:
            assert g1[k].dtype == dtype
            close(g1[k], g0[k], tol)


def test_a_bias_vector_and_an_array_symbol_are_accepted():
    from sympy.tensor.array.expressions import ArraySymbol

    L, wrt, data, (s, p), _ = conv_case("3x3-p1", bias="vector")
    value, grads = sb.compile(L, wrt, target="cpu")(**data)
    want, wgrads = torch_conv(data, s, p)
    assert value == pytest.approx(want, rel=1e-12)
    assert grads["b"].shape == (4,)
    close(grads["b"], wgrads["b"], 1e-12)
    # a SymPy ArraySymbol becomes the tensor of its name and shape
    Y = sb.max_pool2d(sb.conv2d(ArraySymbol("X", (N, 1, 5, 5)), wrt[1], padding=1), 2)
    assert Y.shape == (N, 4, 2, 2)
    assert {s.name for s in Y.atoms(sp.MatrixSymbol)} == {"X", "K"}


def test_the_batch_size_is_symbolic():
    L, wrt, data, *_ = conv_case("3x3-p1")
    fn = sb.compile(L, wrt, target="cpu")
    for n in (1, 3):
        d = {k: (v[:1].repeat(n, axis=0) if k in ("X", "R") else v) for k, v in data.items()}
        v, g = fn(**d)
        v1, g1 = fn(**{k: (x[:1] if k in ("X", "R") else x) for k, x in d.items()})
        assert v == pytest.approx(n * v1, rel=1e-12)  # n copies of one image
        close(g["K"], n * g1["K"], 1e-12)


# --- a small CNN, end to end ------------------------------------------------------------------


def cnn():
    X = sb.tensor("X", N, 3, 8, 8)
    K1, b1 = sb.tensor("K1", 4, 3, 3, 3), sp.MatrixSymbol("b1", 1, 4)
    K2, b2 = sb.tensor("K2", 2, 4, 3, 2), sb.tensor("b2", 2)
    W, c = sp.MatrixSymbol("W", 4, 3), sp.MatrixSymbol("c", 1, 3)
    T = sp.MatrixSymbol("T", N, 3)
    H = sb.max_pool2d(sb.relu(sb.conv2d(X, K1, b1, padding=1)), 2)  # N×4×4×4
    H = sb.avg_pool2d(sb.tanh(sb.conv2d(H, K2, b2, stride=2, padding=1)), 2, 1)  # N×2×1×2
    L = sb.softmax_cross_entropy(sb.dense(sb.flatten(H), W, c), T)
    rng = _rng(3)
    data = {"X": rng.normal(size=(5, 3, 8, 8)), "K1": rng.normal(size=(4, 3, 3, 3)) / 3,
            "b1": rng.normal(size=(1, 4)), "K2": rng.normal(size=(2, 4, 3, 2)) / 3,
            "b2": rng.normal(size=2), "W": rng.normal(size=(4, 3)), "c": rng.normal(size=(1, 3)),
            "T": np.eye(3)[rng.integers(0, 3, 5)]}
    return L, [X, K1, b1, K2, b2, W, c], data


def torch_cnn(data):
    torch = _torch()
    F = torch.nn.functional
    t = {k: torch.tensor(v, requires_grad=k != "T") for k, v in data.items()}
    H = F.max_pool2d(F.relu(F.conv2d(t["X"], t["K1"], t["b1"].reshape(-1), padding=1)), 2)
    H = F.avg_pool2d(torch.tanh(F.conv2d(H, t["K2"], t["b2"], stride=2, padding=1)), 2, 1)
    Z = H.flatten(1) @ t["W"] + t["c"]
    L = -(t["T"] * torch.log_softmax(Z, 1)).sum() / len(Z)
    L.backward()
    return float(L.detach()), {k: v.grad.numpy() for k, v in t.items() if k != "T"}


@pytest.mark.parametrize("target", TARGETS)
def test_a_small_cnn_end_to_end(target):
    L, wrt, data = cnn()
    value, grads = sb.compile(L, wrt, target=target)(**data)
    want, wgrads = torch_cnn(data)
    assert value == pytest.approx(want, rel=1e-12)
    for k, g in wgrads.items():
        close(grads[k], g, 1e-11)
    if target == "cpu":
        check = sb.gradcheck(L, wrt, data, target=target, tol=1e-6)
        assert check.ok, str(check)


# --- max-pool: ties go to the first maximum, NaN propagates -----------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_max_pool_ties_go_to_the_first_maximum(target):
    X = sb.tensor("X", 1, 1, 2, 4)
    R = sb.tensor("R", 1, 1, 1, 2)
    fn = sb.compile(Total(sb.max_pool2d(X, 2) * R), [X], target=target)
    x = np.array([[[[1.0, 3.0, 2.0, 2.0], [3.0, 0.0, 2.0, 2.0]]]])
    value, g = fn(X=x, R=np.array([[[[10.0, 20.0]]]]))
    assert value == 10 * 3 + 20 * 2
    want = np.array([[[[0, 10, 20, 0], [0, 0, 0, 0]]]])  # row-major first: (0,1), (0,2)
    np.testing.assert_array_equal(g["X"], want)
    if have("torch"):
        import torch

        tx = torch.tensor(x, requires_grad=True)
        r = torch.tensor([[[[10.0, 20.0]]]], dtype=torch.float64)
        (torch.nn.functional.max_pool2d(tx, 2) * r).sum().backward()
        np.testing.assert_array_equal(g["X"], tx.grad.numpy())


@pytest.mark.parametrize("target", TARGETS)
def test_max_pool_propagates_nan(target):
    X = sb.tensor("X", 1, 1, 2, 4)
    fn = sb.compile(Total(sb.max_pool2d(X, 2)), [X], target=target)
    x = np.array([[[[1.0, np.nan, 2.0, 5.0], [3.0, 0.0, 2.0, 2.0]]]])
    value, g = fn(X=x)
    assert np.isnan(value)
    # the window's NaN takes its δ (PyTorch's `v > m or isnan(v)` scan)
    np.testing.assert_array_equal(g["X"], [[[[0, 1, 0, 1], [0, 0, 0, 0]]]])
    y = sb.compile_forward(sb.max_pool2d(X, 2), target=target)(X=x)
    assert np.isnan(y[0, 0, 0, 0]) and y[0, 0, 0, 1] == 5


# --- generated code and the cache key ----------------------------------------------------------


def test_the_kernels_are_imported_and_hashed_into_the_cache_key():
    from symbp import cache

    # the parallel target calls the prange kernels where the work pays for threads
    for case, target, suffix in (("3x3-C3-8x8", "cpu", "serial"),
                                 ("3x3-C3-8x8", "parallel", "parallel"),
                                 ("3x3-p1", "parallel", "serial")):
        L, wrt, *_ = conv_case(case)
        src = sb.compile(L, wrt, target=target).source
        assert f"import conv2d_{suffix} as _conv2d_{suffix}" in src
        assert f"_conv2d_grad_kernel_{suffix}(" in src
        # the kernels' module is compiled into the machine code: its hash is in the key
        assert "symbp.backends.conv_numba sha256:" in cache.stamp(src)
    assert "_conv2d(" in sb.compile(L, wrt, target="numpy").source


def test_cuda_refuses_before_compiling():
    from symbp.backends import numba_cuda

    L, wrt, *_ = conv_case("3x3-p1")
    with pytest.raises(UnsupportedError):
        numba_cuda.generate(sb.gradient_program(L, wrt))


# --- printing ----------------------------------------------------------------------------------


def lecture():
    X, K = sb.tensor("X", N, 1, 4, 4), sb.tensor("K", 2, 1, 3, 3)
    b, W = sp.MatrixSymbol("b", 1, 2), sp.MatrixSymbol("W", 8, 3)
    T = sp.MatrixSymbol("T", N, 3)
    H = sb.max_pool2d(sb.relu(sb.conv2d(X, K, b, stride=1, padding=1)), 2)
    return sb.softmax_cross_entropy(sb.flatten(H) * W, T), [X, K, b, W]


def test_derive_prints_the_textbook_rules_with_shapes():
    L, wrt = lecture()
    d = sb.derive(L, wrt)
    text = d.text()
    assert "∂L/∂X = Δ₁ ⋆[full, p=1] rot180(K)   ∈ ℝ^N×1×4×4" in text
    assert "∂L/∂K = X ⋆[p=1] Δ₁" in text
    assert "H₂ = maxpool2(H₁)" in text
    assert "route2×2(∂⁺L/∂H₂ → first argmax of H₁)" in text
    tex = d.latex()
    assert r"\star_{\text{full},\,\text{p=1}} \operatorname{rot180}\left(K\right)" in tex
    assert r"\in \mathbb{R}^{2\times 1\times 3\times 3}" in tex


def test_matrix_formulas_give_the_index_form_of_the_convolution():
    L, wrt = lecture()
    f = sb.matrix_formulas(L, wrt)
    text = f.text()
    assert "∂L/∂K[f,c,u,v] = Σₙ Σᵢ Σⱼ X[n,c,i + u − 1,j + v − 1]·Δ₁[n,f,i,j]" in text
    assert "∂L/∂X[n,c,r,q] = Σ_f Σᵢ Σⱼ K[f,c,r + 1 − i,q + 1 − j]·Δ₁[n,f,i,j]" in text
    assert "is the first max of window (i,j)" in text  # the tie rule, in the index form
    assert r"X_{n,c,i + u - 1,j + v - 1}" in f.latex()


def test_index_forms_agree_with_the_numbers():
    # every index-form entry rule, evaluated by hand, against the compiled gradient
    from symbp.backends import conv_numpy as ref

    rng = _rng(5)
    x, k, g = rng.normal(size=(2, 3, 5, 6)), rng.normal(size=(4, 3, 3, 2)), None
    s, p = 2, 1
    y = ref.conv2d(x, k, None, s, p)
    g = rng.normal(size=y.shape)
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    dk = np.zeros_like(k)
    for f, c, u, v in np.ndindex(*k.shape):  # Σₙ Σᵢ Σⱼ δ[n,f,i,j] X[n,c,i·s+u−p,j·s+v−p]
        dk[f, c, u, v] = sum(g[n, f, i, j] * xp[n, c, i * s + u, j * s + v]
                             for n, i, j in np.ndindex(g.shape[0], *g.shape[2:]))
    close(ref.conv2d_grad_kernel(g, x, k.shape, s, p), dk, 1e-12)
    dx = np.zeros_like(x)
    for n, c, r, q in np.ndindex(*x.shape):  # Σ_f Σᵢ Σⱼ δ[n,f,i,j] K[f,c,r+p−i·s,q+p−j·s]
        dx[n, c, r, q] = sum(g[n, f, i, j] * k[f, c, r + p - i * s, q + p - j * s]
                             for f, i, j in np.ndindex(k.shape[0], *g.shape[2:])
                             if 0 <= r + p - i * s < k.shape[2] and 0 <= q + p - j * s < k.shape[3])
    close(ref.conv2d_grad_input(g, k, x.shape, s, p), dx, 1e-12)


# --- errors name the culprit --------------------------------------------------------------------


@pytest.mark.parametrize("make, match", [
    (lambda: sb.conv2d(sb.tensor("X", N, 8, 8), sb.tensor("K", 2, 1, 3, 3)),
     r"image X must be N×C×H×W \(rank 4\), got N×8×8 \(rank 3\)"),
    (lambda: sb.conv2d(sb.tensor("X", N, 1, 8, 8), sp.MatrixSymbol("K", 3, 3)),
     r"kernel K must be F×C×kh×kw"),
    (lambda: sb.conv2d(sb.tensor("X", N, 3, 8, 8), sb.tensor("K", 2, 1, 3, 3)),
     r"kernel K \(2×1×3×3\) has 1 input channels, the image X \(N×3×8×8\) has 3"),
    (lambda: sb.conv2d(sb.tensor("X", N, 1, 4, 4), sb.tensor("K", 2, 1, 7, 7), padding=1),
     r"K's 7×7 window is larger than the padded image X"),
    (lambda: sb.conv2d(sb.tensor("X", N, 1, 4, 4), sb.tensor("K", 2, 1, 3, 3), stride=0),
     r"stride must be an integer ≥ 1, got 0"),
    (lambda: sb.conv2d(sb.tensor("X", N, 1, 4, 4), sb.tensor("K", 2, 1, 3, 3), stride=1.5),
     r"stride must be an integer ≥ 1, got 1.5"),
    (lambda: sb.conv2d(sb.tensor("X", N, 1, 4, 4), sb.tensor("K", 2, 1, 3, 3), padding=-1),
     r"padding must be an integer ≥ 0, got -1"),
    (lambda: sb.conv2d(sb.tensor("X", N, 1, 4, 4), sb.tensor("K", 2, 1, 3, 3),
                       sp.MatrixSymbol("b", 1, 3)),
     r"bias b must hold one entry per filter, shape 1×2 or 2, got 1×3"),
    (lambda: sb.conv2d(sb.tensor("X", N, 1, sp.Symbol("H"), 4), sb.tensor("K", 2, 1, 3, 3)),
     r"axis 2 of X .* must be a fixed size, not H"),
    (lambda: sb.max_pool2d(sb.tensor("X", N, 1, 4, 4), 5),
     r"max_pool2d.*5×5 window is larger than the 4×4 image X"),
    (lambda: sb.avg_pool2d(sb.tensor("X", N, 4, 4), 2),
     r"avg_pool2d: X must be N×C×H×W \(rank 4\), got N×4×4"),
    (lambda: sb.max_pool2d(sb.tensor("X", N, 1, 4, 4), 2, stride=True),
     r"max_pool2d: the stride must be an integer ≥ 1, got True"),
    (lambda: sb.max_pool2d(sp.Symbol("x"), 2), r"the image must be an array"),
])
def test_bad_input_is_named(make, match):
    with pytest.raises(ShapeError, match=match):
        make()


def test_verify_checks_the_gradient_heads():
    from symbp.heads.conv import Conv2dGradInput, Conv2dGradKernel
    from symbp.heads.pool import MaxPool2dGrad

    X, K = sb.tensor("X", N, 1, 4, 4), sb.tensor("K", 2, 1, 3, 3)
    R = sb.tensor("R", N, 2, 2, 2)  # the 2×2 output of padding 0, not 1
    for e in (Conv2dGradInput(R, K, X.shape, 1, 1), Conv2dGradKernel(R, X, K.shape, 1, 1)):
        with pytest.raises(ShapeError, match=r"δ R is N×2×2×2, the convolution's output is "
                                             r"N×2×4×4 in `t\d+ = "):
            sb.verify(sb.lower(Total(e)))
    sb.verify(sb.lower(Total(Conv2dGradKernel(R, X, K.shape, 1, 0))))  # padding 0 fits
    with pytest.raises(ShapeError, match="pooling's output is N×2×3×3"):
        sb.verify(sb.lower(Total(MaxPool2dGrad(R, sb.tensor("H", N, 2, 6, 6), 2, 2))))


def test_lecture_example_runs(capsys):
    import runpy

    path = Path(__file__).resolve().parent.parent / "examples" / "cnn_lecture.py"
    runpy.run_path(str(path))["main"](["--format", "all"])
    out = capsys.readouterr().out
    assert "All gradients agree with central differences." in out
    assert "∂L/∂X = Δ₁ ⋆[full, p=1] rot180(K)" in out  # text
    assert r"\operatorname{rot180}" in out and "| $" in out  # LaTeX and Markdown


@pytest.mark.parametrize("opt", [sb.SGD(0.1), sb.Momentum(0.1, 0.9), sb.Adam(0.01)],
                         ids=["sgd", "momentum", "adam"])
def test_a_fused_training_step_updates_kernels(opt):
    # the compiled step (forward, backward, update in one call) against the reference
    # update of symbp.optim applied to the compiled gradients, three steps
    from symbp import optim

    L, wrt, data = cnn()
    ps = [w for w in wrt if w.name != "X"]
    step = sb.compile_step(L, ps, opt, target="cpu")
    grad = sb.compile(L, ps, target="numpy")
    got = {w.name: np.ascontiguousarray(data[w.name]) for w in ps}
    want = {k: v.copy() for k, v in got.items()}
    state = optim.init_state(opt, want)
    for _ in range(3):
        loss = step(got, X=data["X"], T=data["T"])
        value, g = grad(**want, X=data["X"], T=data["T"])
        assert loss == pytest.approx(value, rel=1e-12)
        optim.update(opt, want, g, state)
    for k in want:
        close(got[k], want[k], 1e-12)


def _lecture_example():
    import runpy

    return runpy.run_path(str(Path(__file__).resolve().parent.parent / "examples"
                              / "cnn_lecture.py"))


def test_lecture_numbers_equal_torch():
    torch, m = _torch(), _lecture_example()
    F = torch.nn.functional
    at = m["numbers"]()
    d = m["derive"](m["LOSS"], m["PARAMS"], at=at)
    t = {k: torch.tensor(v, requires_grad=k != "T") for k, v in at.items()}
    Z1 = F.conv2d(t["X"], t["K"], t["b"].reshape(-1), padding=1)
    Z3 = F.max_pool2d(F.relu(Z1), 2).flatten(1) @ t["W"] + t["c"]
    L = -(t["T"] * torch.log_softmax(Z3, 1)).sum()
    L.backward()
    assert d.forward[-1].value == pytest.approx(float(L.detach()), rel=1e-12)
    close(d.forward[0].value, Z1.detach().numpy(), 1e-12)
    for w in m["PARAMS"]:
        close(d.gradient(w), t[w.name].grad.numpy(), 1e-12)


def test_lecture_latex_renders_with_katex():
    from test_printing import katex_errors

    m = _lecture_example()
    at = m["numbers"]()
    d = m["derive"](m["LOSS"], m["PARAMS"], at=at)
    f = m["matrix_formulas"](m["LOSS"], m["PARAMS"])
    formulas = [d.latex(), f.latex()]
    assert katex_errors(formulas) == [None] * len(formulas)


def test_every_conv_and_pool_head_has_its_rules():
    from symbp.heads import REGISTRY
    from symbp.heads.conv import Conv2d, Conv2dGradInput, Conv2dGradKernel
    from symbp.heads.pool import AvgPool2d, AvgPool2dGrad, MaxPool2d, MaxPool2dGrad

    for cls in (Conv2d, Conv2dGradInput, Conv2dGradKernel, MaxPool2d, MaxPool2dGrad,
                AvgPool2d, AvgPool2dGrad):
        h = REGISTRY[cls]
        for field in ("lower", "check", "numpy", "cpu", "label"):
            assert getattr(h, field) is not None, (cls.__name__, field)
        # CUDA has no rule: its maps are 2-D only, and it says so before compiling
        assert h.cuda is None
    for cls in (Conv2d, MaxPool2d, AvgPool2d):
        assert REGISTRY[cls].vjp is not None


def test_the_graph_labels_the_heads():
    from symbp.printing.graph import to_dot

    X, K = sb.tensor("X", N, 1, 4, 4), sb.tensor("K", 2, 1, 3, 3)
    dot = to_dot(Total(sb.avg_pool2d(sb.conv2d(X, K, padding=1), 2)), wrt=[K])
    assert '"⋆ (p=1)"' in dot and '"avgpool2"' in dot and '"X  N×1×4×4"' in dot


def test_operands_of_star_are_bracketed_when_they_bind_looser():
    X, K = sb.tensor("X", N, 1, 4, 4), sb.tensor("K", 2, 1, 3, 3)
    B = sb.tensor("B", 1, 1, 4, 4)
    assert str(sb.conv2d(sb.relu(X), K)) == "relu(X) ⋆ K"
    assert str(sb.conv2d(X + B, K, stride=2)) == "(B + X) ⋆[s=2] K"
    assert sp.latex(sb.avg_pool2d(sb.conv2d(X * B, K), 2)) == \
        r"\operatorname{avgpool}_{2}\left(\left(B \circ X\right) \star K\right)"
    assert str(sb.max_pool2d(X, 3, 1)) == "maxpool3[s=1](X)"
    # the pretty printer too (it took a symbp Tensor for a sympy.tensor.Tensor)
    assert sp.pretty(sb.conv2d(sb.relu(X), K, padding=1)) == "relu(X) ⋆[p=1] K"
    assert sp.pretty(sb.flatten(sb.max_pool2d(X, 2))) == "flatten(maxpool2(X))"
