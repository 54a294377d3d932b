"""The workspace views of generated kernels (symbp.backends.views) and the address table's
arrays (symbp.backends.address.array), against NumPy's own slicing and reshape."""

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from symbp.backends.address import array  # noqa: E402
from symbp.backends.views import rows, view  # noqa: E402


@numba.njit
def _view3(buf, at, a, b, c):
    v = view(buf, at, (a, b, c))
    v[0, 0, 0] += 1  # the view shares buf's memory
    return v.copy()


@numba.njit
def _view1(buf, at, n):
    return view(buf, at, n).copy()


@numba.njit
def _rows(a, lo, hi):
    r = rows(a, lo, hi)
    r[...] = -r  # written through
    return r.copy()


@numba.njit
def _at(address, a, b, dt):
    v = array(address, (a, b), dt)
    v[a - 1, b - 1] = 7
    return v.copy()


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_view_is_numpys_slice_and_reshape_and_shares_memory(dt):
    buf = np.arange(40, dtype=dt)
    want = buf[5:5 + 24].reshape(2, 3, 4).copy()
    want[0, 0, 0] += 1
    got = _view3(buf, 5, 2, 3, 4)
    assert got.dtype == dt and got.shape == (2, 3, 4) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    assert buf[5] == 6  # written through
    np.testing.assert_array_equal(_view1(buf, 36, 4), buf[36:])
    assert _view1(buf, 40, 0).shape == (0,)  # empty at the end: inside


@pytest.mark.parametrize("at, shape", [(17, (2, 3, 4)), (-1, (1, 1, 1)), (0, (-1, 2, 2)),
                                       (0, (5, 3, 3))])
def test_a_view_outside_its_array_raises(at, shape):
    with pytest.raises(ValueError, match="workspace view reaches outside"):
        _view3(np.zeros(40, np.float32), at, *shape)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_rows_are_numpys_row_slice(dt):
    a = np.arange(30, dtype=dt).reshape(6, 5)
    got = _rows(a, 2, 5)
    np.testing.assert_array_equal(got, -np.arange(30, dtype=dt).reshape(6, 5)[2:5])
    np.testing.assert_array_equal(a[2:5], got)  # written through
    np.testing.assert_array_equal(a[:2], np.arange(10, dtype=dt).reshape(2, 5))
    v = np.arange(8, dtype=dt)
    np.testing.assert_array_equal(_rows(v, 3, 3), v[3:3])
    np.testing.assert_array_equal(_rows(v, 0, 8), -np.arange(8, dtype=dt))


@pytest.mark.parametrize("lo, hi", [(-1, 2), (3, 2), (0, 7)])
def test_rows_outside_raise(lo, hi):
    with pytest.raises(ValueError, match="workspace view reaches outside"):
        _rows(np.zeros((6, 5)), lo, hi)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_array_at_an_address_is_that_array(dt):
    w = np.arange(12, dtype=dt).reshape(3, 4)
    got = _at(w.ctypes.data, 3, 4, dt)
    assert got.dtype == dt
    np.testing.assert_array_equal(got[:2], np.arange(8, dtype=dt).reshape(2, 4))
    assert got[2, 3] == 7 and w[2, 3] == 7  # the same memory


@numba.njit
def _at1(address, n, dt):
    return array(address, n, dt).copy()  # a bare int: a 1-D shape, as (n,)


def test_array_at_an_address_takes_a_bare_size():
    b = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(_at1(b.ctypes.data, 3, np.float32), b[:3])
