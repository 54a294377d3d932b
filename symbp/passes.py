"""Program -> Program passes, each a named function; ``optimize`` calls them in order.

A pass never changes what a Program computes, only how: every result still passes
``ir.verify`` and has the same inputs and outputs.

    dce               drop assignments no output depends on
    fuse              compose chains of elementwise maps into one map (one loop)
    fuse_sums         a map and the sums of it: one loop (a MapSums head)
    share_softmax_ce  softmax-CE, the softmax of its logits and the row sums of its
                      targets that its gradient reads: one row loop (a SoftmaxCE head)
    fuse_update       (a training step) a gradient product added into its parameter's
                      update by one gemm (an UpdateProduct head)

A fusing pass makes heads only some backends can lower: ``optimize(p, target)`` runs it
only where the target has a rule for them (the NumPy reference runs none: it stays the
plain definition every compiled target is checked against).
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from .heads import of_class
from .heads.fused import MapSums, SoftmaxCE, UpdateProduct
from .heads.linalg import blas_worth
from .ir import Assign, Program, _names_in, verify
from .matrix import (
    AxisSum,
    Elementwise,
    Softmax,
    SoftmaxCrossEntropy,
    Total,
    is_matrix,
    placeholders,
    same_dim,
)
from .optim import axpby


def uses(p: Program) -> dict:
    """How many times each name is read: by later assignments, plus once per output."""
    count: dict = {}
    for a in p.body:
        for n in _names_in(a.expr):
            count[n] = count.get(n, 0) + 1
    for o in p.outputs:
        count[o] = count.get(o, 0) + 1
    return count


def dce(p: Program) -> Program:
    """Dead-code elimination: keep only assignments some output depends on."""
    live = {o for o in p.outputs}
    keep = []
    for a in reversed(p.body):
        if a.name in live or any(n in live for n in a.also):
            keep.append(a)
            live.update(_names_in(a.expr))
    if len(keep) == len(p.body):
        return p
    return replace(p, body=tuple(reversed(keep)))


def _same_shape(a, b) -> bool:
    return all(same_dim(x, y) for x, y in zip(a, b))


def compose(outer: Elementwise, inner_name, inner: Elementwise) -> Elementwise:
    """The map ``outer`` with its argument ``inner_name`` replaced by ``inner``'s body.

    f(…, g(u, v), …) -> one map over the union of both argument lists (each name once).
    """
    args: list = []
    for x in list(outer.operands) + list(inner.operands):
        if x != inner_name and x not in args:
            args.append(x)
    vs = placeholders(len(args))
    # Rename in two steps through fresh dummies: placeholders of both bodies overlap.
    tmp = {x: sp.Dummy(f"a{k}", real=True) for k, x in enumerate(args)}
    inner_body = inner.lam.expr.xreplace(
        {v: tmp[x] for v, x in zip(inner.lam.variables, inner.operands)})
    sub = {v: (inner_body if x == inner_name else tmp[x])
           for v, x in zip(outer.lam.variables, outer.operands)}
    body = outer.lam.expr.xreplace(sub)
    body = body.xreplace({tmp[x]: v for x, v in zip(args, vs)})
    return Elementwise(sp.Lambda(vs, body), outer.shape, *args)


def fuse(p: Program) -> Program:
    """Merge chains of elementwise maps: ``u = f(x); y = g(u, z)`` -> ``y = g(f(x), z)``.

    ``u`` is folded into its user when that user is the only reader of ``u``, is itself a
    map of the same shape (a smaller ``u`` would be recomputed per broadcast entry) and
    ``u`` is not an output.  Folding never moves a read before a definition: ``u``'s
    arguments are defined before ``u``, hence before its user.
    """
    n_uses = uses(p)
    exprs = {a.name: a.expr for a in p.body}
    folded: set = set()
    body: list[Assign] = []
    for a in p.body:
        e = a.expr
        if isinstance(e, Elementwise):
            changed = True
            while changed:  # fold repeatedly: the folded map brings new arguments
                changed = False
                for x in e.operands:
                    inner = exprs.get(x)
                    if (isinstance(inner, Elementwise) and n_uses.get(x) == 1
                            and is_matrix(x) and _same_shape(inner.shape, e.shape)):
                        e = compose(e, x, inner)
                        folded.add(x)
                        changed = True
                        break
            exprs[a.name] = e
            a = replace(a, expr=e) if e is not a.expr else a
        body.append(a)
    body = [a for a in body if a.name not in folded]
    return verify(replace(p, body=tuple(body)))


def fuse_sums(p: Program) -> Program:
    """``y = f(x); s = 𝟏ᵀy; t = Σ y`` -> ``y, s, t = MapSums(f(x))``: one loop.

    Every AxisSum (over rows or columns) and Total of a matrix-valued map is computed in
    the map's loop; the map itself is stored only if something else reads it (a sum of
    squared errors never writes its squares)."""
    users: dict = {}
    for a in p.body:
        for n in _names_in(a.expr):
            users.setdefault(n, []).append(a)
    outputs = set(p.outputs)
    fused: dict = {}  # sum name -> the map that computes it
    body: list[Assign] = []
    for a in p.body:
        e = a.expr
        if not (isinstance(e, Elementwise) and len(e.shape) == 2):
            body.append(a)
            continue
        mine = users.get(a.name, [])
        sums = [u for u in mine if isinstance(u.expr, (AxisSum, Total))
                and u.expr.args[0] == a.name]
        if not sums:
            body.append(a)
            continue
        store = a.name in outputs or any(u not in sums for u in mine)
        kinds = [-1 if isinstance(u.expr, Total) else u.expr.axis for u in sums]
        body.append(replace(a, expr=MapSums(e, kinds, store),
                            also=tuple(u.name for u in sums)))
        fused.update({u.name: a.name for u in sums})
    body = [a for a in body if a.name not in fused]
    return verify(replace(p, body=tuple(body)))


fuse_sums.makes = (MapSums,)


def share_softmax_ce(p: Program) -> Program:
    """``L = CE(softmax(Z), T); …; Y = softmax(Z); r = T𝟏`` -> ``L, Y, r = SoftmaxCE(Z, T)``.

    The gradient (Y ⊙ r − T)/N reads softmax(Z) and the row sums of T: the loss's row
    loop has every exp and every target already.  Only assignments after the loss move
    into it (one before it may be read before the loss)."""
    taken: set = set()
    repl: dict = {}
    for k, a in enumerate(p.body):
        if not isinstance(a.expr, SoftmaxCrossEntropy):
            continue
        Z, T = a.expr.args
        extras, names = [], []
        for kind, want in (("softmax", Softmax(Z)), ("rowsum", AxisSum(T, 1))):
            b = next((b for b in p.body[k + 1:] if b.expr == want and b.name not in taken),
                     None)
            if b is not None:
                extras.append(kind)
                names.append(b.name)
                taken.add(b.name)
        if extras:
            repl[a.name] = replace(a, expr=SoftmaxCE(Z, T, extras), also=tuple(names))
    if not repl:
        return p
    body = [repl.get(a.name, a) for a in p.body if a.name not in taken]
    return verify(replace(p, body=tuple(body)))


share_softmax_ce.makes = (SoftmaxCE,)


def fuse_update(p: Program, rule) -> Program:
    """In a training step, ``g = A·B; x ← α x + γ g`` -> ``x ← α x + γ A·B`` in one gemm.

    ``rule`` is the optimizer's update (``symbp.optim.Rule``).  Where it reads the gradient
    once as x ← α x + γ g (SGD: w ← w − lr g; momentum: m ← β m + g), a gradient that is
    one BLAS-sized product read by nothing else becomes an ``UpdateProduct``: gemm's alpha
    and beta add the product straight into x, so the gradient is never stored and read
    back.  Not where the product reads a parameter: the updates then cannot see each
    other's writes."""
    how = axpby(rule)
    if how is None:
        return p
    defs = {a.name: a.expr for a in p.body}
    read = set(n for a in p.body for n in _names_in(a.expr))
    params = set(p.wrt)
    grads = p.outputs[1:]
    fused = {}
    for w, g in zip(p.wrt, grads):
        e = defs.get(g)
        if not (is_matrix(w) and len(w.shape) == 2 and isinstance(e, sp.MatMul)
                and len(e.args) == 2 and blas_worth(*e.args)):
            continue
        if g in read or grads.count(g) > 1:
            continue
        if any((x.arg if isinstance(x, sp.Transpose) else x) in params for x in e.args):
            continue
        fused[g] = UpdateProduct(*e.args, how)
    if not fused:
        return p
    body = [replace(a, expr=fused[a.name]) if a.name in fused else a for a in p.body]
    return verify(replace(p, body=tuple(body)))


fuse_update.makes = (UpdateProduct,)
fuse_update.takes_rule = True


# The one list of passes, in order: every target runs those it can lower (see optimize).
PIPELINE = (dce, fuse, fuse_sums, share_softmax_ce, fuse_update)


def optimize(p: Program, passes=PIPELINE, target: str | None = None, rule=None) -> Program:
    """Run ``passes`` in order; for a ``target`` ("cpu", "cuda", ...), a fusing pass only
    where the target's backend has a rule for every head the pass makes.  A pass about a
    training step (``fuse_update``) runs only when the optimizer's ``rule`` is given."""
    backend = {"parallel": "cpu"}.get(target, target)
    for f in passes:
        makes = getattr(f, "makes", ())
        if backend is not None and any(getattr(of_class(h), backend, None) is None
                                       for h in makes):
            continue
        if getattr(f, "takes_rule", False):
            if rule is not None:
                p = f(p, rule)
            continue
        p = f(p)
    return p
