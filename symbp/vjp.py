"""Vector-Jacobian rules, one per head: the one table the reverse pass and the printed
derivations share.

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
from .ir import _names_in, make_map
from .matrix import (
    AxisSum,
    Elementwise,
    LogSoftmax,
    Softmax,
    SoftmaxCrossEntropy,
    Total,
    is_matrix,
)

_G, _Y, _S, _R, _T, _N = sp.symbols("_g _y _s _r _t _n", real=True)
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

    ``local(e, d)`` may restate a map's local derivative ``d`` as ``(body, variables,
    operands)`` (the printed derivations name σ′ or fold a size into it); None keeps
    ``local_factor``.  Raises SymbpError for a matrix head without a rule.
    """
    out = []
    if isinstance(e, sp.MatMul):  # C = A B:  Ā = Ḡ Bᵀ,  B̄ = Aᵀ Ḡ
        A, B = e.args[0], sp.MatMul(*e.args[1:]) if len(e.args) > 2 else e.args[1]
        G = broadcast(g, e.shape)
        if wants(A):
            out.append((A, sp.MatMul(G, tr(B))))
        if wants(B):
            out.append((B, sp.MatMul(tr(A), G)))
    elif isinstance(e, sp.Transpose):
        out.append((e.arg, tr(broadcast(g, e.shape))))
    elif isinstance(e, Elementwise):
        out = _map(e, y, g, wants, local or (lambda m, d: local_factor(m, d, y)))
    elif isinstance(e, AxisSum):  # every entry of the summed axis gets the same ḡ
        x = e.args[0]
        out.append((x, make_map(sp.Lambda((_G,), _G), x.shape, [g])))
    elif isinstance(e, Total):  # every entry gets g (the receiver spreads it)
        out.append((e.args[0], g))
    elif isinstance(e, Softmax):  # z̄ = y ⊙ (ḡ − rowsum(ḡ ⊙ y))
        Y = e if y is None else y
        s = AxisSum(make_map(sp.Lambda((_G, _Y), _G * _Y), e.shape, [g, Y]), 1)
        out.append((e.args[0], make_map(sp.Lambda((_G, _Y, _S), _Y * (_G - _S)), e.shape,
                                        [g, Y, s])))
    elif isinstance(e, LogSoftmax):  # z̄ = ḡ − softmax(z) ⊙ rowsum(ḡ); softmax(z) = exp(y)
        G = broadcast(g, e.shape)
        P, Y = (_Y, Softmax(e.args[0])) if y is None else (sp.exp(_Y), y)
        out.append((e.args[0], make_map(sp.Lambda((_G, _Y, _S), _G - P * _S), e.shape,
                                        [G, Y, AxisSum(G, 1)])))
    elif isinstance(e, SoftmaxCrossEntropy):
        # L = Σ_n (r_n lse(Z_n) − Σ_j T_nj Z_nj)/N with r = T𝟏 the row sums of T: exactly
        # −Σ T ⊙ log softmax(Z)/N for every T (one-hot and probability rows have r = 1)
        Z, T = e.args
        n = Z.shape[0]
        if wants(Z):  # Z̄ = g (Y ⊙ r − T)/N, Y = softmax(Z): the familiar (Y − T)/N when r = 1
            out.append((Z, make_map(sp.Lambda((_S, _R, _T, _G, _N), _G * (_S * _R - _T) / _N),
                                    Z.shape, [Softmax(Z), AxisSum(T, 1), T, g, n])))
        if wants(T):  # T̄ = −g log softmax(Z)/N
            out.append((T, make_map(sp.Lambda((_S, _G, _N), -_G * _S / _N), Z.shape,
                                    [LogSoftmax(Z), g, n])))
    elif is_matrix(e):
        raise SymbpError(f"no vector-Jacobian rule for the matrix head {type(e).__name__} "
                         f"in {e}: add one to symbp/vjp.py")
    else:  # scalar arithmetic: ordinary partial derivatives by its operands
        for x in operands(e):
            if not wants(x):
                continue
            d = partial(e, x)
            if y is not None and isinstance(e, (sp.Function, sp.Pow)):
                d = d.xreplace({e: y})  # reuse the node's own value: tanh' = 1 - y**2
            if d != 0:
                out.append((x, g * d))
    return out


def _map(e: Elementwise, y, g, wants, local) -> list:
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
    if x.shape[0] == 1 and shape[0] != 1:
        C = AxisSum(broadcast(C, shape), 0)
    if x.shape[1] == 1 and shape[1] != 1:
        C = AxisSum(broadcast(C, shape), 1)
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
