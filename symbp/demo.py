"""The demo: train a 64-128(tanh)-64(relu)-10 network on scikit-learn's 8×8 digits.

The digits ship inside scikit-learn (1,797 images, no download).  ``symbp demo`` calls
``run``; it trains with a progress bar and prints the test accuracy (≥ 97 %).
"""

from __future__ import annotations

import time

SIZES = [64, 128, 64, 10]
ACTIVATIONS = ["tanh", "relu"]


def digits(seed: int = 0):
    """(X_train, X_test, y_train, y_test): a stratified 75/25 split, pixels standardised
    with the training split's mean and standard deviation."""
    from sklearn.datasets import load_digits  # heavy: imported on use only
    from sklearn.model_selection import train_test_split

    d = load_digits()
    Xtr, Xte, ytr, yte = train_test_split(d.data / 16.0, d.target, test_size=0.25,
                                          random_state=seed, stratify=d.target)
    # + 0.1: border pixels that are always 0 stay 0 instead of dividing by 0
    mu, sd = Xtr.mean(axis=0), Xtr.std(axis=0) + 0.1
    return (Xtr - mu) / sd, (Xte - mu) / sd, ytr, yte


def default_target() -> str:
    """'cpu' when the Numba backend is importable, else the NumPy reference."""
    from .backends import backend
    from .errors import SymbpError

    try:
        backend("cpu")
    except SymbpError:
        return "numpy"
    return "cpu"


def run(epochs: int = 20, target: str | None = None, progress: bool = True,
        batch_size: int = 32, lr: float = 1e-3, seed: int = 0, verbose: bool = True) -> dict:
    """Train on the digits with Adam and return {'accuracy', 'loss', 'seconds',
    'target', 'history', 'model'}.

    ``accuracy`` and ``loss`` are measured on the held-out test quarter (450 images);
    ``seconds`` is the wall time of ``fit``, compilation included.
    """
    from . import nn, optim, train

    target = target or default_target()
    Xtr, Xte, ytr, yte = digits(seed)
    model = nn.mlp(SIZES, activations=ACTIVATIONS, loss="softmax_ce", seed=seed)
    if verbose:
        print(f"symbp demo: {' -> '.join(model.layers)} on {len(Xtr)} digits, target {target!r}")
    t0 = time.perf_counter()
    hist = train.fit(model, Xtr, ytr, epochs=epochs, batch_size=batch_size,
                     optimizer=optim.Adam(lr), target=target, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0  # compile included
    test = train.evaluate(model, Xte, yte, target=target)
    if verbose:
        print(f"test accuracy {test['accuracy']:.2%} on {len(Xte)} digits "
              f"(test loss {test['loss']:.4f}); {seconds:.1f} s including compilation")
    return {"accuracy": test["accuracy"], "loss": test["loss"], "seconds": seconds,
            "target": target, "history": hist, "model": model}
