"""The function library, written as a table of derivatives.

One class per function: its row.  Everything symbp knows about a function is read from
its row, so defining the class is all it takes to add one:

- ``formula``: the value in SymPy primitives (the independent reference the tests
  differentiate with ``sympy.diff``);
- ``fdiff``: the derivative, in terms of the function's own value where that is shorter
  (``sigmoid' = y(1 - y)``), so ``sympy.diff`` and ``symbp.grad`` both use it;
- ``rule``: the value as every backend computes it, a SymPy expression in a numerically
  stable form (``softplus = max(x, 0) + log1p(e^-|x|)``); each backend prints it with
  its own printer.  A row without one prints its ``formula``;
- ``latex_name``, ``text``: how it typesets and how plain text names it;
- ``init``: the weight initialisation a layer feeding it wants ('he', 'lecun', 'glorot');
- ``cost``: the per-entry cost of one call in a compiled loop (``backends.numba_cpu``);
- its arguments, read from ``__new__``'s signature (defaults make them optional) and
  ``nargs``: the parser's arity and the CLI's help line.

Called on a matrix expression, every function applies entry by entry (an
``Elementwise`` map); parameters such as PReLU's slope may be scalars or (1, C) rows,
one per unit.  A user's own formula (``x*sigmoid(x)``) needs nothing registered.

Conventions at kinks, chosen as PyTorch chooses: relu'(0) = 0, leaky_relu'(0) = alpha,
elu'(0) = alpha (the x > 0 branch is strict everywhere).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable, Mapping

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from .errors import ShapeError, SymbpError
from .matrix import (
    Elementwise,
    LogSoftmax,
    Softmax,
    SoftmaxCrossEntropy,
    Total,
    array_symbol,
    elementwise,
    is_matrix,
    placeholders,
    same_dim,
)

__all__ = [
    "Activation", "sigmoid", "relu", "leaky_relu", "prelu", "rrelu", "softplus", "elu",
    "selu", "gelu", "gelu_tanh", "silu", "identity", "tanh", "exp", "log", "step",
    "softmax", "log_softmax", "dense", "fill", "elementwise", "mse", "binary_cross_entropy",
    "bce_with_logits", "cross_entropy", "softmax_cross_entropy", "random_slopes", "FUNCTIONS",
    "ROWS", "bce",
]


def step(x):
    """Heaviside step with step(0) = 0: the derivative of relu."""
    return sp.Heaviside(x, 0)


# Every row by name (the backends print a row's code from here), and the functions a user
# may name: the parser, the layers of ``nn``, the plots, the CLI and the tests read this
# table.  A row enters both when its class is defined.
ROWS: dict[str, type] = {}
FUNCTIONS: dict = {}


class Activation(sp.Function):
    """Base of symbp's function rows: elementwise on matrices, numeric on numbers."""

    latex_name = r"\operatorname{f}"
    text: str  # its plain-text name; the class name unless the row sets one
    # the weights feeding it: 'he' (variance 2/fan_in) keeps the variance of a ReLU-like
    # function's output, which zeroes about half its inputs; 'lecun' (1/fan_in) SELU's
    init = "glorot"
    cost = 20  # a libm call: ~5 ns an entry, against ~0.25 ns for vectorised arithmetic
    listed = True  # False: a row the user reaches through another name (bce)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.text = cls.__dict__.get("text", cls.__name__)
        ROWS[cls.__name__] = cls
        if cls.__dict__.get("listed", True):
            FUNCTIONS[cls.__name__] = cls

    def __new__(cls, *args, **kwargs):
        args = [sp.sympify(a) for a in args]
        if any(is_matrix(a) for a in args):
            return elementwise(lambda *v: cls(*v), *args)
        return super().__new__(cls, *args, **kwargs)

    @classmethod
    def eval(cls, *args):
        # Numbers in, number out: sigmoid(0) = 1/2, relu(-3) = 0.
        if all(a.is_Number for a in args):
            value = cls.formula(*args)
            return value.evalf() if any(a.is_Float for a in args) else value

    @staticmethod
    def formula(*args):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    rule = None  # a staticmethod like formula where the formula is unstable as written

    def expand_formula(self):
        return type(self).formula(*self.args)

    def expand_rule(self):
        """The value as code computes it: the row's ``rule``, else its ``formula``."""
        return code(type(self))(*self.args)

    def _eval_evalf(self, prec):
        return self.expand_formula()._eval_evalf(prec)

    def _numpycode(self, printer):
        return printer._print(self.expand_rule())

    def _eval_is_real(self):
        return all(a.is_real for a in self.args) or None

    def _latex(self, printer, exp=None):
        args = ", ".join(printer._print(a) for a in self.args)
        tex = r"%s\left(%s\right)" % (self.latex_name, args)
        return tex if exp is None else r"%s^{%s}" % (tex, exp)


def parameters(f) -> list[str]:
    """The names of the positional arguments of function ``f``, as its row spells them."""
    if isinstance(f, type) and issubclass(f, Activation):
        if f.__new__ is Activation.__new__:  # no defaults to fill in: formula's arguments
            return list(inspect.signature(f.formula).parameters)
        # __new__(cls, x, alpha=...), past cls; up to nargs (gelu's `approximate` is none)
        return list(inspect.signature(f.__new__).parameters)[1:max(f.nargs) + 1]
    return [n for n, p in inspect.signature(f).parameters.items()
            if p.kind is p.POSITIONAL_OR_KEYWORD][:getattr(f, "arity", (0, 99))[1]]


def arity(f) -> tuple[int, int]:
    """(least, most) positional arguments of function ``f``: those without a default are
    needed; a function may set ``arity`` itself."""
    if hasattr(f, "arity"):
        return f.arity
    if isinstance(f, type) and issubclass(f, Activation) and f.__new__ is Activation.__new__:
        return min(f.nargs), max(f.nargs)
    sig = inspect.signature(f.__new__ if isinstance(f, type) else f).parameters
    names = parameters(f)
    return sum(sig[n].default is inspect.Parameter.empty for n in names), len(names)


def usage(name: str, f) -> str:
    """How help lists function ``f``: ``sigmoid``, ``leaky_relu(x, alpha)``."""
    names = parameters(f)
    return name if len(names) == 1 else f"{name}({', '.join(names)})"


@functools.cache
def code(row) -> Callable:
    """What code computes for ``row``: its ``rule``, else its ``formula``.  A row whose code
    calls itself, directly or through other rows, is refused: its routine would never end."""
    _no_cycle(row, ())
    return row.rule or row.formula


def _no_cycle(row, path):
    if row in path:
        chain = " -> ".join(r.__name__ for r in (*path, row))
        raise SymbpError(f"the rule of {row.__name__} calls itself ({chain}): write it in "
                         "other functions")
    value = (row.rule or row.formula)(*[sp.Symbol(n, real=True) for n in parameters(row)])
    for f in {type(a) for a in value.atoms(Activation)}:
        _no_cycle(f, (*path, row))


class RowTable(Mapping):
    """Row name -> one attribute of that row, read when asked (rows defined later too)."""

    def __init__(self, attribute: str):
        self.attribute = attribute

    def __getitem__(self, name):
        return getattr(ROWS[name], self.attribute)

    def __iter__(self):
        return iter(list(ROWS))

    def __len__(self):
        return len(ROWS)


class sigmoid(Activation):
    r"""σ(x) = 1/(1 + e^{-x}); σ'(x) = σ(1 − σ) ≤ 1/4, so deep sigmoid stacks vanish."""

    latex_name, text = r"\sigma", "σ"
    nargs = 1

    @staticmethod
    def formula(x):
        return 1 / (1 + sp.exp(-x))

    @staticmethod
    def rule(x):
        # e = e^-|x| never overflows: 1/(1 + e) for x >= 0, e/(1 + e) below (NaN too)
        e = sp.exp(-sp.Abs(x))
        return sp.Piecewise((1, x >= 0), (e, True)) / (1 + e)

    def fdiff(self, argindex=1):
        return self * (1 - self)


class relu(Activation):
    """max(0, x); relu'(x) = step(x), with relu'(0) = 0."""

    latex_name, text, init = r"\operatorname{ReLU}", "ReLU", "he"
    nargs = 1
    cost = 1  # a compare and a select, as cheap as arithmetic in a vector loop

    @staticmethod
    def formula(x):
        return sp.Max(0, x)

    @staticmethod
    def rule(x):
        # one compare and one select, no call (Max prints as a routine); NaN falls to x
        return sp.Piecewise((0, x <= 0), (x, True))

    def fdiff(self, argindex=1):
        # step(relu(x)) == step(x) everywhere (0 at the kink too), and in terms of the
        # node's own value the reverse pass reads y, not x: x need not be kept in memory
        return step(self)


class leaky_relu(Activation):
    """x for x > 0, αx otherwise; the derivative at 0 is α.

    The slope ``alpha`` may be a number, a Symbol, or a (1, C) MatrixSymbol (one per unit).
    """

    latex_name, text, init = r"\operatorname{LeakyReLU}", "LeakyReLU", "he"
    nargs = 2
    cost = 1  # a compare and a select

    def __new__(cls, x, alpha=sp.Rational(1, 100)):
        return super().__new__(cls, x, alpha)

    @staticmethod
    def formula(x, a):
        return sp.Piecewise((x, x > 0), (a * x, True))

    def fdiff(self, argindex=1):
        x, a = self.args
        if argindex == 1:
            return sp.Piecewise((1, x > 0), (a, True))
        return sp.Piecewise((0, x > 0), (x, True))  # d/dα: the negative part


class prelu(leaky_relu):
    """Parametric ReLU: a leaky ReLU whose slope ``alpha`` is a learned parameter."""

    latex_name, text = r"\operatorname{PReLU}", "PReLU"

    def __new__(cls, x, alpha):
        return super().__new__(cls, x, alpha)


# Names of rrelu's random slope inputs -> (lower, upper); read by the training loop.
_RANDOM_SLOPES: dict[str, tuple[float, float]] = {}


def rrelu(x, lower=sp.Rational(1, 8), upper=sp.Rational(1, 3), name: str | None = None):
    """Randomized ReLU: a leaky ReLU whose slope is random while training.

    Symbolically the slope is a *random input*: a Symbol (for scalar ``x``) or a
    MatrixSymbol of ``x``'s shape (one slope per entry) named ``rrelu_<id>``.  The
    expression is ``leaky_relu(x, a)``; the training loop draws ``a ~ U(lower, upper)``
    afresh at every step and sets it to the mean ``(lower + upper)/2`` at evaluation
    (``symbp.functions.random_slopes`` lists the bounds).  Derivatives are exact for each
    drawn slope.
    """
    x = sp.sympify(x)
    if name is None:
        name = "rrelu_" + hashlib.sha1(sp.srepr(x).encode()).hexdigest()[:6]
    _RANDOM_SLOPES[name] = (float(lower), float(upper))
    # one slope per entry, of x's shape: a matrix, or a batch of images after a convolution
    a = array_symbol(name, x.shape) if is_matrix(x) else sp.Symbol(name, real=True)
    return leaky_relu(x, a)


rrelu.init, rrelu.arity = "he", (1, 3)  # a leaky ReLU; `name` is no argument of a formula


def random_slopes() -> dict[str, tuple[float, float]]:
    """Names of the random slope inputs made by ``rrelu``, with their (lower, upper)."""
    return dict(_RANDOM_SLOPES)


class softplus(Activation):
    """log(1 + e^x), a smooth relu; softplus' = σ."""

    latex_name = r"\operatorname{softplus}"
    nargs = 1

    @staticmethod
    def formula(x):
        return sp.log(1 + sp.exp(x))

    @staticmethod
    def rule(x):
        # max(x, 0) + log1p(e^-|x|): finite for every finite x (e^x overflows from x ≈ 710),
        # NaN for NaN; the max as a select (Max prints as a routine call)
        return sp.Piecewise((x, x > 0), (0, True)) + log1p(sp.exp(-sp.Abs(x)))

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


class elu(Activation):
    """x for x > 0, α(e^x − 1) otherwise; below 0 the derivative is y + α."""

    latex_name, text, init = r"\operatorname{ELU}", "ELU", "he"
    nargs = 2

    def __new__(cls, x, alpha=1):
        return super().__new__(cls, x, alpha)

    @staticmethod
    def formula(x, a):
        return sp.Piecewise((x, x > 0), (a * (sp.exp(x) - 1), True))

    @staticmethod
    def rule(x, a):
        # expm1 keeps α(e^x − 1) accurate near 0; of −|x| (= x where taken): NumPy computes
        # the branch not taken too, and e^x must not overflow there
        return sp.Piecewise((x, x > 0), (a * expm1(-sp.Abs(x)), True))

    def fdiff(self, argindex=1):
        x, a = self.args
        if argindex == 1:
            return sp.Piecewise((1, x > 0), (self + a, True))
        return sp.Piecewise((0, x > 0), (sp.exp(x) - 1, True))


SELU_ALPHA = sp.Float("1.6732632423543772848170429916717")
SELU_SCALE = sp.Float("1.0507009873554804934193349852946")


class selu(Activation):
    """Scaled ELU, λ·elu(x, α) with the self-normalising constants of Klambauer et al."""

    latex_name, text, init = r"\operatorname{SELU}", "SELU", "lecun"
    nargs = 1

    @staticmethod
    def formula(x):
        return SELU_SCALE * sp.Piecewise((x, x > 0), (SELU_ALPHA * (sp.exp(x) - 1), True))

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sp.Piecewise((SELU_SCALE, x > 0), (self + SELU_SCALE * SELU_ALPHA, True))


class gelu(Activation):
    """x·Φ(x) with the exact normal CDF Φ(x) = (1 + erf(x/√2))/2."""

    latex_name, text, init = r"\operatorname{GELU}", "GELU", "he"
    nargs = 1

    def __new__(cls, x, approximate: str = "none"):
        if approximate == "tanh":
            return gelu_tanh(x)
        if approximate != "none":
            raise ValueError(f"gelu: approximate must be 'none' or 'tanh', not {approximate!r}")
        return super().__new__(cls, x)

    @staticmethod
    def formula(x):
        return x * (1 + sp.erf(x / sp.sqrt(2))) / 2

    def fdiff(self, argindex=1):
        x = self.args[0]
        return (1 + sp.erf(x / sp.sqrt(2))) / 2 + x * sp.exp(-(x**2) / 2) / sp.sqrt(2 * sp.pi)


class gelu_tanh(Activation):
    """GELU's tanh approximation, ½x(1 + tanh(√(2/π)(x + 0.044715x³)))."""

    latex_name, text, init = r"\operatorname{GELU}_{\tanh}", "GELU_tanh", "he"
    nargs = 1

    @staticmethod
    def formula(x):
        u = sp.sqrt(2 / sp.pi) * (x + sp.Float("0.044715") * x**3)
        return x * (1 + sp.tanh(u)) / 2

    def fdiff(self, argindex=1):
        x = self.args[0]
        u = sp.sqrt(2 / sp.pi) * (x + sp.Float("0.044715") * x**3)
        du = sp.sqrt(2 / sp.pi) * (1 + 3 * sp.Float("0.044715") * x**2)
        t = sp.tanh(u)
        return (1 + t) / 2 + x * (1 - t**2) * du / 2


class silu(Activation):
    """x·σ(x) (swish); silu' = σ(x)(1 + x(1 − σ(x)))."""

    latex_name, text, init = r"\operatorname{SiLU}", "SiLU", "he"
    nargs = 1

    @staticmethod
    def formula(x):
        return x / (1 + sp.exp(-x))

    def fdiff(self, argindex=1):
        x = self.args[0]
        s = sigmoid(x)
        return s * (1 + x * (1 - s))


swish = silu
FUNCTIONS["swish"] = silu


def identity(x):
    """The identity activation (a linear layer)."""
    return sp.sympify(x)


def _lift(f, doc):
    def apply(x):
        x = sp.sympify(x)
        return elementwise(f, x) if is_matrix(x) else f(x)

    apply.__name__, apply.__doc__ = f.__name__, doc
    return apply


tanh = _lift(sp.tanh, "tanh, elementwise on matrices; tanh' = 1 − y².")
exp = _lift(sp.exp, "e^x, elementwise on matrices; exp' = y.")
log = _lift(sp.log, "Natural log, elementwise on matrices; log' = 1/x.")
FUNCTIONS.update(tanh=tanh, rrelu=rrelu, identity=identity)


# --- row-wise output layers -------------------------------------------------------------


def softmax(Z):
    """Row-wise softmax of an N×C matrix expression (a list of scalars: their softmax)."""
    if isinstance(Z, (list, tuple)) or (isinstance(Z, sp.MatrixBase)):
        zs = [sp.sympify(z) for z in Z]
        total = sp.Add(*[sp.exp(z) for z in zs])
        return [sp.exp(z) / total for z in zs]
    return Softmax(Z)


def log_softmax(Z):
    """Row-wise log-softmax, computed stably as Z − logsumexp(Z)."""
    if isinstance(Z, (list, tuple)) or (isinstance(Z, sp.MatrixBase)):
        zs = [sp.sympify(z) for z in Z]
        lse = sp.log(sp.Add(*[sp.exp(z) for z in zs]))
        return [z - lse for z in zs]
    return LogSoftmax(Z)


def dense(X, W, b=None):
    """The affine layer ``X*W + 1·b`` (``1`` a column of ones, so b is added to each row).

    ``b`` is a 1×C row (one bias per unit) or a scalar (a Symbol or a number, one bias
    for every entry; its gradient is the sum of the adjoint over all entries).
    """
    if not (is_matrix(X) and is_matrix(W)):
        raise ShapeError(f"dense needs matrices X and W, got {X} and {W}")
    if not same_dim(X.shape[1], W.shape[0]):
        raise ShapeError(
            f"dense: X*W needs X's columns to match W's rows: {X} is {X.shape}, "
            f"{W} is {W.shape}"
        )
    Z = X * W
    if b is None:
        return Z
    if not is_matrix(b):  # a scalar bias: one map, Z + b entry by entry
        return elementwise(lambda z, c: z + c, Z, _scalar_arg("dense", "bias", b))
    if not (is_matrix(b) and b.shape[0] == 1 and same_dim(b.shape[1], W.shape[1])):
        raise ShapeError(f"dense: bias {b} must be 1×{W.shape[1]}, got {getattr(b, 'shape', b)}")
    return Z + sp.OneMatrix(X.shape[0], 1) * b


def fill(c, like):
    """The matrix whose every entry is the scalar ``c``, shaped like ``like``.

    ``like`` is a matrix expression or a shape ``(rows, cols)``.  SymPy refuses a scalar
    beside a matrix (``Z + 1``: "Mix of Matrix and Scalar symbols"); ``Z + fill(1, Z)``
    adds it to every entry, ``X*w + fill(b, X*w)`` broadcasts a scalar bias.  As a map
    of one scalar operand it lowers to a broadcast, and the gradient of ``c`` is the sum
    of the adjoint over all entries.
    """
    c = _scalar_arg("fill", "value", c)
    shape = tuple(like.shape) if is_matrix(like) else tuple(like)
    if len(shape) != 2:
        raise ShapeError(f"fill: give a matrix expression or a shape (rows, cols), not {like}")
    v = placeholders(1)
    return Elementwise(sp.Lambda(v, v[0]), shape, c)


def _scalar_arg(func, what, given):
    try:
        c = sp.sympify(given, strict=True)
    except sp.SympifyError:
        c = None
    if not isinstance(c, sp.Expr) or is_matrix(c):
        raise ShapeError(f"{func}: the {what} must be a scalar (a Symbol or a number), "
                         f"got {given!r}")
    return c


# --- losses: PyTorch's default reductions ---------------------------------------------------


def _check_pair(name, Y, T):
    if is_matrix(Y) != is_matrix(T):
        raise ShapeError(f"{name}: prediction {Y} and target {T} must both be matrices or scalars")
    if is_matrix(Y) and not all(same_dim(a, b) for a, b in zip(Y.shape, T.shape)):
        raise ShapeError(f"{name}: prediction {Y} is {Y.shape} but target {T} is {T.shape}")


def _mean(E):
    return Total(E) / (E.shape[0] * E.shape[1]) if is_matrix(E) else E


def mse(Y, T):
    """Mean squared error over all entries."""
    _check_pair("mse", Y, T)
    sq = lambda y, t: (y - t) ** 2  # noqa: E731
    return _mean(elementwise(sq, Y, T) if is_matrix(Y) else sq(Y, T))


# PyTorch's guards for cross-entropy from probabilities: logs clamped at -100 so p = 0 or
# 1 gives a finite loss, and the derivative's denominator p(1 − p) kept >= 1e-12.
LOG_FLOOR, BCE_EPS = sp.Integer(-100), sp.Float(1e-12)


class bce(Activation):
    """Binary cross-entropy of one probability p against target t, logs clamped at -100.

    Primitive for numerical safety: the textbook −(t log p + (1 − t) log(1 − p)) is
    0·(−∞) = NaN at p = 0 or 1, and its derivative (p − t)/(p(1 − p)) divides by 0.
    The guards are Max() in the formula itself, so every backend prints it as is.
    """

    latex_name = r"\operatorname{BCE}"
    nargs = 2
    listed = False  # binary_cross_entropy's entries, not an activation

    @staticmethod
    def formula(p, t):
        return -(t * sp.Max(sp.log(p), LOG_FLOOR) + (1 - t) * sp.Max(sp.log(1 - p), LOG_FLOOR))

    def fdiff(self, argindex=1):
        p, t = self.args
        if argindex == 1:  # (p − t)/(p(1 − p)), denominator floored as PyTorch does
            return (p - t) / sp.Max(p * (1 - p), BCE_EPS)
        return sp.Max(sp.log(1 - p), LOG_FLOOR) - sp.Max(sp.log(p), LOG_FLOOR)


def binary_cross_entropy(P, T):
    """−mean(t log p + (1 − t) log(1 − p)) from probabilities P (logs clamped at -100)."""
    _check_pair("binary_cross_entropy", P, T)
    return _mean(elementwise(bce, P, T) if is_matrix(P) else bce(P, T))


def bce_with_logits(Z, T):
    """Binary cross-entropy from logits, mean(softplus(z) − t z): stable for any z."""
    _check_pair("bce_with_logits", Z, T)
    f = lambda z, t: softplus(z) - t * z  # noqa: E731
    return _mean(elementwise(f, Z, T) if is_matrix(Z) else f(Z, T))


def cross_entropy(P, T):
    """−Σ_c T log P summed over classes, averaged over rows, from probabilities P.

    ``cross_entropy(softmax(Z), T)`` becomes ``softmax_cross_entropy(Z, T)``: the same
    value for every T, computed stably, with gradient (Y ⊙ T𝟏 − T)/N on the logits
    (the textbook (Y − T)/N where every row of T sums to 1).
    """
    if isinstance(P, Softmax):
        return softmax_cross_entropy(P.args[0], T)
    _check_pair("cross_entropy", P, T)
    if not is_matrix(P):
        return -T * sp.log(P)
    return -Total(elementwise(lambda p, t: t * sp.log(p), P, T)) / P.shape[0]


def softmax_cross_entropy(Z, T):
    """−Σ T log softmax(Z) / N from logits Z (log-sum-exp, stable), for every target T:
    one-hot, soft, label-smoothed, masked (all-zero) or unnormalised rows."""
    _check_pair("softmax_cross_entropy", Z, T)
    return SoftmaxCrossEntropy(Z, T)
