"""CUDA on a real NVIDIA GPU: results against NumPy, then training steps timed on CUDA,
the CPU and PyTorch CUDA.

    python bench/gpu_check.py [--steps 200] [--repeats 5] [--tile 16] [--json out.json]

1. Checks: a few programs (MLPs with tanh/relu/sigmoid/elu/softplus/gelu, softmax-CE,
   log-softmax, MSE, a scalar program) at realistic sizes, cuda vs the float64 NumPy
   reference, in float32 and float64.
2. Steps: W2 (784-256(relu)-10, batch 128, 60,000 synthetic rows) and a wide MLP
   (4096-4096-4096(relu)-10, batch 1024), softmax-CE, one SGD step (forward + backward +
   update) per call; median ms/step on 'cuda' (parameters and data on the device, as
   ``fit`` keeps them: once reading the loss every step, once leaving it there), 'cpu',
   and PyTorch CUDA when importable; per cuda step, the kernel launches and the bytes
   copied up and down (symbp.runtime.device.COUNT).

Exit status: 0 all checks passed, 1 a check failed or a target crashed, 2 no usable GPU
(the message says why).  Runs in about 1-3 minutes on a GPU; the whole run stops itself
at --budget seconds (default 270).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np


def gpu_or_exit() -> str:
    """A one-line description of the GPU, or exit 2 with the reason there is none."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        print("gpu_check: NUMBA_ENABLE_CUDASIM=1 is set: this check needs a real GPU, "
              "not the simulator (unset it)", file=sys.stderr)
        sys.exit(2)
    try:
        from numba import cuda
    except Exception as err:  # noqa: BLE001 - any import failure means "no CUDA here"
        print(f"gpu_check: numba's CUDA support does not import: {err}\n"
              "  install it with: pip install 'numba-cuda[cu13]'", file=sys.stderr)
        sys.exit(2)
    try:
        ok = cuda.is_available()
    except Exception as err:  # noqa: BLE001
        ok, why = False, str(err)
    else:
        why = "cuda.is_available() is False (no NVIDIA GPU or driver visible)"
    if not ok:
        print(f"gpu_check: no usable NVIDIA GPU: {why}", file=sys.stderr)
        sys.exit(2)
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    desc = f"{name} (compute capability {dev.compute_capability[0]}.{dev.compute_capability[1]}"
    try:
        from numba.cuda.cudadrv.driver import driver

        desc += f", driver CUDA {'.'.join(map(str, driver.get_version()))}"
    except Exception:  # noqa: BLE001 - the version is only informative
        pass
    desc += ")"
    # Compile and launch one tiny kernel: a missing NVVM or a driver older than the PTX
    # NVVM emits shows up here, once, with its own message.
    try:
        @cuda.jit
        def smoke(x):
            i = cuda.grid(1)
            if i < x.size:
                x[i] = x[i] * 2 + 1

        d = cuda.to_device(np.arange(4, dtype=np.float32))
        smoke[1, 32](d)
        got = d.copy_to_host()
        assert np.array_equal(got, [1, 3, 5, 7]), got
    except Exception as err:  # noqa: BLE001
        print(f"gpu_check: found {desc} but cannot compile or run a kernel: "
              f"{type(err).__name__}: {err}\n  numba-cuda[cu13] needs a CUDA 13 driver; with a "
              "CUDA 12 driver install numba-cuda[cu12]", file=sys.stderr)
        sys.exit(2)
    return desc


# --- 1. correctness -------------------------------------------------------------------------


def programs():
    import sympy as sp

    import symbp as sb
    from symbp.matrix import Total

    N = sp.Symbol("N")
    M = sp.MatrixSymbol

    def mlp_sce():
        X, T = M("X", N, 784), M("T", N, 10)
        W1, b1, W2, b2 = M("W1", 784, 256), M("b1", 1, 256), M("W2", 256, 10), M("b2", 1, 10)
        Z = sb.dense(sb.relu(sb.dense(X, W1, b1)), W2, b2)
        return sb.softmax_cross_entropy(Z, T), [W1, b1, W2, b2], 128

    def mlp2_mse():
        X, Y = M("X", N, 64), M("Y", N, 3)
        W1, b1, W2, b2 = M("W1", 64, 100), M("b1", 1, 100), M("W2", 100, 33), M("b2", 1, 33)
        W3, b3 = M("W3", 33, 3), M("b3", 1, 3)
        H = sb.sigmoid(sb.dense(sb.tanh(sb.dense(X, W1, b1)), W2, b2))
        return sb.mse(sb.dense(H, W3, b3), Y), [W1, b1, W2, b2, W3, b3], 200

    def activations_logsoftmax():
        X, T = M("X", N, 50), M("T", N, 7)
        W1, b1, W2, b2 = M("W1", 50, 40), M("b1", 1, 40), M("W2", 40, 7), M("b2", 1, 7)
        Z1 = sb.dense(X, W1, b1)
        H = sb.elu(Z1) + sb.softplus(Z1) + sb.gelu(Z1) + sb.leaky_relu(Z1, 0.1)
        P = sb.log_softmax(sb.dense(H, W2, b2))
        return -Total(sp.HadamardProduct(T, P)) / N, [W1, b1, W2, b2], 300

    def scalar():
        x, y = sp.symbols("x y", real=True)
        f = sb.sigmoid(x * y) + sp.log(x) + x**3 / y**2 + sb.softplus(y - 2 * x)
        return f, [x, y], None

    return {"mlp_784_256_10_sce": mlp_sce, "mlp2_tanh_sigmoid_mse": mlp2_mse,
            "activations_logsoftmax": activations_logsoftmax, "scalar": scalar}


def random_inputs(fn, n, rng):
    import sympy as sp

    out = {}
    for s in fn.program.inputs:
        if isinstance(s, sp.MatrixSymbol):
            shape = tuple(int(sp.sympify(d).subs(sp.Symbol("N"), n)) for d in s.shape)
            if s.name == "T":
                out[s.name] = np.eye(shape[1])[rng.integers(0, shape[1], shape[0])]
            else:
                scale = 1 / np.sqrt(shape[0]) if s.name.startswith("W") else 1.0
                out[s.name] = rng.normal(0, scale, shape)
        else:
            out[s.name] = rng.uniform(0.5, 1.5)
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_results(tile: int) -> tuple[list, bool]:
    import symbp as sb

    tol = {"float32": 1e-4, "float64": 1e-11}
    rows, ok = [], True
    rng = np.random.default_rng(0)
    for name, make in programs().items():
        f, wrt, n = make()
        exact = sb.compile(f, wrt, target="numpy", dtype="float64")
        arrays = random_inputs(exact, n, rng)
        want = exact(**arrays)
        for dtype in ("float32", "float64"):
            try:
                cu = sb.compile(f, wrt, target="cuda", dtype=dtype, tile=tile)
                got = cu(**arrays)
                got = cu(**arrays)  # second call: the reused device buffers
                ref = sb.compile(f, wrt, target="numpy", dtype=dtype)(**arrays)
                err = max([rel_err(got[0], want[0])]
                          + [rel_err(got[1][k], want[1][k]) for k in want[1]])
                ref_err = max([rel_err(ref[0], want[0])]
                              + [rel_err(ref[1][k], want[1][k]) for k in want[1]])
                passed = err <= tol[dtype]
                rows.append((name, dtype, f"{err:.2e}", f"{ref_err:.2e}",
                             "ok" if passed else f"FAIL (tol {tol[dtype]:.0e})"))
            except Exception as e:  # noqa: BLE001 - report and go on to the next program
                passed = False
                rows.append((name, dtype, "-", "-", f"ERROR {type(e).__name__}: {e}"[:200]))
                traceback.print_exc()
            ok &= passed
    return rows, ok


# --- 2. step timing ------------------------------------------------------------------------

WORKLOADS = {  # name: (layer sizes, batch, rows of synthetic data)
    "W2 784-256(relu)-10": ([784, 256, 10], 128, 60000),
    "wide 4096-4096-4096(relu)-10": ([4096, 4096, 4096, 10], 1024, 8192),
}


def synthetic(sizes, n_data, seed=0):
    """Random float32 inputs and one-hot targets (the timing does not depend on values)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n_data, sizes[0])).astype(np.float32)
    t = np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], n_data)]
    return x, t


def timed(run, steps, repeats, deadline, sync=lambda: None) -> float:
    """Median ms per step of ``run(k)`` over repeats of ``steps`` steps (warmed up)."""
    for k in range(3):
        run(k)
    sync()
    times, k = [], 3
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            run(k)
            k += 1
        sync()
        times.append((time.perf_counter() - t0) / steps * 1e3)
        if time.monotonic() > deadline:
            break
    return statistics.median(times)


def symbp_rows(name, sizes, batch, n_data, targets, steps, repeats, tile, deadline) -> list:
    """Rows (workload, target, cold s, ms/step, launches/step, bytes up/down per step, note)
    for an SGD step of the MLP ``sizes`` with softmax-CE.  On 'cuda' the parameters and the
    data stay on the device (as ``fit`` keeps them): timed once reading the loss every step
    (the guard's sync) and once leaving it on the device."""
    import symbp as sb
    from symbp import nn
    from symbp.runtime.device import COUNT

    x, t = synthetic(sizes, n_data)
    n_batches = n_data // batch
    rows = []
    for target in targets:
        if time.monotonic() > deadline:
            rows.append((name, target, "-", "-", "-", "-", "skipped: time budget spent"))
            continue
        try:
            model = nn.mlp(sizes, "relu", seed=1)
            params = {k: np.ascontiguousarray(v, np.float32) for k, v in model.params.items()}
            opts = {"tile": tile} if target == "cuda" else {}
            t0 = time.perf_counter()
            step = sb.compile_step(model.loss, model.wrt, sb.SGD(lr=0.01), target=target,
                                   dtype=np.float32, **opts)
            if target == "cuda":
                from numba import cuda

                params = step.to_device(params)
                xd, td = cuda.to_device(x), cuda.to_device(t)  # uploaded once
                log = cuda.device_array((1, 2), np.float32)
                log.copy_to_device(np.zeros((1, 2), np.float32))
            else:
                xd, td = x, t

            def batch_at(k):
                i = (k % n_batches) * batch
                return {"X": xd[i:i + batch], "T": td[i:i + batch]}

            step(params, **batch_at(0))  # compiles the kernels
            cold = time.perf_counter() - t0
            n = steps if target == "cuda" else max(2, steps // 20)
            runs = [("", lambda k: step(params, **batch_at(k)), lambda: None)]
            if target == "cuda":
                runs.append((", loss left on the device",
                             lambda k: step.launch(params, log, 0, **batch_at(k)),
                             cuda.synchronize))
            for note, run, sync in runs:
                c0 = COUNT.copy()
                ms = timed(run, n, repeats, deadline, sync)
                total = COUNT.launches - c0.launches
                done = max(1, round(total / step.launches)) if target == "cuda" else 1
                per = (f"{total / done:.0f}", f"{(COUNT.h2d_bytes - c0.h2d_bytes) / done:,.0f}"
                       f" / {(COUNT.d2h_bytes - c0.d2h_bytes) / done:,.0f}") \
                    if target == "cuda" else ("-", "-")
                rows.append((name, target + note, f"{cold:.2f}", f"{ms:.3f}", *per, ""))
        except Exception as e:  # noqa: BLE001 - one target failing must not hide the others
            rows.append((name, target, "-", "-", "-", "-", f"ERROR {type(e).__name__}: {e}"[:200]))
            traceback.print_exc()
    return rows


def torch_rows(name, sizes, batch, n_data, steps, repeats, deadline) -> list:
    """The same step in PyTorch on the GPU (eager; data and parameters on the device)."""
    if importlib.util.find_spec("torch") is None:
        return [(name, "pytorch cuda", "-", "-", "-", "-", "not installed")]
    try:
        import torch

        if not torch.cuda.is_available():
            return [(name, "pytorch cuda", "-", "-", "-", "-", "no CUDA build or device")]
        dev = torch.device("cuda")
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        net = torch.nn.Sequential(*layers[:-1]).to(dev)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        x, t = synthetic(sizes, n_data)
        xd, yd = torch.from_numpy(x).to(dev), torch.from_numpy(t.argmax(1)).to(dev)
        n_batches = n_data // batch
        lossf = torch.nn.CrossEntropyLoss()

        def run(k):
            i = (k % n_batches) * batch
            opt.zero_grad(set_to_none=True)
            lossf(net(xd[i:i + batch]), yd[i:i + batch]).backward()
            opt.step()

        ms = timed(run, steps, repeats, deadline, torch.cuda.synchronize)
        return [(name, f"pytorch {torch.__version__} cuda", "-", f"{ms:.3f}", "-", "-",
                 "one sync per repeat")]
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return [(name, "pytorch cuda", "-", "-", "-", "-", f"ERROR {type(e).__name__}: {e}"[:200])]


def table(header, rows) -> str:
    rows = [tuple(map(str, r)) for r in rows]
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda r: "| " + " | ".join(c.ljust(n) for c, n in zip(r, w)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (n + 2) for n in w) + "|",
                      *map(line, rows)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tile", type=int, default=16, help="CUDA matmul tile (power of two)")
    ap.add_argument("--budget", type=float, default=270, help="seconds for the whole run")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    deadline = time.monotonic() + args.budget

    gpu = gpu_or_exit()
    import numba

    import symbp

    try:
        from importlib.metadata import version
        ncuda = version("numba-cuda")
    except Exception:  # noqa: BLE001
        ncuda = "built-in numba.cuda"
    print(f"GPU: {gpu}\nnumba {numba.__version__}, numba-cuda {ncuda}, numpy {np.__version__}, "
          f"symbp {symbp.__version__}, Python {platform.python_version()}, "
          f"CPU: {platform.processor() or platform.machine()} × {os.cpu_count()}")
    print(f"command: python bench/gpu_check.py {' '.join(sys.argv[1:])}\n")

    check_rows, ok = check_results(args.tile)
    print("## CUDA vs the float64 NumPy reference (max relative error over value and grads)\n")
    print(table(("program", "dtype", "cuda err", "numpy err (same dtype)", "result"),
                check_rows))

    targets = ["cuda"]
    if importlib.util.find_spec("symbp.backends.numba_cpu") is not None:
        targets += ["cpu"]
    step_rows = []
    for name, (sizes, batch, n_data) in WORKLOADS.items():
        step_rows += symbp_rows(name, sizes, batch, n_data, targets, args.steps, args.repeats,
                                args.tile, deadline)
        step_rows += torch_rows(name, sizes, batch, n_data, args.steps, args.repeats, deadline)
    print("\n## SGD step, softmax-CE, float32: median ms/step of "
          f"{args.repeats} repeats (cuda {args.steps} steps, cpu {max(2, args.steps // 20)})\n")
    print(table(("workload", "target", "cold s", "ms/step", "launches/step",
                 "bytes up / down per step", "note"), step_rows))
    crashed = any(r[-1].startswith("ERROR") for r in step_rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpu": gpu, "checks": check_rows, "steps": step_rows}, fh, indent=1)
    status = 0 if ok and not crashed else 1
    print(f"\ngpu_check: {'all checks passed' if status == 0 else 'FAILED (see above)'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
