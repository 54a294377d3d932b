"""Large float32 reductions accumulate in float64.

A sum of n float32 terms accumulated in float32 drifts by ~n·2⁻²⁴ in the worst case and
~1e-3 relative in practice for n = 4·10⁶; accumulated in float64 and rounded once it is
within float32's own rounding (~6e-8).  The reference is NumPy's float64 sum of the very
same float32 inputs.
"""

import numpy as np
import pytest
import sympy as sp
from conftest import N, have, need

import symbp as sb

need(have("numba"), "numba")

ROWS, COLS = 2000, 2000  # 4·10⁶ entries
Y, T = sp.MatrixSymbol("Y", N, COLS), sp.MatrixSymbol("T", N, COLS)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 1, (ROWS, COLS)).astype(np.float32)
    t = rng.uniform(0, 1, (ROWS, COLS)).astype(np.float32)
    return y, t


def test_mse_over_4e6_float32_entries(data):
    y, t = data
    fn = sb.compile(sb.mse(Y, T), [Y], target="cpu", dtype=np.float32)
    value, g = fn(Y=y, T=t)
    d = y.astype(np.float64) - t.astype(np.float64)
    want = float(np.mean(d * d))
    assert abs(value - want) / want <= 1e-6, (value, want)
    # the gradient is elementwise (no accumulation): float32 rounding of 2(y − t)/n
    np.testing.assert_allclose(g["Y"][:3, :3], (2 * d / d.size)[:3, :3], rtol=1e-6)

