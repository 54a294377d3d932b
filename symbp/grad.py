"""Ordered derivatives: the reverse pass, one Program -> Program function.

Walk the assignments backwards; the adjoint of each value is the sum of what its users
send it, ``v̄_i = Σ_j v̄_j ∂v_j/∂v_i`` (Werbos' ordered derivative ∂⁺L/∂v_i).  Only values
that depend on a ``wrt`` input get adjoints, so the cost is a constant factor of the
forward program: O(V + E).

Vocabulary in the rules: ``y`` the node's value, ``g`` its adjoint (incoming gradient).
"""

from __future__ import annotations

import sympy as sp

from .errors import SymbpError
from .ir import Assign, Program, _names_in, is_constant, make_map, verify
from .matrix import (
    AxisSum,
    Elementwise,
    LogSoftmax,
    Softmax,
    SoftmaxCrossEntropy,
    Total,
    is_matrix,
    placeholders,
)


def _tr(op):
    """Transpose of a product operand, dropping double transposes."""
    return op.arg if isinstance(op, sp.Transpose) else sp.Transpose(op)


def _base(op):
    return op.arg if isinstance(op, sp.Transpose) else op


class _Reverse:
    def __init__(self, p: Program):
        self.p = p
        self.body: list[Assign] = list(p.body)
        self.reserved = {str(n) for n in p.inputs + p.dims} | {str(a.name) for a in p.body}
        self.count = 0
        self.contrib: dict = {}
        self.adjoint: dict = {}

    def fresh(self, shape=None):
        while True:
            self.count += 1
            s = f"g{self.count}"
            if s not in self.reserved:
                break
        self.reserved.add(s)
        return sp.MatrixSymbol(s, *shape) if shape is not None else sp.Symbol(s, real=True)

    def emit(self, expr, of, role="adjoint"):
        """Assign ``expr`` to a fresh name, unless it already is a name or a constant."""
        if isinstance(expr, (sp.Symbol, sp.MatrixSymbol)) or is_constant(expr):
            return expr
        name = self.fresh(tuple(expr.shape) if is_matrix(expr) else None)
        self.body.append(Assign(name, expr, role, of))
        return name

    def send(self, target, value):
        """Add ``value`` (a name or constant) to the adjoint of ``target``."""
        if not (is_constant(value) and value == 0):
            self.contrib.setdefault(target, []).append(value)

    def total(self, name):
        """The adjoint of ``name``: the sum of everything sent to it."""
        parts = self.contrib.get(name, [])
        if not parts:
            g = self.emit(make_map(sp.Lambda((), sp.Integer(0)), name.shape, []), name) \
                if is_matrix(name) else sp.Integer(0)
        elif len(parts) == 1:
            g = parts[0]
        elif is_matrix(name):
            v = placeholders(len(parts))
            g = self.emit(make_map(sp.Lambda(v, sp.Add(*v)), name.shape, parts), name)
        else:
            g = self.emit(sp.Add(*parts), name)
        self.adjoint[name] = g
        return g

    def scalar_arg(self, x, of):
        """A size such as N as a map argument: a constant, a name, or emitted."""
        x = sp.sympify(x)
        if is_constant(x) or isinstance(x, sp.Symbol):
            return x
        return self.emit(x, of, role="aux")

    def reduce_to(self, value, shape, of):
        """Sum a broadcast adjoint back down to the argument's shape (None = scalar)."""
        full = value.shape
        if shape is None:
            return self.emit(Total(value), of)
        if shape[0] == 1 and full[0] != 1:
            value = self.emit(AxisSum(value, 0), of)
        if shape[1] == 1 and full[1] != 1:
            value = self.emit(AxisSum(value, 1), of)
        return value

    # --- rules, one per head -------------------------------------------------------------
    def rule(self, a: Assign, g, dep):
        y, e = a.name, a.expr
        if isinstance(e, sp.MatMul):
            A, B = e.args
            G = g
            if _base(A) in dep:  # C = A B  =>  Ā += Ḡ Bᵀ
                vjp = sp.MatMul(B, _tr(G)) if isinstance(A, sp.Transpose) else sp.MatMul(G, _tr(B))
                self.send(_base(A), self.emit(vjp, _base(A)))
            if _base(B) in dep:  # B̄ += Aᵀ Ḡ
                vjp = sp.MatMul(_tr(G), A) if isinstance(B, sp.Transpose) else sp.MatMul(_tr(A), G)
                self.send(_base(B), self.emit(vjp, _base(B)))
        elif isinstance(e, sp.Transpose):
            self.send(e.arg, self.emit(sp.Transpose(g), e.arg))
        elif isinstance(e, Elementwise):
            self.map_rule(a, g, dep)
        elif isinstance(e, AxisSum):  # broadcast the row/column adjoint back
            x = e.args[0]
            self.send(x, self.emit(make_map(sp.Lambda(placeholders(1), placeholders(1)[0]),
                                            x.shape, [g]), x))
        elif isinstance(e, Total):  # every entry gets g
            x = e.args[0]
            self.send(x, self.emit(make_map(sp.Lambda(placeholders(1), placeholders(1)[0]),
                                            x.shape, [g]), x))
        elif isinstance(e, Softmax):  # z̄ = y ⊙ (ḡ − rowsum(ḡ ⊙ y))
            z = e.args[0]
            gv, yv, sv = placeholders(3)
            gy = self.emit(make_map(sp.Lambda((gv, yv), gv * yv), y.shape, [g, y]), z)
            s = self.emit(AxisSum(gy, 1), z)
            self.send(z, self.emit(make_map(sp.Lambda((gv, yv, sv), yv * (gv - sv)),
                                            y.shape, [g, y, s]), z))
        elif isinstance(e, LogSoftmax):  # z̄ = ḡ − softmax(z) ⊙ rowsum(ḡ)
            z = e.args[0]
            gv, yv, sv = placeholders(3)
            s = self.emit(AxisSum(g, 1), z)
            self.send(z, self.emit(make_map(sp.Lambda((gv, yv, sv), gv - sp.exp(yv) * sv),
                                            y.shape, [g, y, s]), z))
        elif isinstance(e, SoftmaxCrossEntropy):
            Z, T = e.args
            n = self.scalar_arg(Z.shape[0], Z)
            sv, tv, gv, nv = placeholders(4)
            if Z in dep:  # Z̄ = g (Y − T)/N: softmax followed by cross-entropy
                Y = self.emit(Softmax(Z), Z, role="aux")
                self.send(Z, self.emit(make_map(sp.Lambda((sv, tv, gv, nv), gv * (sv - tv) / nv),
                                                Z.shape, [Y, T, g, n]), Z))
            if T in dep:  # T̄ = −g Z/N
                self.send(T, self.emit(make_map(sp.Lambda((sv, gv, nv), -gv * sv / nv),
                                                Z.shape, [Z, g, n]), T))
        else:
            self.scalar_rule(a, g, dep)

    def scalar_rule(self, a: Assign, g, dep):
        y, e = a.name, a.expr
        for x in _names_in(e):
            if x not in dep:
                continue
            d = _linear_partial(e, x)
            if d is None:
                d = sp.diff(e, x)
            if isinstance(e, (sp.Function, sp.Pow)):
                d = d.xreplace({e: y})  # reuse the node's own value: tanh' = 1 - y**2
            if d != 0:
                self.send(x, self.emit(g * d, x))

    def map_rule(self, a: Assign, g, dep):
        y, e = a.name, a.expr
        lam, args = e.lam, e.operands
        body = lam.expr
        yv = sp.Symbol("_y", real=True)
        gv = sp.Symbol("_g", real=True)
        for v, x in zip(lam.variables, args):
            if x not in dep:
                continue
            d = sp.diff(body, v)
            if body.is_Function or body.is_Pow:
                d = d.xreplace({body: yv})
            if d == 0:
                continue
            shape = tuple(x.shape) if is_matrix(x) else None
            if d == 1:
                vjp = g
            else:
                vs = (gv, *lam.variables, yv)
                vjp = self.emit(make_map(sp.Lambda(vs, gv * d), e.shape, [g, *args, y]), x)
            if shape is None or tuple(shape) != tuple(e.shape):
                vjp = self.reduce_to(vjp, shape, x)
            self.send(x, vjp)


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


def grad(p: Program, wrt) -> Program:
    """The ordered-derivative Program: forward body, then the adjoints of ``wrt``."""
    loss = p.outputs[0]
    if is_matrix(loss):
        raise SymbpError(
            f"the loss must be a scalar, but it is a {loss.shape[0]}×{loss.shape[1]} matrix: "
            "reduce it first, e.g. with sb.mse, sb.cross_entropy or symbp.matrix.Total"
        )
    wrt = tuple(wrt)
    for w in wrt:
        if not isinstance(w, (sp.Symbol, sp.MatrixSymbol)):
            raise SymbpError(
                f"cannot differentiate with respect to {w!r}: it is not a Symbol or "
                "MatrixSymbol (differentiate w.r.t. the symbols the expression is built from)"
            )
    # A wrt the loss does not read still gets a gradient (zeros of its shape) and must be
    # an input of the gradient program, or fn(**params) would reject it as "unexpected".
    # A different symbol under an input's name (Symbol("x") vs Symbol("x", real=True))
    # would be silently independent of the loss: name the clash instead.
    by_name = {str(s): s for s in p.inputs + p.dims}
    for w in wrt:
        if str(w) in by_name and by_name[str(w)] != w:
            raise SymbpError(
                f"cannot differentiate with respect to {w!r}: the expression uses a different "
                f"symbol of the same name ({by_name[str(w)]!r}, other assumptions or shape); "
                "pass the very symbol the expression is built from"
            )
    extra = tuple(w for w in dict.fromkeys(wrt) if str(w) not in by_name)
    dims = p.dims + tuple(
        d for d in dict.fromkeys(x for w in extra for s in getattr(w, "shape", ())
                                 for x in sp.sympify(s).free_symbols) if d not in p.dims
    )
    if extra:
        p = Program(p.inputs + extra, dims, p.body, p.outputs, p.wrt, p.meta)
    dep = set(wrt)
    for a in p.body:
        if any(n in dep for n in _names_in(a.expr)):
            dep.add(a.name)
    r = _Reverse(p)
    if loss in dep:
        r.send(loss, sp.Integer(1))
    for a in reversed(p.body):
        if a.name in dep and a.name in r.contrib:
            r.rule(a, r.total(a.name), dep)
    grads = tuple(r.total(w) for w in wrt)
    out = Program(p.inputs, p.dims, tuple(r.body), (loss, *grads), wrt,
                  meta={"adjoint": dict(r.adjoint), "forward": len(p.body)})
    return verify(out)
