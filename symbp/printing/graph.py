"""The computational graph as Graphviz DOT, with numbers on its edges.

One node per operation of the forward Program (``+``, ``×``, ``σ``, ``@`` ...), one per
input, and the output.  Given numbers (``at``), every edge carries the value flowing
forward (black, above) and the gradient flowing back (red, below): for a scalar edge
v → u that is the ordered derivative's share ∂⁺L/∂u · ∂u/∂v, so the gradients on the
edges leaving a value add up to its ∂⁺L/∂v, as in the textbook figure.  A matrix edge
carries the whole ∂⁺L/∂v of its source.

``render(dot, "graph.svg")`` runs Graphviz's ``dot`` program (not a Python dependency).
"""

from __future__ import annotations

import html
import math
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import sympy as sp

from ..api import gradient_program
from ..errors import SymbpError
from ..heads import rule
from ..ir import _names_in, is_constant
from ..matrix import (
    is_matrix,
)
from . import tex as T
from .derive import format_value, real_number, run_program

_INSTALL = (
    "Graphviz's `dot` program is not installed, so the graph cannot be rendered. Install "
    "Graphviz (Debian/Ubuntu: `sudo apt-get install graphviz`; macOS: `brew install "
    "graphviz`; conda: `conda install -c conda-forge graphviz`), or {without_dot}"
)


RED = "red"  # the gradient's colour on edges, sums and the legend


def _op_label(e) -> str:
    """The operation a node performs, in one or two characters where possible."""
    h = rule(e)
    if h is not None and h.label is not None:
        return h.label(e)
    if isinstance(e, sp.Add):
        consts = [a for a in e.args if is_constant(a)]
        return "+" + (T.text(sp.Add(*consts)) if consts else "")
    if isinstance(e, sp.Mul):
        c, rest = e.as_coeff_Mul()
        if c == -1 and len(sp.Mul.make_args(rest)) == 1:
            return "−"
        return "×" + (T.text(c) if c != 1 else "")
    if isinstance(e, sp.Pow):
        if e.exp == -1:
            return "1/x"
        if e.exp.is_Integer and e.exp > 0:
            return "x" + str(e.exp).translate(T._SUP)
        return "^" + T.text(e.exp)
    if isinstance(e, sp.Function):
        return T.TextPrinter._FUNC.get(type(e).__name__, type(e).__name__)
    return type(e).__name__


def _share(user, v, g_user, values):
    """The gradient a scalar edge v → user carries: ∂⁺L/∂user · ∂user/∂v, a number."""
    d = sp.diff(user.expr, v)
    args = sorted(d.free_symbols, key=str)
    try:  # in IEEE floats, as the gradient program: d/dx log x at 0 is ∞, not SymPy's zoo
        local = sp.lambdify(args, d, modules="numpy")
        with np.errstate(all="ignore"):
            return float(np.float64(g_user) * local(*(np.float64(values[a]) for a in args)))
    except (ImportError, NameError, TypeError, AttributeError):  # a head NumPy cannot print
        sub = {k: sp.Float(float(x)) for k, x in values.items()
               if isinstance(k, sp.Symbol) and np.ndim(x) == 0}
        return float(g_user) * real_number(sp.N(d.xreplace(sub)))


def to_dot(f, at=None, wrt=None, *, loss: str = "L", digits: int = 4, order=None) -> str:
    """Graphviz DOT source of the forward graph of ``f``.

    With ``at`` (a number or array for every input), each edge is labelled with its forward
    value and, in red, its backward gradient, and a legend says so; where a scalar value
    feeds several operations, its node shows the sum of their gradients, Σ = ∂⁺L/∂v.
    ``wrt`` (default: every input) says which gradients flow; ``loss`` names the output
    node; numbers get ``digits`` significant digits.  The inputs stand in one column, top
    to bottom in ``order`` (symbols or names, as written: x before y), by default ``wrt``
    first, then the other inputs.  Render with ``render(dot, "g.svg")``.
    """
    f = sp.sympify(f)
    if wrt is None:
        from ..ir import lower

        fwd = lower(f)
        wrt = [s for s in fwd.inputs]
    p = gradient_program(f, wrt)
    nf = p.meta["forward"]
    fwd_body = p.body[:nf]
    adj = p.meta["adjoint"]
    values = run_program(p, at) if at is not None else None

    def gval(name):
        g = adj.get(name)
        if g is None or values is None:
            return None
        return values[g] if isinstance(g, (sp.Symbol, sp.MatrixSymbol)) else float(g)

    def label(v, share=None):
        name = T.name_text(v.name) if v in p.inputs else ""
        if values is None:
            return name
        val = format_value(values[v], "text", digits, 6)
        g = share if share is not None else gval(v)
        top = f"{name} = {val}" if name else val
        if g is None:
            return f"<{_esc(top)}>"
        red = _esc(format_value(g, "text", digits, 6))
        return f'<{_esc(top)}<br/><font color="{RED}">{red}</font>>'

    ids: dict = {}
    rank = [str(w) for w in (order or ())] + [str(w) for w in wrt]
    inputs = sorted(p.inputs, key=lambda s: (rank.index(s.name) if s.name in rank
                                              else len(rank), s.name))
    for k, s in enumerate(inputs):
        ids[s] = f"in{k}"
    for k, a in enumerate(fwd_body):
        ids[a.name] = f"op{k}"
    edges, users = [], Counter()
    for a in fwd_body:
        for v in _names_in(a.expr):
            if v not in ids:
                continue
            share = None
            if values is not None and not is_matrix(v) and not is_matrix(a.name) and \
                    rule(a.expr).kind == "scalar" and a.name in adj \
                    and v in adj:
                share = _share(a, v, gval(a.name), values)
            lab = label(v, share)
            attr = f"label={lab}" if lab.startswith("<") else f'label="{_esc(lab)}"'
            edges.append(f"  {ids[v]} -> {ids[a.name]} [{attr}];")
            users[v] += 1

    def total(v) -> str:
        # a value read by several operations: its ∂⁺L/∂v is the sum of the edge gradients
        # (the ordered derivative), which no single edge shows; a matrix edge shows it whole
        if values is None or users[v] < 2 or is_matrix(v) or gval(v) is None:
            return ""
        return f'<font color="{RED}">Σ = {_esc(format_value(gval(v), "text", digits))}</font>'

    lines = [
        "digraph G {",
        '  rankdir=LR; bgcolor="white"; nodesep=0.35; ranksep=0.6;',
        '  node [fontname="Helvetica", fontsize=16];',
        '  edge [fontname="Helvetica", fontsize=13];',
    ]
    for s in inputs:
        shape = "  " + "×".join(T.text(d) for d in s.shape) if is_matrix(s) else ""
        name = _esc(T.name_text(s.name) + shape)
        sigma = total(s)
        lab = f"<{name}<br/>{sigma}>" if sigma else f'"{name}"'
        lines.append(f"  {ids[s]} [shape=plaintext, label={lab}];")
    if len(inputs) > 1:  # one column, in the given order: invisible edges keep it
        chain = " -> ".join(ids[s] for s in inputs)
        lines.append(f"  {{rank=same; {chain} [style=invis];}}")
    for a in fwd_body:
        sigma = total(a.name)
        op = _esc(_op_label(a.expr))
        lab = f"<{op}<br/>{sigma}>" if sigma else f'"{op}"'  # the sum inside its node
        shape = "ellipse, margin=0.04" if sigma else "circle"  # two lines fit an ellipse
        lines.append(f"  {ids[a.name]} [shape={shape}, width=0.5, fixedsize=false, "
                     f"label={lab}];")
    lines.append(f'  out [shape=plaintext, label="{_esc(loss)}"];')
    lines += edges
    out = p.outputs[0]
    if values is not None:
        top = format_value(values[out], "text", digits)
        lines.append(f'  {ids[out]} -> out [label=<{_esc(top)}<br/>'
                     f'<font color="{RED}">1</font>>];')
        lines.append(f'  label=<black: value (forward)     <font color="{RED}">red: gradient '
                     f'∂⁺{_esc(loss)}/∂· (backward)</font>>; labelloc=b; labeljust=l; '
                     'fontname="Helvetica"; fontsize=13;')
    else:
        lines.append(f"  {ids[out]} -> out;")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


def render(dot_source: str, path, *,
           without_dot: str = "save the DOT source with `to_dot(...)` and render it "
                              "elsewhere") -> Path:
    """Render DOT source to ``path`` (.svg, .png or .pdf) with Graphviz's ``dot``.

    Raises ``SymbpError`` saying how to install Graphviz when ``dot`` is missing, and what
    to do without it (``without_dot``: the command line says ``-o graph.dot``).
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("svg", "png", "pdf"):
        raise SymbpError(f"render: {path} must end in .svg, .png or .pdf, not {path.suffix!r}")
    dot = shutil.which("dot")
    if dot is None:
        raise SymbpError(_INSTALL.format(without_dot=without_dot))
    args = [dot, f"-T{fmt}", "-o", str(path)]
    if fmt == "png":  # a bitmap for a slide: at least SLIDE_PX wide, however small the graph
        args.insert(1, f"-Gdpi={_png_dpi(dot, dot_source)}")
    try:
        r = subprocess.run(args, input=dot_source.encode(),
                           capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as e:
        raise SymbpError(f"Graphviz's dot took over 60 s to render {path}") from e
    if r.returncode != 0:
        raise SymbpError(f"Graphviz's dot failed on this graph: {r.stderr.decode().strip()}")
    return path


SLIDE_PX = 1400  # a PNG's least width: a full-width picture on a 1920-pixel slide


def _png_dpi(dot: str, source: str) -> int:
    """The dpi that makes the layout SLIDE_PX wide (96 to 300: big graphs keep 96)."""
    try:
        r = subprocess.run([dot, "-Tplain"], input=source.encode(), capture_output=True,
                           timeout=60, check=True)
        width = float(r.stdout.split()[2])  # "graph scale width height", in inches
    except (subprocess.SubprocessError, IndexError, ValueError):
        return 150
    return int(min(300, max(96, math.ceil(SLIDE_PX / max(width, 1e-3)))))
