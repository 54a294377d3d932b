"""Kernel launches and host<->device traffic of one CUDA training step, W1 and W2.

    python bench/cuda_step.py

No GPU needed: the launches are read from the generated module (one launch per line of
its driver, each ``kernel[grid, block](...)``), the traffic from the program's shapes.
Two ways to run a step:

  host step    the gradient call on host arrays, then the NumPy update (what
               ``compile_step(..., target="cuda")`` did before issue 14): every input and
               parameter goes up, every gradient and the loss come down, every step
  device step  ``DeviceStep`` as ``fit`` drives it: parameters, gradients, optimizer
               buffers and the training data stay on the device; the loss and a finiteness
               flag come down per step with the guard (2 numbers), per epoch without it

The figures match what tests/test_cuda_step.py counts on the simulator for a small net.
"""

from __future__ import annotations

import re

import numpy as np

import symbp as sb
from symbp import nn
from symbp.backends import numba_cuda

WORKLOADS = {  # name: (layer sizes, activations, batch)
    "W1 64-128 tanh-64 relu-10, CE, batch 32": ([64, 128, 64, 10], ["tanh", "relu"], 32),
    "W2 784-256 relu-10, CE, batch 128": ([784, 256, 10], "relu", 128),
}


def launches(source: str, driver: str) -> int:
    """Kernel launches in the body of the generated function ``driver``."""
    body = source.split(f"\ndef {driver}(", 1)[1].split("\n\n\n", 1)[0]
    return len(re.findall(r"^    _\w+\[[^\n]*\]\(", body, flags=re.M))


def main() -> None:
    rows = []
    for name, (sizes, acts, batch) in WORKLOADS.items():
        model = nn.mlp(sizes, acts)
        p = sb.gradient_program(model.loss, model.wrt)
        f32 = np.dtype(np.float32).itemsize
        params = sum(int(np.prod([int(d) for d in w.shape])) for w in model.wrt) * f32
        data = batch * (sizes[0] + sizes[-1]) * f32
        grad = numba_cuda.generate(p, np.float32)
        step = numba_cuda.generate(p, np.float32, update=sb.SGD(0.1).rule)
        n_grad = launches(grad, "symbp_cuda_run")
        n_unfused = launches(numba_cuda.generate(p, np.float32, fuse=False), "symbp_cuda_run")
        n_step = launches(step, "symbp_cuda_run") + 1  # then _update
        slots = int(re.search(r"_N_SLOTS = (\d+)", grad).group(1))
        # host step: inputs up (data, parameters), gradients and the scalars down
        rows.append((name, "host step", n_grad, f"{len(model.wrt) + 2} / {len(model.wrt) + 1}",
                     f"{data + params:,} / {params + slots * f32:,}"))
        rows.append((name, "device step, guard", n_step, "0 / 1", f"0 / {2 * f32}"))
        rows.append((name, "device step, no guard", n_step, "0 / 0", "0 / 0"))
        rows.append((name, "(fuse=False: one kernel per assignment)", n_unfused, "", ""))
    head = ("workload", "step", "launches", "copies up / down", "bytes up / down")
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(n) for c, n in zip(r, w)) + " |"  # noqa: E731
    print(line(head))
    print("|" + "|".join("-" * (n + 2) for n in w) + "|")
    for r in rows:
        print(line(r))
    print("\n(float32; the data on the device is uploaded once per fit, its shuffle is one "
          "gather kernel per matrix per epoch)")


if __name__ == "__main__":
    main()
