"""Optimizers are defined once, as formulas (``symbp.optim``): the NumPy reference, the
update fused into the compiled step and the flat-buffer update of data-parallel training
all evaluate the same rule.  A new optimizer written only in the test must work on every
path; the layering that keeps backends free of the optimizers is checked from the
sources' imports."""

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from conftest import have

import symbp as sb
from symbp import optim
from symbp.errors import SymbpError
from symbp.optim import g, w

NEEDS_CPU = pytest.mark.needs(have("numba"), "numba")
SYMBP = Path(sb.__file__).resolve().parent

# --- layering ------------------------------------------------------------------------------


def _imports(path: Path, src: str | None = None) -> list[tuple[str, str]]:
    """(module, name) for every import in the file (anywhere in it), relative ones
    resolved against the file's package."""
    package = path.relative_to(SYMBP.parent).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if src is None else src)):
        if isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = list(package[:len(package) - node.level + 1])
                base = ".".join(parts + ([node.module] if node.module else []))
            out += [(base, a.name) for a in node.names]
    return out


def _layer_breaks(path: Path, src: str | None = None) -> list[str]:
    """The imports of symbp.api or symbp.optim (or anything in them) in a file."""
    out = []
    for m, n in _imports(path, src):
        for target in ("symbp.api", "symbp.optim"):
            if m == target or m.startswith(target + ".") or f"{m}.{n}" == target:
                out.append(f"{m}.{n}" if n else m)
    return out


@pytest.mark.parametrize("path", sorted((SYMBP / "backends").glob("*.py")), ids=lambda p: p.name)
def test_backends_import_neither_api_nor_optim(path):
    # a backend prints code for a Program (and an optimizer's rule, handed to it as data)
    assert not _layer_breaks(path), f"{path.name} imports {_layer_breaks(path)}"


@pytest.mark.parametrize("src", ["from .. import optim", "from ..api import bind_inputs",
                                 "import symbp.optim", "from symbp import api as sb",
                                 "def f():\n    from ..optim import SGD"])
def test_the_layering_check_sees_every_spelling(src):
    assert _layer_breaks(SYMBP / "backends" / "numba_cpu.py", src)
    assert not _layer_breaks(SYMBP / "backends" / "numba_cpu.py", "from .. import cache")


def test_runtime_is_apart_from_code_generation():
    # the runtime drives compiled kernels; only the flat update asks a backend for one, and
    # the thread count is set on the library the kernels' gemm calls (blas.py, no printing)
    for path in sorted((SYMBP / "runtime").glob("*.py")):
        gen = {m for m, _ in _imports(path) if m.startswith("symbp.backends")}
        assert gen <= {"symbp.backends.numba_cpu", "symbp.backends.blas"}, (path.name, gen)
    src = (SYMBP / "backends" / "numba_cpu.py").read_text()
    for name in ("class FusedStep", "class _Workspace", "class _ThreadTuner", "class _Blas",
                 "isinstance(opt"):
        assert name not in src


def test_printing_imports_no_private_name_from_api():
    bad = [(p.name, n) for p in sorted((SYMBP / "printing").glob("*.py"))
           for m, n in _imports(p) if m == "symbp.api" and n.startswith("_")]
    assert not bad


# --- one rule, every path ------------------------------------------------------------------

rho = sp.Symbol("rho")


@dataclass(frozen=True)
class RMSprop(optim.Optimizer):
    """v ← ρ v + (1 − ρ) g²;  w ← w − lr g / (√v + ε): defined here and nowhere else."""

    buffers = ("v",)
    update = ((optim.v, rho * optim.v + (1 - rho) * g * g),
              (w, w - optim.lr * g / (sp.sqrt(optim.v) + optim.eps)))
    lr: float = 0.01
    rho: float = 0.9
    eps: float = 1e-8


@dataclass(frozen=True)
class DecayedSGD(optim.Optimizer):
    """w ← (1 − lr·λ) w − lr g: SGD with weight decay, of the form x ← α x + γ g."""

    update = ((w, (1 - optim.lr * sp.Symbol("wd")) * w - optim.lr * g),)
    lr: float = 0.1
    wd: float = 0.01


def rmsprop_by_hand(opt, p, grads, v):
    v = opt.rho * v + (1 - opt.rho) * grads**2
    return p - opt.lr * grads / (np.sqrt(v) + opt.eps), v


def test_reference_update_of_a_new_optimizer():
    rng = np.random.default_rng(0)
    opt = RMSprop(lr=0.05)
    p = {"W": rng.standard_normal((3, 4)), "b": np.array(0.5)}
    want = {k: (a.copy(), np.zeros_like(a)) for k, a in p.items()}
    state = optim.init_state(opt, p)
    for _ in range(3):
        grads = {"W": rng.standard_normal((3, 4)), "b": np.float64(rng.standard_normal())}
        optim.update(opt, p, grads, state)
        want = {k: rmsprop_by_hand(opt, *want[k][:1], grads[k], want[k][1]) for k in p}
    for k in p:
        np.testing.assert_allclose(p[k], want[k][0], rtol=1e-14, err_msg=k)
        np.testing.assert_allclose(state["v"][k], want[k][1], rtol=1e-14, err_msg=k)
    assert state["t"] == 3


def mlp_loss():
    N = sp.Symbol("N")
    X, T = sp.MatrixSymbol("X", N, 6), sp.MatrixSymbol("T", N, 3)
    W1, b1 = sp.MatrixSymbol("W1", 6, 5), sp.MatrixSymbol("b1", 1, 5)
    W2, b2 = sp.MatrixSymbol("W2", 5, 3), sp.MatrixSymbol("b2", 1, 3)
    H = sb.tanh(sb.dense(X, W1, b1))
    return sb.softmax_cross_entropy(sb.dense(H, W2, b2), T), [W1, b1, W2, b2]


@NEEDS_CPU
@pytest.mark.parametrize("opt", [RMSprop(0.02), DecayedSGD(0.2, 0.05)],
                         ids=["rmsprop", "decayed_sgd"])
def test_a_new_optimizer_is_fused_into_the_compiled_step(opt):
    f, params = mlp_loss()
    step = sb.compile_step(f, params, opt, target="cpu", dtype=np.float64)
    ref = sb.compile_step(f, params, opt, target="numpy", dtype=np.float64)
    rng = np.random.default_rng(3)
    p1 = {"W1": rng.standard_normal((6, 5)), "b1": rng.standard_normal((1, 5)),
          "W2": rng.standard_normal((5, 3)), "b2": rng.standard_normal((1, 3))}
    p2 = {k: v.copy() for k, v in p1.items()}
    X = rng.standard_normal((16, 6))
    T = np.eye(3)[rng.integers(0, 3, 16)]
    for _ in range(5):
        np.testing.assert_allclose(step(p1, X=X, T=T), ref(p2, X=X, T=T), rtol=1e-12)
    for k in p1:
        np.testing.assert_allclose(p1[k], p2[k], rtol=1e-11, atol=1e-13, err_msg=k)
    for b in opt.buffers:
        for k in p1:
            np.testing.assert_allclose(step.state[b][k], ref.state[b][k], rtol=1e-11,
                                       atol=1e-13)
    # x ← α x + γ g is one gemm with a stored-nowhere gradient; RMSprop reads g twice
    fused = "added into the update by BLAS" in step.source
    assert fused == isinstance(opt, DecayedSGD)


@NEEDS_CPU
@pytest.mark.parametrize("opt", [sb.SGD(0.3), sb.Momentum(0.1, 0.8), sb.Adam(0.01),
                                 RMSprop(0.02)], ids=["sgd", "momentum", "adam", "rmsprop"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale,parts", [(1.0, 1), (0.5, 2), (1 / 3, 3)])
def test_flat_update_gives_the_reference_bits(opt, dtype, scale, parts):
    # the data-parallel update over concatenated parameters, against optim.update of the
    # scaled gradient (the kernel scales by the last of its float64 words); with several
    # rows of gradient (the ranks' parts in shared memory) the gradient is their sum in
    # row order, and each entry is kept in the backup before it changes
    from symbp.backends.numba_cpu import build_update

    rng = np.random.default_rng(5)
    sizes = {"W": (4, 3), "b": (1, 3)}
    flat = rng.standard_normal(15).astype(dtype)
    ref = {"W": flat[:12].reshape(4, 3).copy(), "b": flat[12:].reshape(1, 3).copy()}
    state = optim.init_state(opt, ref)
    bufs = [np.zeros(15, dtype) for _ in opt.buffers]
    kern = build_update(opt.rule, dtype, parts)
    backup = np.zeros(15, dtype)
    for t in range(1, 4):
        G = rng.standard_normal((parts, 15)).astype(dtype)
        total = G[0].copy()
        for row in G[1:]:
            total = total + row
        gs = total * dtype(scale)
        optim.update(opt, ref, {"W": gs[:12].reshape(sizes["W"]),
                                "b": gs[12:].reshape(sizes["b"])}, state)
        before = flat.copy()
        assert kern(flat, G, backup, *bufs, np.append(optim.hyper(opt), scale), t) is True
        np.testing.assert_array_equal(backup, before)
    np.testing.assert_array_equal(flat, np.concatenate([ref["W"].ravel(), ref["b"].ravel()]))
    for b, a in zip(opt.buffers, bufs):
        np.testing.assert_array_equal(
            a, np.concatenate([state[b]["W"].ravel(), state[b]["b"].ravel()]))


@NEEDS_CPU
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_flat_update_says_when_an_entry_is_not_finite(bad):
    # fit's guard reads this flag instead of its own pass over the parameters; without
    # a backup (an empty one) nothing is kept
    from symbp.backends.numba_cpu import build_update

    kern = build_update(optim.rule(sb.SGD(0.1)), np.float64)
    w = np.ones(5)
    G = np.zeros((1, 5))
    f64 = np.array([0.1, 1.0])
    assert kern(w, G, np.empty(0), f64, 1) is True
    G[0, 3] = bad
    assert kern(w, G, np.empty(0), f64, 2) is False
    assert not np.isfinite(w[3]) and np.isfinite(np.delete(w, 3)).all()
    with pytest.raises(ValueError, match="buffer sizes"):  # a short gradient is refused
        kern(w, G[:, :4], np.empty(0), f64, 3)


# --- mistakes in a rule are named ----------------------------------------------------------


def test_a_formula_reading_an_unknown_name_is_refused():
    @dataclass(frozen=True)
    class Bad(optim.Optimizer):
        update = ((w, w - optim.lr * g * sp.Symbol("momentum")),)
        lr: float = 0.1

    with pytest.raises(SymbpError, match=r"Bad.update: w = .* reads \['momentum'\]"):
        optim.rule(Bad())


def test_formulas_below_the_fields_are_refused():
    # in a class body the field `lr: float = 0.1` rebinds `lr`: a formula below it would
    # hold the number 0.1, and a learning-rate change would be silently ignored
    lr = optim.lr

    @dataclass(frozen=True)
    class Late(optim.Optimizer):
        lr: float = 0.1
        update = ((w, w - lr * g),)

    assert lr == sp.Symbol("lr")
    with pytest.raises(SymbpError, match=r"no formula reads the hyperparameter\(s\) \['lr'\]"):
        optim.rule(Late())


def test_a_rule_cannot_overwrite_a_hyperparameter():
    # printed into the kernel, `lr = ...` inside the loop would change the learning rate
    # of every later entry
    @dataclass(frozen=True)
    class Clobber(optim.Optimizer):
        update = ((optim.lr, optim.lr * 0.5), (w, w - optim.lr * g))
        lr: float = 0.1

    with pytest.raises(SymbpError, match="Clobber: lr is assigned"):
        optim.rule(Clobber())


def test_not_an_optimizer():
    with pytest.raises(SymbpError, match="unknown optimizer"):
        optim.rule("adam")


@NEEDS_CPU
def test_a_compiled_step_keeps_its_kind_of_optimizer():
    f, params = mlp_loss()
    step = sb.compile_step(f, params, sb.Momentum(0.1, 0.9), target="cpu")
    step.optimizer = sb.Momentum(0.05, 0.5)
    np.testing.assert_array_equal(step.hyper, [0.05, 0.5])
    with pytest.raises(SymbpError, match="compiled for Momentum, not Adam"):
        step.optimizer = sb.Adam()
