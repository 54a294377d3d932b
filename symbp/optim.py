"""Optimizers as plain data, with the NumPy reference update.

Compiled backends fuse the same update into the training step; this module's ``update``
is the reference they are tested against.  Vocabulary: ``w`` a parameter, ``g`` its
gradient, ``m``/``v`` the first/second moment buffers, ``t`` the 1-based step count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SGD:
    """w ← w − lr·g"""

    lr: float = 0.1
    buffers = ()


@dataclass(frozen=True)
class Momentum:
    """m ← β m + g;  w ← w − lr·m  (PyTorch's SGD with momentum, no dampening)."""

    lr: float = 0.1
    beta: float = 0.9
    buffers = ("m",)


@dataclass(frozen=True)
class Adam:
    """Kingma & Ba: bias-corrected first and second moments."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    buffers = ("m", "v")


def init_state(opt, params: dict) -> dict:
    """Zeroed optimizer buffers: {buffer: {param name: array}} plus the step count."""
    state = {b: {k: np.zeros_like(w) for k, w in params.items()} for b in opt.buffers}
    state["t"] = 0
    return state


def update(opt, params: dict, grads: dict, state: dict) -> None:
    """Apply one step in place (the reference every fused backend is tested against)."""
    state["t"] += 1
    t = state["t"]
    for k, w in params.items():
        g = grads[k]
        if isinstance(opt, SGD):
            w -= opt.lr * g
        elif isinstance(opt, Momentum):
            m = state["m"][k]
            m *= opt.beta
            m += g
            w -= opt.lr * m
        elif isinstance(opt, Adam):
            m, v = state["m"][k], state["v"][k]
            m *= opt.beta1
            m += (1 - opt.beta1) * g
            v *= opt.beta2
            v += (1 - opt.beta2) * g * g
            mhat = m / (1 - opt.beta1**t)
            vhat = v / (1 - opt.beta2**t)
            w -= opt.lr * mhat / (np.sqrt(vhat) + opt.eps)
        else:
            raise TypeError(f"unknown optimizer {opt!r}: use SGD, Momentum or Adam")
