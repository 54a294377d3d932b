"""Row-wise heads on an N×C matrix of logits: ``Softmax(Z)``, ``LogSoftmax(Z)`` and the
scalar ``SoftmaxCrossEntropy(Z, T)``.  Each is one primitive for numerical stability:
written as exp/Σ exp they would overflow at large logits and lose the cancellation
between log-sum-exp and z."""

from __future__ import annotations

import sympy as sp

from ..matrix import AxisSum, LogSoftmax, Softmax, SoftmaxCrossEntropy, make_map
from ..vjp import broadcast
from . import register

_G, _Y, _S, _R, _T, _N = sp.symbols("_g _y _s _r _t _n", real=True)


def softmax_vjp(e, y, g, wants, local=None):
    # z̄ = y ⊙ (ḡ − rowsum(ḡ ⊙ y))
    Y = e if y is None else y
    s = AxisSum(make_map(sp.Lambda((_G, _Y), _G * _Y), e.shape, [g, Y]), 1)
    return [(e.args[0], make_map(sp.Lambda((_G, _Y, _S), _Y * (_G - _S)), e.shape, [g, Y, s]))]


def log_softmax_vjp(e, y, g, wants, local=None):
    # z̄ = ḡ − softmax(z) ⊙ rowsum(ḡ), with softmax(z) = exp(y)
    G = broadcast(g, e.shape)
    P, Y = (_Y, Softmax(e.args[0])) if y is None else (sp.exp(_Y), y)
    return [(e.args[0], make_map(sp.Lambda((_G, _Y, _S), _G - P * _S), e.shape,
                                 [G, Y, AxisSum(G, 1)]))]


def sce_vjp(e, y, g, wants, local=None):
    # L = Σ_n (r_n lse(Z_n) − Σ_j T_nj Z_nj)/N with r = T𝟏 the row sums of T: exactly
    # −Σ T ⊙ log softmax(Z)/N for every T (one-hot and probability rows have r = 1)
    Z, T = e.args
    n = Z.shape[0]
    out = []
    if wants(Z):  # Z̄ = g (Y ⊙ r − T)/N, Y = softmax(Z): the familiar (Y − T)/N when r = 1
        out.append((Z, make_map(sp.Lambda((_S, _R, _T, _G, _N), _G * (_S * _R - _T) / _N),
                                Z.shape, [Softmax(Z), AxisSum(T, 1), T, g, n])))
    if wants(T):  # T̄ = −g log softmax(Z)/N
        out.append((T, make_map(sp.Lambda((_S, _G, _N), -_G * _S / _N), Z.shape,
                                [LogSoftmax(Z), g, n])))
    return out



def cpu(gen, a):
    rows(gen, a, a.expr)


def rows(gen, a, e, sm=None, rs=None):
    """Softmax, log-softmax and softmax-CE: per row, shift by the max, sum exps in float64.

    ``sm``, ``rs``: assignments of softmax(Z) and of the row sums T𝟏 of a softmax-CE's
    targets that the CE's loop computes too (passes.share_softmax_ce puts them there: the
    backward pass reads both, and the loop already has every exp and every T entry)."""
    Z = e.args[0]
    R, C = Z.shape
    z = gen.ids[Z]
    ce = isinstance(e, SoftmaxCrossEntropy)
    if ce:
        T = e.args[1]
    gen.head(a)
    for u in (sm, rs):
        if u is not None:
            gen.head(u)
    work = gen.est(R) * gen.est(C) * 25  # an exp and a division per entry
    if ce:
        gen.emit("_acc_loss = ACC(0.0)")
    gen.emit(gen.loop("_i", R, work, 1))
    # a NaN anywhere in the row reaches every output through the sum of exps below,
    # whether or not this max saw it
    gen.emit(f"_m = {z}[_i, 0]", 2)
    gen.emit(f"for _j in range(1, {gen.idx(C)}):", 2)
    gen.emit(f"if {z}[_i, _j] > _m:", 3)  # not max(): ~0.05 s less compile time
    gen.emit(f"_m = {z}[_i, _j]", 4)
    gen.emit("_acc_s = ACC(0.0)", 2)
    y = None
    if isinstance(e, Softmax):
        y = gen.buffer(a.name)
    elif sm is not None:
        y = gen.buffer(sm.name)
    if ce:
        t = gen.ids[T]
        gen.emit("_acc_t = ACC(0.0)", 2)
        gen.emit("_acc_tm = ACC(0.0)", 2)
    gen.emit(f"for _j in range({gen.idx(C)}):", 2)
    gen.emit(f"_ez = math.exp({z}[_i, _j] - _m)", 3)
    if y is not None:
        gen.emit(f"{y}[_i, _j] = _ez", 3)
    gen.emit("_acc_s += _ez", 3)
    if ce:
        # −Σ_j t_j log softmax(z)_j = Σ_j t_j (m − z_j) + (Σ_j t_j) log s: exact for
        # every t, and no cancellation between lse ≈ z at large logits
        gen.emit(f"_acc_t += {t}[_i, _j]", 3)
        gen.emit(f"_acc_tm += {t}[_i, _j] * (_m - {z}[_i, _j])", 3)
        gen.emit("_acc_loss += _acc_tm + _acc_t * math.log(_acc_s)", 2)
        if rs is not None:
            gen.emit(f"{gen.buffer(rs.name)}[_i, 0] = DT(_acc_t)", 2)
    if y is not None:
        gen.emit("_s = DT(_acc_s)", 2)
        gen.emit(f"for _j in range({gen.idx(C)}):", 2)
        gen.emit(f"{y}[_i, _j] = {y}[_i, _j] / _s", 3)
    if isinstance(e, LogSoftmax):
        y = gen.buffer(a.name)
        # (z - m) - log s, not z - (m + log s): in float32 m + log s rounds to the
        # spacing of m (6e-5 at |z| = 1000), an error every entry of the row inherits
        gen.emit("_ls = DT(math.log(_acc_s))", 2)
        gen.emit(f"for _j in range({gen.idx(C)}):", 2)
        gen.emit(f"{y}[_i, _j] = ({z}[_i, _j] - _m) - _ls", 3)
    if ce:
        gen.emit(f"{gen.ids[a.name]} = DT(_acc_loss / {gen.idx(R)})")


def softmax_cuda_rows(gen, a):
    e = a.expr
    Z = e.args[0]
    R, C = gen.shape_src(Z.shape)
    kernel = "_softmax" if isinstance(e, Softmax) else "_log_softmax"
    gen.use_fixed(kernel)
    gen.driver.append(f"{kernel}[_grid_tiles({R}), (_TILE, _TILE)]({gen.d(Z)}, "
                      f"{gen.d(a.name)}, {R}, {C})  # {gen.ids[a.name]} = {gen.doc(e)}")


def sce_cuda(gen, a, e=None, rs=None, sm=None):
    # with sm (an assignment Y = softmax(Z) of the same logits) one row kernel writes both
    e, out = e if e is not None else a.expr, gen.ids[a.name]
    Z, T = e.args
    R, C = gen.shape_src(Z.shape)
    rows = f"_rows_{out}"
    gen.scratch.append((rows, f"({R}, 1)"))
    # the row sums T𝟏 come out of the same kernel: into the gradient's AxisSum(T, 1)
    # when passes.share_softmax_ce put it here
    if rs is None:
        rs_buf = f"_rsum_{out}"
        gen.scratch.append((rs_buf, f"({R}, 1)"))
    else:
        rs_buf = gen.d(rs)
    kernel = "_sce_rows" if sm is None else "_sce_softmax_rows"
    y = "" if sm is None else f"{gen.d(sm.name)}, "
    gen.use_fixed(kernel)
    gen.use_fixed("_total")
    gen.driver.append(f"{kernel}[_grid_tiles({R}), (_TILE, _TILE)]({gen.d(Z)}, "
                      f"{gen.d(T)}, {rows}, {rs_buf}, {y}{R}, {C})"
                      f"  # {out}: cross-entropy and target sum per row"
                      + ("" if sm is None else f", {gen.ids[sm.name]} = softmax"))
    gen.driver.append(f"_total[1, _BLOCK]({rows}, {R}, 1, _scalars, "
                      f"{gen.slot[a.name]}, _HT(1 / ({R})))  # {out} = mean of rows")


def softmax_entry(ix, e, i, j):
    # softmax(Z)_ij = exp(z_ij) / Σ_c exp(z_ic)
    Z = e.args[0]
    c = ix.letter(Z.shape[1])
    return sp.exp(ix.entry(Z, i, j)) / sp.Sum(sp.exp(ix.entry(Z, i, c)), (c, 0, Z.shape[1] - 1))


def _one(cls):
    return dict(lower=lambda lw, e: lw.emit(cls(lw.L(e.args[0])), tuple(e.shape)),
                children=lambda e: [e.args[0]], operands=lambda e: [e.args[0]],
                rebuild=lambda e, ops: cls(ops[0]), cpu=cpu, cuda=softmax_cuda_rows, function=True)


register(Softmax, vjp=softmax_vjp, numpy=lambda ctx, a: f"_softmax({ctx.op(a.expr.args[0])})",
         label=lambda e: "softmax", entry=softmax_entry, doc="row-wise softmax",
         **_one(Softmax))
register(LogSoftmax, vjp=log_softmax_vjp,
         numpy=lambda ctx, a: f"_log_softmax({ctx.op(a.expr.args[0])})",
         label=lambda e: "log softmax", doc="row-wise log-softmax", **_one(LogSoftmax))
register(SoftmaxCrossEntropy, kind="reduction",
         lower=lambda lw, e: lw.emit(SoftmaxCrossEntropy(*[lw.L(x) for x in e.args])),
         children=lambda e: list(e.args), operands=lambda e: list(e.args),
         vjp=sce_vjp, numpy=lambda ctx, a: f"DTYPE(_sce({ctx.op(a.expr.args[0])}, "
                                           f"{ctx.op(a.expr.args[1])}))",
         cpu=cpu, cuda=sce_cuda, label=lambda e: "CE∘softmax", function=True,
         doc="mean softmax cross-entropy of the rows")
