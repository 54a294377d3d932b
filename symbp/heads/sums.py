"""Sums: ``AxisSum(M, axis)`` (𝟏ᵀM, a row, or M𝟏, a column) and ``Total(M)`` (Σ of every
entry, a scalar).  Every entry of the summed axis gets the same adjoint."""

from __future__ import annotations

import sympy as sp

from ..matrix import AxisSum, Total, make_map
from . import register

_G = sp.Symbol("_g", real=True)


def cpu_nd(gen, a):
    """A sum over an array of any rank, one loop per axis (a total in a float64
    accumulator, an axis sum straight into its output)."""
    gen.head(a)
    M = a.expr.args[0]
    x, acc = gen.ids[M], f"_acc_{gen.ids[a.name]}"
    vs = gen.index_vars(len(M.shape))
    if isinstance(a.expr, Total):
        gen.emit(f"{acc} = ACC(0.0)")
        depth = gen.nest(M.shape, 0, serial=True)
        gen.emit(f"{acc} += {x}[{', '.join(vs)}]", depth)
        gen.emit(f"{gen.ids[a.name]} = DT({acc})")
        return
    # Y[..., 0, ...] = Σ_k X[..., k, ...]: zero Y, then add every entry into its slot
    k = a.expr.axis
    y = gen.buffer(a.name)
    out = [v if j != k else "0" for j, v in enumerate(vs)]
    depth = gen.nest(a.name.shape, 0, serial=True)
    gen.emit(f"{y}[{', '.join(out)}] = DT(0)", depth)
    depth = gen.nest(M.shape, 0, serial=True)
    gen.emit(f"{y}[{', '.join(out)}] += {x}[{', '.join(vs)}]", depth)


def cpu(gen, a):
    """A sum of a value that is not a map (a product, an input): float64 loops."""
    M = a.expr.args[0]
    if len(M.shape) != 2:
        return cpu_nd(gen, a)
    gen.head(a)
    R, C = M.shape
    x, acc = gen.ids[M], f"_acc_{gen.ids[a.name]}"
    if isinstance(a.expr, Total):
        gen.emit(f"{acc} = ACC(0.0)")
        gen.emit(f"for _i in range({gen.idx(R)}):")
        gen.emit(f"for _j in range({gen.idx(C)}):", 2)
        gen.emit(f"{acc} += {x}[_i, _j]", 3)
        gen.emit(f"{gen.ids[a.name]} = DT({acc})")
    elif a.expr.axis == 0:
        y = gen.buffer(a.name)
        gen.acc_vector(acc, C)
        gen.emit(f"for _i in range({gen.idx(R)}):")
        gen.emit(f"for _j in range({gen.idx(C)}):", 2)
        gen.emit(f"{acc}[_j] += {x}[_i, _j]", 3)
        gen.emit(f"for _j in range({gen.idx(C)}):")
        gen.emit(f"{y}[0, _j] = DT({acc}[_j])", 2)
    else:
        y = gen.buffer(a.name)
        gen.emit(gen.loop("_i", R, gen.est(R) * gen.est(C), 1))
        gen.emit(f"{acc} = ACC(0.0)", 2)
        gen.emit(f"for _j in range({gen.idx(C)}):", 2)
        gen.emit(f"{acc} += {x}[_i, _j]", 3)
        gen.emit(f"{y}[_i, 0] = DT({acc})", 2)


def axis_sum_cuda(gen, a):
    e, M = a.expr, a.expr.args[0]
    R, C = gen.shape_src(M.shape)
    kernel = f"_axis_sum{e.axis}"
    gen.use_fixed(kernel)
    grid = f"_grid_tiles({C})" if e.axis == 0 else f"_grid_tiles({R})"
    gen.driver.append(f"{kernel}[{grid}, (_TILE, _TILE)]({gen.d(M)}, {gen.d(a.name)}, "
                      f"{R}, {C})  # {gen.ids[a.name]} = {gen.doc(e)}")


def axis_sum_entry(ix, e, *index):
    M = e.args[0]
    if len(index) != 2:  # Σ over axis k of images: that axis gets a summed letter
        k = e.axis
        m = ix.letter(M.shape[k])
        at = list(index)
        at[k] = m
        return sp.Sum(ix.entry(M, *at), (m, 0, M.shape[k] - 1))
    i, j = index
    if e.axis == 0:  # (𝟏ᵀM)_j = Σ_n M_nj
        n = ix.letter(M.shape[0])
        return sp.Sum(ix.entry(M, n, j), (n, 0, M.shape[0] - 1))
    m = ix.letter(M.shape[1])  # (M𝟏)_i = Σ_m M_im
    return sp.Sum(ix.entry(M, i, m), (m, 0, M.shape[1] - 1))


register(AxisSum, lower=lambda lw, e: lw.emit(AxisSum(lw.L(e.args[0]), e.axis), tuple(e.shape)),
         children=lambda e: [e.args[0]], operands=lambda e: [e.args[0]],
         rebuild=lambda e, ops: AxisSum(ops[0], e.axis),
         vjp=lambda e, y, g, wants, local=None: [
             (e.args[0], make_map(sp.Lambda((_G,), _G), e.args[0].shape, [g]))],
         numpy=lambda ctx, a: f"numpy.sum({ctx.op(a.expr.args[0])}, axis={a.expr.axis}, "
                              "keepdims=True)",
         cpu=cpu, cuda=axis_sum_cuda, label=lambda e: "𝟏ᵀ·" if e.axis == 0 else "·𝟏",
         entry=axis_sum_entry, doc="sum over one axis",
         # column sums of a map's value: the CUDA map kernel sums them where it computes
         # them (a bias gradient), in _axis_sum0's layout and order
         extra={"cuda_into_map": lambda e: e.axis == 0 and len(e.shape) == 2})


def total_cuda(gen, a):
    M = a.expr.args[0]
    R, C = gen.shape_src(M.shape)
    gen.use_fixed("_total")
    gen.driver.append(f"_total[1, _BLOCK]({gen.d(M)}, {R}, {C}, _scalars, "
                      f"{gen.slot[a.name]}, _HT(1))  # {gen.ids[a.name]} = {gen.doc(a.expr)}")


def total_entry(ix, e, i, j):
    M = e.args[0]
    n, m = ix.letter(M.shape[0]), ix.letter(M.shape[1])
    return sp.Sum(ix.entry(M, n, m), (n, 0, M.shape[0] - 1), (m, 0, M.shape[1] - 1))


register(Total, kind="reduction", lower=lambda lw, e: lw.emit(Total(lw.L(e.args[0]))),
         children=lambda e: [e.args[0]], operands=lambda e: [e.args[0]],
         rebuild=lambda e, ops: Total(ops[0]),
         # every entry gets g (the receiver spreads it)
         vjp=lambda e, y, g, wants, local=None: [(e.args[0], g)],
         numpy=lambda ctx, a: f"DTYPE(numpy.sum({ctx.op(a.expr.args[0])}))",
         cpu=cpu, cuda=total_cuda, label=lambda e: "Σ", entry=total_entry,
         doc="sum of every entry")
