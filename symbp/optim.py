"""Optimizers as plain data, each with its update written once, as formulas.

An optimizer is a frozen dataclass whose fields are its hyperparameters, plus three class
attributes that define it:

    buffers    its per-parameter state (``m``, ``v``), zeroed by ``init_state``
    per_step   scalars of the hyperparameters and the 1-based step count ``t`` (Adam's
               bias corrections 1 − β₁ᵗ): computed in float64 once per step, then rounded
               to the parameters' dtype, as NumPy rounds a Python float
    update     the update of one parameter entry, ordered assignments ``(x, formula)``:
               ``x`` is ``w`` (the parameter), a buffer, or a temporary; formulas read
               ``w``, ``g`` (the gradient), the buffers, the hyperparameters (symbols
               named like the fields), the per-step scalars and earlier temporaries

Every path evaluates these formulas, operation for operation in the order written (so
they all round alike): ``update`` below (the NumPy reference), the Numba backends (the
update fused into the compiled training step) and the data-parallel update over flat
buffers (``symbp.runtime.mpi``).  A new optimizer is one more class here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import numpy as np
import sympy as sp

from .errors import SymbpError

# the vocabulary of every rule: a parameter entry, its gradient, the step count
w, g, t = sp.symbols("w g t")
lr, beta, beta1, beta2, eps = sp.symbols("lr beta beta1 beta2 eps")
m, v = sp.symbols("m v")


@dataclass(frozen=True)
class Rule:
    """An optimizer's update as data (``opt.rule``): what the backends print."""

    hyper: tuple  # hyperparameter names, the order of the float64 array ``hyper(opt)``
    state: tuple  # buffer names
    per_step: tuple  # ((scalar, formula in hyperparameters and t), ...)
    update: tuple  # ((target, formula), ...): target w, a buffer or a temporary
    w, g, t = w, g, t  # the symbols every rule is written in (not fields: no annotation)


class Optimizer:
    """The base of every optimizer (subclasses are frozen dataclasses).

    A subclass writes ``update`` (and ``per_step``) above its fields: in a class body a
    field ``lr: float = 0.1`` binds the name ``lr`` to 0.1, hiding the symbol ``lr``
    from every formula written below it (``rule`` refuses a hyperparameter that no
    formula reads, which is what that mistake looks like).
    """

    buffers: tuple = ()
    per_step: tuple = ()
    update: tuple = ()

    @property
    def rule(self) -> Rule:
        """The update as data (checked once per class): what the backends print."""
        return _rule(type(self))


@dataclass(frozen=True)
class SGD(Optimizer):
    """w ← w − lr·g"""

    update = ((w, w - lr * g),)
    lr: float = 0.1


@dataclass(frozen=True)
class Momentum(Optimizer):
    """m ← β m + g;  w ← w − lr·m  (PyTorch's SGD with momentum, no dampening)."""

    buffers = ("m",)
    update = ((m, beta * m + g),
              (w, w - lr * m))
    lr: float = 0.1
    beta: float = 0.9


_a1, _a2, _c1, _c2, _u, _mh = sp.symbols("a1 a2 c1 c2 u mh")


@dataclass(frozen=True)
class Adam(Optimizer):
    """Kingma & Ba: bias-corrected first and second moments."""

    buffers = ("m", "v")
    per_step = ((_a1, 1 - beta1), (_a2, 1 - beta2),    # 1 − β rounded once, from float64
                (_c1, 1 - beta1**t), (_c2, 1 - beta2**t))  # the bias corrections of step t
    # the temporaries u and m̂ fix the order of rounding (SymPy would write g² and
    # lr·m/(c1·(...))), the order the reference has always used
    update = ((m, beta1 * m + _a1 * g),                 # m ← β₁ m + (1 − β₁) g
              (_u, _a2 * g), (v, beta2 * v + _u * g),   # v ← β₂ v + ((1 − β₂) g) g
              (_mh, m / _c1),                           # m̂ = m / (1 − β₁ᵗ)
              (w, w - lr * _mh / (sp.sqrt(v / _c2) + eps)))  # w ← w − lr m̂ / (√v̂ + ε)
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


@functools.cache
def _rule(cls) -> Rule:
    # checked once per class: every name a formula reads is defined before it
    name = cls.__name__
    hyper = tuple(f.name for f in fields(cls))
    state = tuple(cls.buffers)
    hyp = {sp.Symbol(h) for h in hyper}
    for s, e in cls.per_step:
        extra = sp.sympify(e).free_symbols - hyp - {t}
        if extra:
            raise SymbpError(f"{name}.per_step: {s} = {e} reads {sorted(map(str, extra))}; "
                             f"a per-step scalar reads only the hyperparameters {hyper} and t")
    known = hyp | {w, g} | {sp.Symbol(b) for b in state} | {s for s, _ in cls.per_step}
    # a per-step scalar is a new name; an entry's assignment may rewrite w and the
    # buffers, never g, t, a hyperparameter or a per-step scalar
    steps = [s for s, _ in cls.per_step]
    bufs = {sp.Symbol(b) for b in state}
    clash = [s for s in steps if s in hyp | {w, g, t} | bufs or steps.count(s) > 1]
    clash += [x for x, _ in cls.update if x in hyp | {g, t} | set(steps)]
    if clash:
        raise SymbpError(f"{name}: {clash[0]} is assigned, but it is g, t, a buffer, a "
                         "hyperparameter or a per-step scalar: give it another name")
    for x, e in cls.update:
        extra = sp.sympify(e).free_symbols - known
        if extra:
            raise SymbpError(
                f"{name}.update: {x} = {e} reads {sorted(map(str, extra))}, which is not w, "
                f"g, a buffer {state}, a hyperparameter {hyper}, a per-step scalar or an "
                "earlier assignment")
        known.add(x)
    read = set().union(*(sp.sympify(e).free_symbols for _, e in (*cls.per_step, *cls.update)))
    unread = [h for h in hyper if sp.Symbol(h) not in read]
    if unread:
        raise SymbpError(f"{name}: no formula reads the hyperparameter(s) {unread}; write "
                         "`update` and `per_step` above the fields (see Optimizer)")
    if not any(x == w for x, _ in cls.update):
        raise SymbpError(f"{name}.update never assigns w: the parameter would not move")
    return Rule(hyper, state, tuple(cls.per_step), tuple(cls.update))


def rule(opt) -> Rule:
    """The update rule of optimizer ``opt`` (checked once per class)."""
    if not (isinstance(opt, Optimizer) and hasattr(opt, "__dataclass_fields__")):
        raise SymbpError(f"unknown optimizer {opt!r}: use SGD, Momentum or Adam (or a "
                         "frozen dataclass subclassing symbp.optim.Optimizer)")
    return opt.rule


def hyper(opt) -> np.ndarray:
    """The hyperparameters' values in ``rule(opt).hyper`` order, float64."""
    return np.array([float(getattr(opt, h)) for h in rule(opt).hyper])


def step_scalars(opt, t: int) -> list:
    """The hyperparameters, then the per-step scalars of step ``t``, in float64: what an
    update kernel that is not handed ``t`` (the CUDA step's) takes as arguments."""
    r = rule(opt)
    _, scalars, _ = _numpy_update(type(opt))
    h = [float(getattr(opt, name)) for name in r.hyper]
    return h + [float(f(*h, t)) for _, f in scalars]


def init_state(opt, params: dict) -> dict:
    """Zeroed optimizer buffers: {buffer: {param name: array}} plus the step count."""
    state = {b: {k: np.zeros_like(a) for k, a in params.items()} for b in opt.buffers}
    state["t"] = 0
    return state


@functools.cache
def _numpy_update(cls):
    # the per-step scalars as Python float arithmetic (float64, libm's pow), the entry
    # formulas as NumPy expressions over whole arrays: each lambdified once per class
    r = _rule(cls)
    hyp = [sp.Symbol(h) for h in r.hyper]
    scalars = [(s, sp.lambdify([*hyp, t], e, "math")) for s, e in r.per_step]
    steps = []
    for x, e in r.update:
        args = sorted(sp.sympify(e).free_symbols, key=str)
        steps.append((x, args, sp.lambdify(args, e, "numpy")))
    return hyp, scalars, steps


def update(opt, params: dict, grads: dict, state: dict) -> None:
    """Apply one step in place (the reference every fused backend is tested against)."""
    r = rule(opt)
    hyp, scalars, steps = _numpy_update(type(opt))
    state["t"] += 1
    h = [getattr(opt, name) for name in r.hyper]
    consts = dict(zip(hyp, h))
    consts.update((s, f(*h, state["t"])) for s, f in scalars)
    bufs = [(sp.Symbol(b), b) for b in r.state]
    for k, a in params.items():
        # Python floats in the array's dtype: float32 parameters step in float32 arithmetic
        env = {s: a.dtype.type(c) for s, c in consts.items()}
        env.update({w: a, g: grads[k]})
        env.update((s, state[b][k]) for s, b in bufs)
        for x, args, f in steps:  # a later formula reads the new value of a buffer
            env[x] = f(*(env[y] for y in args))
        np.copyto(a, env[w])
        for s, b in bufs:
            if env[s] is not state[b][k]:
                np.copyto(state[b][k], env[s])


__all__ = ["SGD", "Momentum", "Adam", "Optimizer", "Rule", "rule", "hyper", "init_state",
           "step_scalars", "update"]

@functools.cache
def axpby(rule: Rule):
    """``(k, x, α, γ)`` when the update reads g once, in its k-th assignment, as
    x ← α·x + γ·g with x the parameter or a buffer and α, γ free of every entry (numbers,
    hyperparameters, per-step scalars): a product's gemm can then compute it."""
    reads = [k for k, (_, e) in enumerate(rule.update) if rule.g in e.free_symbols]
    if len(reads) != 1:
        return None
    k = reads[0]
    x, e = rule.update[k]
    entry = {rule.w, rule.g} | {sp.Symbol(b) for b in rule.state} | {y for y, _ in rule.update}
    if x not in {rule.w} | {sp.Symbol(b) for b in rule.state}:
        return None
    gamma = sp.diff(e, rule.g)
    alpha = sp.cancel((e - gamma * rule.g) / x)
    if (alpha.free_symbols | gamma.free_symbols) & entry or sp.expand(
            e - alpha * x - gamma * rule.g) != 0:
        return None
    return k, x, alpha, gamma
