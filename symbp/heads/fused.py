"""Fused heads: one loop computing several values, made by passes (symbp/passes.py),
never written by a user and never differentiated.  Each assigns its primary name plus the
names in ``Assign.also``; the backends that have a rule print it, the others never see it
(``passes.optimize`` runs a fusion only for a target that can lower what it makes).

    MapSums(map, kinds, store)   a map and sums of it (kind 0 / 1: the axis of an
                                 AxisSum, −1: Total) in the map's loop; ``store``: whether
                                 the map itself is written (something else reads it)
    SoftmaxCE(Z, T, extras)      softmax-CE, and in the same row loop softmax(Z)
                                 ("softmax") and the target row sums T𝟏 ("rowsum") that
                                 its gradient reads
    UpdateProduct(A, B, how)     a gradient A·B that a training step's update adds into
                                 its parameter by one gemm (never stored)
"""

from __future__ import annotations

from dataclasses import replace

import sympy as sp
from sympy.matrices.expressions.matexpr import MatrixExpr

from ..ir import Assign
from ..matrix import AxisSum, Softmax, SoftmaxCrossEntropy, Total
from . import register
from .maps import map_loop
from .softmax import rows, sce_cuda


class MapSums(MatrixExpr):
    def __new__(cls, m, kinds, store):
        return super().__new__(cls, m, sp.Tuple(*kinds), sp.true if store else sp.false)

    @property
    def map(self):
        return self.args[0]

    @property
    def kinds(self) -> tuple:
        return tuple(int(k) for k in self.args[1])

    @property
    def store(self) -> bool:
        return bool(self.args[2])

    @property
    def shape(self):
        return self.map.shape

    def sums(self, y, names) -> list:
        """The fused sums as the assignments they replace: ``s = AxisSum(y, k)``."""
        return [Assign(s, Total(y) if k < 0 else AxisSum(y, k)) for s, k in zip(names, self.kinds)]

    def _sympystr(self, printer):
        return f"map_sums({printer._print(self.map)}, {self.kinds})"


def map_sums_cpu(gen, a):
    # printed as the map and the sums it replaces, each with its own comment line
    e = a.expr
    map_loop(gen, replace(a, expr=e.map, also=()), e.map, e.sums(a.name, a.also),
             store=e.store)


register(MapSums, cpu=map_sums_cpu,
         label=lambda e: "map+Σ", doc="a map and its sums in one loop")


class SoftmaxCE(sp.Expr):
    is_commutative = True
    is_real = True

    def __new__(cls, Z, T, extras):
        return super().__new__(cls, Z, T, sp.Tuple(*[sp.Symbol(x) for x in extras]))

    @property
    def extras(self) -> tuple:
        return tuple(str(x) for x in self.args[2])

    @property
    def sce(self) -> SoftmaxCrossEntropy:
        return SoftmaxCrossEntropy(*self.args[:2])

    def parts(self, also) -> dict:
        """extra kind -> the assignment it replaces."""
        Z, T = self.args[:2]
        made = {"softmax": Softmax(Z), "rowsum": AxisSum(T, 1)}
        return {k: Assign(n, made[k]) for k, n in zip(self.extras, also)}

    def _sympystr(self, printer):
        return f"softmax_ce({printer._print(self.args[0])}, {printer._print(self.args[1])}, " \
               f"{', '.join(self.extras)})"


def softmax_ce_cpu(gen, a):
    parts = a.expr.parts(a.also)
    rows(gen, replace(a, expr=a.expr.sce, also=()), a.expr.sce, sm=parts.get("softmax"),
         rs=parts.get("rowsum"))


def softmax_ce_cuda(gen, a):
    parts = a.expr.parts(a.also)
    rs = parts.get("rowsum")
    sce_cuda(gen, a, a.expr.sce, rs=rs.name if rs is not None else None,
             sm=parts.get("softmax"))


register(SoftmaxCE, kind="reduction", cpu=softmax_ce_cpu, cuda=softmax_ce_cuda,
         label=lambda e: "CE∘softmax", doc="softmax-CE with softmax and T𝟏 in its loop")


class UpdateProduct(MatrixExpr):
    """A gradient ``A·B`` that is never stored: the training step's update x ← α x + γ g of
    its parameter is one gemm call, x ← α x + γ A·B (passes.fuse_update).  ``how`` is
    ``(k, x, α, γ)``: the update's k-th assignment, its target x, and α, γ."""

    def __new__(cls, A, B, how):
        return super().__new__(cls, A, B, sp.Tuple(*how))

    @property
    def product(self):
        return sp.MatMul(*self.args[:2])

    @property
    def how(self) -> tuple:
        k, x, alpha, gamma = self.args[2]
        return int(k), x, alpha, gamma

    @property
    def shape(self):
        return (self.args[0].shape[0], self.args[1].shape[1])

    def _sympystr(self, printer):
        return f"update_by({printer._print(self.product)})"


# its code is the update's: nothing at its own place in the kernel
register(UpdateProduct, cpu=lambda gen, a: None, label=lambda e: "@→update",
         extra={"into_update": True}, doc="a gradient product added into its update by gemm")
