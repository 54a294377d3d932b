"""A user's own activation, written as a formula: f(x) = x·σ(x) (swish/SiLU).

Nothing is registered: SymPy derives f', symbp compiles forward and backward, and the
network trains on the digits with the derived gradient.

    python examples/custom_activation.py
"""

import numpy as np
import sympy as sp

import symbp as sb
from symbp import demo, nn, train


def f(x):
    return x * sb.sigmoid(x)


x = sp.Symbol("x", real=True)
print("f(x)  =", f(x))
print("f'(x) =", sp.diff(f(x), x), "  (derived by SymPy from the formula)")

# The derived gradient against central differences on a small net with this activation.
small = nn.mlp([3, 4, 2], activations=[f], seed=1)
rng = np.random.default_rng(0)
arrays = {**small.params, "X": rng.normal(size=(5, 3)), "T": small.targets(rng.integers(0, 2, 5))}
print(sb.gradcheck(small.loss, small.wrt, arrays))

Xtr, Xte, ytr, yte = demo.digits()
model = nn.mlp([64, 64, 10], activations=[f], seed=0)
hist = train.fit(model, Xtr, ytr, epochs=20, batch_size=32, optimizer=sb.SGD(0.1),
                 target=demo.default_target(), progress=False)
test = train.evaluate(model, Xte, yte, target=demo.default_target())
print(f"digits with f(x) = x*sigmoid(x): training loss {hist.loss[0]:.3f} -> "
      f"{hist.loss[-1]:.3f}, test accuracy {test['accuracy']:.2%}")
