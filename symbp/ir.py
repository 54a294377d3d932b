"""The IR: a Program of ordered single-head assignments, lowering from SymPy, and verify.

A Program is plain data.  Its body is a list of ``Assign(name, expr)`` in evaluation
order; ``expr`` is one head over names (and constants):

    scalar heads   Add, Mul, Pow, any differentiable sympy.Function, Piecewise,
                   Total(M), SoftmaxCrossEntropy(Z, T)
    matrix heads   MatMul(A, B)            (A, B names or Transpose(name))
                   Elementwise(λ, shape, args...)   fused entry-by-entry map, broadcasting
                   AxisSum(M, axis), Transpose(M), Softmax(M), LogSoftmax(M)

Names are ``Symbol`` (scalars) or ``MatrixSymbol`` (shape known, batch size symbolic);
a constant matrix (Identity, a Matrix of numbers) becomes a ``Constant`` input that the
compiled function binds itself, ZeroMatrix and OneMatrix maps of a constant body.
Lowering memoises on SymPy nodes, so a subexpression used twice is computed once and the
graph stays as small as the user's expression DAG: it never walks the expression as a
tree (no ``free_symbols``, ``count_ops`` or ``subs`` on the whole graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp
from sympy.core.function import AppliedUndef
from sympy.functions.elementary.piecewise import ExprCondPair

from .errors import ShapeError, SymbpError, UnsupportedError
from .heads import rule
from .matrix import (  # noqa: F401  (make_map and is_constant: re-exported for the passes)
    AxisSum,
    Constant,
    array_symbol,
    is_constant,
    is_matrix,
    is_placeholder,
    make_map,
    placeholders,
    same_dim,
    shape_text,
)

Name = sp.Symbol | sp.MatrixSymbol


@dataclass(frozen=True)
class Assign:
    """``name = expr``.  ``role`` is 'forward' or 'adjoint'; ``of`` names the primal
    value whose adjoint (ordered derivative ∂⁺L/∂of) this is, or a part of it."""

    name: Name
    expr: sp.Basic
    role: str = "forward"
    of: Name | None = None
    also: tuple = ()  # more names a fused head assigns in the same loop (symbp/heads/fused.py)


@dataclass(frozen=True)
class Program:
    """Inputs (user arrays), dims (sizes bound from array shapes), body, outputs.

    For a gradient program ``outputs[0]`` is the loss and ``outputs[1:]`` are the
    gradients with respect to ``wrt``, in order.
    """

    inputs: tuple[Name, ...]
    dims: tuple[sp.Symbol, ...]
    body: tuple[Assign, ...]
    outputs: tuple
    wrt: tuple[Name, ...] = ()
    meta: dict = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        lines = [f"inputs  {', '.join(map(str, self.inputs))}   dims {self.dims}"]
        for a in self.body:
            mark = "  " if a.role == "forward" else "∂ "
            lines.append(f"{mark}{a.name} = {a.expr}")
        lines.append(f"outputs {', '.join(map(str, self.outputs))}")
        return "\n".join(lines)


# --- lowering ----------------------------------------------------------------------------


class _Lowering:
    """Walks the SymPy DAG once in post-order, emitting one assignment per head."""

    def __init__(self, reserved: set[str]):
        self.memo: dict[sp.Basic, sp.Basic] = {}
        self.body: list[Assign] = []
        self.inputs: dict[str, Name] = {}
        self.reserved = set(reserved)
        self.count = 0

    # names -----------------------------------------------------------------------------
    def fresh(self, shape=None, prefix="t") -> Name:
        while True:
            self.count += 1
            s = f"{prefix}{self.count}"
            if s not in self.reserved:
                break
        self.reserved.add(s)
        return array_symbol(s, shape) if shape is not None else sp.Symbol(s, real=True)

    def emit(self, expr, shape=None) -> Name:
        name = self.fresh(shape)
        self.body.append(Assign(name, expr))
        return name

    # the walk --------------------------------------------------------------------------
    def run(self, root) -> sp.Basic:
        stack = [(root, False)]
        while stack:
            e, expanded = stack.pop()
            if e in self.memo:
                continue
            kids = [k for k in _children(e) if k not in self.memo]
            if expanded or not kids:
                self.memo[e] = self.lower_node(e)
            else:
                stack.append((e, True))
                # pushed last to first, so the first operand is lowered first: a printed
                # derivation names exp(z1) before exp(z2), in the order they are written
                stack.extend((k, False) for k in reversed(kids))
        return self.memo[root]

    def L(self, e):
        return self.memo[e]

    def lower_node(self, e):
        if isinstance(e, (sp.Symbol, sp.MatrixSymbol)):
            return self.input(e)
        if isinstance(e, (sp.logic.boolalg.Boolean, sp.core.relational.Relational)):
            return e.func(*[self.L(a) for a in e.args]) if e.args else e
        if not is_matrix(e) and e.is_number:
            return e
        return rule(e).lower(self, e)  # the head's own lowering (symbp/heads)

    def input(self, s):
        old = self.inputs.get(s.name)
        if old is not None and old != s:
            raise SymbpError(
                f"two different symbols are both named {s.name!r} ({old!r} and {s!r}): "
                "rename one"
            )
        self.inputs[s.name] = s
        return s

    def lower_scalar(self, e):
        """Scalar arithmetic or a function: one assignment over the lowered operands."""
        if isinstance(e, AppliedUndef):
            raise UnsupportedError(
                f"{e.func}({', '.join(map(str, e.args))}) is an undefined function: it has "
                f"no derivative. Define a sympy.Function subclass with fdiff, or write "
                f"{e.func} as a formula of known functions"
            )
        if isinstance(e, (sp.Derivative, sp.Integral, sp.Subs)):
            raise UnsupportedError(f"{type(e).__name__} {e} cannot be compiled: evaluate it first")
        args = [self.L(a) for a in e.args]
        if all(is_constant(a) for a in args):
            return e
        return self.emit(e.func(*args))

    # helpers the heads' lowering rules call (symbp/heads) ---------------------------

    def constant(self, e) -> Constant:
        """Identity(k) or a Matrix of numbers: an input the compiled function binds itself
        (a map's body sees entries, not their indices, so it cannot write a diagonal)."""
        base = "I" if isinstance(e, sp.Identity) else "C"
        name, k = base, 1
        while name in self.reserved:
            k += 1
            name = f"{base}{k}"
        self.reserved.add(name)
        c = Constant(name, e)
        self.inputs[name] = c
        return c

    def map(self, lam, shape, args):
        """Emit an Elementwise map; free symbols of the body become scalar arguments."""
        free = sorted(lam.expr.free_symbols - set(lam.variables), key=str)
        if free:
            vs = placeholders(len(args) + len(free))
            body = lam.expr.xreplace(dict(zip(list(lam.variables) + free, vs)))
            lam = sp.Lambda(vs, body)
            args = list(args) + [self.memo.get(s) or self.input(s) for s in free]
        return self.emit(make_map(lam, shape, args), shape)

    def matmul(self, e):
        scalars = [a for a in e.args if not is_matrix(a)]
        mats = [a for a in e.args if is_matrix(a)]
        acc = mats[0]
        acc_l = None if isinstance(acc, sp.OneMatrix) else self.operand(acc)
        for B in mats[1:]:
            acc, acc_l = B, self.product(acc, acc_l, B)
        if acc_l is None:  # a lone OneMatrix
            acc_l = self.map(sp.Lambda((), sp.Integer(1)), tuple(acc.shape), [])
        if isinstance(acc_l, sp.Transpose):
            acc_l = self.emit(acc_l, tuple(acc_l.shape))
        if scalars:
            c = sp.Mul(*[self.L(s) for s in scalars])
            if not is_constant(c):
                c = self.emit(c) if not isinstance(c, sp.Symbol) else c
            v = placeholders(2)
            return self.map(sp.Lambda(v, v[0] * v[1]), tuple(e.shape), [c, acc_l])
        return acc_l

    def operand(self, M):
        # X.T inside a product stays an operand: BLAS transposes for free.
        if isinstance(M, sp.Transpose):
            return sp.Transpose(self.L(M.arg))
        return self.L(M)

    def product(self, A, A_l, B):
        """The lowered value of A·B; OneMatrix factors become broadcasts and sums."""
        for M in (A, B):
            if len(M.shape) != 2:
                raise ShapeError(
                    f"matrix product {A}*{B}: {M} is a {shape_text(M.shape)} array, not a "
                    "matrix: flatten it first (sb.flatten)")
        ra, ca = A.shape if A_l is None else A_l.shape
        rb, cb = B.shape
        if not same_dim(ca, rb):
            raise ShapeError(
                f"matrix product {A}*{B}: {A} is {ra}×{ca} but {B} is {rb}×{cb} "
                f"({ca} ≠ {rb})"
            )
        if A_l is None:  # A is OneMatrix(ra, ca)
            B_l = self.L(B) if not isinstance(B, sp.OneMatrix) else None
            if B_l is None:  # 1·1 = a matrix filled with ca
                return self.map(sp.Lambda((), sp.sympify(ca)), (ra, cb), [])
            if ca == 1:  # 1·b: broadcast the row b down ra rows
                return self.map(sp.Lambda(placeholders(1), placeholders(1)[0]), (ra, cb), [B_l])
            col = self.emit(AxisSum(self.materialize(B_l), 0), (1, cb))  # 1ᵀ B
            return col if ra == 1 else self.map(
                sp.Lambda(placeholders(1), placeholders(1)[0]), (ra, cb), [col]
            )
        if isinstance(B, sp.OneMatrix):
            rows = self.emit(AxisSum(self.materialize(A_l), 1), (ra, 1))  # B 1
            return rows if cb == 1 else self.map(
                sp.Lambda(placeholders(1), placeholders(1)[0]), (ra, cb), [rows]
            )
        return self.emit(sp.MatMul(A_l, self.operand(B)), (ra, cb))

    def materialize(self, op):
        return self.emit(op, tuple(op.shape)) if isinstance(op, sp.Transpose) else op


def _children(e) -> list:
    """The operands the walk lowers before ``e``: its head's ``children`` rule."""
    if isinstance(e, (sp.Symbol, sp.MatrixSymbol)) or not isinstance(e, sp.Basic):
        return []
    h = rule(e)
    if h is not None and h.children is not None:
        return h.children(e)
    if e.is_Atom:
        return []
    return [a for a in e.args if isinstance(a, sp.Basic) and not isinstance(a, sp.Tuple)]


def lower(f, extra_names: set[str] = frozenset()) -> Program:
    """Lower a SymPy expression into a forward Program whose single output is ``f``."""
    f = sp.sympify(f)
    reserved = set(extra_names)
    lw = _Lowering(reserved)
    _reserve_input_names(f, lw)
    out = lw.run(f)
    if is_constant(out) or isinstance(out, (sp.Symbol, sp.MatrixSymbol)) and not lw.body:
        out = lw.emit(sp.sympify(out) if not is_matrix(out) else out, getattr(out, "shape", None))
    dims = _dims(lw.inputs.values())
    inputs = tuple(s for s in lw.inputs.values() if s not in dims)
    return Program(inputs=inputs, dims=dims, body=tuple(lw.body), outputs=(out,))


def _reserve_input_names(f, lw: _Lowering):
    # Names the user chose must never be reused for temporaries; a cheap DAG walk.  It
    # also meets every size in a shape, so one name used by two different symbols
    # (Symbol("N") in the shapes, Symbol("N", positive=True) in a formula) is caught here:
    # compiled code binds arguments by name and would mix the two up.
    names = NameTable()
    seen, stack = set(), [(f, None)]
    bound: set = set()  # a Lambda's own variables are not inputs
    while stack:
        e, where = stack.pop()
        if e in seen or not isinstance(e, sp.Basic):
            continue
        seen.add(e)
        if isinstance(e, sp.Lambda):
            bound.update(e.variables)
            stack.append((e.expr, where))
        elif isinstance(e, (sp.Symbol, sp.MatrixSymbol)):
            if e in bound or is_placeholder(e):
                continue
            names.add(e, where)
            lw.reserved.add(e.name)
            for d in getattr(e, "shape", ()):
                stack.append((d, f"a size in the shape of {e.name}"))
        else:
            stack.extend((a, where) for a in e.args)


class NameTable:
    """Symbols by name: two different symbols under one name are an error naming both."""

    def __init__(self, symbols=()):
        self.by_name: dict = {}
        for s in symbols:
            self.add(s)

    def add(self, s, where: str | None = None):
        old = self.by_name.get(s.name)
        if old is None:
            self.by_name[s.name] = (s, where)
        elif old[0] != s:
            raise SymbpError(
                f"two different symbols are both named {s.name}: {_describe(*old)} and "
                f"{_describe(s, where)}: rename one (or build both from the same symbol)"
            )


def _describe(s, where) -> str:
    """``Symbol('N', positive=True) (a size in the shape of X)``, ``X: a 3×N matrix``."""
    if isinstance(s, sp.MatrixSymbol):
        kind = "matrix" if len(s.shape) == 2 else f"{len(s.shape)}-D array"
        text = f"{s.name}: a {shape_text(s.shape)} {kind}"
    else:
        text = sp.srepr(s)
    return f"{text} ({where})" if where else text


def check_names(p: Program, wrt) -> None:
    """The sizes in the shapes of ``wrt`` against the program's names."""
    # (a wrt under an input's name is grad's to report: it says which symbol to pass)
    names = NameTable(p.inputs + p.dims)
    for w in wrt:
        for d in getattr(w, "shape", ()):
            for x in sp.sympify(d).free_symbols:
                names.add(x, f"a size in the shape of {w.name}")


def _dims(names) -> tuple[sp.Symbol, ...]:
    dims = []
    for s in names:
        for d in getattr(s, "shape", ()):
            for x in sp.sympify(d).free_symbols:
                if x not in dims:
                    dims.append(x)
    return tuple(dims)


# --- verify ------------------------------------------------------------------------------


def verify(p: Program) -> Program:
    """Check that names are defined before use and once, heads are known and shapes agree.

    Cheap (one pass over small expressions); returns the program so it chains."""
    defined = set(p.inputs) | set(p.dims)
    for a in p.body:
        # printed only when something is wrong: printing every assignment was most of
        # verify's time on large programs
        where = _Where(a)
        for n in (a.name, *a.also):
            if n in defined:
                raise SymbpError(f"{n} is assigned twice ({where})")
        used = _names_in(a.expr)
        missing = [u for u in used if u not in defined]
        if missing:
            raise SymbpError(f"{', '.join(map(str, missing))} used before definition {where}")
        h = rule(a.expr)
        if isinstance(a.expr, sp.Symbol) or (not is_matrix(a.expr) and a.expr.is_number):
            pass  # a copy or a constant
        elif h is None or h.front_end or (h.kind == "array") != is_matrix(a.name):
            kind = "matrix" if is_matrix(a.name) else "scalar"
            raise SymbpError(f"unknown {kind} head {type(a.expr).__name__} {where}")
        if is_matrix(a.name):
            shape = tuple(a.expr.shape)
            if not all(same_dim(x, y) for x, y in zip(shape, a.name.shape)):
                raise ShapeError(f"{a.name} is {a.name.shape} but its value is {shape} {where}")
        if h is not None and h.check is not None:
            h.check(a.expr, where)
        defined.add(a.name)
        defined.update(a.also)
    for o in p.outputs:
        if not is_constant(o) and o not in defined:
            raise SymbpError(f"output {o} is never assigned")
    return p


class _Where:
    """The assignment an error is in, printed lazily (``in `t3 = x*y```)."""

    def __init__(self, a: Assign):
        self.a = a

    def __str__(self) -> str:
        return f"in `{self.a.name} = {self.a.expr}`"

    def __format__(self, spec) -> str:
        return format(str(self), spec)


def _names_in(expr) -> list:
    """The names an assignment reads (its expression is small: a plain walk is fine)."""
    out, stack = [], [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, (sp.Symbol, sp.MatrixSymbol)):
            if not is_placeholder(e) and e not in out:
                out.append(e)
        elif isinstance(e, ExprCondPair):
            # a Tuple subclass, but Piecewise's branches and conditions are real operands:
            # skipping it with the shape Tuples below made every Piecewise gradient 0
            stack.extend(e.args)
        elif isinstance(e, sp.Basic) and not isinstance(e, (sp.Lambda, sp.Tuple)):
            stack.extend(e.args)
    return out
