"""The elementwise map: ``Elementwise(λ, shape, A, B, ...)``, f applied entry by entry with
NumPy broadcasting.  Activations, Hadamard products, sums of matrices and the bias
broadcast are all maps; the fuse pass composes chains of them into one."""

from __future__ import annotations

import sympy as sp

from ..errors import SymbpError
from ..matrix import AxisSum, Elementwise, Total, broadcast_shape, is_matrix
from ..vjp import map_vjp
from . import register


def check(e, where):
    broadcast_shape([x.shape if is_matrix(x) else None for x in e.operands] + [e.shape],
                    culprit=where)
    extra = e.lam.expr.free_symbols - set(e.lam.variables)
    if extra:
        raise SymbpError(f"map body has free symbols {extra} {where}")


def numpy(ctx, a):
    e = a.expr
    names = {v: sp.Symbol(ctx.op(x)) for v, x in zip(e.lam.variables, e.operands)}
    return f"_full({ctx.pr.doprint(e.lam.expr.xreplace(names))}, {ctx.shape(e.shape)})"


def _body(gen, e):
    """The map's body over its operands' loads, common subexpressions as temporaries:
    ``(body, temps, value, names)``, ``names`` saying how each load and temp prints."""
    loads = {v: sp.Symbol(f"_ld{k}") for k, v in enumerate(e.lam.variables)}
    names = {loads[v]: gen.load(x, e.shape) for v, x in zip(e.lam.variables, e.operands)}
    body = e.lam.expr.xreplace(loads)
    temps, (value,) = sp.cse([body], symbols=sp.numbered_symbols("_x"), optimizations=None)
    names.update({t: str(t) for t, _ in temps})
    return body, temps, value, names


def cpu_nd(gen, a):
    """A map over an array of any rank: one loop per axis, the body once per entry."""
    e = a.expr
    gen.head(a)
    body, temps, value, extra = _body(gen, e)
    work = 1
    for d in e.shape:
        work *= gen.est(d)
    depth = gen.nest(e.shape, work * max(gen.cost(body), 1))
    for t, v in temps:
        gen.emit(f"{t} = {gen.expr(v, extra)}", depth)
    at = ", ".join(gen.index_vars(len(e.shape)))
    gen.emit(f"{gen.over_operand(a, e)}[{at}] = {gen.expr(value, extra)}", depth)


def cpu(gen, a):
    """One loop nest for a map (the sums that read it are fused in by passes.fuse_sums)."""
    if len(a.expr.shape) != 2:
        return cpu_nd(gen, a)
    map_loop(gen, a, a.expr, [], store=True)


def map_loop(gen, a, e, sums, store: bool):
    """The loop nest of map ``e`` assigned by ``a``; ``sums`` are assignments of sums of
    it (AxisSum over rows or columns, Total) accumulated, in float64, in the same loop;
    ``store`` whether the map's own value is written (something else reads it)."""
    R, C = e.shape
    gen.head(a)
    for s in sums:
        gen.head(s)
    body, temps, value, extra = _body(gen, e)
    axis0 = [s for s in sums if isinstance(s.expr, AxisSum) and s.expr.axis == 0]
    axis1 = [s for s in sums if isinstance(s.expr, AxisSum) and s.expr.axis == 1]
    totals = [s for s in sums if isinstance(s.expr, Total)]
    acc = {s.name: f"_acc_{gen.ids[s.name]}" for s in sums}
    for s in axis0:
        gen.acc_vector(acc[s.name], C)
    for s in totals:
        gen.emit(f"{acc[s.name]} = ACC(0.0)")
    work = gen.est(R) * gen.est(C) * max(gen.cost(body), 1)
    # prange over rows would race on the column sums: keep those loops serial
    gen.emit(gen.loop("_i", R, work, 1, serial=bool(axis0)))
    for s in axis1:
        gen.emit(f"{acc[s.name]} = ACC(0.0)", 2)
    gen.emit(f"for _j in range({gen.idx(C)}):", 2)
    for t, v in temps:
        gen.emit(f"{t} = {gen.expr(v, extra)}", 3)
    val = gen.expr(value, extra)
    y = gen.over_operand(a, e) if store else None
    if sums:
        gen.emit(f"_v = {val}", 3)
        val = "_v"
    if store:
        gen.emit(f"{y}[_i, _j] = {val}", 3)
    for s in sums:
        k = "[_j]" if s in axis0 else ""
        gen.emit(f"{acc[s.name]}{k} += {val}", 3)
    for s in axis1:
        gen.emit(f"{gen.buffer(s.name)}[_i, 0] = DT({acc[s.name]})", 2)
    for s in axis0:
        gen.emit(f"for _j in range({gen.idx(C)}):")
        gen.emit(f"{gen.buffer(s.name)}[0, _j] = DT({acc[s.name]}[_j])", 2)
    for s in totals:
        gen.emit(f"{gen.ids[s.name]} = DT({acc[s.name]})")


def label(e) -> str:
    body = e.lam.expr
    if body.is_Add:
        return "+"
    if body.is_Mul:
        return "⊙"
    if not e.lam.variables:
        return str(body)
    if body in e.lam.variables:
        return "broadcast"
    from ..printing.graph import _op_label  # the body's own scalar label

    return _op_label(body) if not body.is_Symbol else "map"


def entry(ix, e, *index):
    sub = {v: (ix.entry(a, *index) if is_matrix(a) else a)
           for v, a in zip(e.lam.variables, e.operands)}
    return ix.no_piecewise(e.lam.expr.xreplace(sub))


def function(e) -> bool:
    # a map of an activation (σ(Z)), not of arithmetic (Z + b)
    return bool(e.lam.expr.atoms(sp.Function)) or isinstance(e.lam.expr, sp.Piecewise)


register(Elementwise, lower=lambda lw, e: lw.map(e.lam, tuple(e.shape),
                                                 [lw.L(a) for a in e.operands]),
         children=lambda e: list(e.operands), operands=lambda e: list(e.operands),
         rebuild=lambda e, ops: Elementwise(e.lam, e.shape, *ops), check=check,
         vjp=map_vjp, numpy=numpy, cpu=cpu, cuda="maps", label=label, entry=entry,
         function=function, doc="f applied entry by entry, broadcasting")
