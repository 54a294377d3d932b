"""symbp's own lowering of generated kernels to LLVM (``symbp.backends.native``) against
Numba's compile of the very same modules.

The two must compute the same bits: the same operations in the same order, on every
function row, loss and optimizer (the tables of tests/test_nan.py, read here, so a new
function gets these tests for free), with NaN, infinities and signed zeros in the inputs;
on a hand-written module of every construct of the dialect (promotions, integer division,
negative indices, loops, short-circuits, every math function); and they refuse the same
arguments.  Whatever the lowering does not take goes to Numba, and a damaged or foreign
object file is compiled afresh, never run.
"""

from __future__ import annotations

import math
import types
import warnings

import numpy as np
import pytest
import sympy as sp
from conftest import N, have, need
from test_nan import CASES

import symbp as sb
from symbp import cache
from symbp.backends import native
from symbp.errors import SymbpError

pytestmark = pytest.mark.skipif(not have("numba"), reason="numba is not installed")


@pytest.fixture
def lowerings(tmp_path, monkeypatch):
    """``make(build)`` -> {"native": build(), "numba": build()}: each under its lowering,
    in a fresh cache directory of its own (nothing loaded in this process reused)."""
    need(have("numba"), "numba")

    def make(build):
        out = {}
        for mode in ("native", "numba"):
            monkeypatch.setenv("SYMBP_LOWER", mode)
            monkeypatch.setenv("SYMBP_CACHE_DIR", str(tmp_path / mode))
            cache._loaded.clear()
            out[mode] = build()
        monkeypatch.setenv("SYMBP_LOWER", "native")
        cache._loaded.clear()
        return out

    yield make
    cache._loaded.clear()


def is_native(kernel) -> bool:
    return isinstance(kernel, types.BuiltinFunctionType) and kernel.__self__.native


def kernel_of(compiled):
    """The compiled kernel behind ``sb.compile``'s function or ``sb.compile_step``'s step."""
    k = getattr(compiled, "kernel", None)
    return k.fn.kernel if hasattr(k, "fn") else k


def same_bits(a, b, what="") -> None:
    """The same dtype, shape and bits entry by entry, signed zeros included; a NaN matches
    any NaN (which operand's NaN an operation passes on, and its sign, is the compiler's
    choice: LLVM may swap the operands of an addition)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype.kind != "f":
        assert np.array_equal(a, b), (what, a, b)
        return
    nan = np.isnan(a)
    word = {4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    same = (a.view(word) == b.view(word)) | (nan & np.isnan(b))
    assert same.all(), (what, a[~same], b[~same])


# --- every function row and loss, float32 and float64 ---------------------------------------

PLAIN = [n for n, (_, unit) in CASES.items() if not unit]  # inputs in (-1, 1)
UNIT = [n for n, (_, unit) in CASES.items() if unit]  # probabilities: inputs in (0.1, 0.9)


def _summed(names):
    """One scalar: every case of ``names``, summed (one kernel to compile per lowering)."""
    total = sum((CASES[n][0]() for n in names), sp.Integer(0))
    wrt = sorted(total.atoms(sp.MatrixSymbol), key=lambda s: s.name)
    return total, wrt


def _hostile(program, unit, dtype, seed=0):
    """Input sets: plain ones, then each input with a NaN, ±inf, -0 or a large entry of
    either sign in turn."""
    rng = np.random.default_rng(seed)
    lo = 0.1 if unit else -1.0
    base = {}
    for s in program.inputs:
        shape = tuple(int(sp.sympify(d).subs(N, 3)) for d in s.shape)
        base[s.name] = rng.uniform(lo, 0.9, shape).astype(dtype)
    yield "plain", base
    for k in base:
        for label, v in [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf),
                         ("-0", -0.0), ("large", 87.5), ("-large", -90.25)]:
            arrays = {n: a.copy() for n, a in base.items()}
            arrays[k][min(1, arrays[k].shape[0] - 1), -1] = v
            yield f"{label} in {k}", arrays


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("group", ["functions", "probabilities"])
def test_every_function_and_loss_matches_numba_bit_for_bit(lowerings, group, dtype):
    names = PLAIN if group == "functions" else UNIT + [
        "mse", "bce_with_logits", "softmax_cross_entropy"]
    f, wrt = _summed(names)
    fns = lowerings(lambda: sb.compile(f, wrt, target="cpu", dtype=dtype))
    assert is_native(kernel_of(fns["native"])), "the lowering refused a generated module"
    assert not is_native(kernel_of(fns["numba"]))
    for label, arrays in _hostile(fns["native"].program, group != "functions", dtype):
        got = {}
        for mode, fn in fns.items():
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                v, g = fn(**{k: a.copy() for k, a in arrays.items()})
            got[mode] = (v, g)
        same_bits(np.float64(got["native"][0]), np.float64(got["numba"][0]), label)
        for w in got["numba"][1]:
            same_bits(got["native"][1][w], got["numba"][1][w], f"{label}: d/d{w}")


# --- training steps: every optimizer, a deep (split) step, a forward function -----------------


def _mlp(depth, width=8, acts=("tanh", "relu", "sigmoid", "gelu", "silu", "elu")):
    X, T = sp.MatrixSymbol("X", N, width), sp.MatrixSymbol("T", N, 5)
    H, params = X, []
    sizes = [width] * (depth + 1) + [5]
    for k, (a, b) in enumerate(zip(sizes, sizes[1:])):
        W, c = sp.MatrixSymbol(f"W{k}", a, b), sp.MatrixSymbol(f"b{k}", 1, b)
        params += [W, c]
        H = sb.dense(H, W, c)
        if k < depth:
            H = getattr(sb, acts[k % len(acts)])(H)
    return sb.softmax_cross_entropy(H, T), params


def _train(step, params, dtype, steps=4, batch=6, seed=3):
    rng = np.random.default_rng(seed)
    P = {p.name: (rng.standard_normal(tuple(int(d) for d in p.shape)) * 0.5).astype(dtype)
         for p in params}
    X = rng.standard_normal((batch, int(params[0].shape[0]))).astype(dtype)
    T = np.eye(5, dtype=dtype)[rng.integers(0, 5, batch)]
    losses = [step(P, X=X, T=T) for _ in range(steps)]
    return np.array(losses), P


@pytest.mark.parametrize("opt", [sb.SGD(0.1), sb.Momentum(0.05, 0.9), sb.Adam(0.01)],
                         ids=["sgd", "momentum", "adam"])
def test_training_steps_match_numba_bit_for_bit(lowerings, opt):
    L, params = _mlp(3)
    steps = lowerings(lambda: sb.compile_step(L, params, opt, target="cpu",
                                              dtype=np.float32))
    assert is_native(steps["native"].kernel) and not is_native(steps["numba"].kernel)
    out = {mode: _train(s, params, np.float32) for mode, s in steps.items()}
    same_bits(out["native"][0], out["numba"][0], "losses")
    for name in out["numba"][1]:
        same_bits(out["native"][1][name], out["numba"][1][name], name)


def test_a_deep_step_with_its_address_table_matches_numba(lowerings):
    L, params = _mlp(12, width=6)  # deep enough for stages, loops and the address table
    steps = lowerings(lambda: sb.compile_step(L, params, sb.Adam(0.01), target="cpu",
                                              dtype=np.float64))
    assert "_pa" in steps["native"].source and "for _l in range(" in steps["native"].source
    assert is_native(steps["native"].kernel)
    out = {mode: _train(s, params, np.float64, batch=4) for mode, s in steps.items()}
    same_bits(out["native"][0], out["numba"][0], "losses")
    for name in out["numba"][1]:
        same_bits(out["native"][1][name], out["numba"][1][name], name)


def test_a_forward_function_matches_numba(lowerings):
    X, W = sp.MatrixSymbol("X", N, 4), sp.MatrixSymbol("W", 4, 3)
    Y = sb.softmax(sb.tanh(X * W))
    fns = lowerings(lambda: sb.compile_forward(Y, target="cpu", dtype=np.float32))
    rng = np.random.default_rng(0)
    arrays = {"X": rng.standard_normal((5, 4)).astype(np.float32),
              "W": rng.standard_normal((4, 3)).astype(np.float32)}
    arrays["X"][2, 1] = np.nan
    same_bits(fns["native"](**arrays), fns["numba"](**arrays), "forward")


# --- the dialect, construct by construct -----------------------------------------------------

MATH1 = sorted(set(native.INTRINSIC) | set(native.EXTERN))

PROBE = '''
import math

import numpy as np
from numba import njit

DT = np.float32
ACC = np.float64


@njit(error_model="numpy", cache=True, inline="always")
def _twice_or_third(x):
    return x * 2 if x > 0 else -x / 3


@njit(error_model="numpy", cache=True)
def _pair(a, k):
    s = ACC(0.0)
    for i in range(k):
        s += a[i]
    return s, a[k - 1] * DT(2)


@njit("(float32[::1], float64[::1], float64[::1], int64[::1], int64[::1], int64,)",
      error_model="numpy", cache=True)
def probe(a, b, out, ints, iout, n):
    if a.size < 8 or b.size < 8 or out.size < 600 or iout.size < 64:
        raise ValueError("probe: arrays too small")
    k = 0
    # promotions: float32 with an int literal is float64, with DT stays float32
    out[k] = a[0] * 3
    out[k + 1] = a[0] * DT(3)
    out[k + 2] = a[1] / a[2]
    out[k + 3] = n / 7
    out[k + 4] = -a[3]
    out[k + 5] = -(a[3] - a[3])
    out[k + 6] = a[-1]
    out[k + 7] = b[-2]
    out[k + 8] = _twice_or_third(a[4])
    out[k + 9] = _twice_or_third(b[4])
    out[k + 10] = (a[5] if a[5] > 0 else 1)
    out[k + 11] = abs(a[6]) + abs(b[6])
    out[k + 12] = DT(n) * a[7]
    out[k + 13] = np.int64(a[7] * DT(10.7))
    out[k + 14] = DT(16777217)
    out[k + 15] = True + n
    s, last = _pair(a, 5)
    out[k + 16] = s
    out[k + 17] = last
    out[k + 18] = a[0] < 1 and b[0] > 0 or a[1] != a[1]
    out[k + 19] = not (a[2] >= b[2])
    k = 20
    for j in range(8):
        x = a[j]
        y = b[j]
        for name_k in range(1):
            out[k] = math.pow(x, DT(1.5))
            out[k + 1] = math.copysign(y, x)
            out[k + 2] = math.atan2(x, DT(0.5))
            out[k + 3] = math.isnan(x)
            out[k + 4] = math.isinf(y)
            out[k + 5] = math.isfinite(x)
            out[k + 6] = math.exp(n)
        k += 7
    # integers: floor division and modulo of every sign, and by zero (0, as Numba's
    # numpy error model), INT64_MIN // -1
    m = 0
    for i in range(8):
        for j in range(8):
            if m < 64:
                iout[m] = ints[i] // ints[j] if (i + j) % 2 == 0 else ints[i] % ints[j]
            m += 1
    # loops: while, break, continue, a negative step
    t = 0
    w = 0
    while t < 100:
        t += 3
        if t % 2 == 0:
            continue
        w += t
        if w > 150:
            break
    out[k] = w
    for i in range(10, 0, -3):
        out[k + 1] += i
    k += 2
    MATHS
    return ACC(out[0]), DT(k)
'''


def _probe_source():
    lines = []
    for f in MATH1:
        lines.append(f"for j in range(8):\n        out[k] = math.{f}(a[j])\n"
                     f"        out[k + 1] = math.{f}(b[j])\n        k += 2")
    return PROBE.replace("MATHS", "\n    ".join(lines))


def _probe_inputs():
    a = np.array([0.3, -1.7, 0.0, -0.0, 2.5, -3.25, -0.5, 0.9], np.float32)
    b = np.array([0.7, np.nan, -np.inf, np.inf, -2.0, 1e-300, 0.25, 1.5], np.float64)
    ints = np.array([7, -7, 0, 3, -2, np.iinfo(np.int64).min, -1, 1], np.int64)
    return a, b, ints


def test_every_construct_of_the_dialect_matches_numba(lowerings):
    source = _probe_source()
    mods = lowerings(lambda: cache.load(source))
    assert is_native(mods["native"].probe) and not is_native(mods["numba"].probe)
    got = {}
    for mode, mod in mods.items():
        a, b, ints = _probe_inputs()
        out, iout = np.zeros(600), np.zeros(64, np.int64)
        with np.errstate(all="ignore"):
            ret = mod.probe(a, b, out, ints, iout, 5)
        got[mode] = (ret, out, iout)
    assert type(got["native"][0]) is tuple and len(got["native"][0]) == 2
    same_bits(np.array(got["native"][0]), np.array(got["numba"][0]), "returned")
    same_bits(got["native"][1], got["numba"][1], "out")
    same_bits(got["native"][2], got["numba"][2], "integers")
    assert got["native"][2][0] == 7 // 7 and got["native"][2][2] == 0  # 7 // 0 is 0


def test_the_kernels_refuse_what_numba_refuses(lowerings):
    source = _probe_source()
    mods = lowerings(lambda: cache.load(source))
    a, b, ints = _probe_inputs()
    out, iout = np.zeros(600), np.zeros(64, np.int64)
    readonly = out.copy()
    readonly.setflags(write=False)
    bad = {
        "float64 for float32": (a.astype(np.float64), b, out, ints, iout, 5),
        "a list": (list(a), b, out, ints, iout, 5),
        "None": (None, b, out, ints, iout, 5),
        "two dimensions": (a.reshape(2, 4), b, out, ints, iout, 5),
        "not contiguous": (np.repeat(a, 2)[::2], b, out, ints, iout, 5),
        "read-only": (a, b, readonly, ints, iout, 5),
        "big-endian": (a.astype(">f4"), b, out, ints, iout, 5),
        "int32 for int64": (a, b, out, ints.astype(np.int32), iout, 5),
        "a string for an int": (a, b, out, ints, iout, "5"),
        "one argument short": (a, b, out, ints, iout),
    }
    for label, args in bad.items():
        for mode, mod in mods.items():
            with pytest.raises(TypeError) as info:
                mod.probe(*args)
            assert any(w in str(info.value) for w in ("No matching", "arguments", "probe() ")), (
                label, mode, info.value)
    with pytest.raises(TypeError):
        mods["native"].probe(a, b, out, ints, iout, n=5)
    # stricter than Numba, which truncates a float given for an int64 (symbp passes
    # sizes and step counts as ints: a float there is a bug to name, not to round)
    with pytest.raises(TypeError, match=r"argument 6 \(n\) must be an integer"):
        mods["native"].probe(a, b, out, ints, iout, 5.5)
    for mod in mods.values():  # the kernel's own raise: the same class and message
        with pytest.raises(ValueError, match="probe: arrays too small"):
            mod.probe(a[:4], b, out, ints, iout, 5)
    assert np.all(out == 0) and np.all(iout == 0)  # refused before anything was written


@pytest.mark.parametrize("construct", [
    "x = a[1:3]",  # a slice
    "x = (a, b)[n]",  # a tuple indexed at run time
    "x = a.sum()",  # a method
    "x = np.zeros(3)",  # NumPy
    "x = [1, 2]",  # a list
    "for x in prange(n):\n        pass",
    "x = 1 < n < 3",  # a chained comparison
    "x = 2 ** n",  # a power (the printers spell products)
])
def test_what_the_lowering_does_not_take_is_refused(construct):
    source = ("import numpy as np\nfrom numba import njit, prange\n\n"
              '@njit("(float64[::1], float64[::1], int64,)", error_model="numpy")\n'
              f"def k(a, b, n):\n    {construct}\n    return a[0]\n")
    with pytest.raises(native.Unsupported):
        native.translate(source)


def test_targets_and_options_outside_the_dialect_go_to_numba(cache_dir):
    X, W = sp.MatrixSymbol("X", N, 3), sp.MatrixSymbol("W", 3, 2)
    f = sb.Total(sb.tanh(X * W))
    checked = sb.compile(f, [W], target="cpu", dtype=np.float64, boundscheck=True)
    assert not is_native(kernel_of(checked))
    plain = sb.compile(f, [W], target="cpu", dtype=np.float64)
    assert is_native(kernel_of(plain))
    x, w = np.ones((4, 3)), np.full((3, 2), 0.5)
    same_bits(checked(X=x, W=w)[1]["W"], plain(X=x, W=w)[1]["W"])


def test_numba_lowers_every_module_when_asked(cache_dir, monkeypatch):
    monkeypatch.setenv("SYMBP_LOWER", "numba")
    L, params = _mlp(1)
    step = sb.compile_step(L, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
    assert not is_native(step.kernel)
    monkeypatch.setenv("SYMBP_LOWER", "llvm")
    cache._loaded.clear()
    with pytest.raises(SymbpError, match="SYMBP_LOWER='llvm'.*'native'.*'numba'"):
        sb.compile_step(L, params, sb.SGD(0.2), target="cpu", dtype=np.float32)


# --- the object code on disk ----------------------------------------------------------------


def _objects(d):
    return sorted((d / "__pycache__").glob("gen_*.native"))


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign recipe", "empty"])
def test_a_damaged_object_file_is_compiled_again_not_run(cache_dir, monkeypatch, damage):
    L, params = _mlp(1)
    first = _train(sb.compile_step(L, params, sb.SGD(0.1), target="cpu",
                                   dtype=np.float32), params, np.float32)
    (path,) = _objects(cache_dir)
    data = path.read_bytes()
    bad = {"truncated": data[:len(data) // 2],
           "flipped": data[:100] + bytes([data[100] ^ 0xFF]) + data[101:],
           "foreign recipe": bytes(32) + data[32:],
           "empty": b""}[damage]
    path.write_bytes(bad)
    cache._loaded.clear()
    compiled = []
    real = native._optimise
    monkeypatch.setattr(native, "_optimise", lambda ir: compiled.append(1) or real(ir))
    again = _train(sb.compile_step(L, params, sb.SGD(0.1), target="cpu",
                                   dtype=np.float32), params, np.float32)
    assert compiled == [1], "the damaged file was not compiled again"
    same_bits(again[0], first[0])
    assert path.read_bytes() == data  # rewritten whole


def test_a_second_load_reads_the_object_code(cache_dir, monkeypatch):
    L, params = _mlp(1)
    sb.compile_step(L, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
    assert len(_objects(cache_dir)) == 1
    cache._loaded.clear()
    monkeypatch.setattr(native, "_optimise", lambda ir: pytest.fail("compiled again"))
    step = sb.compile_step(L, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
    assert is_native(step.kernel) and np.isfinite(_train(step, params, np.float32)[0]).all()


GEMMS = """
import numpy as np
from numba import njit

from symbp.backends.blas import gemm as _gemm
"""
for _dt in ("float32", "float64"):
    for _form in ("nn", "tn", "nt", "tt"):
        _a = "a.T" if _form[0] == "t" else "a"
        _b = "b.T" if _form[1] == "t" else "b"
        GEMMS += (f'\n\n@njit("({_dt}[:, ::1], {_dt}[:, ::1], {_dt}[:, ::1], float64, '
                  f'float64,)", error_model="numpy", cache=True)\n'
                  f"def {_form}_{_dt}(a, b, c, al, be):\n    _gemm({_a}, {_b}, c, al, be)\n")


def test_products_of_every_layout_and_size_match_numba(lowerings):
    mods = lowerings(lambda: cache.load(GEMMS))
    assert is_native(mods["native"].nn_float32) and not is_native(mods["numba"].tt_float64)
    rng = np.random.default_rng(0)
    for dt in ("float32", "float64"):
        for m, k, n in [(3, 4, 5), (0, 3, 4), (3, 0, 4), (1, 1, 1), (64, 64, 64),
                        (65, 64, 64), (70, 33, 17)]:
            A = rng.standard_normal((m, k)).astype(dt)
            B = rng.standard_normal((k, n)).astype(dt)
            C0 = rng.standard_normal((m, n)).astype(dt)
            for form in ("nn", "tn", "nt", "tt"):
                a = np.ascontiguousarray(A.T) if form[0] == "t" else A
                b = np.ascontiguousarray(B.T) if form[1] == "t" else B
                out = {}
                for mode, mod in mods.items():
                    out[mode] = C0.copy()
                    getattr(mod, f"{form}_{dt}")(a, b, out[mode], -0.5, 2.0)
                same_bits(out["native"], out["numba"], (dt, form, m, k, n))
                np.testing.assert_allclose(out["native"], -0.5 * (A @ B) + 2 * C0,
                                           rtol=1e-4, atol=1e-4)
    for mod in mods.values():
        with pytest.raises(ValueError, match="the sizes of A @ B and C disagree"):
            mod.nn_float64(np.zeros((2, 3)), np.zeros((4, 5)), np.zeros((2, 5)), 1.0, 0.0)


THREADED_STEPS = """
import sys, threading
import numpy as np, sympy as sp
import symbp as sb
N = sp.Symbol("N")
def net(w, depth):
    X, T = sp.MatrixSymbol("X", N, 3), sp.MatrixSymbol("T", N, 2)
    H, params, sizes = X, [], [3] + [w] * depth + [2]
    for k, (a, b) in enumerate(zip(sizes, sizes[1:])):
        W, bb = sp.MatrixSymbol(f"W{k}", a, b), sp.MatrixSymbol(f"b{k}", 1, b)
        params += [W, bb]
        H = sb.dense(H, W, bb)
        if k < len(sizes) - 2:
            H = [sb.tanh, sb.relu, sb.sigmoid][k % 3](H)
    return sb.softmax_cross_entropy(H, T), params, sizes
cfgs = [(5, 1), (6, 2), (7, 3), (9, 2), (4, 4), (8, 1)]
res, errs = {}, []
def work(c):
    try:
        L, params, sizes = net(*c)
        st = sb.compile_step(L, params, sb.Adam(0.01), target=sys.argv[1], dtype=np.float64)
        rng = np.random.default_rng(c[0])
        P = {}
        for k, (a, b) in enumerate(zip(sizes, sizes[1:])):
            P[f"W{k}"], P[f"b{k}"] = rng.standard_normal((a, b)) * 0.5, np.zeros((1, b))
        x, t = rng.standard_normal((8, 3)), np.eye(2)[np.arange(8) % 2]
        res[c] = [st(P, X=x, T=t) for _ in range(3)]
    except Exception as err:
        errs.append(f"{c}: {type(err).__name__}: {err}")
threads = [threading.Thread(target=work, args=(c,)) for c in cfgs]
for t in threads:
    t.start()
for t in threads:
    t.join()
at_once = dict(res)
for c in cfgs:  # the same steps again, one after another (from the cache now)
    work(c)
print(errs or [c for c in cfgs if at_once[c] != res[c]] or "ok")
"""


@pytest.mark.parametrize("target", ["cpu", "numpy"])
def test_steps_compiled_from_threads_in_a_fresh_process(target, tmp_path):
    # six steps compiled from six threads at once, in a process that has looked up no head
    # yet: the registry was marked loaded before its modules were, and a second thread
    # read it half filled ("unknown matrix head AxisSum", 4 runs of 6 failed).  Each
    # step's first three losses must equal those of the same step compiled alone
    import os
    import subprocess
    import sys

    env = dict(os.environ, SYMBP_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", THREADED_STEPS, target], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "ok", r.stdout


def test_threads_compiling_at_once_each_get_their_kernel(cache_dir):
    # the lowering and its one engine, from four threads at once (the modules are
    # generated first, one after another: whole steps compiled from threads are
    # test_steps_compiled_from_threads_in_a_fresh_process)
    import threading

    from symbp.backends import numba_cpu

    sources = []
    for w in (5, 6, 7, 9):
        L, params = _mlp(1, width=w)
        sources.append(numba_cpu.generate(sb.gradient_program(L, params), np.float64,
                                          "cpu")[0])
    mods: dict = {}
    errors: list = []

    def load(k):
        try:
            mods[k] = cache.load(sources[k])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=load, args=(k,)) for k in range(len(sources))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    kernels = [mods[k].loss_and_grad for k in range(len(sources))]
    assert all(is_native(k) for k in kernels) and len({id(k) for k in kernels}) == 4
    assert all(cache.load(src).loss_and_grad is k for src, k in zip(sources, kernels))


def test_names_llvm_would_not_take_are_fine(lowerings):
    # a parameter named α: the kernel's arguments are named by position in the IR
    X, A, T = sp.MatrixSymbol("X", N, 3), sp.MatrixSymbol("α", 3, 2), sp.MatrixSymbol("T", N, 2)
    f = sb.mse(sb.tanh(X * A), T)
    fns = lowerings(lambda: sb.compile(f, [A], target="cpu", dtype=np.float64))
    assert is_native(kernel_of(fns["native"]))
    rng = np.random.default_rng(5)
    arrays = {"X": rng.standard_normal((4, 3)), "α": rng.standard_normal((3, 2)),
              "T": rng.standard_normal((4, 2))}
    got = {mode: fn(**arrays) for mode, fn in fns.items()}
    same_bits(np.float64(got["native"][0]), np.float64(got["numba"][0]))
    same_bits(got["native"][1]["α"], got["numba"][1]["α"])


def test_a_module_llvm_refuses_goes_to_numba_with_a_warning(cache_dir, monkeypatch):
    def refuse(ir):
        raise RuntimeError("<string>:1:1: error: made up")

    monkeypatch.setattr(native, "_optimise", refuse)
    L, params = _mlp(1)
    with pytest.warns(RuntimeWarning, match="own lowering failed.*made up.*gen_"):
        step = sb.compile_step(L, params, sb.SGD(0.1), target="cpu", dtype=np.float32)
    assert not is_native(step.kernel)
    assert np.isfinite(_train(step, params, np.float32)[0]).all()
