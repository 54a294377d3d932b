"""The training seed decides the batch order: two seeds differ, one seed repeats exactly."""

import numpy as np
import pytest
from conftest import have, need

from symbp import nn, optim, train


def run(seed, target="numpy"):
    m = nn.mlp([4, 6, 3], activations="tanh", seed=0)  # same initial parameters every run
    rng = np.random.default_rng(5)
    X = rng.normal(size=(40, 4))
    y = rng.integers(0, 3, 40)
    order = []
    h = train.fit(m, X, y, epochs=2, batch_size=8, optimizer=optim.SGD(0.5), target=target,
                  dtype=np.float64, seed=seed, progress=False,
                  callback=lambda e, s, loss: order.append(loss))
    return m.params, order, h


@pytest.mark.parametrize("target", ["numpy", "cpu"])
def test_seed_changes_the_run_and_repeats_it(target):
    if target != "numpy":
        need(have("numba"), "numba")
    p1, l1, _ = run(1, target)
    p1b, l1b, _ = run(1, target)
    p2, l2, _ = run(2, target)
    assert l1 == l1b  # the same seed: the same batches, bit for bit
    for k in p1:
        np.testing.assert_array_equal(p1[k], p1b[k])
    # another seed: other batches, so other per-step losses and other final parameters
    assert l1 != l2
    assert any(not np.allclose(p1[k], p2[k], rtol=1e-6, atol=0) for k in p1)
