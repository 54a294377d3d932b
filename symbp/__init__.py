"""symbp: a symbolic-to-numeric differentiation compiler.

Write a network as a SymPy expression; symbp applies the chain rule in reverse order over
its graph (ordered derivatives) and lowers forward and gradient code to NumPy or Numba.
Importing symbp loads SymPy and NumPy only; backends load on first use.
"""

from .api import (
    Compiled,
    Forward,
    GradcheckResult,
    Step,
    compile,
    compile_forward,
    compile_step,
    grad,
    gradcheck,
    gradient_program,
)
from .errors import InputError, ShapeError, SymbpError, TrainingError, UnsupportedError
from .functions import (
    bce_with_logits,
    binary_cross_entropy,
    cross_entropy,
    dense,
    elementwise,
    elu,
    exp,
    fill,
    gelu,
    gelu_tanh,
    identity,
    leaky_relu,
    log,
    log_softmax,
    mse,
    prelu,
    relu,
    rrelu,
    selu,
    sigmoid,
    silu,
    softmax,
    softmax_cross_entropy,
    softplus,
    step,
    swish,
    tanh,
)
from .heads.conv import conv2d
from .heads.pool import avg_pool2d, max_pool2d
from .heads.shape import Reshape, flatten, reshape
from .ir import Program, lower, verify
from .matrix import AxisSum, Constant, Elementwise, Tensor, Total, tensor
from .optim import SGD, Adam, Momentum

__version__ = "0.1.0"

__all__ = [
    "Compiled", "Forward", "GradcheckResult", "Step", "compile", "compile_forward",
    "compile_step", "grad", "gradcheck", "gradient_program", "SGD", "Adam", "Momentum",
    "InputError", "ShapeError", "SymbpError", "TrainingError", "UnsupportedError",
    "bce_with_logits", "binary_cross_entropy", "cross_entropy", "dense", "elementwise", "elu",
    "exp", "fill",
    "gelu", "gelu_tanh", "identity", "leaky_relu", "log", "log_softmax", "mse", "prelu",
    "relu", "rrelu", "selu", "sigmoid", "silu", "softmax", "softmax_cross_entropy",
    "softplus", "step", "swish", "tanh", "Program", "lower", "verify", "AxisSum",
    "Constant", "Elementwise", "Total", "Tensor", "tensor", "Reshape", "flatten", "reshape",
    "conv2d", "max_pool2d", "avg_pool2d",
]


def __getattr__(name):
    # sb.derive / sb.matrix_formulas load symbp.printing on first use (SymPy only)
    if name in ("derive", "matrix_formulas"):
        from . import printing

        return getattr(printing, name)
    raise AttributeError(f"module 'symbp' has no attribute {name!r}")
