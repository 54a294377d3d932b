"""The numerics program of tests/test_numerics.py on the CUDA backend, in Numba's simulator.

    NUMBA_ENABLE_CUDASIM=1 python tests/cuda_numerics.py

Prints one JSON object on the last line: per dtype, the value and every gradient (lists;
NaN and Infinity are spelled as Python's json module does, so they survive the trip).
"""

import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from test_numerics import case  # noqa: E402

import symbp as sb  # noqa: E402

OPTIONS = {"tile": 4, "block": 8}  # small blocks: the simulator runs one Python thread each


def _ieee(f, overflow=math.inf, at_zero=math.nan):
    """f with the GPU's IEEE results: the simulator runs kernels with Python's math, which
    raises where CUDA returns inf, -inf or NaN (silu(-1000) = -1000/(1 + exp(1000)) = -0,
    BCE's max(log(0), -100) = -100)."""

    def g(x, *rest):
        try:
            return f(x, *rest)
        except OverflowError:
            return overflow
        except ValueError:  # a domain error: log(0) = -inf, log(-1) = NaN
            return at_zero if x == 0 else math.nan

    return g


if __name__ == "__main__":
    import simulator

    simulator.fast()
    math.exp, math.expm1 = _ieee(math.exp), _ieee(math.expm1)
    math.log = _ieee(math.log, at_zero=-math.inf)
    assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run with NUMBA_ENABLE_CUDASIM=1"
    f, wrt, arrays = case()
    out = {}
    for dtype in ("float32", "float64"):
        fn = sb.compile(f, wrt, target="cuda", dtype=dtype, **OPTIONS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            v, g = fn(**arrays)
        out[dtype] = {"value": float(v),
                      "grads": {k: np.asarray(x, dtype=np.float64).tolist() for k, x in g.items()}}
    print(json.dumps(out))
