"""Vector-Jacobian products: the one entry point the reverse pass and the printed
derivations share, and the helpers the heads' rules (symbp/heads) are written with.

``vjp(e, y, g, wants)`` says what a node ``e`` with value ``y`` and adjoint ``g`` sends to
each of its operands: ``[(x, x̄ contribution), ...]``.  It is pure: a contribution is an
expression built from heads (MatMul, Transpose, maps, AxisSum, Total, Softmax) that may
nest, and naming the nested heads is the caller's business (``grad`` assigns each one,
``derive`` prints them).  A scalar contribution to a matrix operand means every entry gets
it: the receiver broadcasts, so a printed ``Total`` can pass a size such as 1/N on unspread.

Vocabulary: ``y`` the node's value (None when the caller has no name for it: ``e`` itself
is used), ``g`` its adjoint, ``wants(x)`` whether operand ``x`` needs an adjoint.
"""

from __future__ import annotations

import sympy as sp

from .errors import SymbpError
from .heads import rule
from .ir import _names_in
from .matrix import AxisSum, Elementwise, SoftmaxCrossEntropy, Total, is_matrix, make_map

_G, _Y = sp.symbols("_g _y", real=True)
OWN = _Y  # the node's own value in a map's local derivative: σ' = OWN (1 − OWN)


def tr(M):
    """Transpose, pushed through products and dropping double transposes."""
    if isinstance(M, sp.Transpose):
        return M.arg
    if isinstance(M, sp.MatMul):
        return sp.MatMul(*[tr(a) for a in reversed(M.args)])
    return sp.Transpose(M)


def broadcast(g, shape):
    """A scalar adjoint spread over a matrix of ``shape``: every entry gets ``g``."""
    if is_matrix(g):
        return g
    return make_map(sp.Lambda((_G,), _G), tuple(shape), [g])


def local_factor(e: Elementwise, d, y):
    """The default local factor of map ``e``: derivative ``d`` (in the map's variables and
    ``_Y``, the node's own value) as ``(body, variables, operands)`` of a map."""
    return d, (*e.lam.variables, _Y), (*e.operands, e if y is None else y)


def vjp(e, y, g, wants, local=None) -> list:
    """``[(operand, contribution)]``: the vector-Jacobian product of node ``e`` with ``g``.

    The rule is the head's own (``symbp/heads``).  ``local(e, d)`` may restate a map's
    local derivative ``d`` as ``(body, variables, operands)`` (the printed derivations name
    σ′ or fold a size into it); None keeps ``local_factor``.  Raises SymbpError for a head
    without a rule.
    """
    h = rule(e)
    if h is None or h.vjp is None:
        raise SymbpError(f"no vector-Jacobian rule for the head {type(e).__name__} in {e}: "
                         "register one with symbp.heads.register(..., vjp=...)")
    return h.vjp(e, y, g, wants, local)


def map_vjp(e: Elementwise, y, g, wants, local=None) -> list:
    """A map's rule: x̄ = ḡ ⊙ ∂f/∂x for each operand, summed back over broadcast axes."""
    local = local or (lambda m, d: local_factor(m, d, y))
    body, out = e.lam.expr, []
    for v, x in zip(e.lam.variables, e.operands):
        if not wants(x):
            continue
        d = sp.factor_terms(sp.diff(body, v))  # 2(y − t), not 2y − 2t
        if y is not None and (body.is_Function or body.is_Pow):
            d = d.xreplace({body: _Y})  # in terms of the node's own value: σ' = y(1 − y)
        if d == 0:
            continue
        f, vs, args = local(e, d)
        C = g if f == 1 else make_map(sp.Lambda((_G, *vs), _G * f), e.shape, [g, *args])
        out.append((x, unbroadcast(C, x, e.shape)))
    return out


def unbroadcast(C, x, shape):
    """Sum a contribution of the map's ``shape`` back down to operand ``x``'s shape."""
    if not is_matrix(x):
        return Total(broadcast(C, shape))
    for k, (d, full) in enumerate(zip(x.shape, shape)):
        if d == 1 and full != 1:  # a broadcast axis: every entry along it sent x̄ a share
            C = AxisSum(broadcast(C, shape), k)
    return C


def operands(e) -> list:
    """The operands of scalar arithmetic: its names and the heads it reads (Total, ...)."""
    heads = e.atoms(Total, SoftmaxCrossEntropy)
    if not heads:
        return _names_in(e)
    back = {sp.Dummy("h", real=True): h for h in heads}
    e = e.xreplace({h: D for D, h in back.items()})
    return [back.get(x, x) for x in _names_in(e)]


def partial(e, x):
    """∂e/∂x for scalar ``e`` and one of its operands ``x`` (a name or a head)."""
    d = _linear_partial(e, x)
    if d is not None:
        return d
    if isinstance(x, sp.Symbol):
        return sp.diff(e, x)
    D = sp.Dummy("d", real=True)
    return sp.diff(e.xreplace({x: D}), D).xreplace({D: x})


def _linear_partial(e, x):
    """∂e/∂x read off a sum or product in which ``x`` is one plain argument, else None.

    Sums and products are most heads of a network (z = Σ w·h + b); sympy.diff on them
    costs ~1 ms each through its assumption system, which made the reverse pass of a
    depth-8 tanh net miss its 0.2 s target (bench/swell.py)."""
    if e.is_Add and e.args.count(x) == 1 and all(
        a == x or not a.has(x) for a in e.args
    ):
        return sp.Integer(1)  # ∂(x + r)/∂x = 1
    if e.is_Mul and e.args.count(x) == 1 and all(a == x or not a.has(x) for a in e.args):
        return sp.Mul(*[a for a in e.args if a != x])  # ∂(x·r)/∂x = r
    if e.is_Pow and e.base == x and not e.exp.has(x):
        return e.exp * x ** (e.exp - 1)  # ∂xⁿ/∂x = n xⁿ⁻¹
    if isinstance(e, sp.Function) and e.args.count(x) == 1 and all(
        a == x or not a.has(x) for a in e.args
    ):
        return e.fdiff(e.args.index(x) + 1)  # the function's own derivative row
    return None
