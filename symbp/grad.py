"""Ordered derivatives: the reverse pass, one Program -> Program function.

Walk the assignments backwards; the adjoint of each value is the sum of what its users
send it, ``v̄_i = Σ_j v̄_j ∂v_j/∂v_i`` (Werbos' ordered derivative ∂⁺L/∂v_i).  Only values
that depend on a ``wrt`` input get adjoints, so the cost is a constant factor of the
forward program: O(V + E).

The rules, one per head, live in symbp/vjp.py (the printed derivations use the same
table); here each nested head of a rule's contribution becomes one assignment.
"""

from __future__ import annotations

import sympy as sp

from .errors import SymbpError
from .heads import rule
from .ir import Assign, Program, _names_in, is_constant, make_map, verify
from .matrix import array_symbol, is_matrix, placeholders
from .vjp import broadcast, vjp


class _Reverse:
    def __init__(self, p: Program, dep: set):
        self.dep = dep
        self.body: list[Assign] = list(p.body)
        self.reserved = {str(n) for n in p.inputs + p.dims} | {str(a.name) for a in p.body}
        self.count = 0
        self.contrib: dict = {}
        self.adjoint: dict = {}
        self.grads: set = set()  # names of adjoint values (the rest of the helpers are aux)

    def fresh(self, shape=None):
        while True:
            self.count += 1
            s = f"g{self.count}"
            if s not in self.reserved:
                break
        self.reserved.add(s)
        return array_symbol(s, shape) if shape is not None else sp.Symbol(s, real=True)

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

    def wants(self, x) -> bool:
        if isinstance(x, (sp.Symbol, sp.MatrixSymbol)):
            return x in self.dep
        return any(n in self.dep for n in _names_in(x))

    def rule(self, a: Assign, g):
        """Send the adjoint ``g`` of assignment ``a`` to what it reads (the shared table)."""
        for x, c in vjp(a.expr, a.name, g, self.wants):
            self.route(x, c)

    def route(self, x, c):
        """A name takes contribution ``c`` (its heads assigned); a transpose passes it on."""
        if isinstance(x, (sp.Symbol, sp.MatrixSymbol)):
            if is_matrix(x) and not is_matrix(c):
                c = broadcast(c, x.shape)
            self.send(x, self.assign(c, x))
        else:
            for y, cy in vjp(x, None, c, self.wants):
                self.route(y, cy)

    def assign(self, e, of, nested=False):
        """``e`` as a name or constant: each head in it one assignment, innermost first.

        A product keeps its transposed operands (``g2*W2.T``); a nested helper that reads
        no adjoint (softmax(Z) for cross-entropy, a size) is an aux value."""
        if isinstance(e, (sp.Symbol, sp.MatrixSymbol)) or is_constant(e):
            return e
        h = rule(e)
        if h is not None and h.keeps_transpose:  # g2*W2.T: BLAS reads the transpose
            args = [sp.Transpose(self.assign(a.arg, of, True)) if isinstance(a, sp.Transpose)
                    else self.assign(a, of, True) for a in e.args]
            e = e.func(*args) if args != list(e.args) else e
        elif h is not None and h.operands is not None and h.rebuild is not None:
            ops = h.operands(e)
            new = [self.assign(o, of, True) for o in ops]
            e = h.rebuild(e, new) if new != list(ops) else e
        adj = not nested or any(n in self.grads for n in _names_in(e))
        name = self.emit(e, of, role="adjoint" if adj else "aux")
        if adj:
            self.grads.add(name)
        return name


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
    r = _Reverse(p, dep)
    if loss in dep:
        r.send(loss, sp.Integer(1))
    for a in reversed(p.body):
        if a.name in dep and a.name in r.contrib:
            g = r.total(a.name)
            r.grads.add(g)
            r.rule(a, g)
    grads = tuple(r.total(w) for w in wrt)
    out = Program(p.inputs, p.dims, tuple(r.body), (loss, *grads), wrt,
                  meta={"adjoint": dict(r.adjoint), "forward": len(p.body)})
    return verify(out)
