"""Mutation check: plant one realistic bug at a time and see the tests catch it.

Each mutant replaces one exact piece of symbp's source (found exactly once, or the run
fails loudly: the source moved and the list needs updating) in a scratch copy of the
repository, then runs the few tests that should catch it, with PYTHONPATH pointing at
the copy and a fresh SYMBP_CACHE_DIR (machine code compiled from the unmutated source
must not answer for the mutated one).  A mutant is caught when its tests fail ("error"
when it breaks collection instead of an assertion, "timeout" when its tests hang: both
count as caught); "SURVIVED", "not found" or a selection that matches no test make the
run exit 1.

    python tools/mutants.py               # every mutant; exit 1 if any survives
    python tools/mutants.py --baseline    # every selection on the unmutated tree: all pass
    python tools/mutants.py --list        # the mutants, and whether each still applies
    python tools/mutants.py --only ID ... -j 2

Run it whenever a rule, a backend or a test selection changes; a surviving mutant means
a missing test, not a mutant to delete.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    replacement: str
    tests: str  # pytest arguments: files and -k selections
    what: str


M = Mutant
MUTANTS = [
    # --- the function table -------------------------------------------------------------------
    M("bce-eps", "symbp/functions.py",
      "LOG_FLOOR, BCE_EPS = sp.Integer(-100), sp.Float(1e-12)",
      "LOG_FLOOR, BCE_EPS = sp.Integer(-100), sp.Float(1e-6)",
      "tests/test_saturation.py", "BCE's p(1 − p) floor 1e-12 → 1e-6: saturated slope ÷500"),
    M("mean-to-sum", "symbp/functions.py",
      "return Total(E) / (E.shape[0] * E.shape[1]) if is_matrix(E) else E",
      "return Total(E) if is_matrix(E) else E",
      "tests/test_nn.py -k other_losses", "mse/bce sum over entries instead of the mean"),
    M("sigmoid-deriv", "symbp/functions.py",
      "        return self * (1 - self)\n",
      "        return self * (1 + self)\n",
      "tests/test_functions.py -k fdiff", "σ' = σ(1 + σ)"),
    M("leaky-slope", "symbp/functions.py",
      "            return sp.Piecewise((1, x > 0), (a, True))",
      "            return sp.Piecewise((1, x > 0), (2 * a, True))",
      "tests/test_properties.py -k gradcheck", "leaky-relu slope 2α below 0 (the property)"),
    M("elu-deriv", "symbp/functions.py",
      "            return sp.Piecewise((1, x > 0), (self + a, True))",
      "            return sp.Piecewise((1, x > 0), (self, True))",
      "tests/test_functions.py -k fdiff", "elu' = y instead of y + α below 0"),
    M("selu-deriv", "symbp/functions.py",
      "(self + SELU_SCALE * SELU_ALPHA, True)",
      "(self + SELU_ALPHA, True)",
      "tests/test_functions.py -k fdiff", "selu' loses its scale λ below 0"),
    M("bce-floor", "symbp/functions.py",
      "LOG_FLOOR, BCE_EPS = sp.Integer(-100),",
      "LOG_FLOOR, BCE_EPS = sp.Integer(-10),",
      "tests/test_numerics.py -k 'bce_probabilities and numpy'",
      "BCE's log clamp at −10, not −100"),
    # --- the reverse pass and its rules -------------------------------------------------------
    M("adjoint-last-matrix", "symbp/grad.py",
      "            g = self.emit(make_map(sp.Lambda(v, sp.Add(*v)), name.shape, parts), name)",
      "            g = parts[-1]",
      "tests/test_adjoint_sum.py", "a matrix read twice keeps only its last adjoint"),
    M("adjoint-last-scalar", "symbp/grad.py",
      "            g = self.emit(sp.Add(*parts), name)",
      "            g = parts[-1]",
      "tests/test_grad.py -k sympy_diff", "a scalar read twice keeps only its last adjoint"),
    M("matmul-no-transpose", "symbp/heads/linalg.py",
      "        out.append((A, sp.MatMul(G, tr(B))))",
      "        out.append((A, sp.MatMul(G, B)))",
      "tests/test_adjoint_sum.py", "Ā = Ḡ B instead of Ḡ Bᵀ (silent for square B)"),
    M("softmax-vjp-sign", "symbp/heads/softmax.py",
      "_Y * (_G - _S)", "_Y * (_G + _S)",
      "tests/test_printing.py -k softmax_mse", "softmax z̄ = y ⊙ (ḡ + rowsum(ḡ ⊙ y))"),
    M("log-softmax-vjp", "symbp/heads/softmax.py",
      "_G - P * _S", "_G - _S",
      "tests/test_printing.py -k central", "log-softmax z̄ forgets softmax(z) ⊙ rowsum(ḡ)"),
    M("sce-no-mean", "symbp/heads/softmax.py",
      "_G * (_S * _R - _T) / _N", "_G * (_S * _R - _T)",
      "tests/test_grad.py -k softmax_ce_gradient", "softmax-CE adjoint (Y − T) without the 1/N"),
    M("pow-rule", "symbp/vjp.py",
      "return e.exp * x ** (e.exp - 1)", "return e.exp * x ** e.exp",
      "tests/test_grad.py -k sympy_diff", "∂xⁿ/∂x = n xⁿ"),
    M("bias-axis", "symbp/vjp.py",
      "            C = AxisSum(broadcast(C, shape), k)",
      "            C = Total(broadcast(C, shape))",
      "tests/test_grad.py -k 'mlp_gradcheck and 1-tanh'",
      "a bias gradient sums every entry of the adjoint, not each column (Σ Ḡ, not 𝟏ᵀḠ)"),
    M("fuse-shared", "symbp/passes.py",
      "n_uses.get(x) == 1", "n_uses.get(x, 0) >= 1",
      "tests/test_passes.py", "fusion folds a map that has other readers"),
    M("dce-keeps-nothing", "symbp/passes.py",
      "            live.update(_names_in(a.expr))\n", "",
      "tests/test_passes.py", "dead-code elimination forgets what a kept line reads"),
    M("verify-no-shapes", "symbp/ir.py",
      "            if not all(same_dim(x, y) for x, y in zip(shape, a.name.shape)):",
      "            if False:",
      "tests/test_ir.py", "verify no longer compares a value's shape with its name's"),
    # --- backends -----------------------------------------------------------------------------
    M("numpy-sigmoid", "symbp/functions.py",
      "return sp.Piecewise((1, x >= 0), (e, True)) / (1 + e)",
      "return sp.Piecewise((e, x >= 0), (1, True)) / (1 + e)",
      "tests/test_nn.py -k other_losses",
      "σ's stable rule (what NumPy and every backend compute) gives σ(−x)"),
    M("numpy-sce-mean", "symbp/backends/numpy.py",
      "-numpy.sum(t * _log_softmax(z)) / z.shape[0]",
      "-numpy.sum(t * _log_softmax(z)) / z.size",
      "tests/test_nn.py -k by_hand", "reference softmax-CE divides by N·C, not N"),
    M("acc-float32", "symbp/backends/numba_cpu.py",
      "ACC = np.float64", "ACC = np.float32",
      "tests/test_reductions.py", "float32 accumulators in cpu reductions"),
    M("sgd-gemm-beta", "symbp/backends/numba_cpu.py",
      'f"{self.rule_expr(alpha, names)})")', '"DT(0))")',
      "tests/test_backend_numba_cpu.py -k 'fused_step_matches and sgd'",
      "fused SGD: gemm β = 0 overwrites W with −lr·g"),
    M("momentum-gemm-beta", "symbp/backends/numba_cpu.py",
      'f"{self.rule_expr(alpha, names)})")', '"DT(1))")',
      "tests/test_backend_numba_cpu.py -k 'fused_step_matches and momentum'",
      "fused momentum: m ← m + g, β forgotten"),
    M("adam-bias-correction", "symbp/backends/numba_cpu.py",
      'f64[rule.t] = "_t"', 'f64[rule.t] = "(_t + 1)"',
      "tests/test_backend_numba_cpu.py -k 'fused_step_matches and adam-float64'",
      "fused Adam: the bias corrections 1 − βᵗ one step late (t + 1)"),
    M("adam-second-moment", "symbp/optim.py",
      "(v, beta2 * v + _u * g)", "(v, beta2 * v + _u)",
      "tests/test_train.py -k 'optimizer_matches and adam-numpy'",
      "Adam's rule (every path): v accumulates g, not g²"),
    M("in-place-live", "symbp/backends/numba_cpu.py",
      "and all(u.name == name or u.name in self.done",
      "and all(True or u.name == name or u.name in self.done",
      "tests/test_in_place.py -k 'steps_compute and read_later and float64'",
      "a map written over an operand that a later map still reads"),
    M("softmax-no-shift", "symbp/heads/softmax.py",
      'gen.emit(f"_ez = math.exp({z}[_i, _j] - _m)", 3)',
      'gen.emit(f"_ez = math.exp({z}[_i, _j])", 3)',
      "tests/test_saturation.py -k large_logits",
      "cpu softmax without the max shift: overflow"),
    M("gemm-layout-flag", "symbp/backends/blas.py",
      'flag = {"C": ord("n"), "F": ord("t")}',
      'flag = {"C": ord("n"), "F": ord("n")}',
      "tests/test_backend_numba_cpu.py -k gemm_every_layout",
      "gemm ignores an F-ordered (transposed) operand"),
    M("cpu-neg-power", "symbp/backends/numba_cpu.py",
      "return prod if n > 0 else self._recip(prod)", "return prod",
      "tests/test_powers.py", "compiled x**-n prints x**n"),
    M("sign-rule", "symbp/backends/scalar.py",
      "(-{one} if {x} < {zero} else {x})", "({one} if {x} < {zero} else {x})",
      "tests/test_powers.py", "compiled sign(u) is +1 below 0: |u|' wrong for u < 0"),
    M("cuda-tile-k", "symbp/backends/numba_cuda.py",
      "        for _kk in range(_TILE):\n            _acc += _sA[_ty, _kk] * _sB[_kk, _tx]",
      "        for _kk in range(_TILE - 1):\n            _acc += _sA[_ty, _kk] * _sB[_kk, _tx]",
      "tests/test_backend_cuda.py -k simulator",
      "CUDA tiled product skips the last k of each tile (simulator)"),
    # --- training, optimizers, checkpoints ----------------------------------------------------
    M("seed-ignored", "symbp/train.py",
      "rng = np.random.default_rng(seed)", "rng = np.random.default_rng(0)",
      "tests/test_seeds.py", "fit ignores its seed"),
    M("resume-epoch", "symbp/train.py",
      "_save(path, model, step, optimizer, rng, epoch + 1, 0, None, hist, seed, [])",
      "_save(path, model, step, optimizer, rng, epoch, 0, None, hist, seed, [])",
      "tests/test_train.py -k resume_equals", "a resumed run repeats its last epoch"),
    M("adam-reference-bias", "symbp/optim.py",
      "(_mh, m / _c1),", "(_mh, m),",
      "tests/test_train.py -k 'optimizer_matches and adam-numpy'",
      "Adam's rule (every path, the reference too) without the first-moment bias correction"),
    M("momentum-reference", "symbp/optim.py",
      "(m, beta * m + g),", "(m, m + g),",
      "tests/test_train.py -k 'optimizer_matches and momentum-numpy'",
      "momentum's rule (every path, the reference too) never decays m"),
    M("checkpoint-non-atomic", "symbp/checkpoint.py",
      "    fd, tmp = _create_temp(path)\n",
      "    fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), str(path)\n",
      "tests/test_checkpoint.py -k failed_save", "the checkpoint is written in place"),
    # --- the parser ---------------------------------------------------------------------------
    M("parser-attribute", "symbp/parse.py",
      "        if kind is ast.Name:\n            return self.name(node)",
      "        if kind is ast.Name:\n            return self.name(node)\n"
      "        if kind is ast.Attribute:\n            return self.build(node.value, depth + 1)",
      "tests/test_parse.py -k hostile", "x.attr is let through as x"),
    M("parser-dunder", "symbp/parse.py",
      'if not NAME.match(s) or "__" in s:', "if not NAME.match(s):",
      "tests/test_parse.py -k hostile", "names with __ are accepted"),
    # --- printing -----------------------------------------------------------------------------
    M("tex-ce-minus", "symbp/printing/tex.py",
      r'return r"-\frac{1}{%s}\textstyle', r'return r"\frac{1}{%s}\textstyle',
      "tests/test_golden_derivation.py -k golden", "the printed cross-entropy loses its minus"),
    M("text-ce-minus", "symbp/printing/tex.py",
      'return f"−(1/{n}) Σ', 'return f"(1/{n}) Σ',
      "tests/test_golden_derivation.py -k golden", "the text cross-entropy loses its minus"),
    M("check-skips-forward", "symbp/printing/derive.py",
      "for r in self.forward + self.backward + self.gradients:",
      "for r in self.backward + self.gradients:",
      "tests/test_golden_derivation.py -k check", "Derivation.check() ignores forward rows"),
    # --- what a user meets in the first hour --------------------------------------------------
    M("sce-rowsum-dz", "symbp/heads/softmax.py",
      "_G * (_S * _R - _T) / _N", "_G * (_S - _T) / _N",
      "tests/test_softmax_ce.py -k 'numpy and not pytorch'",
      "softmax-CE d/dZ is (Y − T)/N also where rows of T do not sum to 1"),
    M("sce-dt-logits", "symbp/heads/softmax.py",
      "[LogSoftmax(Z), g, n]", "[Z, g, n]",
      "tests/test_softmax_ce.py -k 'numpy and not pytorch'", "softmax-CE d/dT is −Z/N"),
    M("sce-cpu-rowsum", "symbp/heads/softmax.py",
      '"_acc_loss += _acc_tm + _acc_t * math.log(_acc_s)"',
      '"_acc_loss += _acc_tm + math.log(_acc_s)"',
      "tests/test_softmax_ce.py -k 'cpu and not pytorch'",
      "cpu softmax-CE value as if every row of T summed to 1"),
    M("max-drops-nan", "symbp/backends/scalar.py",
      "return a if a > b or a != a else b", "return a if a > b else b",
      "tests/test_nan.py -k 'Max_of_two and cpu'",
      "compiled max(NaN, y) is y: a NaN first argument is dropped"),
    M("min-drops-nan", "symbp/backends/scalar.py",
      "return a if a < b or a != a else b", "return a if a < b else b",
      "tests/test_nan.py -k 'Min_of_two and cpu'",
      "compiled min(NaN, y) is y: a NaN first argument is dropped"),
    M("step-drops-nan", "symbp/backends/scalar.py",
      'return f"({one} if {x} > {z} else ({zero} if {x} <= {z} else {x}))"',
      'return f"({one} if {x} > {z} else {zero})"',
      "tests/test_nan.py -k 'printed_heads and Heaviside'", "compiled step(NaN) is 0"),
    M("checkpoint-mode-0600", "symbp/checkpoint.py",
      "return os.open(tmp, flags, 0o666), tmp", "return os.open(tmp, flags, 0o600), tmp",
      "tests/test_checkpoint.py -k umask", "checkpoints written 0600 whatever the umask"),
    M("names-shadow-modules", "symbp/backends/__init__.py",
      "while s in used or s in taken:", "while s in used:",
      "tests/test_names.py -k 'reserved and numpy'",
      "a symbol named numpy/DTYPE/scipy shadows the generated code's module"),
]


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def _copy(dest: Path, files: list[str]) -> None:
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)


def applies(m: Mutant) -> str:
    """'' when the original text is in the file exactly once, else why not."""
    path = ROOT / m.file
    if not path.exists():
        return f"{m.file} does not exist"
    n = path.read_text().count(m.original)
    return "" if n == 1 else f"original text found {n} times in {m.file} (expected once)"


def run_one(m: Mutant | None, tests: str, files: list[str],
            timeout: float) -> tuple[str, float, str]:
    """Apply ``m`` (None: unmutated) in a scratch copy, run ``tests``; (status, seconds, log)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="symbp-mutant-") as tmp:
        tree, cache = Path(tmp) / "tree", Path(tmp) / "cache"
        _copy(tree, files)
        if m is not None:
            p = tree / m.file
            text = p.read_text()
            if text.count(m.original) != 1:
                return "not found", time.perf_counter() - t0, applies(m)
            p.write_text(text.replace(m.original, m.replacement))
        env = {**os.environ, "PYTHONPATH": str(tree), "SYMBP_CACHE_DIR": str(cache),
               "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("PYTEST_ADDOPTS", None)
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               *shlex.split(tests)]
        try:
            r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - t0, ""
        log = (r.stdout + r.stderr)[-3000:]
    dt = time.perf_counter() - t0
    if r.returncode in (4, 5):  # a usage error, or the selection matches nothing: fix the list
        return ("no tests" if r.returncode == 5 else "bad args"), dt, log
    if m is None:
        return ("passes" if r.returncode == 0 else "FAILS"), dt, log
    # 1: a test failed; 2 or 3: the mutant broke collection or pytest itself (still caught,
    # but shown apart: a failing assertion is the better catch)
    return {0: "SURVIVED", 1: "caught"}.get(r.returncode, "error"), dt, log


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these mutants only")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--baseline", action="store_true",
                    help="run every selection on the unmutated tree (all must pass)")
    ap.add_argument("-j", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    ap.add_argument("-v", action="store_true", help="print the test log of each bad result")
    ap.add_argument("--tests", help="run this pytest selection instead of each mutant's own "
                    "(to find the tests that catch a mutant)")
    a = ap.parse_args(argv)

    ids = [m.id for m in MUTANTS]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        print(f"duplicate mutant ids: {', '.join(sorted(dup))}", file=sys.stderr)
        return 2
    chosen = MUTANTS
    if a.only:
        unknown = set(a.only) - set(ids)
        if unknown:
            print(f"unknown mutant ids: {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
            return 2
        chosen = [m for m in MUTANTS if m.id in a.only]

    if a.list:
        for m in chosen:
            why = applies(m)
            print(f"{m.id:22} {m.file:30} {'ok' if not why else 'NOT FOUND'}  {m.what}")
            print(f"{'':22} tests: {m.tests}" + (f"\n{'':22} {why}" if why else ""))
        return 0 if all(not applies(m) for m in chosen) else 1

    stale = [(m.id, applies(m)) for m in chosen if applies(m)]
    for mid, why in stale:  # said first and loudly: the list needs updating, not the tests
        print(f"NOT FOUND {mid}: {why}", file=sys.stderr)
    files = _tracked_files()
    if a.baseline:
        jobs = [(None, t, t) for t in dict.fromkeys(a.tests or m.tests for m in chosen)]
    else:
        jobs = [(m, a.tests or m.tests, m.id) for m in chosen]
    t0 = time.perf_counter()
    results: dict = {}

    def work(job):
        m, tests, key = job
        res = run_one(m, tests, files, a.timeout)
        results[key] = res
        mark = res[0]
        print(f"  {key}: {mark} ({res[1]:.1f} s)", file=sys.stderr, flush=True)
        return res

    with ThreadPoolExecutor(max_workers=max(1, a.j)) as pool:
        list(pool.map(work, jobs))
    wall = time.perf_counter() - t0

    good = {"caught", "error", "passes", "timeout"}
    if a.baseline:
        print(f"{'selection':70} {'result':8} {'s':>6}")
        for _, tests, key in jobs:
            status, dt, _ = results[key]
            print(f"{tests:70} {status:8} {dt:6.1f}")
    else:
        print(f"{'id':22} {'file':30} {'result':9} {'s':>6}  description")
        for m, _, key in jobs:
            status, dt, _ = results[key]
            print(f"{m.id:22} {m.file:30} {status:9} {dt:6.1f}  {m.what}")
    bad = [k for _, _, k in jobs if results[k][0] not in good]
    counts: dict = {}
    for _, _, k in jobs:
        counts[results[k][0]] = counts.get(results[k][0], 0) + 1
    total_s = sum(r[1] for r in results.values())
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"\n{len(jobs)} {'selections' if a.baseline else 'mutants'}: {summary}; "
          f"{total_s:.0f} s of runs, {wall:.0f} s wall (-j {a.j})")
    if not a.baseline and jobs:
        caught = sum(counts.get(k, 0) for k in ("caught", "error", "timeout"))
        print(f"caught {caught}/{len(jobs)} = {100 * caught / len(jobs):.0f} %")
    if a.v:
        for k in bad:
            print(f"\n--- {k}: {results[k][0]}\n{results[k][2]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
