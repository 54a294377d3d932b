"""The `symbp` command, run as a subprocess (`python -m symbp ...`) the way a person runs it.

Every subprocess case runs once, concurrently, in a module fixture (starting Python with
SymPy costs about a second each); the tests then read the results.  Hostile expressions
must end in exit status 2 with one clean line on stderr, no traceback, nothing on stdout
and no file created.  The full hostile table of test_parse also goes through ``main()`` in
this process, which is fast.
"""

import importlib
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from shutil import which

import numpy as np
import pytest
import sympy as sp
from conftest import need
from test_parse import HOSTILE

import symbp as sb
from symbp import cli
from symbp.errors import SymbpError

REPO = Path(__file__).resolve().parents[1]


def have(module: str, attr: str | None = None) -> bool:
    """Whether ``module`` imports (and has ``attr``)."""
    try:
        m = importlib.import_module(module)
    except ImportError:
        return False
    return attr is None or hasattr(m, attr)


# Every subcommand's module exists: one that fails to import is a bug to report, never a
# reason to skip its tests.
HAVE_DERIVE = HAVE_GRAPH = HAVE_PLOTS = HAVE_DEMO = True

# Hostile expressions run as real subprocesses: (subcommand args before the expression).
# `--` ends the options, so an expression may start with a minus.
DERIVE = ["derive", "--"]
GRAPH = ["graph", "-o", "canary.svg", "--"]
GRAPH_DOT = ["graph", "--at", "x=1", "-o", "canary.dot", "--"]
HOSTILE_CLI = [
    (DERIVE, "__import__('os').system('touch canary')"),
    (GRAPH, "__import__('os').system('touch canary')"),
    (DERIVE, "__import__(chr(111)+chr(115)).system(chr(116))"),
    (DERIVE, "().__class__.__bases__[0].__subclasses__()"),
    (GRAPH, "x.__class__"),
    (DERIVE, "lambda: 1"),
    (GRAPH_DOT, "[x for x in y]"),
    (DERIVE, "open('canary', 'w')"),
    (DERIVE, "eval('1')"),
    (GRAPH, "exec(x)"),
    (DERIVE, "getattr(x, 'y')"),
    (DERIVE, "globals()"),
    (DERIVE, "__builtins__"),
    (GRAPH_DOT, "x[0]"),
    (DERIVE, "'a'"),
    (DERIVE, "f'{x}'"),
    (DERIVE, "9**9**9"),
    (GRAPH, "x**1000000"),
    (DERIVE, "((x**100)**100)**100"),
    (DERIVE, "(" * 10000 + "x" + ")" * 10000),
    (GRAPH_DOT, "sigmoid(" * 60 + "x" + ")" * 60),
    (DERIVE, "x" * 100_000),
    (DERIVE, "x if y else z"),
    (DERIVE, "a and b"),
    (DERIVE, "(x := 1)"),
    (DERIVE, "*x"),
    (DERIVE, "sigmoid(x=1)"),
    (DERIVE, "1j"),
    (DERIVE, "x\nimport os"),
    (GRAPH, "ｅｖａｌ(x)"),
    (DERIVE, "\x1b]0;pwned\x07x"),
    (DERIVE, "-" * 1999 + "x"),
]
# Hostile arguments other than the expression.
HOSTILE_ARGS = [
    ["derive", "w*x", "--at", "w=__import__('os')", "x=1"],
    ["derive", "w*x", "--wrt", "__class__"],
    ["graph", "w*x", "-o", "canary.exe"],
    ["plot", "__import__('os').system('touch canary')", "-o", "canary.png"],
]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("SYMBP_DEBUG", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _run(args, cwd: Path, timeout: float = 120):
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "symbp", *args], cwd=cwd, env=_env(),
                       capture_output=True, text=True, encoding="utf-8", timeout=timeout)
    return p, time.perf_counter() - start


def _cases() -> dict:
    """Every subprocess run of this module, by key: (args, run in its own directory)."""
    c = {"version": ["--version"], "help": ["--help"]}
    c["imports"] = None  # a plain `python -c`, see below
    if HAVE_DERIVE:
        at = ["--at", "w=0.5", "x=1", "b=0"]
        c["derive text"] = ["derive", "sigmoid(w*x + b)", "--wrt", "w", "b", *at]
        c["derive latex"] = ["derive", "mse(sigmoid(w*x + b), t)", "--wrt", "w", "b",
                             "--format", "latex"]
    if HAVE_GRAPH:
        c["graph dot"] = ["graph", "sigmoid(w*x + b)", "--at", "w=0.5", "x=1", "b=0",
                          "-o", "g.dot"]
        if which("dot"):
            c["graph svg"] = ["graph", "sigmoid(w*x + b)", "--at", "w=0.5", "x=1", "b=0",
                              "-o", "g.svg"]
        c["derive singular"] = ["derive", "log(x)", "--at", "x=0"]
        c["derive sqrt negative"] = ["derive", "sqrt(x)", "--at", "x=-1"]
    if HAVE_PLOTS and have("matplotlib"):
        c["plot"] = ["plot", "relu", "-o", "relu.png"]
        c["plot formula"] = ["plot", "x*sigmoid(x)"]
    if HAVE_DEMO:
        c["demo"] = ["demo", "--epochs", "1", "--target", "numpy", "--quiet"]
    for i, (pre, expr) in enumerate(HOSTILE_CLI):
        c[f"hostile {i}"] = [*pre, expr]
    for i, args in enumerate(HOSTILE_ARGS):
        c[f"hostile arg {i}"] = args
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every case concurrently, each in its own empty directory."""
    cases = _cases()

    def one(item):
        key, args = item
        cwd = tmp_path_factory.mktemp(key.replace(" ", "_"))
        if args is None:  # what `import symbp.cli` loads
            heavy = ("symbp.parse", "symbp.printing", "symbp.demo", "matplotlib", "numba",
                     "sklearn", "tqdm", "graphviz")
            code = ("import sys, symbp.cli; print([m for m in %r if m in sys.modules])"
                    % (heavy,))
            p = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(),
                               capture_output=True, text=True, timeout=120)
            return key, (p, 0.0, cwd)
        p, seconds = _run(args, cwd)
        return key, (p, seconds, cwd)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(one, cases.items()))


def _clean_error(p, cwd: Path, seconds: float, produced=()):
    err = p.stderr
    assert p.returncode == 2, (p.returncode, err, p.stdout)
    assert err.startswith("symbp: error: ") and err.endswith("\n"), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert err.isascii() and err[:-1].isprintable(), ascii(err)
    assert p.stdout == "", p.stdout
    assert sorted(os.listdir(cwd)) == sorted(produced), os.listdir(cwd)
    assert seconds < 60, seconds  # the refusal is instant; this bounds a loaded machine


@pytest.mark.parametrize("i", range(len(HOSTILE_CLI)),
                         ids=[ascii(e)[:30] for _, e in HOSTILE_CLI])
def test_hostile_expression_subprocess(runs, i):
    p, seconds, cwd = runs[f"hostile {i}"]
    _clean_error(p, cwd, seconds)


@pytest.mark.parametrize("i", range(len(HOSTILE_ARGS)),
                         ids=[" ".join(a)[:30] for a in HOSTILE_ARGS])
def test_hostile_arguments_subprocess(runs, i):
    p, seconds, cwd = runs[f"hostile arg {i}"]
    _clean_error(p, cwd, seconds)


def test_enough_hostile_subprocess_runs():
    assert len(HOSTILE_CLI) >= 30


def test_version(runs):
    p, _, _ = runs["version"]
    assert p.returncode == 0 and p.stdout == f"symbp {sb.__version__}\n", p


def test_help_subprocess(runs):
    p, _, _ = runs["help"]
    assert p.returncode == 0, p.stderr
    assert "examples:" in p.stdout and "symbp derive" in p.stdout


@pytest.mark.parametrize("command", ["derive", "graph", "plot", "demo"])
def test_every_subcommand_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"symbp {command}" in out


def test_import_is_light(runs):
    p, _, _ = runs["imports"]
    assert p.returncode == 0 and p.stdout.strip() == "[]", (p.stdout, p.stderr)


# --- happy paths (skipped only while the backing module does not exist) -----------------


def _sigmoid_grads(w=0.5, x=1.0, b=0.0):
    """Independent reference: sympy.diff of the formula, evaluated in floats."""
    W, X, B = sp.symbols("w x b")
    f = 1 / (1 + sp.exp(-(W * X + B)))
    at = {W: w, X: x, B: b}
    return float(f.subs(at)), [float(sp.diff(f, v).subs(at)) for v in (W, B)]


def test_derive_text_with_numbers(runs):
    p, _, _ = runs["derive text"]
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "∂L/∂w" in out and "∂L/∂b" in out and "∂L/∂x" not in out, out
    value, (gw, gb) = _sigmoid_grads()
    assert f"{value:.4g}" in out and f"{gw:.3g}" in out, (value, gw, out)


def test_derive_latex(runs):
    p, _, _ = runs["derive latex"]
    assert p.returncode == 0, p.stderr
    out = p.stdout.strip()
    assert out.startswith(r"\begin{align*}") and out.endswith(r"\end{align*}"), out
    assert r"\sigma" in out and r"\partial" in out


def test_derive_markdown(capsys):
    assert cli.main(["derive", "tanh(w*x + b)", "--at", "w=0.5,x=1", "b=0", "--format",
                     "md"]) == 0
    out = capsys.readouterr().out
    assert "|" in out and "$" in out


def test_derive_matches_library_call(capsys):
    # The command prints exactly what the library prints for the parsed expression.
    w, x, b = (sp.Symbol(n, real=True) for n in "wxb")
    from symbp.printing import derive

    want = derive(sb.sigmoid(w * x + b), [w], at={w: 0.5, x: 1.0, b: 0.0}).text()
    assert cli.main(["derive", "sigmoid(w*x + b)", "--wrt", "w", "--at", "w=0.5,x=1,b=0"]) == 0
    assert capsys.readouterr().out.strip() == want.strip()


def test_graph_dot_file(runs):
    p, _, cwd = runs["graph dot"]
    assert p.returncode == 0, p.stderr
    assert os.listdir(cwd) == ["g.dot"]
    text = (cwd / "g.dot").read_text()
    assert "digraph" in text and "->" in text


def test_graph_stdout(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["graph", "(x + y)*z", "--at", "x=-2", "y=5", "z=-4"]) == 0
    assert "digraph" in capsys.readouterr().out and os.listdir(tmp_path) == []


def test_graph_svg(runs):
    need(which("dot") is not None, "graphviz")
    p, _, cwd = runs["graph svg"]
    assert p.returncode == 0, p.stderr
    assert "<svg" in (cwd / "g.svg").read_text()


def test_plot_png(runs):
    need(have("matplotlib"), "matplotlib")
    p, _, cwd = runs["plot"]
    assert p.returncode == 0, p.stderr
    data = (cwd / "relu.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_demo(runs):
    p, _, _ = runs["demo"]
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip().splitlines()[-1]
    assert line.startswith("final accuracy: "), p.stdout
    assert 0.2 < float(line.split(":")[1]) <= 1.0  # chance is 0.1 on ten digits


# --- in-process: the whole hostile table, and the error plumbing --------------------------


@pytest.mark.parametrize("text, fragment", HOSTILE, ids=[ascii(h[0])[:40] for h in HOSTILE])
def test_hostile_in_process(text, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = text.replace("{canary}", str(tmp_path / "canary"))
    start = time.perf_counter()
    status = cli.main(["graph", "-o", "canary.dot", "--", text])
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert status == 2 and out == "", (status, out, err)
    assert err.startswith("symbp: error: ") and err.count("\n") == 1, err
    assert err.isascii() and err[:-1].isprintable(), ascii(err)
    assert os.listdir(tmp_path) == []
    assert elapsed < 2.0, elapsed  # milliseconds when idle; slack for a loaded machine


BAD_USE = [
    (["derive", "w*x", "--wrt", "q"], "--wrt q: not a name in the expression (its names: w, x)"),
    (["derive", "w*x", "--wrt", "w", "w"], "twice"),
    (["derive", "2 + 3"], "no names"),
    (["derive", "w*x", "--at", "w=1"], "no value for x"),
    (["derive", "w*x", "--at", "w=1", "x=1", "y=2"], "--at y: not a name"),
    (["derive", "w*x", "--at", "w=1", "w=2", "x=1"], "twice"),
    (["graph", "w*x", "-o", "g.jpg"], "must end in .svg"),
    (["derive", "w*x", "--at", "w=1e999", "x=1"], "too large"),
    (["derive", "w*x", "--at", "w=1", "q=2", "x=1"], "--at q: not a name"),
    (["plot", "foo"], "unknown activation foo"),
    (["plot", "../../etc/passwd", "-o", "p.png"], "not a valid expression"),
    (["plot", "x" * 100], "unknown activation " + "x" * 40 + ";"),
    (["plot", "w*sigmoid(x)"], "one variable"),
    (["plot", "sigmoid(x) + 1/0"], "division by zero"),
    (["derive"], "`derive` needs an expression"),
    (["graph", "--wrt", "w", "--at", "w=1"], "`graph` needs an expression"),
    (["derive", "--wrt", "w", "w*x", "w+x"], "two expressions given"),
    (["derive", "--wrt", "w", "q", "--", "w*x"], "--wrt q: not a name"),
    (["derive", "softmax(a, b)"], "gives 2 values, not one"),
]


@pytest.mark.parametrize("argv, fragment", BAD_USE, ids=[" ".join(a)[:30] for a, _ in BAD_USE])
def test_bad_use_is_one_clean_line(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("symbp: error: ") and err.count("\n") == 1 and fragment in err, err
    assert os.listdir(tmp_path) == []


def test_argparse_errors_exit_2(capsys):
    for argv in (["nosuch"], ["demo", "--epochs", "0"], ["demo", "--epochs", "x"],
                 ["derive", "x", "--format", "html"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2, argv
        assert "error:" in capsys.readouterr().err


def _stub_derive(result=None, exc=None, sleep=0.0):
    def derive(f, wrt, at=None):
        time.sleep(sleep)
        if exc is not None:
            raise exc
        return result

    return derive


@pytest.fixture
def printing(monkeypatch):
    """symbp.printing, real when it exists; the tests below replace only its `derive`."""
    import types

    if not HAVE_DERIVE:
        monkeypatch.setitem(sys.modules, "symbp.printing", types.ModuleType("symbp.printing"))
        return sys.modules["symbp.printing"]
    import importlib

    # imported here: run alone, no earlier test has loaded it into sys.modules
    return importlib.import_module("symbp.printing")


def test_library_error_is_one_line(printing, monkeypatch, capsys):
    monkeypatch.setattr(printing, "derive", _stub_derive(exc=SymbpError("bad\nthing \x1b")),
                        raising=False)
    assert cli.main(["derive", "w*x"]) == 2
    assert capsys.readouterr().err == "symbp: error: bad thing \\x1b\n"


def test_internal_error_has_hint_and_no_traceback(printing, monkeypatch, capsys):
    monkeypatch.setattr(printing, "derive", _stub_derive(exc=RuntimeError("boom")),
                        raising=False)
    monkeypatch.delenv("SYMBP_DEBUG", raising=False)
    assert cli.main(["derive", "w*x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("symbp: error: internal error: RuntimeError: boom")
    assert "SYMBP_DEBUG=1" in err and err.count("\n") == 1
    monkeypatch.setenv("SYMBP_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["derive", "w*x"])


def test_timeout(printing, monkeypatch, capsys):
    monkeypatch.setattr(printing, "derive", _stub_derive(sleep=5.0), raising=False)
    start = time.perf_counter()
    assert cli.main(["derive", "w*x", "--timeout", "0.2"]) == 2
    assert time.perf_counter() - start < 3.0
    assert "gave up after 0.2 s" in capsys.readouterr().err


def test_derive_passes_parsed_symbols(printing, monkeypatch, capsys):
    seen = {}

    class D:
        def text(self):
            return "TEXT"

        def latex(self):
            return "LATEX"

        def markdown(self):
            return "MD"

    def derive(f, wrt, at=None):
        seen.update(f=f, wrt=wrt, at=at)
        return D()

    monkeypatch.setattr(printing, "derive", derive, raising=False)
    assert cli.main(["derive", "sigmoid(w*x + b)", "--wrt", "b", "w", "--at", "w=0.5,x=1",
                     "b=-2", "--format", "md"]) == 0
    assert capsys.readouterr().out == "MD\n"
    w, x, b = (sp.Symbol(n, real=True) for n in "wxb")
    assert seen == {"f": sb.sigmoid(w * x + b), "wrt": [b, w], "at": {w: 0.5, x: 1.0, b: -2.0}}
    assert cli.main(["derive", "w*x"]) == 0 and seen["wrt"] == [w, x] and seen["at"] is None


def test_help_lists_every_known_function(capsys):
    from symbp.parse import known_functions

    with pytest.raises(SystemExit):
        cli.main(["derive", "--help"])
    words = set(capsys.readouterr().out.replace("(", " ").replace(",", " ").split())
    missing = sorted(set(known_functions()) - words)
    assert not missing, f"derive --help does not list {missing}"


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "symbp derive" in capsys.readouterr().out


# --- options in any order, formulas to plot, softmax + cross-entropy, singular points ------


ORDERS = [
    ["derive", "sigmoid(w*x + b)", "--wrt", "w", "b", "--at", "w=0.5", "x=1", "b=0"],
    ["derive", "--wrt", "w", "b", "sigmoid(w*x + b)", "--at", "w=0.5", "x=1", "b=0"],
    ["derive", "--wrt", "w", "b", "--at", "w=0.5", "x=1", "b=0", "sigmoid(w*x + b)"],
    ["derive", "--at", "w=0.5,x=1,b=0", "sigmoid(w*x + b)", "--wrt", "w", "--wrt", "b"],
    ["derive", "--wrt", "w", "b", "--at", "w=0.5", "x=1", "b=0", "--", "sigmoid(w*x + b)"],
]


@pytest.mark.parametrize("argv", ORDERS, ids=[str(i) for i in range(len(ORDERS))])
def test_options_in_any_order(argv, capsys):
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert cli.main(ORDERS[0]) == 0
    assert out == capsys.readouterr().out
    value, (gw, gb) = _sigmoid_grads()
    assert f"{gw:.4g}" in out and "∂L/∂x" not in out, out


def test_a_name_as_the_expression_after_wrt(capsys):
    assert cli.main(["derive", "--wrt", "w", "w"]) == 0
    assert "∂L/∂w = 1" in capsys.readouterr().out


def test_softmax_cross_entropy_from_the_command_line(capsys):
    z, t = (1.0, 2.0, 0.5), (0.0, 1.0, 0.0)
    at = [f"z{i}={v}" for i, v in enumerate(z, 1)] + [f"t{i}={v}" for i, v in enumerate(t, 1)]
    argv = ["derive", "--wrt", "z1", "z2", "z3",
            "cross_entropy(softmax(z1, z2, z3), t1, t2, t3)", "--at", *at]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    y = np.exp(z) / np.exp(z).sum()  # the chapter's result: ∂L/∂zᵢ = yᵢ − tᵢ
    for i, g in enumerate(y - np.array(t), 1):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"∂L/∂z{'₀₁₂₃'[i]}"))
        assert line.split("= ")[-1].replace("−", "-") == f"{g:.4g}", (line, g)


def test_derive_at_a_singular_point_subprocess(runs):
    p, _, _ = runs["derive singular"]
    assert p.returncode == 0, p.stderr
    assert p.stderr == "", p.stderr  # no RuntimeWarning quoting generated code
    assert "= −∞" in p.stdout and "= ∞" in p.stdout, p.stdout
    assert "note: at x = 0, L = log(x) is −∞" in p.stdout, p.stdout
    p, _, _ = runs["derive sqrt negative"]
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert "not a real number (NaN)" in p.stdout, p.stdout


def test_plot_a_formula_subprocess(runs):
    need(have("matplotlib"), "matplotlib")
    p, _, cwd = runs["plot formula"]
    assert p.returncode == 0, p.stderr
    assert (cwd / "x_sigmoid_x.png").read_bytes().startswith(b"\x89PNG"), os.listdir(cwd)


def test_plot_a_formula_draws_that_formula(monkeypatch, tmp_path):
    from symbp.printing import plots

    seen = []
    monkeypatch.setattr(plots, "plot_activation", lambda f, path: seen.append((f, path)))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plot", "leaky_relu(x, 0.1)", "-o", "lr.png"]) == 0
    f, path = seen[0]
    xs = sp.Symbol("x", real=True)
    assert path == "lr.png" and sp.simplify(f - sb.leaky_relu(xs, 0.1)) == 0


def test_missing_graphviz_names_the_command_line_way(monkeypatch, capsys, tmp_path):
    from symbp.printing import graph

    monkeypatch.setattr(graph.shutil, "which", lambda name: None)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["graph", "x*y", "-o", "g.png"]) == 2
    err = capsys.readouterr().err
    assert "apt-get install graphviz" in err and "-o graph.dot" in err, err
    assert "to_dot" not in err


def test_graph_inputs_in_the_order_written(capsys):
    import re

    assert cli.main(["graph", "z + y*x", "--wrt", "x"]) == 0
    dot = capsys.readouterr().out
    names = re.findall(r'in\d+ \[shape=plaintext, label=["<](\w+)', dot)
    assert names == ["z", "y", "x"], dot
