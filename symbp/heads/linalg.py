"""Linear algebra heads: the matrix product ``A·B`` and the transpose ``Xᵀ``."""

from __future__ import annotations

import sympy as sp

from ..errors import ShapeError
from ..matrix import same_dim
from ..vjp import broadcast, tr
from . import register

# --- C = A B --------------------------------------------------------------------------------

# products whose fixed sizes multiply to at most this are loops, not BLAS calls
SMALL_PRODUCT = 16


def blas_worth(A, B) -> bool:
    """A product worth a BLAS call (~1 µs): its fixed sizes multiply to more than
    SMALL_PRODUCT (a size such as N counts as 1)."""
    fixed = 1
    for d in (*A.shape, B.shape[1]):
        d = sp.sympify(d)
        fixed *= int(d) if d.is_Integer else 1
    return fixed > SMALL_PRODUCT


def matmul_check(e, where):
    l, r = e.args
    if not same_dim(l.shape[1], r.shape[0]):
        raise ShapeError(f"product of {l.shape} and {r.shape} {where}")


def matmul_vjp(e, y, g, wants, local=None):
    # C = A B:  Ā = Ḡ Bᵀ,  B̄ = Aᵀ Ḡ
    A, B = e.args[0], sp.MatMul(*e.args[1:]) if len(e.args) > 2 else e.args[1]
    G = broadcast(g, e.shape)
    out = []
    if wants(A):
        out.append((A, sp.MatMul(G, tr(B))))
    if wants(B):
        out.append((B, sp.MatMul(tr(A), G)))
    return out


def matmul_numpy(ctx, a):
    A, B = a.expr.args
    return f"{ctx.op(A)} @ {ctx.op(B)}"


def matmul_cpu(gen, a):
    """BLAS, or loops for a product whose fixed sizes are tiny (a call costs ~1 µs)."""
    gen.head(a)
    A, B = a.expr.args
    C = gen.buffer(a.name)
    m, k = A.shape
    n = B.shape[1]
    if blas_worth(A, B):
        gen.emit(f"_gemm({gen.operand(A)}, {gen.operand(B)}, {C}, DT(1), DT(0))")
        return

    def at(x, i, j):
        return f"{gen.ids[x.arg]}[{j}, {i}]" if isinstance(x, sp.Transpose) \
            else f"{gen.ids[x]}[{i}, {j}]"

    gen.emit(f"for _i in range({gen.idx(m)}):")
    gen.emit(f"for _j in range({gen.idx(n)}):", 2)
    gen.emit("_acc = ACC(0.0)", 3)
    gen.emit(f"for _k in range({gen.idx(k)}):", 3)
    gen.emit(f"_acc += {at(A, '_i', '_k')} * {at(B, '_k', '_j')}", 4)
    gen.emit(f"{C}[_i, _j] = DT(_acc)", 3)


def matmul_cuda(gen, a):
    # a tiled shared-memory kernel, one variant per transposed operand
    e, out = a.expr, gen.ids[a.name]
    A, B = e.args
    name = gen.matmul_kernel(isinstance(A, sp.Transpose), isinstance(B, sp.Transpose))
    M, N = gen.shape_src(a.name.shape)
    (K,) = gen.shape_src([A.shape[1]])
    ops = [gen.d(x.arg if isinstance(x, sp.Transpose) else x) for x in (A, B)]
    gen.driver.append(
        f"{name}[_grid2({M}, {N}), (_TILE, _TILE)]({ops[0]}, {ops[1]}, {gen.d(a.name)}, "
        f"{M}, {N}, {K})  # {out} = {gen.doc(e)}")


def matmul_entry(ix, e, i, j):
    # (A B)_ij = Σ_k A_ik B_kj
    A, B = e.args[0], (sp.MatMul(*e.args[1:]) if len(e.args) > 2 else e.args[1])
    k = ix.letter(A.shape[1])
    return sp.Sum(ix.entry(A, i, k) * ix.entry(B, k, j), (k, 0, A.shape[1] - 1))


register(sp.MatMul, lower=lambda lw, e: lw.matmul(e), children=lambda e: [
    a.arg if isinstance(a, sp.Transpose) else a for a in e.args
    if not isinstance(a, sp.OneMatrix)], keeps_transpose=True, check=matmul_check,
    vjp=matmul_vjp, numpy=matmul_numpy, cpu=matmul_cpu, cuda=matmul_cuda,
    label=lambda e: "@", entry=matmul_entry, doc="matrix product (BLAS gemm)",
    # CUDA: the maps that alone read a product run in its kernel, at each entry it holds
    extra={"cuda_epilogue": True})


# --- Y = Xᵀ ---------------------------------------------------------------------------------


def transpose_cpu(gen, a):
    gen.head(a)
    r, c = a.name.shape
    y, x = gen.buffer(a.name), gen.ids[a.expr.arg]
    gen.emit(gen.loop("_i", r, 0, 1))
    gen.emit(f"for _j in range({gen.idx(c)}):", 2)
    gen.emit(f"{y}[_i, _j] = {x}[_j, _i]", 3)


def transpose_cuda(gen, a):
    R, C = gen.shape_src(a.name.shape)
    gen.use_fixed("_transpose")
    gen.driver.append(f"_transpose[_grid1({R} * {C}), _BLOCK]({gen.d(a.expr.arg)}, "
                      f"{gen.d(a.name)}, {R}, {C})  # {gen.ids[a.name]} = {gen.doc(a.expr)}")


register(sp.Transpose, lower=lambda lw, e: lw.emit(sp.Transpose(lw.L(e.arg)), tuple(e.shape)),
         children=lambda e: [e.arg], operands=lambda e: [e.arg],
         rebuild=lambda e, ops: sp.Transpose(ops[0]),
         vjp=lambda e, y, g, wants, local=None: [(e.arg, tr(broadcast(g, e.shape)))],
         numpy=lambda ctx, a: f"numpy.ascontiguousarray({ctx.op(a.expr.arg)}.T)",
         cpu=transpose_cpu, cuda=transpose_cuda, label=lambda e: "ᵀ",
         entry=lambda ix, e, i, j: ix.entry(e.arg, j, i), doc="transpose")
