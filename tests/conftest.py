import os
import sys

import numpy as np
import pytest
import sympy as sp

sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

# In CI every external tool a test needs must really be there: no silent skips.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, what: str):
    """Skip locally when a tool is missing, fail in CI (where .ci/run installs it)."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI (.ci/run installs it) but is missing")
    pytest.skip(f"{what} not installed")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


N = sp.Symbol("N")
