"""The disk cache of generated modules: hashed files, damage repair, concurrent processes."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from symbp import cache

pytest.importorskip("numba")

SOURCE = '''\
from numba import njit

@njit("(float64[::1],)", cache=True)
def total(x):
    s = 0.0
    for v in x:
        s += v
    return s
'''


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SYMBP_CACHE_DIR", str(tmp_path))
    cache._loaded.clear()
    yield tmp_path
    cache._loaded.clear()


def test_source_goes_to_a_content_hashed_file(cache_dir):
    m = cache.load(SOURCE)
    path = cache_dir / f"gen_{cache.digest(SOURCE)}.py"
    assert path.read_text() == SOURCE
    assert m.total(np.arange(4.0)) == 6.0
    assert cache.load(SOURCE) is m  # once per process
    assert cache._numba_files(path)  # Numba's index and object code sit beside it
    assert not list(cache_dir.glob("*.tmp"))  # no temporary file left behind


def test_a_damaged_source_file_is_rewritten(cache_dir):
    path = cache.path_for(SOURCE)
    path.write_text("def total(:\n")  # truncated by a crash, say
    assert cache.load(SOURCE).total(np.ones(3)) == 3.0
    assert path.read_text() == SOURCE


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
    print(repr(v), sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values()))
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
