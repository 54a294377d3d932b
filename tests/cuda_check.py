"""CUDA backend checks that must run in their own process (tests/test_backend_cuda.py).

    python tests/cuda_check.py sim   # needs NUMBA_ENABLE_CUDASIM=1 set before numba loads:
                                     # every case on the simulator vs the NumPy reference
    python tests/cuda_check.py step  # NUMBA_ENABLE_CUDASIM=1: the device-resident training
                                     # step and fit against 'cpu', with the simulator's own
                                     # launches and copies counted
    python tests/cuda_check.py ptx   # real NVVM, no GPU needed: every float32 kernel of the
                                     # cases compiled to PTX for sm_80, counting .f64 lines;
                                     # needs NVIDIA's numba-cuda (pip install 'symbp[cuda]')

Prints one JSON object on the last line of stdout.  The case table is shared by both modes
so that every program the simulator checks is also compiled for real hardware.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import sympy as sp

import symbp as sb
from symbp.matrix import Total

N = sp.Symbol("N")


def _mlp_sce():
    X, T = sp.MatrixSymbol("X", N, 6), sp.MatrixSymbol("T", N, 3)
    W1, b1 = sp.MatrixSymbol("W1", 6, 5), sp.MatrixSymbol("b1", 1, 5)
    W2, b2 = sp.MatrixSymbol("W2", 5, 3), sp.MatrixSymbol("b2", 1, 3)
    Z = sb.dense(sb.tanh(sb.dense(X, W1, b1)), W2, b2)
    return sb.softmax_cross_entropy(Z, T), [W1, b1, W2, b2]


def _mlp2_mse():
    X, Y = sp.MatrixSymbol("X", N, 5), sp.MatrixSymbol("Y", N, 2)
    W1, b1 = sp.MatrixSymbol("W1", 5, 7), sp.MatrixSymbol("b1", 1, 7)
    W2, b2 = sp.MatrixSymbol("W2", 7, 6), sp.MatrixSymbol("b2", 1, 6)
    W3, b3 = sp.MatrixSymbol("W3", 6, 2), sp.MatrixSymbol("b3", 1, 2)
    H1 = sb.relu(sb.dense(X, W1, b1))
    H2 = sb.sigmoid(sb.dense(H1, W2, b2))
    return sb.mse(sb.dense(H2, W3, b3), Y), [W1, b1, W2, b2, W3, b3]


def _mlp_activations():
    # softplus, elu, leaky_relu, gelu, silu (helpers and formulas); a log-softmax output
    X, T = sp.MatrixSymbol("X", N, 4), sp.MatrixSymbol("T", N, 3)
    W1, b1 = sp.MatrixSymbol("W1", 4, 6), sp.MatrixSymbol("b1", 1, 6)
    W2, b2 = sp.MatrixSymbol("W2", 6, 3), sp.MatrixSymbol("b2", 1, 3)
    Z1 = sb.dense(X, W1, b1)
    H = sb.elu(Z1) + sb.softplus(Z1) + sb.leaky_relu(Z1, 0.1) + sb.gelu(Z1) + sb.silu(Z1)
    P = sb.log_softmax(sb.dense(H, W2, b2))
    return -Total(sp.HadamardProduct(T, P)) / N, [W1, b1, W2, b2]


def _softmax_mse_prelu():
    # softmax as a value (its backward needs row sums); PReLU slopes: a row and a scalar
    X, Y = sp.MatrixSymbol("X", N, 5), sp.MatrixSymbol("Y", N, 4)
    W, b = sp.MatrixSymbol("W", 5, 4), sp.MatrixSymbol("b", 1, 4)
    a, c = sp.MatrixSymbol("a", 1, 4), sp.Symbol("c", real=True)
    H = sb.prelu(sb.dense(X, W, b), a)
    return sb.mse(sb.softmax(c * H), Y), [W, b, a, c]


def _tied_autoencoder():
    # W and Wᵀ in one network: products with transposed operands forward and backward
    X = sp.MatrixSymbol("X", N, 6)
    W, b = sp.MatrixSymbol("W", 6, 3), sp.MatrixSymbol("b", 1, 3)
    H = sb.tanh(sb.dense(X, W, b))
    return sb.mse(H * W.T, X), [W, b]


def _bce_logits():
    X, Y = sp.MatrixSymbol("X", N, 3), sp.MatrixSymbol("Y", N, 1)
    W, b = sp.MatrixSymbol("W", 3, 1), sp.MatrixSymbol("b", 1, 1)
    return sb.bce_with_logits(sb.dense(X, W, b), Y), [W, b]


def _transposes():
    # Xᵀ as an operand of a product and as a materialised value; a parameter V the loss
    # ignores (its gradient is a zero fill); a scalar c inside maps
    X, Y = sp.MatrixSymbol("X", 3, N), sp.MatrixSymbol("Y", N, 3)
    W, V = sp.MatrixSymbol("W", 3, 3), sp.MatrixSymbol("V", 2, 2)
    c = sp.Symbol("c", real=True)
    f = sb.mse(sb.tanh(X.T * W), Y) + c * Total(sp.HadamardProduct(X.T, Y)) / N
    return f, [W, V, X, c]


def _sce_soft_targets():
    # targets exp(Q): positive rows that do not sum to 1, so the exact cross-entropy, its
    # row sums T𝟏 and ∂/∂T = −log softmax(Z)/N are all checked (Q is random normal)
    X, Q = sp.MatrixSymbol("X", N, 4), sp.MatrixSymbol("Q", N, 3)
    W = sp.MatrixSymbol("W", 4, 3)
    return sb.cross_entropy(sb.softmax(X * W), sb.exp(Q)), [W, Q]


def _scalar():
    # x**3 / y**2 once printed as x*x*x/y*y: integer powers in denominators
    x, y = sp.symbols("x y", real=True)
    f = sb.sigmoid(x * y) + sp.log(x) + x**3 / y**2 + sb.softplus(y - 2 * x) + sp.sqrt(x)
    return f, [x, y]


# name -> (builder, batch size, dtypes run on the simulator); float64 runs only where it
# adds a check (the functions, the losses): the simulator is slow
BOTH, F32 = ("float32", "float64"), ("float32",)
CASES = {
    "scalar": (_scalar, None, BOTH),
    "mlp_tanh_sce": (_mlp_sce, 7, BOTH),
    "sce_soft_targets": (_sce_soft_targets, 6, BOTH),
    "mlp2_relu_sigmoid_mse": (_mlp2_mse, 9, BOTH),
    "mlp_activations_logsoftmax": (_mlp_activations, 6, BOTH),
    "softmax_mse_prelu": (_softmax_mse_prelu, 5, F32),
    "tied_autoencoder": (_tied_autoencoder, 6, F32),
    "bce_with_logits": (_bce_logits, 10, BOTH),
    "transposes_zero_grad": (_transposes, 5, F32),
}
OPTIONS = {"tile": 4, "block": 8}  # small blocks: the simulator runs one Python thread each


def inputs(fn, n, seed):
    """Random arrays for every input of a compiled function (targets: one-hot rows)."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in fn.program.inputs:
        if isinstance(s, sp.MatrixSymbol):
            shape = tuple(int(d.subs(N, n)) for d in s.shape)
            if s.name == "T":
                out[s.name] = np.eye(shape[1])[rng.integers(0, shape[1], shape[0])]
            elif s.name == "Y" and shape[1] == 1:
                out[s.name] = rng.integers(0, 2, shape).astype(float)
            else:
                out[s.name] = rng.normal(0, 1, shape)
        else:  # positive scalars: the scalar case takes log(x) and sqrt(x)
            out[s.name] = rng.uniform(0.5, 1.5)
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _errs(got, want) -> float:
    (v1, g1), (v2, g2) = got, want
    return max([rel_err(v1, v2)] + [rel_err(g1[k], g2[k]) for k in g2])


def sim() -> dict:
    """Per case and dtype: the max relative error of cuda, and of the NumPy reference in
    the same dtype, against the float64 NumPy reference (float32 roundoff is judged
    against the exact value, not against another float32 rounding)."""
    assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run with NUMBA_ENABLE_CUDASIM=1"
    from numba import config

    assert config.ENABLE_CUDASIM, "numba was imported before the simulator was switched on"
    result = {}
    for name, (make, n, dtypes) in CASES.items():
        f, wrt = make()
        exact = sb.compile(f, wrt, target="numpy", dtype="float64")
        for dtype in dtypes:
            t0 = time.perf_counter()
            ref = sb.compile(f, wrt, target="numpy", dtype=dtype)
            cu = sb.compile(f, wrt, target="cuda", dtype=dtype, **OPTIONS)
            calls = [(1, n)]
            if name == "mlp_tanh_sce" and dtype == "float32":  # new data, then a new size
                calls += [(2, n), (3, 3)]
            err, ref_err = 0.0, 0.0
            for seed, m in calls:
                arrays = inputs(ref, m, seed)
                want = exact(**arrays)
                got = cu(**arrays)
                assert all(np.asarray(g).dtype == dtype for g in got[1].values()), name
                err = max(err, _errs(got, want))
                ref_err = max(ref_err, _errs(ref(**arrays), want))
            result[f"{name}/{dtype}"] = {"err": err, "ref_err": ref_err,
                                         "s": time.perf_counter() - t0}
    # a forward program whose value is a matrix (softmax of logits)
    X, W = sp.MatrixSymbol("X", N, 5), sp.MatrixSymbol("W", 5, 3)
    expr = sb.softmax(sb.relu(X * W))
    rng = np.random.default_rng(4)
    arrays = {"X": rng.normal(size=(6, 5)), "W": rng.normal(size=(5, 3))}
    want = sb.compile_forward(expr, target="numpy", dtype="float64")(**arrays)
    for dtype in ("float32", "float64"):
        ref = sb.compile_forward(expr, target="numpy", dtype=dtype)(**arrays)
        got = sb.compile_forward(expr, target="cuda", dtype=dtype, **OPTIONS)(**arrays)
        result[f"forward_softmax/{dtype}"] = {"err": rel_err(got, want),
                                              "ref_err": rel_err(ref, want), "s": 0.0}
    return result


class Traffic:
    """What the simulator really does, counted by wrapping it: kernel launches, and copies
    between host and device with their sizes (an implicit copy, a host array passed to a
    kernel, counts both ways)."""

    def __init__(self):
        from numba.cuda.simulator import kernel
        from numba.cuda.simulator.cudadrv import devicearray as da

        self.launches, self.copies = 0, []  # copies: (direction, bytes)
        me = self
        call, to_host, to_dev = (kernel.FakeCUDAKernel.__call__, da.FakeCUDAArray.copy_to_host,
                                 da.FakeCUDAArray.copy_to_device)

        def launch(k, *args):
            if not k._device:
                me.launches += 1
                me.copies += [("arg", a.nbytes) for a in args
                              if isinstance(a, np.ndarray) and a.ndim]
            return call(k, *args)

        def host(a, ary=None, stream=0):
            me.copies.append(("d2h", a.nbytes))
            return to_host(a, ary, stream)

        def dev(a, ary, stream=0):
            if not isinstance(ary, da.FakeCUDAArray):  # device to device is no transfer
                me.copies.append(("h2d", np.asarray(ary).nbytes))
            return to_dev(a, ary, stream)

        kernel.FakeCUDAKernel.__call__ = launch
        da.FakeCUDAArray.copy_to_host = host
        da.FakeCUDAArray.copy_to_device = dev

    def mark(self):
        return self.launches, len(self.copies)

    def since(self, m):
        return self.launches - m[0], self.copies[m[1]:]


STEP_OPTS = [("SGD", {"lr": 0.1}), ("Momentum", {"lr": 0.05}), ("Adam", {"lr": 0.01})]


def step() -> dict:
    """The CUDA training step against the CPU's, on the simulator: parameters after a few
    steps of each optimizer in each dtype; per step, the launches and copies the
    simulator saw against the runtime's own count (symbp.runtime.device.COUNT)."""
    from numba import config

    assert config.ENABLE_CUDASIM, "run with NUMBA_ENABLE_CUDASIM=1"
    from symbp import nn, train
    from symbp.runtime.device import COUNT

    seen = Traffic()
    out: dict = {"step": {}, "fit": {}}
    f, wrt = _mlp_sce()
    rng = np.random.default_rng(0)
    p0 = {w.name: rng.normal(0, 0.5, tuple(int(d) for d in w.shape)) for w in wrt}
    batches = [(rng.normal(size=(7, 6)), np.eye(3)[rng.integers(0, 3, 7)]) for _ in range(4)]
    for opt_name, hyper in STEP_OPTS:
        opt = getattr(sb, opt_name)(**hyper)
        for dtype in ("float64", "float32"):
            cpu = sb.compile_step(f, wrt, opt, target="cpu", dtype=dtype)
            cu = sb.compile_step(f, wrt, opt, target="cuda", dtype=dtype)
            want = {k: v.astype(dtype) for k, v in p0.items()}
            host = {k: v.astype(dtype) for k, v in p0.items()}
            dev = cu.to_device(host)
            per_step = []
            for x, t in batches:
                cpu(want, X=x, T=t)
                xd, td = (sb_to_device(a.astype(dtype)) for a in (x, t))
                c0, m = COUNT.copy(), seen.mark()
                cu(dev, X=xd, T=td)
                launches, copies = seen.since(m)
                per_step.append({"launches": launches, "copies": copies,
                                 "counted": [COUNT.launches - c0.launches,
                                             COUNT.h2d - c0.h2d, COUNT.d2h - c0.d2h,
                                             COUNT.d2h_bytes - c0.d2h_bytes]})
            cu.to_host(host)
            out["step"][f"{opt_name}/{dtype}"] = {
                "err": max(rel_err(host[k], want[k]) for k in want),
                "per_step": per_step, "launches": cu.launches,
                "param_bytes": [int(v.nbytes) for v in host.values()]}
    # host parameters (the CPU step's contract): updated in place through the device
    cu = sb.compile_step(f, wrt, sb.Adam(0.01), target="cuda", dtype="float64")
    cpu = sb.compile_step(f, wrt, sb.Adam(0.01), target="cpu", dtype="float64")
    a, b = ({k: v.copy() for k, v in p0.items()} for _ in range(2))
    for x, t in batches:
        la, lb = cpu(a, X=x, T=t), cu(b, X=x, T=t)
    out["host_params"] = {"err": max(rel_err(b[k], a[k]) for k in a), "loss": [la, lb]}
    # fit: the data uploaded once, the loss read per step (guard) or per epoch (no guard);
    # run at two batch sizes, the difference in traffic is what the extra steps cost
    X = rng.normal(size=(20, 4))
    y = rng.integers(0, 3, 20)
    for (opt_name, hyper), dtype, guard in [(STEP_OPTS[0], "float64", True),
                                            (STEP_OPTS[1], "float32", False),
                                            (STEP_OPTS[2], "float64", False),
                                            (STEP_OPTS[2], "float32", True)]:
        got = {}
        for target, bs in (("cpu", 6), ("cuda", 6), ("cuda", 3)):
            m = nn.mlp([4, 5, 3], "tanh", seed=1)
            c0, mark = COUNT.copy(), seen.mark()
            h = train.fit(m, X, y, epochs=2, batch_size=bs, optimizer=getattr(sb, opt_name)(
                **hyper), target=target, dtype=dtype, progress=False, guard=guard)
            launches, copies = seen.since(mark)
            got[target, bs] = {"params": m.params, "loss": h.loss, "steps": h.steps,
                               "launches": launches, "copies": copies,
                               "counted": COUNT.launches - c0.launches}
        cpu, a, b = got["cpu", 6], got["cuda", 6], got["cuda", 3]
        out["fit"][f"{opt_name}/{dtype}/guard={guard}"] = {
            "err": max(rel_err(a["params"][k], cpu["params"][k]) for k in cpu["params"]),
            "loss_err": max(abs(u - v) / abs(v) for u, v in zip(a["loss"], cpu["loss"])),
            "steps": [a["steps"], b["steps"]], "copies": [a["copies"], b["copies"]],
            "launches": [a["launches"], b["launches"]], "counted": [a["counted"], b["counted"]],
            "param_bytes": sorted({int(v.nbytes) for v in a["params"].values()}
                                  | {sum(int(v.nbytes) for v in a["params"].values())})}
    out["oom"] = _oom(f, wrt)
    out["resume"] = _resume(X, y)
    return out


def _resume(X, y) -> float:
    """Adam on cuda, 2 epochs at once against 1 epoch, a checkpoint, and a resumed second:
    the optimizer's buffers go to the file and back to the device.  The relative
    difference of the parameters."""
    import tempfile

    from symbp import nn, train

    kw = dict(batch_size=6, optimizer=sb.Adam(0.01), target="cuda", dtype="float64",
              progress=False)
    whole = nn.mlp([4, 5, 3], "tanh", seed=1)
    train.fit(whole, X, y, epochs=2, **kw)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ck.npz")
        part = nn.mlp([4, 5, 3], "tanh", seed=1)
        train.fit(part, X, y, epochs=1, checkpoint=path, **kw)
        part = nn.mlp([4, 5, 3], "tanh", seed=1)
        train.fit(part, X, y, epochs=2, checkpoint=path, resume=True, **kw)
    return max(rel_err(part.params[k], whole.params[k]) for k in whole.params)


def _oom(f, wrt) -> dict:
    """The messages when the device runs out of memory: allocating the step's buffers,
    and a batch's buffers inside a step (numba-cuda raises CudaAPIError there)."""
    from numba import cuda

    real = cuda.device_array

    def full(*args, **kwargs):
        raise RuntimeError("[CUDA_ERROR_OUT_OF_MEMORY] Call to cuMemAlloc results in "
                           "CUDA_ERROR_OUT_OF_MEMORY")

    out = {}
    cuda.device_array = full
    try:
        sb.compile_step(f, wrt, sb.SGD(0.1), target="cuda", dtype="float32")
    except sb.SymbpError as err:
        out["build"] = str(err)
    finally:
        cuda.device_array = real
    step = sb.compile_step(f, wrt, sb.SGD(0.1), target="cuda", dtype="float32")
    rng = np.random.default_rng(1)
    params = {w.name: rng.normal(size=tuple(int(d) for d in w.shape)).astype(np.float32)
              for w in wrt}
    data = {"X": cuda.to_device(np.ones((9, 6), np.float32)),
            "T": cuda.to_device(np.eye(3, dtype=np.float32)[[0] * 9])}
    cuda.device_array = full
    try:
        step(params, **data)
    except sb.SymbpError as err:
        out["run"] = str(err)
    finally:
        cuda.device_array = real
    return out


def sb_to_device(a):
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(a))


def ptx() -> dict:
    """Compile every float32 kernel of every case for sm_80; count .f64 lines."""
    from numba import config

    assert not config.ENABLE_CUDASIM, "the PTX check needs the real CUDA target"
    import numba.cuda.dispatcher as dispatcher

    from symbp.backends import numba_cuda

    # Device functions (our helpers) compile for the *current* device's compute
    # capability, and there is no device here: pin the one compile_ptx is asked for.
    assert hasattr(dispatcher, "get_current_device"), "numba-cuda moved get_current_device"
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(8, 0))

    result, seen = {}, {}
    # every case, then a training step's module for each optimizer (its _update, _gather)
    modules = [(name, make, None) for name, (make, _, _) in CASES.items()]
    modules += [(f"step_{o}", _mlp_sce, getattr(sb, o)().rule) for o, _ in STEP_OPTS]
    for name, make, update in modules:
        f, wrt = make()
        fn = sb.compile(f, wrt, target="numpy", dtype=np.float32)  # just for its Program
        ns = numba_cuda.load(numba_cuda.generate(fn.program, np.float32, update=update))
        for kname, sig in ns["_SIGNATURES"].items():
            text = inspect.getsource(ns[kname].py_func) + sig
            if text in seen:  # a fixed kernel (_mm_nn, _total, ...) already compiled
                continue
            seen[text] = f"{name}/{kname}"
            result[f"{name}/{kname}"] = _f64_lines(ns[kname].py_func, sig)
    # the control: a kernel with a bare float64 literal must show .f64 lines
    result["control/float64_literal"] = _f64_lines(_control, "void(float32[::1])")
    return result


def _control(x):
    x[0] = x[0] * 0.1  # 0.1 is a float64: x[0] is promoted, multiplied in f64, rounded back


def _f64_lines(kernel, sig) -> dict:
    from numba import cuda

    code, _ = cuda.compile_ptx(kernel, sig, cc=(8, 0))
    f64 = [ln.strip() for ln in code.splitlines() if ".f64" in ln]
    return {"f64": f64[:5], "n_f64": len(f64), "ptx_lines": len(code.splitlines())}


def nvvm_available() -> str:
    """'' when numba-cuda's NVVM can compile a trivial kernel, else the reason it cannot."""
    # Numba's built-in CUDA target (deprecated) finds a system CUDA toolkit's NVVM too, but
    # fails on symbp's kernels that call device functions ("TypeError: Signature mismatch:
    # 2 argument types given, but function takes 1 arguments"): only NVIDIA's numba-cuda,
    # which takes over `numba.cuda` when installed, compiles them.
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed"
    try:
        from numba import cuda

        if getattr(cuda, "implementation", "Built-in") == "Built-in":
            return "numba-cuda is installed but numba.cuda is still Numba's built-in target"

        def k(x):
            x[0] = 1.0

        cuda.compile_ptx(k, "(float32[::1],)", cc=(8, 0))
        return ""
    except Exception as err:  # noqa: BLE001 - any failure means "no NVVM here"
        return f"{type(err).__name__}: {err}".splitlines()[0][:300]


if __name__ == "__main__":
    import simulator  # tests/, this script's directory

    simulator.fast()
    mode = sys.argv[1]
    if mode == "sim":
        out = sim()
    elif mode == "step":
        out = step()
    elif mode == "ptx":
        why = nvvm_available()
        out = {"nvvm": why or "ok"}
        if not why:
            out["kernels"] = ptx()
    else:
        raise SystemExit(f"unknown mode {mode!r}: use sim or ptx")
    print(json.dumps(out))
