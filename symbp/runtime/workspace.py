"""Scratch memory of the compiled kernels, kept between calls.

A kernel's scratch arrays (the forward values the backward pass reads, the gradients
before the update) are views into one flat array per batch size, so a call allocates
nothing; the shapes may depend on the sizes (``N``, ``2*N``), bound at each call.
"""

from __future__ import annotations

import numpy as np
import sympy as sp


def shape_fn(shape, dims):
    """A function of the dims' values giving a buffer's shape (sizes may be 2*N)."""
    parts = []
    for d in shape:
        d = sp.sympify(d)
        parts.append(int(d) if d.is_Integer else d)

    def f(vals):
        env = dict(zip(dims, vals))
        return tuple(x if isinstance(x, int) else int(x.xreplace(env)) for x in parts)

    return f


class Workspace:
    """One preallocated array per batch size holding every scratch array (a few sizes
    are kept: the last batch of an epoch is smaller)."""

    def __init__(self, names, dims, dtype, keep=4):
        self.dtype, self.keep = dtype, keep
        self.sizes = [shape_fn(n.shape, dims) for n in names]
        self.sets: dict = {}

    def get(self, dim_vals: tuple) -> np.ndarray:
        ws = self.sets.get(dim_vals)
        if ws is None:
            if len(self.sets) >= self.keep:
                self.sets.pop(next(iter(self.sets)))
            n = sum(int(np.prod(s(dim_vals))) for s in self.sizes)
            ws = self.sets[dim_vals] = np.empty(n, self.dtype)
        return ws
