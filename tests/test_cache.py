"""The disk cache of generated modules: hashed files, a key that covers everything the
machine code depends on, damage repair, concurrent processes, warm runs equal cold ones."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from conftest import have, need

import symbp as sb
from symbp import cache

need(have("numba"), "numba")

N = sp.Symbol("N")
SOURCE = '''\
from numba import njit

@njit("(float64[::1],)", cache=True)
def total(x):
    s = 0.0
    for v in x:
        s += v
    return s
'''


def test_source_goes_to_a_content_hashed_file(cache_dir):
    m = cache.load(SOURCE)
    path = cache_dir / f"gen_{cache.digest(SOURCE)}.py"
    text = path.read_text()
    # the source first (tracebacks keep fn.source's line numbers), then the key's ingredients
    assert text.startswith(SOURCE) and text[len(SOURCE):] == "\n" + cache.stamp(SOURCE)
    assert path.name == f"gen_{hashlib.sha256(text.encode()).hexdigest()}.py"
    assert m.total(np.arange(4.0)) == 6.0
    assert cache.load(SOURCE) is m  # once per process
    assert cache._numba_files(path)  # Numba's index and object code sit beside it
    assert not list(cache_dir.glob("*.tmp"))  # no temporary file left behind


def test_a_damaged_source_file_is_rewritten(cache_dir):
    path = cache.path_for(SOURCE)
    path.write_text("def total(:\n")  # truncated by a crash, say
    assert cache.load(SOURCE).total(np.ones(3)) == 3.0
    assert path.read_text().startswith(SOURCE)


@pytest.mark.parametrize("damage", [b"", b"\x80\x04garbage", b"not a pickle at all" * 10],
                         ids=["empty", "bad-pickle", "text"])
def test_a_damaged_numba_cache_entry_is_rebuilt(cache_dir, damage):
    cache.load(SOURCE)
    path = cache.path_for(SOURCE)
    for f in cache._numba_files(path):
        f.write_bytes(damage)
    cache._loaded.clear()
    sys.modules.pop(f"symbp_gen_{cache.digest(SOURCE)[:20]}", None)
    assert cache.load(SOURCE).total(np.ones(5)) == 5.0
    assert all(f.read_bytes() != damage for f in cache._numba_files(path))


def test_a_compile_error_names_the_generated_file(cache_dir):
    bad = SOURCE.replace("s += v", "s += undefined_name")
    with pytest.raises(cache.SymbpError, match="gen_"):
        cache.load(bad)


# A tiny symbp program compiled in fresh processes: the cache is shared through the disk.
SCRIPT = textwrap.dedent('''
    import sympy as sp, symbp as sb
    x, w, b = sp.symbols("x w b", real=True)
    f = sb.compile(sb.sigmoid(w * x + b) ** 2, [w, b], target="cpu")
    v, g = f(x=0.5, w=1.0, b=0.25)
    k = f.kernel.fn.kernel
    info = getattr(k, "__self__", None)  # symbp's own lowering: read from disk or compiled
    hits, misses = ((int(info.from_disk), int(not info.from_disk)) if hasattr(info, "from_disk")
                    else (sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values())))
    print(repr(v), hits, misses)
''')


def _run_at_once(n, env):
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    return [out.split() for out, _ in outs]


def test_processes_compiling_at_once_all_succeed_then_hit_the_cache(tmp_path):
    env = {**os.environ, "SYMBP_CACHE_DIR": str(tmp_path / "a")}
    two = _run_at_once(2, env)
    env4 = {**os.environ, "SYMBP_CACHE_DIR": str(tmp_path / "b")}
    four = _run_at_once(4, env4)
    assert len({r[0] for r in two + four}) == 1  # every process computed the same value
    (after,) = _run_at_once(1, env)  # a later process loads the machine code from disk
    assert after[0] == two[0][0] and after[1:] == ["1", "0"]


# --- the key: everything the machine code depends on -----------------------------------------

def test_the_run_compiles_into_a_fresh_directory():
    # conftest points every run at its own empty directory: nothing compiled by an older
    # symbp (or the user's ~/.cache/symbp) can stand in for a kernel under test
    d = cache.cache_dir()
    assert d.name.startswith("symbp-test-cache-") and d != Path.home() / ".cache" / "symbp"
    assert os.environ.get("NUMBA_CACHE_DIR") is None


def _kernel_source(target="cpu"):
    from symbp.backends import numba_cpu

    X, W, Y = sp.MatrixSymbol("X", N, 3), sp.MatrixSymbol("W", 3, 2), sp.MatrixSymbol("Y", N, 2)
    return numba_cpu.generate(sb.gradient_program(sb.mse(X * W, Y), [W]), np.float64, target)[0]


def test_a_kernel_depends_on_the_gemm_module():
    src = _kernel_source()
    assert "symbp.backends.blas" in cache.dependencies(src)
    assert "symbp.backends.blas sha256:" in cache.stamp(src)


def test_dependencies_follow_symbp_imports_of_symbp_modules():
    # relative imports inside a module a source imports (`from .scalar import`, `from ..
    # import cache`) are followed; other packages are not part of the key
    deps = cache.dependencies("import numpy\nfrom symbp.backends.numba_cpu import generate\n")
    assert {"symbp.backends.numba_cpu", "symbp.backends.scalar", "symbp.cache",
            "symbp.errors"} <= set(deps)
    assert all(d.split(".")[0] == "symbp" for d in deps)
    deps = cache.dependencies("from symbp.backends import (\n    blas as b,\n    identifiers,\n)\n")
    assert {"symbp.backends", "symbp.backends.blas"} <= set(deps)
    assert "symbp.backends.identifiers" not in deps  # a function, not a module


def test_the_key_changes_with_a_helper_module(monkeypatch):
    src = _kernel_source()
    before = cache.digest(src)
    real = cache._file_hash
    monkeypatch.setattr(cache, "_file_hash", lambda name: real(name) if name !=
                        "symbp.backends.blas" else "0" * 64)  # blas.py edited
    assert cache.digest(src) != before
    assert cache.digest(SOURCE) == cache.digest(SOURCE)  # a source without symbp imports


def test_the_key_changes_with_symbp_version(monkeypatch):
    before = cache.digest(SOURCE)
    monkeypatch.setattr(sb, "__version__", sb.__version__ + ".post1")
    assert cache.digest(SOURCE) != before


@pytest.mark.parametrize("module", ["numba", "llvmlite", "numpy"])
def test_the_key_changes_with_compiler_versions(monkeypatch, module):
    before = cache.digest(SOURCE)
    monkeypatch.setattr(__import__(module), "__version__", "0.0.0-other")
    assert cache.digest(SOURCE) != before


# --- in fresh processes: a warm kernel equals a cold one; a changed helper recompiles --------

# X·W and Xᵀ·G have more than SMALL_PRODUCT fixed entries: both are gemm calls
RUN = textwrap.dedent('''
    import json, sys, numpy as np, sympy as sp, symbp as sb
    N = sp.Symbol("N")
    X, W, Y = sp.MatrixSymbol("X", N, 6), sp.MatrixSymbol("W", 6, 4), sp.MatrixSymbol("Y", N, 4)
    fn = sb.compile(sb.mse(X * W, Y), [W], target="cpu")
    assert fn.source.count("_gemm(") == 2, fn.source
    v, g = fn(**{k: np.asarray(a) for k, a in json.loads(sys.argv[1]).items()})
    k = fn.kernel.fn.kernel
    info = getattr(k, "__self__", None)  # symbp's own lowering: read from disk or compiled
    hits, misses = ((int(info.from_disk), int(not info.from_disk)) if hasattr(info, "from_disk")
                    else (sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values())))
    print(json.dumps({"file": sb.__file__, "value": float(v), "dW": g["W"].tolist(),
                      "hits": hits, "misses": misses}))
''')
_rng = np.random.default_rng(0)
ARRAYS = {"X": _rng.normal(size=(5, 6)), "W": _rng.normal(size=(6, 4)),
          "Y": _rng.normal(size=(5, 4))}

# A change to gemm, appended to a copy of blas.py: every product comes out doubled.  Machine
# code compiled against the original gemm must not be loaded for it.
DOUBLED_GEMM = '''

import numba as _numba

_original_gemm = gemm


@_numba.njit
def gemm(a, b, c, alpha, beta):
    _original_gemm(a, b, c, alpha * 2, beta)
'''


def _reference(W):
    """Loss and dW/dW on the NumPy reference backend."""
    X, W_, Y = sp.MatrixSymbol("X", N, 6), sp.MatrixSymbol("W", 6, 4), sp.MatrixSymbol("Y", N, 4)
    v, g = sb.compile(sb.mse(X * W_, Y), [W_], target="numpy")(**{**ARRAYS, "W": W})
    return v, g["W"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """Two copies of symbp, the second with DOUBLED_GEMM, and one cache directory."""
    root = tmp_path_factory.mktemp("symbp-copies")
    here = Path(sb.__file__).parent
    for name in ("original", "changed"):
        shutil.copytree(here, root / name / "symbp", ignore=shutil.ignore_patterns("__pycache__"))
    with open(root / "changed" / "symbp" / "backends" / "blas.py", "a") as f:
        f.write(DOUBLED_GEMM)
    return root


def _run(packages, name):
    env = {**os.environ, "SYMBP_CACHE_DIR": str(packages / "cache"),
           "PYTHONPATH": os.pathsep.join([str(packages / name)]
                                         + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    # cwd: `python -c` puts it first on sys.path, before PYTHONPATH
    p = subprocess.run([sys.executable, "-c", RUN, json.dumps({k: a.tolist() for k, a in
                                                                ARRAYS.items()})],
                       env=env, cwd=packages / name,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).is_relative_to(packages / name), out["file"]
    return out


@pytest.fixture(scope="module")
def cold(packages):
    out = _run(packages, "original")
    assert out["misses"] >= 1 and out["hits"] == 0, out  # compiled here, then stored
    return out


def test_a_warm_kernel_from_disk_equals_the_cold_compile(packages, cold):
    warm = _run(packages, "original")
    assert warm["hits"] >= 1 and warm["misses"] == 0, warm  # loaded, not compiled
    assert warm["value"] == cold["value"] and warm["dW"] == cold["dW"]  # to the last bit
    v, dW = _reference(ARRAYS["W"])
    assert cold["value"] == pytest.approx(v, rel=1e-12)
    np.testing.assert_allclose(cold["dW"], dW, rtol=1e-12, atol=1e-14)


def test_a_changed_helper_module_is_recompiled(packages, cold):
    changed = _run(packages, "changed")
    assert changed["misses"] >= 1 and changed["hits"] == 0, changed
    # the new gemm runs (stale machine code would give cold's numbers): X·W doubled is the
    # loss at 2W, and the backward product doubles that gradient once more
    v, dW = _reference(2 * ARRAYS["W"])
    assert changed["value"] == pytest.approx(v, rel=1e-12)
    np.testing.assert_allclose(changed["dW"], 2 * dW, rtol=1e-12, atol=1e-14)
    assert abs(changed["value"] - cold["value"]) > 1e-3 * abs(cold["value"])
