"""XOR with a 2-2-1 sigmoid network: the textbook case a single layer cannot learn.

Two sigmoid hidden units and a sigmoid output (binary cross-entropy on its logit),
full-batch momentum.  Some initialisations of a 2-2-1 net stall in a local minimum (about
1 seed in 10 here); seed 0 does not.

    python examples/xor.py
"""

import numpy as np

import symbp as sb
from symbp import nn, train

X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
y = np.array([0, 1, 1, 0])

model = nn.mlp([2, 2, 1], activations="sigmoid", loss="bce", seed=0)
hist = train.fit(model, X, y, epochs=2000, batch_size=4, optimizer=sb.Momentum(0.5),
                 dtype=np.float64, progress=False)
p = train.predict(model, X)
print(f"after {hist.steps} steps: loss {hist.loss[-1]:.5f}, accuracy {hist.accuracy[-1]:.0%}")
for x, t, q in zip(X, y, p[:, 0]):
    print(f"  {x[0]:.0f} xor {x[1]:.0f} = {t}   network: {q:.4f}")
assert hist.accuracy[-1] == 1.0, "XOR not learned"
