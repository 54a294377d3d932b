"""Shared test setup: a fresh compile cache per run, `need` for tools outside symbp, and a
closing summary of every check that was skipped and why."""

import importlib.util
import os
import shutil
import sys
import tempfile
from collections import Counter

import numpy as np
import pytest
import sympy as sp

sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

# Every tool a test may need, and how to get it.  A run lists in SYMBP_REQUIRE the tools it
# installed (.ci/run does): a test that needs a listed tool fails when it is missing; for any
# other tool it is skipped, and the summary at the end says so.
TOOLS = {
    "graphviz": "Graphviz's dot (apt-get install graphviz)",
    "katex": "KaTeX on Node.js (apt-get install nodejs npm; cd tools/katex && npm install)",
    "nvvm": "NVVM via numba-cuda (pip install 'symbp[cuda]')",
    "cuda-simulator": "Numba's CUDA simulator, numba.cuda (pip install 'symbp[cuda]')",
    "numba": "Numba (a dependency of symbp: pip install -e .)",
    "openblas": "symbp's own OpenBLAS, scipy-openblas64 (a dependency on x86-64: pip install -e .)",
    "matplotlib": "matplotlib (pip install 'symbp[plot]')",
    "scikit-learn": "scikit-learn (pip install 'symbp[demo]')",
    "pytorch": "PyTorch, an independent reference (pip install torch)",
    "mpi": "mpi4py and MPICH (pip install 'symbp[mpi]')",
    "mkl": "Intel's MKL, the mkl wheel (pip install 'symbp[mkl]')",
}
REQUIRED = {t.strip() for t in os.environ.get("SYMBP_REQUIRE", "").split(",") if t.strip()}


def have(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def dense_net(sizes, act):
    """A user's MLP: ``(H, T, params)``, H = the last dense layer's output for inputs X (N ×
    sizes[0]), ``act`` after every dense layer but the last, T the targets (N × sizes[-1]),
    params W0, b0, W1, b1, ... (``b`` a 1 × width row)."""
    import symbp as sb

    N = sp.Symbol("N")
    X, T = sp.MatrixSymbol("X", N, sizes[0]), sp.MatrixSymbol("T", N, sizes[-1])
    H, params = X, []
    for k, (a, b) in enumerate(zip(sizes, sizes[1:])):
        W, c = sp.MatrixSymbol(f"W{k}", a, b), sp.MatrixSymbol(f"b{k}", 1, b)
        params += [W, c]
        H = sb.dense(H, W, c)
        if k < len(sizes) - 2:
            H = act(H)
    return H, T, params


def need(ok: bool, tool: str, detail: str = "") -> None:
    """Go on when ``ok``; else fail if SYMBP_REQUIRE lists ``tool``, or skip saying what to
    install.  ``tool`` is a key of TOOLS; ``detail`` says what was found instead."""
    if tool not in TOOLS:
        pytest.fail(f"need(): unknown tool {tool!r}: add it to TOOLS in tests/conftest.py "
                    f"(known: {', '.join(TOOLS)})")
    if ok:
        return
    why = f"needs {TOOLS[tool]}" + (f": {detail}" if detail else "")
    if tool in REQUIRED:
        pytest.fail(f"{why}; SYMBP_REQUIRE lists {tool!r}, so this check must run here")
    pytest.skip(why, allow_module_level=True)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A compile cache of this test's own (SYMBP_CACHE_DIR), nothing of it loaded yet."""
    from symbp import cache

    monkeypatch.setenv("SYMBP_CACHE_DIR", str(tmp_path))
    cache._loaded.clear()
    yield tmp_path
    cache._loaded.clear()


N = sp.Symbol("N")


# --- a fresh compile cache -----------------------------------------------------------------
# Machine code left on disk by an earlier run (or by the user's own ~/.cache/symbp) would
# let a kernel pass on code compiled from an older symbp.  Every run compiles into its own
# empty directory; subprocesses inherit it through the environment.

_fresh: list = []


def pytest_configure(config):
    unknown = REQUIRED - set(TOOLS)
    if unknown:
        raise pytest.UsageError(f"SYMBP_REQUIRE names unknown tools {sorted(unknown)}: "
                                f"known are {', '.join(TOOLS)}")
    config.addinivalue_line("markers", "needs(ok, tool, detail=''): need() as a mark, for "
                            "a parameter that needs a tool")
    d = tempfile.mkdtemp(prefix="symbp-test-cache-")
    _fresh.append(d)
    os.environ["SYMBP_CACHE_DIR"] = d
    # Numba keeps a generated module's machine code beside it (symbp.cache repairs damaged
    # entries there); a user's NUMBA_CACHE_DIR would move it out of the fresh directory.
    os.environ.pop("NUMBA_CACHE_DIR", None)


def pytest_unconfigure(config):
    while _fresh:
        shutil.rmtree(_fresh.pop(), ignore_errors=True)


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        need(*mark.args, **mark.kwargs)


# --- what was skipped, and why --------------------------------------------------------------


def pytest_terminal_summary(terminalreporter):
    reasons: Counter = Counter()
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = rep.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if not reasons:
        return
    terminalreporter.section("skipped checks")
    for reason, n in reasons.most_common():
        tests = f"{n} test{'s' if n > 1 else ''}"
        if reason.startswith("needs "):
            verb = "needs" if n == 1 else "need"
            terminalreporter.write_line(f"skipped: {tests} {verb} {reason[len('needs '):]}")
        else:
            terminalreporter.write_line(f"skipped: {tests}: {reason}")
    if not REQUIRED:
        terminalreporter.write_line("(SYMBP_REQUIRE=tool,... makes a missing tool a failure)")
