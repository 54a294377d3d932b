"""Program -> Program passes, each a named function; ``optimize`` calls them in order.

A pass never changes what a Program computes, only how: every result still passes
``ir.verify`` and has the same inputs and outputs.

    dce    drop assignments no output depends on
    fuse   compose chains of elementwise maps into one map (one loop in a backend)
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp

from .ir import Assign, Program, _names_in, verify
from .matrix import Elementwise, is_matrix, placeholders, same_dim


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
        if a.name in live:
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


# The standard sequence every compiled backend runs before printing.
PIPELINE = (dce, fuse)


def optimize(p: Program, passes=PIPELINE) -> Program:
    """Run ``passes`` in order (by default: dce, fuse)."""
    for f in passes:
        p = f(p)
    return p
