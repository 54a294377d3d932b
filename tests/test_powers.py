"""Compiled powers and |u|: the scalar printer's special cases against SymPy's exact value.

The Numba printer spells small integer powers as products (x**-3 as 1/(x*x*x)), ±1/2 as
sqrt, and the rest as math.pow; each spelling is checked here, in the value and in the
gradient (whose rules raise the exponents by −1: x**-3 → −3 x**-4), on 'cpu'.
"""

import numpy as np
import pytest
import sympy as sp
from conftest import have, need

import symbp as sb

need(have("numba"), "numba")

w, x = sp.symbols("w x", real=True)
TERMS = [
    w * x**-3, (w + x**2) ** -1, x**2 * w**3, sp.sqrt(1 + w**2) * x,
    (1 + x**2) ** sp.Rational(-1, 2),
    w * (1 + x**2) ** sp.Rational(3, 2), x**-9 * w, w**sp.Float(2.5) * x,
    w * sp.Abs(x - 2), w * sp.Abs(x),  # |u|' = sign(u): the printer's own sign rule, both signs
]
POINT = {w: 1.3, x: 0.7}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compiled_powers_match_sympy(dtype):
    f = sum(TERMS)
    fn = sb.compile(f, [w, x], target="cpu", dtype=dtype)
    value, g = fn(w=POINT[w], x=POINT[x])
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert value == pytest.approx(float(f.subs(POINT)), rel=rtol)
    for s in (w, x):
        assert g[s.name] == pytest.approx(float(sp.diff(f, s).subs(POINT)), rel=rtol), s
