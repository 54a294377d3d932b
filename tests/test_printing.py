"""Derivations and matrix formulas: right numbers, real LaTeX, textbook form, linear size.

Every case in CASES is derived with numbers; its printed rows are re-evaluated and compared
with the gradient Program, its gradients with sb.compile and with central differences, and
its LaTeX is rendered by KaTeX (node + tools/katex, installed by `npm install` there).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from conftest import need

import symbp as sb
from symbp.errors import ShapeError, SymbpError
from symbp.printing import derive, matrix_formulas
from symbp.printing.formulas import _checked_shape
from symbp.printing.tex import name_latex, name_text, tex

KATEX_DIR = Path(__file__).resolve().parent.parent / "tools" / "katex"

w, x, b, t, y, u, v = sp.symbols("w x b t y u v", real=True)
N = sp.Symbol("N")
X = sp.MatrixSymbol("X", N, 3)
W1, b1 = sp.MatrixSymbol("W1", 3, 4), sp.MatrixSymbol("b1", 1, 4)
W2, b2 = sp.MatrixSymbol("W2", 4, 2), sp.MatrixSymbol("b2", 1, 2)
T2 = sp.MatrixSymbol("T", N, 2)


def _scalar_net(depth, width=2, act=sb.tanh):
    """A width×depth scalar tanh network with a squared-error loss (shared hidden values)."""
    h = [sp.Symbol(f"x_{i}", real=True) for i in range(width)]
    params = []
    for layer in range(1, depth + 1):
        new = []
        for j in range(width):
            ws = [sp.Symbol(f"w{layer}_{j}{i}", real=True) for i in range(width)]
            bj = sp.Symbol(f"b{layer}_{j}", real=True)
            params += ws + [bj]
            new.append(act(sum(wi * hi for wi, hi in zip(ws, h)) + bj))
        h = new
    return (sum(h) - t) ** 2 / 2, params


def _mlp_sce():
    H = sb.sigmoid(sb.dense(X, W1, b1))
    return sb.softmax_cross_entropy(sb.dense(H, W2, b2), T2), [W1, b1, W2, b2]


def _mlp_mse():
    H = sb.tanh(sb.dense(X, W1, b1))
    return sb.mse(sb.leaky_relu(sb.dense(H, W2, b2)), T2), [W1, b1, W2, b2]


def _bce():
    W = sp.MatrixSymbol("W", 3, 2)
    return sb.bce_with_logits(sb.dense(X, W, b2), T2), [W, b2]


def _softmax_mse():
    W = sp.MatrixSymbol("W", 3, 2)
    return sb.mse(sb.softmax(X * W), T2), [W]


def _log_softmax_ce():
    W = sp.MatrixSymbol("W", 3, 2)
    LS = sb.log_softmax(X * W)
    return -sb.Total(sb.matrix.elementwise(lambda a, c: a * c, T2, LS)) / N, [W]


# name -> (builder of (f, wrt)); numbers are drawn per input below
CASES = {
    "neuron": lambda: ((sb.sigmoid(w * x + b) - t) ** 2 / 2, [w, b]),
    "sum": lambda: (x + y, [x, y]),
    "chain": lambda: (sp.sin(x**2), [x]),
    "shared": lambda: (x * x + sp.exp(x) * w, [x, w]),
    "relu": lambda: ((sb.relu(w * x + b) - t) ** 2, [w, b]),
    "leaky": lambda: ((sb.leaky_relu(w * x + b, 0.1) - t) ** 2, [w, b]),
    "elu": lambda: (sb.elu(w * x + b) * t, [w, b]),
    "softplus": lambda: (sb.softplus(w * x) - t * w, [w]),
    "softmax3": lambda: (-sp.log(sb.softmax([u, v, w])[0]), [u, v, w]),
    "tanh_net": lambda: _scalar_net(2),
    "mlp_sce": _mlp_sce,
    "mlp_mse": _mlp_mse,
    "bce": _bce,
    "softmax_mse": _softmax_mse,
    "log_softmax": _log_softmax_ce,
}


def _numbers(f, wrt, rng):
    p = sb.gradient_program(f, wrt)
    at = {}
    for s in p.inputs:
        if isinstance(s, sp.MatrixSymbol):
            r = 5 if s.shape[0] == N else int(s.shape[0])
            at[s.name] = rng.normal(size=(r, int(s.shape[1])))
        else:
            at[s.name] = float(rng.normal())
    if "T" in at:
        at["T"] = np.eye(at["T"].shape[1])[rng.integers(0, at["T"].shape[1], at["T"].shape[0])]
    return at


def katex_errors(formulas):
    """KaTeX's verdict on each formula: None when it renders."""
    node = shutil.which("node")
    need(node is not None and (KATEX_DIR / "node_modules" / "katex").exists(), "katex",
         "no node" if node is None else f"no {KATEX_DIR / 'node_modules' / 'katex'}")
    r = subprocess.run([node, str(KATEX_DIR / "check.js")], input=json.dumps(formulas),
                       capture_output=True, text=True, timeout=60, check=True)
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def derived():
    rng = np.random.default_rng(7)
    out = {}
    for name, make in CASES.items():
        f, wrt = make()
        at = _numbers(f, wrt, rng)
        out[name] = (f, wrt, at, derive(f, wrt, at=at))
    return out


@pytest.mark.parametrize("name", CASES)
def test_numbers_agree_with_compile_and_central_differences(derived, name):
    f, wrt, at, d = derived[name]
    fn = sb.compile(f, wrt)
    value, grads = fn(**at)
    loss_row = [r for r in d.forward if r.prog == d.program.outputs[0]][0]
    assert np.isclose(float(loss_row.value), value, rtol=1e-12)
    eps = 1e-6
    for ws in wrt:
        g = np.asarray(d.gradient(ws), dtype=float)
        np.testing.assert_allclose(g, np.asarray(grads[ws.name]), rtol=1e-10, atol=1e-12)
        base = np.array(at[ws.name], dtype=float)
        flat = base.reshape(-1)
        for i in range(min(flat.size, 4)):  # a few entries by central differences
            hi, lo = flat.copy(), flat.copy()
            hi[i] += eps
            lo[i] -= eps
            fh = fn(**{**at, ws.name: hi.reshape(base.shape)})[0]
            fl = fn(**{**at, ws.name: lo.reshape(base.shape)})[0]
            assert abs((fh - fl) / (2 * eps) - g.reshape(-1)[i]) < 1e-5 * max(1, abs(fh))


@pytest.mark.parametrize("name", CASES)
def test_printed_rows_evaluate_to_the_program_values(derived, name):
    # the printed upstream × local formulas are an independent chain rule (display rules):
    # re-evaluated with the numbers, each must give what the gradient Program computed
    f, wrt, _, d = derived[name]
    assert d.check() < 1e-9
    # one gradient row per wrt, in order, and every row carries the number it was checked on
    assert [r.prog for r in d.gradients] == list(wrt)
    assert all(r.value is not None for r in d.forward)
    assert all(r.grad is not None for r in d.backward + d.gradients)
    # check() really compares: a row with a nonzero value made 3× too big is reported
    row = next(r for r in d.backward + d.gradients if np.any(np.asarray(r.grad) != 0))
    saved, row.expr = row.expr, 3 * row.expr
    try:
        with pytest.raises(SymbpError, match="derivation row"):
            d.check()
    finally:
        row.expr = saved


@pytest.mark.parametrize("name", [n for n in CASES if n in ("neuron", "chain", "shared",
                                                              "softplus", "softmax3", "relu")])
def test_scalar_gradients_match_sympy_diff(derived, name):
    f, wrt, at, d = derived[name]
    sub = {s: at[s.name] for s in f.free_symbols}
    for ws in wrt:
        ref = sp.diff(f, ws)
        ref = ref.rewrite(sp.exp) if ref.has(sb.sigmoid) else ref
        want = float(sp.N(ref.subs(sub)))
        assert d.gradient(ws) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_latex_renders_with_katex(derived):
    formulas = []
    for f, wrt, _, d in derived.values():
        formulas.append(d.latex())
        formulas.append(derive(f, wrt).latex())  # without numbers too
    for make in (_mlp_sce, _mlp_mse, _bce):
        formulas.append(matrix_formulas(*make()).latex())
    formulas.append(derive(*_scalar_net(3, 3)).latex())
    W = sp.MatrixSymbol("W1", 2, 2)
    formulas += [tex(W[0, 0]), tex(sp.Symbol("W1_00")), name_latex("alpha_2")]
    errors = katex_errors(formulas)
    bad = [(f[:200], e) for f, e in zip(formulas, errors) if e]
    assert not bad, bad


def test_katex_rejects_broken_latex():
    # the renderer really checks: a broken formula is reported
    errs = katex_errors([r"\frac{1}{", r"x^{2}"])
    assert errs[0] and errs[1] is None


def test_neuron_reads_like_the_textbook(derived):
    *_, d = derived["neuron"]
    text = d.text()
    for line in ("z = w·x + b", "y = σ(z)", "L = (y − t)²/2", "∂⁺L/∂y = y − t",
                 "∂⁺L/∂z = ∂⁺L/∂y · y·(1 − y)", "∂L/∂w = ∂⁺L/∂z · x", "∂L/∂b = ∂⁺L/∂z"):
        assert line in text, (line, text)
    # rows in evaluation order, forward value and gradient on each
    assert [d.names.text(r.sym) for r in d.forward] == ["z", "y", "L"]
    assert all(r.value is not None for r in d.forward)
    assert all(r.grad is not None for r in d.backward + d.gradients)
    lx = d.latex()
    assert lx.startswith(r"\begin{align*}") and lx.endswith(r"\end{align*}")
    assert r"\frac{\partial^{+} L}{\partial z} &= \frac{\partial^{+} L}{\partial y} \cdot" in lx
    md = d.markdown()
    assert md.count("\n|---|") == 3 and "| $z$ | $w x + b$ |" in md
    assert d._repr_latex_().startswith("$$") and d._repr_markdown_() == md


def test_tanh_derivative_in_terms_of_its_value():
    d = derive((sb.tanh(w * x) - t) ** 2, [w])
    assert "∂⁺L/∂z = ∂⁺L/∂y · (1 − y²)" in d.text()


def test_chain_rule_on_f_of_g():
    d = derive(sp.sin(x**2), [x], loss="f")
    text = d.text()
    assert "z = x²" in text and "f = sin(z)" in text
    assert "∂⁺f/∂z = cos(z)" in text and "∂f/∂x = ∂⁺f/∂z · 2·x" in text


def test_shared_value_sums_its_users():
    d = derive(x * x + sp.exp(x) * w, [x])
    row = d.gradients[0]
    assert len(row.terms) == 2  # x feeds the square and the exponential: two ordered terms


def test_matrix_derivation_and_delta_rule():
    f, wrt = _mlp_sce()
    text = derive(f, wrt).text()
    for line in ("Z₁ = X W₁ + 𝟏b₁", "H₁ = σ(Z₁)", "Z₂ = H₁ W₂ + 𝟏b₂", "Y = softmax(Z₂)",
                 "Δ₂ = (Y ⊙ (T𝟏)𝟏ᵀ − T)/N", "∂⁺L/∂H₁ = Δ₂ W₂ᵀ", "Δ₁ = ∂⁺L/∂H₁ ⊙ H₁ ⊙ (1 − H₁)"):
        assert line in text, (line, text)
    F = matrix_formulas(f, wrt)
    ft = F.text()
    # T𝟏 (the targets' row sums) stays: (Y − T)/N holds only where every row sums to 1
    for line in ("Δ₂ = (Y ⊙ (T𝟏)𝟏ᵀ − T)/N", "Δ₁ = (Δ₂ W₂ᵀ) ⊙ σ′(Z₁)", "σ′(Z₁) = H₁ ⊙ (1 − H₁)",
                 "∂L/∂W₁ = Xᵀ Δ₁", "∂L/∂b₁ = 𝟏ᵀΔ₁", "∂L/∂W₂ = H₁ᵀ Δ₂", "∂L/∂b₂ = 𝟏ᵀΔ₂",
                 "∂L/∂W₁[k,l] = Σₙ X[n,k]·Δ₁[n,l]", "∂L/∂b₂[l] = Σₙ Δ₂[n,l]",
                 "Δ₂[n,l] = (Y[n,l]·Σₘ T[n,m] − T[n,l])/N"):
        assert line in ft, (line, ft)
    shapes = {F.names.text(r.lhs): r.shape for r in F.rows}
    assert shapes["∂L/∂W₁"] == (3, 4) and shapes["Δ₂"] == (N, 2)
    for r in F.rows:
        if r.index is not None:
            s = sp.srepr(r.index)
            assert "KroneckerDelta" not in s and "Piecewise" not in s


def test_tanh_and_leaky_relu_formulas():
    F = matrix_formulas(*_mlp_mse())
    ft = F.text()
    assert "tanh′(Z₁) = 1 − H₁^∘²" in ft and "Δ₁ = (Δ₂ W₂ᵀ) ⊙ tanh′(Z₁)" in ft
    assert all("Piecewise" not in sp.srepr(r.index) for r in F.rows if r.index is not None)


def test_shapes_are_checked():
    with pytest.raises(ShapeError, match="W1"):
        _checked_shape(W1, sp.MatMul(X.T, T2))  # 3×2, not 3×4


def test_indexed_names():
    assert name_latex("W1_00") == "W_{1,00}" and name_text("W1_00") == "W₁,₀₀"
    assert name_latex("W1") == "W_{1}" and name_latex("alpha") == r"\alpha"
    assert tex(sp.MatrixSymbol("W1", 2, 2)[0, 0]) == "W_{1,00}"
    assert tex(sp.Symbol("W1_00")) != "W_{1 00}"


def _latex_size(depth):
    return len(derive(*_scalar_net(depth, 2)).latex())


def test_latex_is_linear_in_depth():
    s2, s4, s8 = _latex_size(2), _latex_size(4), _latex_size(8)
    # named intermediates: each layer adds the same amount of LaTeX
    assert abs((s8 - s4) - 2 * (s4 - s2)) < 0.05 * s8, (s2, s4, s8)


def test_errors_name_the_culprit():
    with pytest.raises(SymbpError, match="missing .*t"):
        derive((sb.sigmoid(w * x + b) - t) ** 2, [w], at={"w": 1, "x": 2, "b": 0})
    with pytest.raises(SymbpError, match="not an input"):
        derive(w * x, [w], at={"w": 1, "x": 2, "q": 0})
    with pytest.raises(SymbpError, match="MatrixSymbols"):
        matrix_formulas(w * x, [w])
    with pytest.raises(SymbpError, match="needs numbers"):
        derive(w * x, [w]).check()


def test_import_symbp_stays_light():
    code = ("import sys, symbp as sb; sb.derive; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'graphviz')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_lecture_example_runs_end_to_end(capsys):
    # examples/lecture.py asserts the chapter's facts itself (σ′ ≤ 1/4, Σ softmax = 1,
    # softmax + cross-entropy gives y − t, gradient check); here it must run through
    import runpy

    path = Path(__file__).resolve().parent.parent / "examples" / "lecture.py"
    lecture = runpy.run_path(str(path))
    lecture["main"](["--format", "md"])
    out = capsys.readouterr().out
    assert "All sections reproduced." in out and "| $\\Delta_{2}$ |" in out


# --- singular points: the table shows ±∞ and NaN, no warning leaks -------------------------

# (f, x0, value, derivative): NumPy's IEEE answers, the maths' limits where they exist
SINGULAR = [
    (sp.log(x), 0.0, -np.inf, np.inf),
    (1 / x, 0.0, np.inf, -np.inf),
    (sp.sqrt(x), -1.0, np.nan, np.nan),
    (sp.sqrt(x), 0.0, 0.0, np.inf),
    (sb.sigmoid(w * sp.log(x)), 0.0, 0.0, np.nan),  # σ(−∞) = 0; 0·∞ in d/dw: undefined
]


@pytest.mark.parametrize("f, x0, value, slope", SINGULAR, ids=lambda v: str(v)[:20])
def test_derive_at_a_singular_point(f, x0, value, slope):
    import warnings

    at = {s: (x0 if s == x else 1.0) for s in f.free_symbols}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning quoting generated code fails here
        d = derive(f, sorted(f.free_symbols, key=str), at=at)
        text = d.text()
    np.testing.assert_equal(float(d.forward[-1].value), value)
    np.testing.assert_equal(float(d.gradient("x")), slope)
    shown = {np.inf: "∞", -np.inf: "−∞"}
    for v in (value, slope):
        assert (shown.get(v, "NaN") if not np.isfinite(v) else "") in text, text
    # one line says where the numbers stop being finite
    note = [line for line in text.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "x = " in note[0] and "there" in note[0], text
    assert d.note in d.markdown() and d.note in d.latex()


def test_finite_derivation_has_no_note():
    d = derive(sp.log(x), [x], at={x: 2.0})
    assert d.note == "" and "note" not in d.text()
    assert float(d.gradient(x)) == pytest.approx(0.5)


def test_infinities_in_tex_and_matrices():
    from symbp.printing.derive import format_value

    assert format_value(-np.inf, "tex") == r"-\infty"
    assert format_value(np.nan, "tex") == r"\text{NaN}"
    assert format_value(np.array([[np.inf, 1.0]])) == "[∞ 1]"


# --- a Derivation in a REPL, IPython and a notebook -----------------------------------------


def test_repr_names_what_is_derived_and_the_gradients():
    f = (sb.sigmoid(w * x + b) - t) ** 2 / 2
    d = derive(f, [w, b], at={w: 0.5, x: 1.0, b: 0.1, t: 1.0})
    r = repr(d)
    assert "object at 0x" not in r and r.startswith("<Derivation of L = ")
    assert "with respect to w, b" in r and "∂L/∂w = " in r and "∂L/∂b = " in r
    gw = float(sp.diff(f, w).subs({w: 0.5, x: 1.0, b: 0.1, t: 1.0}))
    assert f"{gw:.4g}" in r, (gw, r)
    assert len(r.splitlines()) == 3  # short: a header and one line per gradient
    assert "∂L/∂w = " in repr(derive(f, [w]))  # without numbers too


def test_repr_pretty_and_html():
    d = derive((sb.sigmoid(w * x + b) - t) ** 2 / 2, [w, b],
               at={w: 0.5, x: 1.0, b: 0.1, t: 1.0})

    class Printer:  # IPython's RepresentationPrinter, as far as _repr_pretty_ uses it
        def __init__(self):
            self.out = ""

        def text(self, s):
            self.out += s

    p = Printer()
    d._repr_pretty_(p, False)
    assert p.out == d.text()
    h = d._repr_html_()
    assert h.count("<table") == 3 and h.count("<tr>") == len(d.rows) + 3  # a header row per table
    for r in d.rows:  # every row's LaTeX, escaped, between MathJax/KaTeX delimiters
        import html

        assert html.escape(rf"\({d.lhs(r)}\)") in h
    assert "<script" not in h
