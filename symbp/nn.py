"""Layers and models: build a network's SymPy expression and initialise its parameters.

A model is plain data: the loss (a scalar SymPy expression), the prediction expression,
the parameters (name -> array, seeded initialisation) and the data symbols ``X``, ``T``
and any random inputs (RReLU slopes).  ``symbp.train`` compiles and drives it; nothing
here runs numbers through the network.

    model = nn.mlp([64, 128, 64, 10], activations=["tanh", "relu"], loss="softmax_ce")
    model = nn.Sequential([nn.Dense(128, "tanh"), nn.Dense(64), nn.PReLU(), nn.Dense(10)],
                          inputs=64, loss="softmax_ce")
    model = nn.Sequential([nn.conv2d(16, 3, padding=1, activation="relu"), nn.max_pool2d(2),
                           nn.flatten(), nn.Dense(10)], inputs=(1, 8, 8))

A layer maps the shape of one sample to the next: an int for a row of features, a tuple
(C, H, W) for an image of C channels (the batch is N×C×H×W).  The convolution and
pooling layers read images, ``Dense`` reads rows; ``Flatten`` turns the one into the
other.

Initialisation: Glorot/Xavier uniform, U(±√(6/(fan_in + fan_out))), before sigmoid-like
activations and linear outputs; He normal, N(0, 2/fan_in), before the relu family
(their half-zero output halves the variance, He et al. 2015); LeCun normal before SELU.
A convolution's fans count the window: fan_in = C·kh·kw, fan_out = F·kh·kw (each input
entry meets F·kh·kw weights), as PyTorch and Keras count them.  Biases start at 0, PReLU
slopes at 0.25.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import sympy as sp

from . import functions as F
from .errors import SymbpError
from .heads.conv import conv2d as _conv2d
from .heads.conv import integer
from .heads.pool import avg_pool2d as _avg_pool2d
from .heads.pool import max_pool2d as _max_pool2d
from .heads.shape import flatten as _flatten
from .matrix import array_symbol, elementwise

LOSSES = {
    # name: (metric, link from logits to prediction)
    "softmax_ce": ("argmax", "softmax"),
    "bce": ("threshold", "sigmoid"),
    "mse": (None, None),
}
ALIASES = {"ce": "softmax_ce", "cross_entropy": "softmax_ce",
           "softmax_cross_entropy": "softmax_ce", "bce_with_logits": "bce",
           "binary_cross_entropy": "bce"}


@dataclass
class Model:
    """A network ready to train: expressions, parameters and the names of its data.

    ``loss`` is the scalar training loss of the batch ``X`` (N×inputs, or N×C×H×W
    images) against ``T``;
    ``output`` the last layer's value (logits for 'softmax_ce' and 'bce');
    ``prediction`` what ``predict`` returns (probabilities for the classification losses);
    ``params`` maps each parameter's name to its array, in the order of ``wrt``;
    ``random`` maps each RReLU slope input to its (lower, upper) bounds and width.
    """

    loss: sp.Expr
    output: sp.MatrixExpr
    prediction: sp.MatrixExpr
    params: dict
    wrt: list
    X: sp.MatrixSymbol  # a Tensor for images
    T: sp.MatrixSymbol
    N: sp.Symbol
    loss_name: str
    metric: str | None = None
    random: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def data_names(self) -> list[str]:
        """Names of the non-parameter inputs: X, T and the random slopes."""
        return [self.X.name, self.T.name, *self.random]

    def targets(self, y) -> np.ndarray:
        """The array bound to ``T``: one-hot rows for 'softmax_ce' from integer labels."""
        y = np.asarray(y)
        C = self.T.shape[1]
        if self.loss_name == "softmax_ce" and y.ndim == 1:
            if y.dtype.kind not in "iub" or (y.size and (y.min() < 0 or y.max() >= C)):
                raise SymbpError(
                    f"softmax_ce needs integer class labels in 0..{C - 1} (or one-hot rows); "
                    f"got {y.dtype} labels" + (f" from {y.min()} to {y.max()}" if y.size else "")
                )
            return np.eye(C)[y]
        if y.ndim == 1 and C == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[1] != C:
            raise SymbpError(f"targets must have {C} column(s), got shape {y.shape}")
        return y

    def accuracy(self, pred: np.ndarray, y) -> float | None:
        """Fraction of rows classified right from ``prediction`` values (None: no metric)."""
        y = np.asarray(y)
        if self.metric == "argmax":
            labels = y.argmax(axis=1) if y.ndim == 2 else y
            return float(np.mean(pred.argmax(axis=1) == labels))
        if self.metric == "threshold":
            return float(np.mean((pred > 0.5) == (self.targets(y) > 0.5)))
        return None

    @property
    def sample_shape(self) -> tuple:
        """The shape of one sample of ``X``: (inputs,) for rows, (C, H, W) for images."""
        return tuple(int(d) if sp.sympify(d).is_Integer else d for d in self.X.shape[1:])

    def slopes(self, n: int, dtype, rng: np.random.Generator | None = None) -> dict:
        """RReLU slope arrays for a batch of ``n`` rows: drawn from U(lower, upper) when
        ``rng`` is given (training), the mean (lower + upper)/2 otherwise (evaluation)."""
        out = {}
        for name, (lo, hi, width) in self.random.items():
            shape = (n, *_dims(width))
            if rng is None:
                out[name] = np.full(shape, (lo + hi) / 2, dtype=dtype)
            else:
                out[name] = rng.uniform(lo, hi, size=shape).astype(dtype, copy=False)
        return out

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k} {v.shape}" for k, v in self.params.items())
        return f"Model({' -> '.join(self.layers)}; loss {self.loss_name}; params {sizes})"


# --- layers ----------------------------------------------------------------------------


class _Builder:
    """What layers share while a model is built: the rng, parameters, names."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.params, self.symbols, self.random = rng, {}, [], {}
        self.count: dict[str, int] = {}
        self.layers: list[str] = []

    def layer(self) -> int:
        """The number of the next layer with weights: its W, K and b are named by it."""
        self.count["layer"] = self.count.get("layer", 0) + 1
        return self.count["layer"]

    def name(self, prefix: str) -> str:
        self.count[prefix] = self.count.get(prefix, 0) + 1
        return f"{prefix}{self.count[prefix]}"

    def param(self, name: str, shape: tuple, value: np.ndarray) -> sp.MatrixSymbol:
        s = array_symbol(name, shape)  # a MatrixSymbol, or a Tensor of another rank
        self.symbols.append(s)
        self.params[name] = np.ascontiguousarray(value, dtype=np.float64)
        return s


@dataclass
class Dense:
    """The affine layer ``H W + 1 b`` of ``units`` outputs, then ``activation`` if given.

    ``init``: 'glorot', 'he', 'lecun' or None (chosen from the activation that follows).
    """

    units: int
    activation: str | Callable | None = None
    bias: bool = True
    init: str | None = None

    def build(self, H, width: int, b: _Builder, after=None):
        if not isinstance(width, int):
            raise SymbpError(f"Dense({self.units}) reads rows of features, but the layer before "
                             f"it gives images of shape {width}: put nn.flatten() before it")
        k = b.layer()
        init = self.init or _init_for(self.activation if self.activation is not None else after)
        W = b.param(f"W{k}", (width, self.units), _draw(init, b.rng, width, self.units))
        bias = b.param(f"b{k}", (1, self.units), np.zeros((1, self.units))) if self.bias else None
        b.layers.append(f"Dense({self.units})")
        H = F.dense(H, W, bias)
        if self.activation is not None:
            H, _ = Activation(self.activation).build(H, self.units, b)
        return H, self.units


@dataclass
class Conv2d:
    """``filters`` convolutions of ``size``×``size`` windows over C×H×W images (PyTorch's
    cross-correlation, ``sb.conv2d``), one bias per filter, then ``activation`` if given.

    The kernel K is filters×C×size×size, the bias an F-vector; the output has shape
    (filters, H', W') with H' = ⌊(H + 2·padding − size)/stride⌋ + 1.  ``init`` as for
    ``Dense``, the fans counting the window (fan_in = C·size², fan_out = filters·size²).
    """

    filters: int
    size: int
    stride: int = 1
    padding: int = 0
    activation: str | Callable | None = None
    bias: bool = True
    init: str | None = None

    def build(self, H, width, b: _Builder, after=None):
        c, h, w = _image(width, f"Conv2d({self.filters}, {self.size})")
        f, kh = int(integer(self.filters, "Conv2d's filters", 1)), int(
            integer(self.size, "Conv2d's size", 1))
        s, p = int(integer(self.stride, "Conv2d's stride", 1)), int(
            integer(self.padding, "Conv2d's padding", 0))
        k = b.layer()
        init = self.init or _init_for(self.activation if self.activation is not None else after)
        shape = (f, c, kh, kh)
        # an output sums C·kh·kw products (fan_in); an input entry feeds F·kh·kw (fan_out)
        value = _draw(init, b.rng, c * kh * kh, f * kh * kh, shape=shape)
        K = b.param(f"K{k}", shape, value)
        bias = b.param(f"b{k}", (f,), np.zeros(f)) if self.bias else None
        H = _conv2d(H, K, bias, stride=s, padding=p)  # checks the window fits the image
        out = tuple(int(d) for d in H.shape[1:])
        b.layers.append(f"Conv2d({f}, {kh}×{kh}{_sp(s, p)})")
        if self.activation is not None:
            H, _ = Activation(self.activation).build(H, out, b)
        return H, out


@dataclass
class _Pool2d:
    size: int
    stride: int | None = None

    def build(self, H, width, b: _Builder, after=None):
        name = type(self).__name__
        _image(width, f"{name}({self.size})")
        H = self.pool(H, self.size, self.stride)
        b.layers.append(f"{name}({self.size}{_sp(self.stride, 0, self.size)})")
        return H, tuple(int(d) for d in H.shape[1:])


@dataclass
class MaxPool2d(_Pool2d):
    """The maximum of each ``size``×``size`` window of each channel (``sb.max_pool2d``);
    ``stride`` defaults to ``size`` (windows side by side)."""

    pool = staticmethod(_max_pool2d)


@dataclass
class AvgPool2d(_Pool2d):
    """The mean of each ``size``×``size`` window of each channel (``sb.avg_pool2d``);
    ``stride`` defaults to ``size``."""

    pool = staticmethod(_avg_pool2d)


@dataclass
class Flatten:
    """Images C×H×W as rows of C·H·W features, row-major (PyTorch's ``flatten(1)``), so
    that a ``Dense`` layer can follow."""

    def build(self, H, width, b: _Builder, after=None):
        if isinstance(width, int):
            return H, width  # rows already: nothing to do
        b.layers.append("Flatten")
        return _flatten(H), int(np.prod(width))


# The names of the issue and of symbp's heads: nn.conv2d(16, 3, padding=1) is a layer.
conv2d, max_pool2d, avg_pool2d, flatten = Conv2d, MaxPool2d, AvgPool2d, Flatten


def _image(width, who: str) -> tuple:
    if isinstance(width, int):
        raise SymbpError(f"{who} reads images C×H×W, but its input is a row of {width} "
                         "features: give Sequential(inputs=(C, H, W)) for images, and put no "
                         "Flatten or Dense before it")
    if len(width) != 3:
        raise SymbpError(f"{who} reads images C×H×W, got samples of shape {width}")
    return width


def _sp(stride, padding, default=1) -> str:
    """The stride and padding in a layer's label, where they are not the defaults."""
    parts = ([f"stride {stride}"] if stride not in (None, default) else []) + \
        ([f"pad {padding}"] if padding else [])
    return "".join(f", {x}" for x in parts)


def _dims(width) -> tuple:
    return (width,) if isinstance(width, int) else tuple(width)


@dataclass
class Activation:
    """An elementwise activation: a name from ``symbp.functions.FUNCTIONS`` or a callable
    taking a SymPy scalar and returning a formula (``lambda x: x*sb.sigmoid(x)``)."""

    fn: str | Callable

    def build(self, H, width: int, b: _Builder, after=None):
        if self.fn == "prelu":
            return PReLU().build(H, width, b)
        if self.fn == "rrelu":
            return RReLU().build(H, width, b)
        f = activation(self.fn)
        b.layers.append(_label(self.fn))
        return _apply(f, H), width


@dataclass
class PReLU:
    """Parametric ReLU: the negative slope α is learned, one per unit or one shared.

    A shared α is a 1×1 parameter (every parameter is an array the optimizer updates in
    place); a per-unit α is a 1×units row, broadcast down the batch; after a convolution
    ``per_unit`` means one α per channel, a 1×C×1×1 array (PyTorch's ``num_parameters=C``).
    """

    per_unit: bool = True
    init: float = 0.25

    def build(self, H, width, b: _Builder, after=None):
        if isinstance(width, int):
            shape = (1, width) if self.per_unit else (1, 1)
        else:  # one slope per channel, broadcast over the batch and the positions
            shape = (1, width[0], 1, 1) if self.per_unit else (1, 1, 1, 1)
        a = b.param(b.name("alpha"), shape, np.full(shape, self.init))
        b.layers.append("PReLU")
        return F.prelu(H, a), width


@dataclass
class RReLU:
    """Randomized ReLU: slopes drawn from U(lower, upper) per entry and step while
    training, the mean (lower + upper)/2 at evaluation (Xu et al. 2015)."""

    lower: float = 1 / 8
    upper: float = 1 / 3

    def build(self, H, width: int, b: _Builder, after=None):
        name = f"rrelu_{b.name('r')[1:]}"
        b.random[name] = (float(self.lower), float(self.upper), width)
        b.layers.append("RReLU")
        return F.rrelu(H, self.lower, self.upper, name=name), width


def activation(fn) -> Callable:
    """The scalar function for an activation name or callable (errors name the choices)."""
    if callable(fn):
        return fn
    if fn not in F.FUNCTIONS:
        raise SymbpError(
            f"unknown activation {fn!r}: choose one of {', '.join(sorted(F.FUNCTIONS))} "
            "or pass a callable formula such as lambda x: x*sb.sigmoid(x)"
        )
    if fn in ("prelu", "rrelu"):
        raise SymbpError(f"{fn} has parameters of its own: use the layer nn.PReLU() / nn.RReLU()")
    return F.FUNCTIONS[fn]


def _apply(f, H):
    # symbp's functions map matrices themselves; a user formula goes through a map.
    if isinstance(f, type) and issubclass(f, F.Activation) or f in (F.tanh, F.exp, F.log):
        return f(H)
    if f is F.identity:
        return H
    return elementwise(f, H)


def _label(fn) -> str:
    return fn if isinstance(fn, str) else getattr(fn, "__name__", "formula")


def _init_for(act) -> str:
    if isinstance(act, (PReLU, RReLU)):
        return "he"
    if isinstance(act, Activation):
        act = act.fn
    # a named function's row says which initialisation it wants; a formula gets Glorot's
    return getattr(F.FUNCTIONS.get(act), "init", "glorot") if isinstance(act, str) else "glorot"


def _draw(init: str, rng: np.random.Generator, fan_in: int, fan_out: int,
          shape: tuple | None = None) -> np.ndarray:
    shape = (fan_in, fan_out) if shape is None else shape
    if init == "glorot":
        a = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-a, a, size=shape)
    if init == "he":
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
    if init == "lecun":
        return rng.normal(0.0, np.sqrt(1.0 / fan_in), size=shape)
    raise SymbpError(f"unknown init {init!r}: use 'glorot', 'he' or 'lecun'")


class Sequential:
    """Layers applied in order to the batch ``X``, closed by a loss.

    ``inputs``: the width of a row (``X`` is N×inputs), or the shape (C, H, W) of an
    image (``X`` is N×C×H×W).  ``loss``: 'softmax_ce' (the last layer's output are logits;
    targets integer labels or one-hot rows), 'bce' (logits of independent sigmoids; 0/1
    targets) or 'mse'.  The last layer must give rows (``Flatten`` after images).
    """

    def __init__(self, layers: Sequence, inputs, loss: str = "softmax_ce",
                 seed: int = 0, metric: str | None = "default", batch: str = "N"):
        self.layers, self.inputs, self.seed = list(layers), _inputs(inputs), seed
        self.loss, self.metric, self.batch = loss, metric, batch

    def build(self) -> Model:
        loss = ALIASES.get(self.loss, self.loss)
        if loss not in LOSSES:
            raise SymbpError(
                f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)} "
                f"(or {', '.join(ALIASES)})"
            )
        N = sp.Symbol(self.batch, integer=True, positive=True)
        X = array_symbol("X", (N, *_dims(self.inputs)))
        b = _Builder(np.random.default_rng(self.seed))
        H, width = X, self.inputs
        for i, layer in enumerate(self.layers):
            after = self.layers[i + 1] if i + 1 < len(self.layers) else None
            H, width = layer.build(H, width, b, after=after)
        if not isinstance(width, int):
            raise SymbpError(f"the last layer gives images of shape {width}, but the loss "
                             "compares rows with the targets: end with nn.flatten() and a "
                             "Dense layer")
        T = sp.MatrixSymbol("T", N, width)
        metric, link = LOSSES[loss]
        if self.metric != "default":
            metric = self.metric
        L = {"softmax_ce": F.softmax_cross_entropy, "bce": F.bce_with_logits,
             "mse": F.mse}[loss](H, T)
        pred = {"softmax": F.softmax, "sigmoid": F.sigmoid, None: lambda Z: Z}[link](H)
        return Model(L, H, pred, b.params, b.symbols, X, T, N, loss, metric, b.random,
                     b.layers)


def _inputs(inputs):
    """``Sequential``'s inputs: an int (features) or a (C, H, W) tuple (images)."""
    if isinstance(inputs, (tuple, list)):
        shape = tuple(int(integer(d, "an input size", 1)) for d in inputs)
        if len(shape) == 1:
            return shape[0]
        if len(shape) != 3:
            raise SymbpError(f"inputs={tuple(inputs)}: give the width of a row (an int) or "
                             "the shape (C, H, W) of an image")
        return shape
    return int(inputs)


def mlp(sizes: Sequence[int], activations="tanh", loss: str = "softmax_ce",
        output=None, seed: int = 0, metric: str | None = "default") -> Model:
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]``.

    ``activations``: one per hidden layer, or a single one for all; each a name from
    ``symbp.functions.FUNCTIONS`` ('prelu' and 'rrelu' included) or a callable formula.
    ``output``: an activation after the last layer (for 'mse'; the classification losses
    take logits).  Parameters are W1, b1, W2, b2, ...
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2:
        raise SymbpError(f"mlp needs at least input and output sizes, got {sizes}")
    hidden = len(sizes) - 2
    acts = [activations] * hidden if isinstance(activations, str) or callable(activations) \
        else list(activations)
    if len(acts) != hidden:
        raise SymbpError(f"mlp {sizes} has {hidden} hidden layers but {len(acts)} activations")
    layers: list = []
    for units, act in zip(sizes[1:-1], acts):
        layers += [Dense(units), _layer_for(act)]
    layers.append(Dense(sizes[-1]))
    if output is not None:
        layers.append(_layer_for(output))
    return Sequential(layers, sizes[0], loss=loss, seed=seed, metric=metric).build()


def _layer_for(act):
    if act == "prelu":
        return PReLU()
    if act == "rrelu":
        return RReLU()
    activation(act)  # fail early with the list of names
    return Activation(act)

