"""Scalar arithmetic: Add, Mul, Pow, any differentiable ``sympy.Function``, Max/Min/Abs,
Piecewise.  One record for all of them (on ``sympy.Expr``): SymPy knows their
derivatives, every printer knows their syntax."""

from __future__ import annotations

import sympy as sp

from ..vjp import operands, partial
from . import register


def vjp(e, y, g, wants, local=None):
    # ordinary partial derivatives by each operand
    out = []
    for x in operands(e):
        if not wants(x):
            continue
        d = partial(e, x)
        if y is not None and isinstance(e, (sp.Function, sp.Pow)):
            d = d.xreplace({e: y})  # reuse the node's own value: tanh' = 1 - y**2
        if d != 0:
            out.append((x, g * d))
    return out


def numpy(ctx, a):
    e = a.expr
    return f"DTYPE({ctx.pr.doprint(e.xreplace(ctx.names_in(e)))})"


def cpu(gen, a):
    gen.head(a)
    gen.emit(f"{gen.ids[a.name]} = {gen.expr(a.expr)}")


def _function(e) -> bool:
    return isinstance(e, (sp.Function, sp.Piecewise))


register(sp.Expr, kind="scalar", lower=lambda lw, e: lw.lower_scalar(e), vjp=vjp,
         numpy=numpy, cpu=cpu, cuda="scalars", function=_function,
         doc="scalar arithmetic over names")


def lower_piecewise(lw, e):
    pairs = [(lw.L(x), lw.L(c)) for x, c in e.args]
    return lw.emit(sp.Piecewise(*pairs, evaluate=False))


register(sp.Piecewise, kind="scalar", lower=lower_piecewise,
         children=lambda e: [x for pair in e.args for x in pair.args], vjp=vjp,
         numpy=numpy, cpu=cpu, cuda="scalars", function=True,
         doc="a scalar chosen by conditions")
