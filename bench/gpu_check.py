"""CUDA on a real NVIDIA GPU: results against NumPy, then W2 timed on CUDA vs the CPU.

    python bench/gpu_check.py [--steps 200] [--repeats 5] [--tile 16] [--json out.json]

1. Checks: a few programs (MLPs with tanh/relu/sigmoid/elu/softplus/gelu, softmax-CE,
   log-softmax, MSE, a scalar program) at realistic sizes, cuda vs the float64 NumPy
   reference, in float32 and float64.
2. W2: synthetic MNIST-shaped data (60,000 × 784 float32, 10 classes), 784-256(relu)-10
   softmax-CE, batch 128, one SGD step (forward + backward + update) per call; median
   ms/step over repeats on 'cuda', 'cpu' and 'parallel' (when symbp/backends/numba_cpu.py
   exists) and 'numpy'.  The CUDA step is the gradient call (host arrays in, host arrays
   out, device buffers reused) followed by the NumPy SGD update.

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


# --- 2. W2 timing -------------------------------------------------------------------------


def w2(targets, steps: int, repeats: int, tile: int, deadline: float,
       n_data=60000, d_in=784, hidden=256, classes=10, batch=128) -> list:
    """Rows (target, cold s, ms/step, loss first -> last, note) for the W2 step."""
    import sympy as sp

    import symbp as sb

    N = sp.Symbol("N")
    X, T = sp.MatrixSymbol("X", N, d_in), sp.MatrixSymbol("T", N, classes)
    W1, b1 = sp.MatrixSymbol("W1", d_in, hidden), sp.MatrixSymbol("b1", 1, hidden)
    W2, b2 = sp.MatrixSymbol("W2", hidden, classes), sp.MatrixSymbol("b2", 1, classes)
    loss = sb.softmax_cross_entropy(sb.dense(sb.relu(sb.dense(X, W1, b1)), W2, b2), T)
    rng = np.random.default_rng(0)
    data_x = rng.normal(0, 1, (n_data, d_in)).astype(np.float32)
    data_t = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n_data)]
    n_batches = n_data // batch
    rows = []
    for target in targets:
        if time.monotonic() > deadline:
            rows.append((target, "-", "-", "-", "skipped: time budget spent"))
            continue
        try:
            p_rng = np.random.default_rng(1)  # same initialisation for every target
            params = {  # He initialisation
                "W1": p_rng.normal(0, np.sqrt(2 / d_in), (d_in, hidden)).astype(np.float32),
                "b1": np.zeros((1, hidden), np.float32),
                "W2": p_rng.normal(0, np.sqrt(2 / hidden), (hidden, classes)).astype(np.float32),
                "b2": np.zeros((1, classes), np.float32),
            }
            opts = {"tile": tile} if target == "cuda" else {}
            t0 = time.perf_counter()
            step = sb.compile_step(loss, [W1, b1, W2, b2], sb.SGD(lr=0.1), target=target,
                                   dtype=np.float32, **opts)
            first = step(params, X=data_x[:batch], T=data_t[:batch])  # compiles kernels
            cold = time.perf_counter() - t0
            def batch_at(k):  # the k-th batch, cycling through the data (C-contiguous views)
                i = (k % n_batches) * batch
                return {"X": data_x[i:i + batch], "T": data_t[i:i + batch]}

            for k in range(1, 11):  # warm up
                step(params, **batch_at(k))
            k = 11
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(steps):
                    last = step(params, **batch_at(k))
                    k += 1
                times.append((time.perf_counter() - t0) / steps * 1e3)
                if time.monotonic() > deadline:
                    break
            rows.append((target, f"{cold:.2f}", f"{statistics.median(times):.3f}",
                         f"{first:.4f} -> {last:.4f}", ""))
        except Exception as e:  # noqa: BLE001 - one target failing must not hide the others
            rows.append((target, "-", "-", "-", f"ERROR {type(e).__name__}: {e}"[:200]))
            traceback.print_exc()
    return rows


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
        targets += ["cpu", "parallel"]
    targets.append("numpy")
    w2_rows = w2(targets, args.steps, args.repeats, args.tile, deadline)
    base = {r[0]: float(r[2]) for r in w2_rows if r[2] != "-"}
    ref = base.get("numpy")
    w2_rows = [r[:3] + ((f"{ref / float(r[2]):.2f}x" if ref and r[2] != "-" else "-"),) + r[3:]
               for r in w2_rows]
    print("\n## W2: 784-256(relu)-10 softmax-CE, batch 128, SGD step, float32 "
          f"(median of {args.repeats} × {args.steps} steps)\n")
    print(table(("target", "cold s", "ms/step", "speed vs numpy", "loss first -> last", "note"),
                w2_rows))
    crashed = any(r[-1].startswith("ERROR") for r in w2_rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpu": gpu, "checks": check_rows, "w2": w2_rows}, fh, indent=1)
    status = 0 if ok and not crashed else 1
    print(f"\ngpu_check: {'all checks passed' if status == 0 else 'FAILED (see above)'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
