"""The device-resident CUDA training step, on Numba's simulator (no GPU needed).

``tests/cuda_check.py step`` runs in its own process (the simulator must be switched on
before numba is imported): the step and ``fit`` on 'cuda' against 'cpu' for SGD,
momentum and Adam in float64 and float32, with every launch and copy the simulator makes
counted by wrapping it.  The checks here read its report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import have, need

HERE = Path(__file__).parent
TOL = {"float64": 1e-10, "float32": 1e-5}
_report: dict = {}


def _run(mode: str, sim: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.run([sys.executable, str(HERE / "cuda_check.py"), mode], cwd=HERE.parent,
                          env=env, text=True, capture_output=True, timeout=600)


def report() -> dict:
    if not _report:
        need(have("numba"), "numba")
        p = _run("step", sim=True)
        if p.returncode != 0:
            pytest.fail(f"cuda_check.py step failed:\n{p.stderr[-3000:]}")
        _report.update(json.loads(p.stdout.strip().splitlines()[-1]))
    return _report


STEP_KEYS = [f"{o}/{d}" for o in ("SGD", "Momentum", "Adam") for d in ("float64", "float32")]


@pytest.mark.parametrize("key", STEP_KEYS)
def test_step_matches_cpu(key):
    r = report()["step"][key]
    tol = TOL[key.split("/")[1]]
    assert r["err"] <= tol, f"{key}: parameters {r['err']:.2e} from the CPU step's after 4 steps"


@pytest.mark.parametrize("key", STEP_KEYS)
def test_step_moves_no_parameter(key):
    # per step: the launches the runtime counts are the simulator's, and the only copy is
    # the loss and its flag coming back (2 numbers), never a parameter
    r = report()["step"][key]
    itemsize = 8 if key.endswith("64") else 4
    for s in r["per_step"]:
        assert s["launches"] == r["launches"] == s["counted"][0]
        assert s["copies"] == [["d2h", 2 * itemsize]], s["copies"]
        assert s["counted"][1:] == [0, 1, 2 * itemsize]
    # the program's kernels plus one update kernel: 9 + 1 (bias and activation in their
    # product's kernel, bias gradients summed in their map's, the softmax in the loss's
    # row kernel; 14 + the NumPy update before)
    assert r["launches"] == 10


def test_host_parameters_are_updated_in_place():
    r = report()["host_params"]
    assert r["err"] <= 1e-10 and abs(r["loss"][0] - r["loss"][1]) <= 1e-12


FIT_KEYS = ["SGD/float64/guard=True", "Momentum/float32/guard=False",
            "Adam/float64/guard=False", "Adam/float32/guard=True"]


@pytest.mark.parametrize("key", FIT_KEYS)
def test_fit_matches_cpu(key):
    r = report()["fit"][key]
    tol = TOL[key.split("/")[1]]
    assert r["err"] <= tol and r["loss_err"] <= tol, r


@pytest.mark.parametrize("key", FIT_KEYS)
def test_fit_traffic_per_step(key):
    # the same fit with more steps (batch 3 against 6): the extra steps add launches and,
    # with the guard, one small read of the loss each; nothing of a parameter's size
    r = report()["fit"][key]
    (s6, s3), (c6, c3) = r["steps"], r["copies"]
    assert s3 > s6
    assert r["launches"] == r["counted"]
    extra = Counter(map(tuple, c3))
    extra.subtract(Counter(map(tuple, c6)))
    extra = {k: v for k, v in extra.items() if v}
    itemsize = 8 if "float64" in key else 4
    if key.endswith("True"):
        assert extra == {("d2h", 2 * itemsize): s3 - s6}, extra
    else:  # the loss stays on the device: read once per epoch, whatever the steps
        assert sum(extra.values()) == 0 and not any(b in r["param_bytes"]
                                                    for _, b in extra), extra
    assert (r["launches"][1] - r["launches"][0]) % (s3 - s6) == 0


def test_resume_restores_the_device_optimizer_state():
    # Adam's buffers go to the checkpoint and back onto the device: the resumed run ends
    # where the uninterrupted one does
    assert report()["resume"] <= 1e-12


def test_out_of_memory_is_one_clear_line():
    r = report()["oom"]
    for where in ("build", "run"):
        msg = r[where]
        assert "\n" not in msg and "ran out of memory" in msg and "batch_size" in msg, msg
    assert "N=9" in r["run"]


def test_no_gpu_says_so_in_one_line():
    p = subprocess.run(
        [sys.executable, "-c", "import symbp as sb, sympy as sp, numpy as np\n"
         "from numba import cuda\n"
         "if cuda.is_available(): print('GPU'); raise SystemExit\n"
         "x = sp.Symbol('x')\n"
         "try:\n    sb.compile(x**2, [x], target='cuda')\n"
         "except sb.SymbpError as e:\n    print('ERR', e)\n"],
        cwd=HERE.parent, env={k: v for k, v in os.environ.items()
                              if k != "NUMBA_ENABLE_CUDASIM"},
        text=True, capture_output=True, timeout=300)
    out = p.stdout.strip()
    if out == "GPU":
        pytest.skip("this machine has a GPU: there is no missing driver to report")
    assert out.startswith("ERR ") and "\n" not in out, (out, p.stderr[-2000:])
    assert "NVIDIA GPU" in out and "target='cpu'" in out
