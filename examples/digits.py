"""Handwritten digits (scikit-learn's bundled 8×8 images, no download): ≥ 97 % test accuracy.

A 64-128(tanh)-64(relu)-10 network, softmax cross-entropy, Adam lr 1e-3, batch 32,
standardised pixels (the setup of ``symbp demo``).
Uses the Numba 'cpu' target when it is available, the NumPy reference otherwise.

    python examples/digits.py [epochs]
"""

import sys

from symbp import demo

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
result = demo.run(epochs=epochs, progress=True)
model, hist = result["model"], result["history"]
print(f"per epoch: {1000 * sum(hist.time) / len(hist.time):.1f} ms; "
      f"final training loss {hist.loss[-1]:.4f}")
print(f"test accuracy {result['accuracy']:.2%}")
assert result["accuracy"] >= 0.97, "below the 97 % this example promises"
