"""Data-parallel training over MPI: ``mpiexec -n K`` runs of tests/mpi_worker.py end with
the parameters of one process with the same global batch (the independent reference is
the one-process ``fit``), on every rank; uneven shards, broadcast, resume with another
rank count, and a failing rank that must stop the others."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mpi_worker
import numpy as np
import pytest
from conftest import have, need

from symbp import checkpoint as ckpt
from symbp import distributed, train
from symbp.errors import SymbpError, TrainingError

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "mpi_worker.py"


def mpiexec() -> str | None:
    # The mpiexec beside this Python (MPICH's wheel installs it into the venv) first.
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def launch(k, *args, timeout=120):
    need(have("mpi4py") and mpiexec() is not None, "mpi")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    t0 = time.monotonic()
    p = subprocess.run([mpiexec(), "-n", str(k), sys.executable, str(WORKER), *args],
                       capture_output=True, text=True, timeout=timeout, env=env)
    return p, time.monotonic() - t0


def train_mpi(tmp_path, k, *args):
    out = tmp_path / f"out{k}.npz"
    p, _ = launch(k, "--out", str(out), *args)
    assert p.returncode == 0, p.stdout + p.stderr
    r = np.load(out)
    assert r["same"] == 1, "the ranks ended with different parameters"
    return r


def train_one(*args):
    m, h = mpi_worker.run(mpi_worker.parser().parse_args(list(args)))
    return m.params, h


def _model_with(params):
    m = mpi_worker.model()
    for k, v in params.items():
        m.params[k][...] = v
    return m


def assert_close(params, r, rtol):
    for k, v in params.items():
        err = np.max(np.abs(r[k] - v)) / np.max(np.abs(v))
        assert err <= rtol, f"{k}: relative difference {err:.2e} > {rtol:g}"


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_same_as_one_process_float64(tmp_path, k, opt):
    # 50 rows in global batches of 16: 16, 16, 16, 2; on 3 ranks the shards are 6/5/5 and
    # 1/1/0 (a rank with no rows), so both weighting and the last partial batch count.
    args = ["--opt", opt, "--epochs", "3"]
    r = train_mpi(tmp_path, k, *args)
    params, h = train_one(*args)
    assert_close(params, r, 1e-12)
    assert int(r["steps"]) == h.steps == 12
    np.testing.assert_allclose(r["loss"], h.loss, rtol=1e-12)  # the loss is reduced too
    # accuracy after each epoch and evaluate() on other rows: per-rank shares, reduced
    np.testing.assert_allclose(r["accuracy"], h.accuracy, rtol=1e-12)
    X, y = mpi_worker.data(n=31, seed=5)
    ev = train.evaluate(_model_with(params), X, y)
    np.testing.assert_allclose(r["test"], [ev["loss"], ev["accuracy"]], rtol=1e-12)


@pytest.mark.parametrize("k,opt,target", [
    (3, "adam", "numpy"),
    pytest.param(2, "momentum", "cpu", marks=pytest.mark.needs(have("numba"), "numba"))])
def test_a_cnn_same_as_one_process_float64(tmp_path, k, opt, target):
    # 4-D kernels and 1-D biases in the flat buffers, images sharded along their first
    # axis; one process (numpy target, the reference update) is the reference
    args = ["--model", "cnn", "--opt", opt, "--target", target]
    r = train_mpi(tmp_path, k, *args)
    params, h = train_one("--model", "cnn", "--opt", opt)
    assert r["K1"].shape == (3, 1, 3, 3) and r["b1"].shape == (3,)
    assert_close(params, r, 1e-12)
    np.testing.assert_allclose(r["loss"], h.loss, rtol=1e-12)
    assert h.loss[-1] < h.loss[0]


@pytest.mark.needs(have("numba"), "numba")
@pytest.mark.parametrize("opt,how", [("sgd", "shared"), ("momentum", "allreduce"),
                                     ("adam", "shared"), ("adam", "allreduce")])
def test_compiled_update_matches_the_reference_float64(tmp_path, opt, how):
    # On 'cpu' the ranks update the flat buffers with a compiled loop, which also sums the
    # ranks' rows of shared memory ('shared') or reads MPI's Allreduce; one process with
    # the 'numpy' target takes the reference optim.update.  Resumed halfway, so the
    # loop also picks up optimizer buffers restored from a checkpoint.
    path = tmp_path / "run.ckpt"
    train_mpi(tmp_path, 2, "--opt", opt, "--target", "cpu", "--epochs", "2",
              "--checkpoint", str(path), "--sum", how)
    r = train_mpi(tmp_path, 3, "--opt", opt, "--target", "cpu", "--epochs", "4",
                  "--checkpoint", str(path), "--resume", "--sum", how)
    assert_close(train_one("--opt", opt, "--epochs", "4")[0], r, 1e-12)


@pytest.mark.parametrize("target,how", [("numpy", "allreduce"), pytest.param(
    "cpu", "shared", marks=pytest.mark.needs(have("numba"), "numba")), pytest.param(
    "cpu", "allreduce", marks=pytest.mark.needs(have("numba"), "numba"))])
def test_same_as_one_process_float32(tmp_path, target, how):
    # One process takes the fused step on 'cpu'; the ranks the gradient, then the update.
    args = ["--opt", "adam", "--dtype", "float32", "--target", target, "--batch", "20",
            "--sum", how]
    r = train_mpi(tmp_path, 2, *args)
    params, _ = train_one(*args)
    assert r["W1"].dtype == np.float32
    assert_close(params, r, 1e-5)


def test_random_slopes_are_drawn_for_the_global_batch(tmp_path):
    # RReLU draws its slopes from fit's seeded rng: a rank must use its rows of the global
    # batch's draw, or the result would differ from one process.
    args = ["--act", "rrelu", "--opt", "momentum"]
    r = train_mpi(tmp_path, 3, *args)
    assert_close(train_one(*args)[0], r, 1e-12)


def test_parameters_start_from_rank_0(tmp_path):
    # Each rank builds its model with a different seed; rank 0's must win on all.
    r = train_mpi(tmp_path, 3, "--seed-per-rank")
    assert_close(train_one()[0], r, 1e-12)


def test_resume_on_a_different_number_of_ranks(tmp_path):
    path = tmp_path / "run.ckpt"
    train_mpi(tmp_path, 2, "--opt", "adam", "--epochs", "2", "--checkpoint", str(path))
    r = train_mpi(tmp_path, 3, "--opt", "adam", "--epochs", "4", "--checkpoint", str(path),
                  "--resume")
    params, h = train_one("--opt", "adam", "--epochs", "4")
    assert_close(params, r, 1e-12)
    assert ckpt.load(path).meta["epoch"] == 4


def test_a_failing_rank_stops_every_rank(tmp_path):
    # Rank 1 raises in the 6th step (the 2nd epoch); ranks 0 and 2 are then waiting in the
    # Allreduce: the job must end, non-zero, and rank 0's checkpoint of epoch 1 stay whole.
    path = tmp_path / "run.ckpt"
    p, seconds = launch(3, "--checkpoint", str(path), "--fail-rank", "1", "--fail-step", "5",
                        timeout=60)
    assert p.returncode != 0
    assert "injected failure on rank 1" in p.stderr and "rank 1 of 3 failed" in p.stderr
    assert seconds < 30
    assert ckpt.load(path).meta["epoch"] == 1


def test_demo_on_two_processes_matches_one(tmp_path):
    need(have("sklearn"), "scikit-learn")
    need(have("mpi4py") and mpiexec() is not None, "mpi")
    cmd = [sys.executable, "-m", "symbp", "demo", "--epochs", "2", "--target", "numpy",
           "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    two = subprocess.run([mpiexec(), "-n", "2", *cmd, "--distributed", "mpi"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert one.stdout.startswith("final accuracy")
    assert two.stdout == one.stdout  # rank 0 alone prints, the same accuracy


def test_a_killed_rank_stops_every_rank(tmp_path):
    # SIGKILL leaves no chance to report or abort: mpiexec must end the job itself.
    path = tmp_path / "run.ckpt"
    p, seconds = launch(2, "--checkpoint", str(path), "--fail-rank", "1", "--fail-step", "5",
                        "--kill", timeout=60)
    assert p.returncode != 0
    assert seconds < 30
    assert ckpt.load(path).meta["epoch"] == 1


@pytest.mark.parametrize("target", ["numpy", pytest.param(
    "cpu", marks=pytest.mark.needs(have("numba"), "numba"))])
def test_a_nan_in_one_shard_stops_every_rank_with_the_error(tmp_path, target):
    # Row 7 of X is NaN: it lands in one rank's shard, but the reduced loss is NaN on all,
    # so every rank raises the same TrainingError (naming the row) instead of waiting.
    # On 'cpu' the compiled update kept the parameters and checked them itself.
    out = tmp_path / "nan.npz"
    p, seconds = launch(3, "--out", str(out), "--nan-row", "7", "--target", target,
                        timeout=60)
    assert p.returncode == 3, p.stdout + p.stderr
    assert seconds < 30
    msg = str(np.load(out)["error"])
    with pytest.raises(TrainingError) as one:  # the same error as on one process
        train_one("--nan-row", "7", "--target", target)
    assert msg == str(one.value) and "rows [7]" in msg, msg


@pytest.mark.needs(have("numba"), "numba")
def test_parameters_that_overflow_are_restored_on_every_rank(tmp_path):
    # An infinite learning rate makes the parameters infinite in the first update while
    # that step's loss is still finite: the compiled update's own check must catch it on
    # every rank, with the error one process gives (its loss may differ in the last digit).
    out = tmp_path / "inf.npz"
    p, _ = launch(2, "--out", str(out), "--target", "cpu", "--lr", "inf", timeout=60)
    assert p.returncode == 3, p.stdout + p.stderr
    msg = str(np.load(out)["error"])
    with pytest.raises(TrainingError) as one:
        train_one("--target", "cpu", "--lr", "inf")
    strip = re.compile(r"the loss is [^;]*;")
    assert strip.sub("", msg) == strip.sub("", str(one.value)), msg
    assert "step 1:" in msg and "made parameter(s) W1" in msg and "before this step" in msg


# --- without MPI ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 5, 16, 17])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shards_cover_the_batch_once(n, size):
    spans = [distributed.shard(n, r, size) for r in range(size)]
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    sizes = [hi - lo for lo, hi in spans]
    assert max(sizes) - min(sizes) <= 1


def test_an_unknown_way_to_sum_is_named(monkeypatch):
    monkeypatch.setenv("SYMBP_MPI_SUM", "nccl")
    with pytest.raises(SymbpError, match=r"SYMBP_MPI_SUM='nccl': use 'shared' .* 'allreduce'"):
        distributed.summer(None, 10, np.float64)


def test_missing_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    X, y = mpi_worker.data()
    with pytest.raises(SymbpError, match=r"pip install 'symbp\[mpi\]'"):
        train.fit(mpi_worker.model(), X, y, epochs=1, progress=False, distributed="mpi")
    with pytest.raises(SymbpError, match="use 'mpi'"):
        train.fit(mpi_worker.model(), X, y, epochs=1, progress=False, distributed="horovod")


def test_import_symbp_does_not_import_mpi4py():
    code = "import sys, symbp, symbp.train; assert 'mpi4py' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.needs(have("numba"), "numba")
def test_a_schedule_is_followed_by_every_rank(tmp_path):
    # the ranks' compiled flat update reads the learning rate of each epoch
    r = train_mpi(tmp_path, 2, "--opt", "adam", "--target", "cpu", "--schedule")
    assert_close(train_one("--opt", "adam", "--schedule")[0], r, 1e-12)
    fixed, _ = train_one("--opt", "adam")
    assert not np.allclose(fixed["W1"], r["W1"], rtol=1e-6)
