"""The ``symbp`` command: derivations, graphs and plots for a lecture, and a training demo.

Every expression string goes through ``symbp.parse.parse_expr``, which never executes
its text.  Heavy modules (the parser's SymPy work, printing, matplotlib, the demo's
training code) load inside the command that needs them, so ``symbp --help`` stays quick.

A bad input (a refused expression, an unknown ``--wrt`` name, a missing Graphviz) prints
one line, ``symbp: error: ...``, on stderr and exits with status 2; an unexpected failure
prints one line with a hint and exits with status 1 (``SYMBP_DEBUG=1`` shows the
traceback).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from contextlib import contextmanager

PROG = "symbp"
EXPR_HELP = """\
expressions: numbers, names (w, x1, b_out), + - * / **, parentheses, pi, and calls of
{functions}
  exp log sqrt sin cos tan sinh cosh erf abs max(a, b, ...) min(...) step, and the losses
  mse(y, t) binary_cross_entropy(p, t) bce_with_logits(z, t) cross_entropy(p, t), and
  cross_entropy(softmax(z1, z2, z3), t1, t2, t3) over classes (softmax only there).
  Nothing else is accepted (no attributes, subscripts, strings, keywords, ...), and
  nothing in the text is ever executed.  Quote the expression for your shell; put
  -- before one that starts with a minus: symbp derive --wrt x -- "-x*w"."""


def expr_help() -> str:
    """EXPR_HELP with every function of ``symbp.functions.FUNCTIONS`` listed as it is
    called (``leaky_relu(x, alpha)``), rows defined after import included."""
    from .functions import FUNCTIONS, usage

    lines, line = [], " "
    for name, f in FUNCTIONS.items():
        word = usage(name, f)
        if len(line) + 1 + len(word) > 88:
            lines.append(line)
            line = " "
        line += " " + word
    return EXPR_HELP.format(functions="\n".join(lines + [line]))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("symbp")
    except Exception:  # not installed as a distribution: ask the package
        from . import __version__

        return __version__


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``symbp`` and its subcommands."""
    top = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_Formatter,
        description="symbp: symbolic differentiation of networks, printed for a lecture "
                    "and compiled to NumPy/Numba.",
        epilog="examples:\n"
               '  symbp derive "sigmoid(w*x + b)" --wrt w b --at w=0.5 x=1 b=0\n'
               '  symbp graph "sigmoid(w*x + b)" --at w=0.5 x=1 b=0 -o graph.svg\n'
               "  symbp plot relu -o relu.png\n"
               "  symbp demo --epochs 5\n\n"
               "run `symbp COMMAND --help` for each command's options.",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "derive", formatter_class=_Formatter,
        help="print the step-by-step derivation of an expression's gradient",
        description="Print the forward table, the backward table of ordered derivatives and "
                    "the gradients of EXPR, optionally with numbers.",
        epilog=expr_help() + "\n\nexamples:\n"
               '  symbp derive "sigmoid(w*x + b)" --wrt w b\n'
               '  symbp derive "sigmoid(w*x + b)" --wrt w b --at w=0.5 x=1 b=0\n'
               '  symbp derive "mse(sigmoid(w*x + b), t)" --wrt w b --format latex\n'
               '  symbp derive "leaky_relu(w*x, 0.1)" --at w=2,x=-1 --format md\n'
               '  symbp derive --wrt z1 z2 z3 "cross_entropy(softmax(z1, z2, z3), t1, t2, t3)"',
    )
    _expr_args(d)
    d.add_argument("--format", choices=("text", "latex", "md", "markdown"), default="text",
                   help="output: plain Unicode text (default), LaTeX align*, or Markdown")
    d.set_defaults(run=cmd_derive)

    g = sub.add_parser(
        "graph", formatter_class=_Formatter,
        help="draw the computational graph with forward values and gradients",
        description="Write the forward graph of EXPR as Graphviz DOT; with --at, each edge "
                    "carries its forward value and its backward gradient.  .svg/.png/.pdf "
                    "need Graphviz's `dot`; .dot (or no -o: stdout) does not.",
        epilog=expr_help() + "\n\nexamples:\n"
               '  symbp graph "sigmoid(w*x + b)" --at w=0.5 x=1 b=0 -o graph.svg\n'
               '  symbp graph "(x + y)*z" --at x=-2 y=5 z=-4 -o graph.dot\n'
               '  symbp graph "tanh(w*x)" --wrt w --at w=1,x=2 | dot -Tpng > g.png',
    )
    _expr_args(g)
    g.add_argument("-o", "--output", metavar="FILE",
                   help="output file: .svg, .png, .pdf (Graphviz) or .dot; default: DOT on "
                        "stdout")
    g.set_defaults(run=cmd_graph)

    p = sub.add_parser(
        "plot", formatter_class=_Formatter,
        help="plot an activation and its derivative (needs matplotlib)",
        description="Plot an activation (a name, or a formula in one variable) and its "
                    "derivative on one figure.",
        epilog="examples:\n  symbp plot relu -o relu.png\n  symbp plot sigmoid -o sigmoid.svg\n"
               '  symbp plot "x*sigmoid(x)" -o swish.png',
    )
    p.add_argument("name", metavar="NAME|FORMULA",
                   help="an activation (sigmoid, relu, tanh, elu, ...) or a formula in one "
                        "variable, e.g. 'x*sigmoid(x)'")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="image file (default: NAME.png, or the formula's letters .png)")
    p.set_defaults(run=cmd_plot)

    m = sub.add_parser(
        "demo", formatter_class=_Formatter,
        help="train a small network end to end and print its final accuracy",
        description="Train symbp's demo network (compiled forward, gradient and update) and "
                    "print the final accuracy.",
        epilog="examples:\n  symbp demo\n  symbp demo --epochs 20 --target parallel\n"
               "  symbp demo --model cnn\n"
               "  mpiexec -n 2 symbp demo --distributed mpi",
    )
    m.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                   help="mlp: 64-128-64-10 on the digits' pixels (default); cnn: two "
                        "convolutions and max-pools on the 8×8 images (≥ 98.5 %%)")
    m.add_argument("--epochs", type=_epochs, default=None, metavar="N",
                   help="training epochs (default: the demo's own)")
    m.add_argument("--target", choices=("cpu", "numpy", "parallel"), default=None,
                   help="where the compiled step runs (default: cpu if Numba is installed, "
                        "else numpy)")
    m.add_argument("--quiet", action="store_true",
                   help="no progress bar and no commentary: only the final accuracy")
    m.add_argument("--distributed", choices=("mpi",), default=None,
                   help="data-parallel over the processes of mpiexec (pip install "
                        "'symbp[mpi]'); rank 0 prints")
    m.set_defaults(run=cmd_demo)
    return top


def _expr_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("expr", metavar="EXPR", nargs="?",
                   help="the expression, e.g. 'sigmoid(w*x + b)'; before or after the options")
    p.add_argument("--wrt", nargs="+", metavar="NAME", action="extend",
                   help="names to differentiate by (default: every name in EXPR)")
    p.add_argument("--at", nargs="+", metavar="NAME=VALUE", action="extend",
                   help="numbers for the names, e.g. --at w=0.5 x=1 b=0 (or w=0.5,x=1,b=0)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up after this many seconds (default: 60; 0: never)")


_NAMELIKE = re.compile(r"[A-Za-z0-9_]+\Z")


def _take_expression(args) -> None:
    """Find EXPR wherever it was typed: ``--wrt w b "sigmoid(w*x+b)"`` hands it to --wrt,
    whose nargs="+" takes every word up to the next option.  A --wrt word that is not a
    name, or an --at word without ``=``, is the expression (neither can be one)."""
    from .errors import SymbpError

    found = [args.expr] if args.expr is not None else []
    if args.wrt:
        found += [w for w in args.wrt if not _NAMELIKE.match(w)]
        args.wrt = [w for w in args.wrt if _NAMELIKE.match(w)]
    if args.at:
        found += [a for a in args.at if "=" not in a]
        args.at = [a for a in args.at if "=" in a]
    if not found and args.wrt and len(args.wrt) > 1:
        found.append(args.wrt.pop())  # --wrt x x: the last name is the expression
    if not found:
        raise SymbpError(f"`{args.command}` needs an expression, e.g. "
                         f'symbp {args.command} "sigmoid(w*x + b)" --wrt w b')
    if len(found) > 1:
        shown = " and ".join(_one_line(repr(f))[:40] for f in found[:2])
        raise SymbpError(f"two expressions given ({shown}); give one, quoted")
    args.expr = found[0]


def _epochs(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
    if not 1 <= n <= 100_000:
        raise argparse.ArgumentTypeError(f"{n} epochs: choose 1 to 100000")
    return n


# --- commands --------------------------------------------------------------------------


def _problem(args) -> tuple:
    """Parse EXPR, --wrt and --at into (f, wrt symbols, {Symbol: value} or None)."""
    from .errors import SymbpError
    from .parse import parse_assignments, parse_expr

    _take_expression(args)
    f, symbols = parse_expr(args.expr)
    args.symbols = list(symbols.values())  # in the order written: the graph's input column
    names = ", ".join(symbols) or "none"
    if args.wrt is None:
        wrt = list(symbols.values())
    else:
        unknown = [w for w in args.wrt if w not in symbols]
        if unknown:
            raise SymbpError(f"--wrt {' '.join(unknown)}: not a name in the expression "
                             f"(its names: {names})")
        if len(set(args.wrt)) != len(args.wrt):
            raise SymbpError("--wrt names a variable twice")
        wrt = [symbols[w] for w in args.wrt]
    if not wrt:
        raise SymbpError("the expression has no names to differentiate by")
    at = None
    if args.at:
        values = parse_assignments(args.at)
        unknown = [n for n in values if n not in symbols]
        if unknown:
            raise SymbpError(f"--at {', '.join(unknown)}: not a name in the expression "
                             f"(its names: {names})")
        missing = [n for n in symbols if n not in values]
        if missing:
            raise SymbpError(f"--at gives no value for {', '.join(missing)}; give every "
                             f"name a value, e.g. --at {' '.join(n + '=1' for n in missing)}")
        at = {symbols[n]: v for n, v in values.items()}
    return f, wrt, at


def cmd_derive(args) -> int:
    f, wrt, at = _problem(args)
    from .printing import derive

    with _deadline(args.timeout):
        d = derive(f, wrt, at=at)
        fmt = {"latex": d.latex, "md": d.markdown, "markdown": d.markdown, "text": d.text}
        out = fmt[args.format]()
    _write(out)
    return 0


def cmd_graph(args) -> int:
    from .errors import SymbpError

    path = args.output
    if path is not None:
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".svg", ".png", ".pdf", ".dot", ".gv"):
            raise SymbpError(f"-o {path}: the file must end in .svg, .png, .pdf or .dot")
    f, wrt, at = _problem(args)
    from .printing.graph import render, to_dot

    with _deadline(args.timeout):
        dot = to_dot(f, at=at, wrt=wrt, order=args.symbols)
    if path is None:
        _write(dot)
    elif ext in (".dot", ".gv"):
        _save(path, dot)
    else:
        with _os_errors(path):
            render(dot, path, without_dot="write the DOT source with -o graph.dot (or no -o: "
                                          "DOT on stdout) and render it elsewhere")
    if path is not None:
        print(f"wrote {_one_line(path)}", file=sys.stderr)
    return 0


def cmd_plot(args) -> int:
    from .errors import SymbpError
    from .functions import FUNCTIONS

    name = args.name
    if name in FUNCTIONS:
        what, stem = name, name
    elif _NAMELIKE.match(name):  # a typo of a name, not the formula y = x
        raise SymbpError(f"unknown activation {name[:40]}; known: "
                         f"{', '.join(sorted(FUNCTIONS))}; or write a formula in x, as in "
                         '"x*sigmoid(x)"')
    else:
        from .parse import parse_expr

        what, symbols = parse_expr(name)
        if len(symbols) != 1:
            raise SymbpError(f"plot: the formula must have one variable, as in "
                             f'"x*sigmoid(x)"; it has {len(symbols)} ({", ".join(symbols)})')
        stem = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:40] or "plot"
    path = args.output or f"{stem}.png"
    from .printing.plots import plot_activation

    with _os_errors(path):
        plot_activation(what, path)
    print(f"wrote {_one_line(path)}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .demo import run, run_cnn

    root = True
    if args.distributed:
        from .distributed import world

        root = world().Get_rank() == 0  # the others train in step but stay silent
        os.environ["SYMBP_DISTRIBUTED"] = args.distributed  # fit's default, inside run()
    talk = root and not args.quiet
    options = {"target": args.target, "progress": talk, "verbose": talk}
    if args.epochs is not None:
        options["epochs"] = args.epochs
    result = (run_cnn if args.model == "cnn" else run)(**options)
    if not root:
        return 0
    acc = _accuracy(result)
    if acc is None:
        print(f"demo finished: {result}")
    else:
        print(f"final accuracy: {acc:.4f}")
    return 0


def _accuracy(result):
    if isinstance(result, dict):
        for key in ("accuracy", "final_accuracy", "test_accuracy", "acc"):
            if key in result:
                return float(result[key])
    return None


# --- plumbing --------------------------------------------------------------------------


def _write(text: str) -> None:
    """Print to stdout; a terminal that cannot show ∂ or σ gets escapes, not a crash."""
    text = text if text.endswith("\n") else text + "\n"
    try:
        sys.stdout.write(text)
    except UnicodeEncodeError:
        enc = sys.stdout.encoding or "ascii"
        sys.stdout.write(text.encode(enc, "backslashreplace").decode(enc))
    sys.stdout.flush()


def _save(path: str, text: str) -> None:
    with _os_errors(path), open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


@contextmanager
def _os_errors(path: str):
    from .errors import SymbpError

    try:
        yield
    except OSError as e:
        raise SymbpError(f"cannot write {path}: {e.strerror or e}") from None


class _Expired(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in SymPy eats it."""


@contextmanager
def _deadline(seconds: float):
    """Bound symbolic work in wall time: SymPy can be slow on legal but large inputs."""
    from .errors import SymbpError

    if not seconds or seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise _Expired

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired:
        raise SymbpError(f"gave up after {seconds:g} s; simplify the expression or pass "
                         "a larger --timeout") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _one_line(msg: str) -> str:
    # One line, no terminal control characters: messages may quote user text.
    msg = " ".join(str(msg).split())
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in msg)


def main(argv: list[str] | None = None) -> int:
    """Run ``symbp`` with ``argv`` (default: the process arguments); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `symbp derive ... | head`
        sys.stderr.close()
        return 0
    except Exception as e:
        from .errors import SymbpError

        if os.environ.get("SYMBP_DEBUG"):
            raise
        if isinstance(e, SymbpError):
            print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        if isinstance(e, ImportError) and e.name:
            if e.name.split(".")[0] == "symbp":
                print(f"{PROG}: error: this installation of symbp lacks {e.name}, which "
                      f"`{args.command}` needs", file=sys.stderr)
                return 1
            print(f"{PROG}: error: `{args.command}` needs the package {e.name}; install "
                  f"it (pip install {e.name})", file=sys.stderr)
            return 2
        print(f"{PROG}: error: internal error: {_one_line(f'{type(e).__name__}: {e}')} "
              "(a bug in symbp; rerun with SYMBP_DEBUG=1 for the traceback and report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
