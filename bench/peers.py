"""Training-step speed of symbp against its peers on the CPU (issue 3's W1, W2, W3).

    python bench/peers.py                  # every workload, every installed peer
    python bench/peers.py --only W3 --repeats 7

Same data, same initialisation, float32 everywhere.  Each (framework, workload) runs in
its own fresh process, so thread pools (OpenBLAS, OpenMP, XLA, PyTorch) never share one,
``--rounds`` times, round-robin over the frameworks (this machine's speed drifts by tens
of percent within minutes: a peer measured a minute later is not measured on the same
machine); it reports the median ms/step over all rounds and repeats, and the ratio
symbp/peer from this one run.  Then cold compile time of the W1 step (fresh process,
empty cache) and start from the disk cache (fresh process, warm cache).  Peers (torch,
jax) are optional: install them locally, they are not symbp dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

# workload: layer widths, activations, loss, batch, lr, steps per repeat
WORKLOADS = {
    "W1": dict(sizes=[64, 128, 64, 10], acts=["tanh", "relu"], loss="ce", batch=32,
               lr=0.1, steps=300, what="digits 64-128 tanh-64 relu-10, softmax-CE, batch 32"),
    "W2": dict(sizes=[784, 256, 10], acts=["relu"], loss="ce", batch=128, lr=0.05,
               steps=40, what="synthetic 60000x784, 784-256 relu-10, softmax-CE, batch 128"),
    "W3": dict(sizes=[2, 8, 1], acts=["tanh"], loss="bce", batch=4, lr=0.5, steps=5000,
               what="XOR 2-8 tanh-1 sigmoid, BCE, batch 4"),
}
FRAMEWORKS = ["symbp-cpu", "symbp-parallel", "jax-jit", "torch-eager", "numpy"]


def workload(name):
    """W1-W3, or a grid point of bench/scale.py: ``mlp-d16-w64-b32`` is a tanh MLP
    64 -> 64 x 16 -> 10 with softmax-CE on random data, batch 32, its steps per repeat
    chosen so that a repeat takes ~0.2 s on this machine."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    m = re.fullmatch(r"mlp-d(\d+)-w(\d+)-b(\d+)", name)
    if m is None:
        raise SystemExit(f"unknown workload {name!r}: W1, W2, W3 or mlp-d<depth>-w<width>-b<batch>")
    depth, width, batch = map(int, m.groups())
    flops = 6 * batch * width * width * (depth + 1)  # forward and backward products
    seconds = flops / 2e10 + 3e-6 * (depth + 1)  # a rough single-core estimate
    return dict(sizes=[width] * (depth + 1) + [10], acts=["tanh"] * depth, loss="ce",
                batch=batch, lr=0.01, steps=int(min(2000, max(3, 0.2 / seconds))),
                what=f"tanh MLP {width}-{width}x{depth}-10, softmax-CE, batch {batch}")


# --- the same data and initialisation for everyone ------------------------------------------


def data(name):
    rng = np.random.default_rng(0)
    if name == "W1":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = d.data / 16.0, d.target
    elif name == "W2":
        X = rng.random((60000, 784), dtype=np.float32)
        y = rng.integers(0, 10, 60000)
    elif name == "W3":
        X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
        y = np.array([0, 1, 1, 0])
    else:  # a grid point: four batches of random rows
        w = workload(name)
        rows = 4 * w["batch"]
        X = rng.standard_normal((rows, w["sizes"][0]), dtype=np.float32)
        y = rng.integers(0, w["sizes"][-1], rows)
    X = np.ascontiguousarray(X, dtype=np.float32)
    k = workload(name)["sizes"][-1]
    T = (np.eye(k, dtype=np.float32)[y] if k > 1 else y[:, None].astype(np.float32))
    return X, np.ascontiguousarray(T)


def init(name):
    """Xavier-uniform weights, zero biases, seeded."""
    rng = np.random.default_rng(1)
    sizes, params = workload(name)["sizes"], {}
    for k, (a, b) in enumerate(zip(sizes, sizes[1:])):
        lim = np.sqrt(6 / (a + b))
        params[f"W{k}"] = rng.uniform(-lim, lim, (a, b)).astype(np.float32)
        params[f"b{k}"] = np.zeros((1, b), np.float32)
    return params


def batches(name):
    X, T = data(name)
    n = workload(name)["batch"]
    return [(X[i:i + n], T[i:i + n]) for i in range(0, len(X) - n + 1, n)]


def timed(step, bs, steps, repeats, sync=lambda x: x):
    for k in range(20):  # warm up: compile, caches, thread pools
        out = step(*bs[k % len(bs)])
    sync(out)
    per = []
    for _ in range(repeats):
        t = time.perf_counter()
        for k in range(steps):
            out = step(*bs[k % len(bs)])
        sync(out)
        per.append((time.perf_counter() - t) / steps * 1e3)
    return per


# --- one function per framework: returns (ms/step per repeat, first loss) -------------------


def symbp_expr(name):
    import sympy as sp

    import symbp as sb

    w = workload(name)
    N = sp.Symbol("N")
    X = sp.MatrixSymbol("X", N, w["sizes"][0])
    T = sp.MatrixSymbol("T", N, w["sizes"][-1])
    H, params = X, []
    for k, (a, b) in enumerate(zip(w["sizes"], w["sizes"][1:])):
        W, bb = sp.MatrixSymbol(f"W{k}", a, b), sp.MatrixSymbol(f"b{k}", 1, b)
        params += [W, bb]
        H = sb.dense(H, W, bb)
        if k < len(w["acts"]):
            H = {"tanh": sb.tanh, "relu": sb.relu}[w["acts"][k]](H)
    L = sb.softmax_cross_entropy(H, T) if w["loss"] == "ce" else sb.bce_with_logits(H, T)
    if w["loss"] == "bce":  # the sigmoid output and binary CE, as the workload says
        L = sb.binary_cross_entropy(sb.sigmoid(H), T)
    return L, params


def run_symbp(name, target, repeats, **options):
    import symbp as sb

    L, params = symbp_expr(name)
    w = workload(name)
    step = sb.compile_step(L, params, sb.SGD(w["lr"]), target=target, dtype=np.float32,
                           **options)
    P = init(name)
    bs = batches(name)
    first = step(P, X=bs[0][0], T=bs[0][1])
    return timed(lambda x, t: step(P, X=x, T=t), bs, w["steps"], repeats), first


def run_numpy(name, repeats):
    """Hand-written NumPy layers: forward, backward and SGD, no framework."""
    w, P = workload(name), init(name)
    lr = np.float32(w["lr"])
    nl = len(w["sizes"]) - 1

    def step(X, T):
        Hs, H = [X], X
        for k in range(nl):
            Z = H @ P[f"W{k}"] + P[f"b{k}"]
            if k < len(w["acts"]):
                H = np.tanh(Z) if w["acts"][k] == "tanh" else np.maximum(Z, 0)
            else:
                H = Z
            Hs.append(H)
        n = X.shape[0]
        if w["loss"] == "ce":
            m = H.max(axis=1, keepdims=True)
            e = np.exp(H - m)
            s = e.sum(axis=1, keepdims=True)
            loss = float(np.sum(m + np.log(s)) - np.sum(T * H)) / n
            G = (e / s - T) / n
        else:
            Y = 1 / (1 + np.exp(-H))
            loss = float(-np.mean(T * np.log(Y) + (1 - T) * np.log(1 - Y)))
            G = (Y - T) / T.size
        for k in reversed(range(nl)):
            Hp = Hs[k]
            gW, gb = Hp.T @ G, G.sum(axis=0, keepdims=True)
            if k > 0:
                G = G @ P[f"W{k}"].T
                Hk = Hs[k]
                G = G * (1 - Hk * Hk) if w["acts"][k - 1] == "tanh" else G * (Hk > 0)
            P[f"W{k}"] -= lr * gW
            P[f"b{k}"] -= lr * gb
        return loss

    bs = batches(name)
    first = step(*bs[0])
    return timed(step, bs, w["steps"], repeats), first


def run_torch(name, repeats):
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # 1 under taskset -c 0
    w = workload(name)
    P = {k: torch.tensor(v, requires_grad=True) for k, v in init(name).items()}
    nl = len(w["sizes"]) - 1
    labels = w["loss"] == "ce"

    def step(X, T):
        H = X
        for k in range(nl):
            H = H @ P[f"W{k}"] + P[f"b{k}"]
            if k < len(w["acts"]):
                H = torch.tanh(H) if w["acts"][k] == "tanh" else torch.relu(H)
        if labels:
            loss = torch.nn.functional.cross_entropy(H, T)
        else:
            loss = torch.nn.functional.binary_cross_entropy(torch.sigmoid(H), T)
        loss.backward()
        with torch.no_grad():
            for p in P.values():
                p -= w["lr"] * p.grad
                p.grad = None
        return loss

    bs = [(torch.from_numpy(x), torch.from_numpy(t.argmax(1)) if labels else torch.from_numpy(t))
          for x, t in batches(name)]
    first = float(step(*bs[0]))
    return timed(step, bs, w["steps"], repeats), first


def run_jax(name, repeats):
    import jax
    import jax.numpy as jnp

    w = workload(name)
    nl = len(w["sizes"]) - 1

    def loss_fn(P, X, T):
        H = X
        for k in range(nl):
            H = H @ P[f"W{k}"] + P[f"b{k}"]
            if k < len(w["acts"]):
                H = jnp.tanh(H) if w["acts"][k] == "tanh" else jax.nn.relu(H)
        if w["loss"] == "ce":
            return jnp.mean(jax.nn.logsumexp(H, axis=1) - jnp.sum(T * H, axis=1))
        Y = jax.nn.sigmoid(H)
        return -jnp.mean(T * jnp.log(Y) + (1 - T) * jnp.log(1 - Y))

    @jax.jit
    def step(P, X, T):  # value_and_grad plus the SGD update in one jitted call
        loss, g = jax.value_and_grad(loss_fn)(P, X, T)
        return jax.tree_util.tree_map(lambda p, d: p - w["lr"] * d, P, g), loss

    state = {"P": {k: jnp.asarray(v) for k, v in init(name).items()}}

    def run(X, T):
        state["P"], loss = step(state["P"], X, T)
        return loss

    bs = [(jnp.asarray(x), jnp.asarray(t)) for x, t in batches(name)]
    first = float(run(*bs[0]))
    return timed(run, bs, w["steps"], repeats, sync=lambda x: x.block_until_ready()), first


def worker(fw, name, repeats):
    if fw == "symbp-cpu-blas2":  # opt-in: two BLAS threads, for an otherwise idle machine
        return run_symbp(name, "cpu", repeats, blas_threads=2)
    if fw.startswith("symbp-"):
        return run_symbp(name, fw.split("-")[1], repeats)
    return {"numpy": run_numpy, "torch-eager": run_torch, "jax-jit": run_jax}[fw](name, repeats)


COMPILE_SCRIPT = '''
import time, sys
t0 = time.perf_counter()
import numpy as np, symbp as sb
sys.path.insert(0, {bench!r})
from peers import symbp_expr, WORKLOADS
t1 = time.perf_counter()
L, params = symbp_expr("W1")
step = sb.compile_step(L, params, sb.SGD(0.1), target={target!r}, dtype=np.float32)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
'''


def compile_times(target, tree=None):
    """(imports, compile_step, process total) in a fresh process with an empty cache, then
    again from the cache.  ``tree``: another checkout to measure (its symbp and bench)."""
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "SYMBP_CACHE_DIR": d}
        bench = os.path.dirname(os.path.abspath(__file__))
        if tree is not None:
            env["PYTHONPATH"] = tree
            bench = os.path.join(tree, "bench")
        code = COMPILE_SCRIPT.format(bench=bench, target=target)
        out = []
        for _ in range(2):
            t = time.perf_counter()
            # cwd elsewhere: `-c` puts the working directory before PYTHONPATH on sys.path
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                               text=True, check=True, cwd=d)
            total = time.perf_counter() - t
            imp, comp = map(float, r.stdout.split())
            out.append((imp, comp, total))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="W1,W2,W3")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3,
                    help="fresh processes per (framework, workload), taken round-robin so a "
                         "machine whose speed drifts slows every framework alike")
    ap.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "WORKLOAD"))
    args = ap.parse_args()
    if args.worker:
        per, first = worker(*args.worker, args.repeats)
        print(json.dumps({"per": per, "first": first}))
        return
    load = os.getloadavg()[0]
    names = args.only.split(",")
    runs: dict = {}
    skipped: set = set()
    for _ in range(args.rounds):
        for name in names:
            for fw in args.frameworks.split(","):
                if (name, fw) in skipped:
                    continue
                r = subprocess.run([sys.executable, __file__, "--worker", fw, name,
                                    "--repeats", str(args.repeats)], capture_output=True,
                                   text=True)
                if r.returncode != 0:
                    last = (r.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"  {name} {fw}: skipped ({last[:100]})", file=sys.stderr)
                    skipped.add((name, fw))
                    continue
                out = json.loads(r.stdout.strip().splitlines()[-1])
                per, _ = runs.setdefault((name, fw), ([], out["first"]))
                per.extend(out["per"])
    res = {k: (float(np.median(per)), first) for k, (per, first) in runs.items()}
    print(f"machine: {os.cpu_count()} CPUs, load average at start {load:.1f}, "
          f"at end {os.getloadavg()[0]:.1f}; median of {args.rounds} rounds x "
          f"{args.repeats} repeats\n")
    fws = [f for f in args.frameworks.split(",") if any((n, f) in res for n in names)]
    print("| workload | " + " | ".join(f"{f} ms/step" for f in fws) + " |")
    print("|---|" + "---|" * len(fws))
    for n in names:
        cells = [f"{res[n, f][0]:.4f}" if (n, f) in res else "–" for f in fws]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\nratios symbp-cpu / peer (< 1: symbp faster)\n")
    peers = [f for f in fws if f != "symbp-cpu"]
    print("| workload | " + " | ".join(peers) + " |")
    print("|---|" + "---|" * len(peers))
    for n in names:
        if (n, "symbp-cpu") not in res:
            continue
        s = res[n, "symbp-cpu"][0]
        cells = [f"{s / res[n, f][0]:.2f}" if (n, f) in res else "–" for f in peers]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\nfirst-step loss (same data and init: should agree)\n")
    for n in names:
        print(f"- {n}: " + ", ".join(f"{f} {res[n, f][1]:.6f}" for f in fws if (n, f) in res))
    if "W1" in names:
        print("\nW1 step compile, fresh processes (s, median of the rounds): imports, "
              "compile_step, process total\n")
        print("| target | cold: imports | cold: compile | cold: total | cached: imports "
              "| cached: compile | cached: total |")
        print("|---|---|---|---|---|---|---|")
        times: dict = {}
        for _ in range(args.rounds):  # medians over rounds, cpu and parallel alternating
            for target in ("cpu", "parallel"):
                times.setdefault(target, []).append(compile_times(target))
        for target, ts in times.items():
            (i0, c0, t0), (i1, c1, t1) = np.median(np.array(ts), axis=0)
            print(f"| {target} | {i0:.2f} | {c0:.2f} | {t0:.2f} | {i1:.2f} | {c1:.2f} "
                  f"| {t1:.2f} |")


if __name__ == "__main__":
    main()
