"""The CUDA backend against the NumPy reference, without a GPU.

Numba's CUDA simulator must be switched on before numba is first imported, and other
test files import numba normally, so the kernels run in subprocesses
(tests/cuda_check.py): ``sim`` runs every case of its table on the simulator and reports
errors against the float64 NumPy reference; ``ptx`` compiles every float32 kernel for
real hardware (sm_80) and reports its float64 instructions.  Both start once, in
parallel, when the first test needs them.  The source checks run here: generating
kernels needs no Numba.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from conftest import need
from cuda_check import CASES

import symbp as sb
from symbp.backends import numba_cuda
from symbp.errors import SymbpError

HERE = Path(__file__).parent
_procs: dict = {}


def _start(mode: str):
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if mode == "sim":
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.Popen([sys.executable, str(HERE / "cuda_check.py"), mode],
                            cwd=HERE.parent, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _result(mode: str) -> dict:
    """The JSON report of ``cuda_check.py mode`` (both modes start on the first call)."""
    for m in ("sim", "ptx"):
        if m not in _procs:
            _procs[m] = _start(m)
    p = _procs[mode]
    if isinstance(p, dict):
        return p
    try:
        out, err = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"cuda_check.py {mode} ran over 400 s")
    if p.returncode != 0:
        pytest.fail(f"cuda_check.py {mode} failed:\n{err[-3000:]}")
    _procs[mode] = json.loads(out.strip().splitlines()[-1])
    return _procs[mode]


@pytest.fixture(scope="module", autouse=True)
def _stop_unread_checks():
    # a run that selects only one mode (-k ptx) must not leave the other running on
    yield
    for p in _procs.values():
        if isinstance(p, subprocess.Popen) and p.poll() is None:
            p.kill()
            p.wait()


SIM_KEYS = ([f"{c}/{d}" for c, (_, _, dtypes) in CASES.items() for d in dtypes]
            + ["forward_softmax/float32", "forward_softmax/float64"])
TOL = {"float32": 1e-5, "float64": 1e-12}


@pytest.mark.parametrize("key", SIM_KEYS)
def test_simulator_matches_numpy(key):
    r = _result("sim")[key]
    tol = TOL[key.split("/")[1]]
    assert r["err"] <= tol, (
        f"{key}: cuda is {r['err']:.2e} from the float64 reference (NumPy in this dtype: "
        f"{r['ref_err']:.2e}), tolerance {tol:.0e}")


def test_ptx_float32_kernels_have_no_float64():
    r = _result("ptx")
    need(r["nvvm"] == "ok", "nvvm", r["nvvm"])
    kernels = r["kernels"]
    # the grep works: a bare float64 literal does show up as .f64 instructions
    assert kernels.pop("control/float64_literal")["n_f64"] > 0
    assert len(kernels) >= 20, sorted(kernels)  # every case's kernels were compiled
    bad = {k: v["f64"] for k, v in kernels.items() if v["n_f64"]}
    assert not bad, f"float64 instructions in float32 kernels: {bad}"


# --- the generated source, checked here (no Numba involved) --------------------------------


def _program(case, dtype=np.float32):
    f, wrt = CASES[case][0]()
    return sb.gradient_program(f, wrt)


def _kernels(src: str) -> str:
    """The device code of a generated module: every @cuda.jit function's text."""
    return "\n".join(re.findall(r"@cuda\.jit.*?\n(?=\n\n|\Z)", src, flags=re.S))


@pytest.mark.parametrize("case", list(CASES))
def test_float32_source_discipline(case):
    src = numba_cuda.generate(_program(case), np.float32)
    code = re.sub(r'""".*?"""', "", _kernels(src), flags=re.S)  # docstrings quote the math
    assert code.count("@cuda.jit") >= 1
    assert "float64" not in code and "numpy." not in code and "np." not in code
    # every float literal is wrapped as float32(...), or as _DT(...) in the device routines
    # printed from function rows (_DT = float32 here): strip those, no literal is left
    assert "_DT = float32" in src
    bare = re.sub(r"(?:float32|_DT)\([^()]*\)", "", code)
    assert not re.findall(r"(?<![\w.])\d+\.\d*|(?<![\w.])\d+e[-+]?\d+", bare), bare


def test_float64_source_uses_float64_constants():
    src = numba_cuda.generate(_program("mlp2_relu_sigmoid_mse"), np.float64)
    assert "float64(1)" in src and "float32(" not in _kernels(src)


@pytest.mark.parametrize("case, heads", [
    ("mlp_tanh_sce", ["_mm_nt", "_mm_tn", "_sce_softmax_rows", "_total"]),
    ("softmax_mse_prelu", ["_softmax", "_axis_sum0", "_axis_sum1"]),
    ("mlp_activations_logsoftmax", ["_log_softmax", "_axis_sum1", "_elu", "_softplus",
                                    "_leaky_relu", "math.erf"]),
    ("tied_autoencoder", ["_mm_nt", "_total"]),
    ("transposes_zero_grad", ["_transpose", "_mm_nn", "_mm_nt", "_scalars"]),
])
def test_source_names_its_kernels(case, heads):
    src = numba_cuda.generate(_program(case), np.float32)
    for h in heads:
        assert h in src, h
    assert "def symbp_cuda(" in src and "_SIGNATURES = {" in src


def test_fused_map_keeps_intermediates_in_registers():
    # dense + tanh: one kernel, the product's, writes tanh(X W + b) and never stores the
    # product X W nor the sum X W + b
    src = numba_cuda.generate(_program("mlp_tanh_sce"), np.float32)
    k = [b for b in _kernels(src).split("@cuda.jit") if "math.tanh" in b]
    assert len(k) == 1 and k[0].count("] = ") == 3  # two shared-memory loads, one store
    assert "_acc += _sA" in k[0] and "math.tanh(_acc + b1_)" in k[0].replace("b1_ + _acc",
                                                                            "_acc + b1_")


def test_bias_gradients_are_summed_in_their_map_kernel():
    # g = a map's value, 1ᵀ g its bias gradient: one kernel computes both (launches: the
    # unfused program has one _axis_sum0 per bias, the fused none)
    p = _program("mlp_tanh_sce")
    fused = numba_cuda.generate(p, np.float32)
    assert "_axis_sum0[" not in fused and "_softmax[" not in fused
    summing = [k for k in _kernels(fused).split("@cuda.jit") if "def _k_" in k and "_sh[" in k]
    assert len(summing) == 2, summing  # the two biases
    unfused = numba_cuda.generate(p, np.float32, fuse=False)
    assert unfused.count("_axis_sum0[") == 2


def test_unfused_has_one_kernel_per_map():
    p = _program("mlp_tanh_sce")
    n_maps = sum(isinstance(a.expr, sb.Elementwise) for a in p.body)
    src = numba_cuda.generate(p, np.float32, fuse=False)
    assert src.count("def _k_") == n_maps


@pytest.mark.parametrize("opts, match", [
    ({"tile": 3}, "power of two"),
    ({"tile": 64}, "1024"),
    ({"block": 2048}, "1024"),
    ({"threads": 8}, "unknown CUDA options"),
])
def test_bad_options_are_named(opts, match):
    with pytest.raises(SymbpError, match=match):
        numba_cuda.build(_program("scalar"), np.float32, **opts)


def test_reserved_names_are_renamed():
    # an input called `math` must not shadow the math module inside kernels
    X, m = sp.MatrixSymbol("X", sp.Symbol("N"), 3), sp.MatrixSymbol("math", 1, 3)
    f = sb.mse(sb.tanh(sb.dense(X, sp.MatrixSymbol("W", 3, 3), m)), X)
    src = numba_cuda.generate(sb.gradient_program(f, [m]), np.float32)
    assert "def symbp_cuda(X, W, math_2, N):" in src  # inputs in the order written


# --- the scalar printer, evaluated as plain Python against SymPy ----------------------------

_x = sp.Symbol("x", real=True)
_POINTS = [-30.0, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0]
_NO_PRINTER_ROW = {"rrelu", "swish"}  # rrelu is leaky_relu with a random slope; swish = silu


def _device_namespace(dtype_name):
    """The printed code's globals, with @cuda.jit(device=True) helpers as Python functions."""
    from types import SimpleNamespace

    ns = {"math": __import__("math"), "float32": np.float32, "float64": np.float64,
          "_DT": getattr(np, dtype_name),
          "cuda": SimpleNamespace(jit=lambda *a, **k: (lambda f: f))}
    for src in numba_cuda._HELPERS.values():
        exec(src, ns)  # the backend's own table, not user text
    return ns


@pytest.mark.parametrize("name", sorted(set(sb.functions.FUNCTIONS) - _NO_PRINTER_ROW))
def test_printer_values_and_derivatives_match_sympy(name):
    f = sb.functions.FUNCTIONS[name]
    y = f(_x) if name not in ("prelu",) else f(_x, sp.Rational(1, 4))
    ns = _device_namespace("float64")
    for expr in (y, sp.diff(y, _x)):
        code = numba_cuda.CudaPrinter("float64", set()).doprint(expr)
        for v in _POINTS:
            got = eval(code, dict(ns, x=np.float64(v)))  # our printer's output, not user text
            want = float(sp.N(expr.subs(_x, v), 30))
            assert abs(got - want) <= 1e-12 * max(1.0, abs(want)), (name, str(expr), v, code)
