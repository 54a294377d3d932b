"""The NumPy reference backend: one line of NumPy per assignment, nothing fused.

It exists to be obviously right.  It shares no printer code with the Numba backends, so
a printer bug cannot hide on both sides of a test.  symbp's functions print their rows'
stable ``rule`` inline, with SciPy's rules; log-softmax goes through log-sum-exp: both keep
it finite for large inputs.
"""

from __future__ import annotations

import linecache

import numpy
import scipy.special
import sympy as sp
from sympy.printing.numpy import SciPyPrinter

from ..heads import require, rule
from ..ir import Program
from . import Kernel, identifiers

# The routines of the row-wise heads and of broadcasting.
HELPERS = '''
def _log_softmax(z):
    m = numpy.max(z, axis=1, keepdims=True)
    return z - m - numpy.log(numpy.sum(numpy.exp(z - m), axis=1, keepdims=True))

def _softmax(z):
    e = numpy.exp(z - numpy.max(z, axis=1, keepdims=True))
    return e / numpy.sum(e, axis=1, keepdims=True)

def _sce(z, t):
    # the definition itself, -Σ t log softmax(z) / N: right for every t, rows summing to 1 or not
    return -numpy.sum(t * _log_softmax(z)) / z.shape[0]

def _full(v, shape):
    v = numpy.asarray(v, dtype=DTYPE)
    return v if v.shape == shape else numpy.broadcast_to(v, shape).copy()
'''


# the generated module's globals: a user symbol named `numpy` must not shadow the module
RESERVED = {"numpy", "scipy", "DTYPE", "symbp_numpy"}


class NumpyPrinter(SciPyPrinter):
    """SciPy's printer, NaN-propagating where SymPy's is not; symbp's functions print
    their rule (``Activation._numpycode``)."""

    def _print_Piecewise(self, e):
        # nested numpy.where when the last condition is True: SciPy's select would compute
        # in float64 (its default, a float64 NaN), and the rows' rules are mostly such
        *pairs, (out, cond) = e.args
        if cond != sp.true:
            return super()._print_Piecewise(e)  # NaN where no condition holds
        out = self._print(out)
        for value, c in reversed(pairs):
            out = f"numpy.where({self._print(c)}, {self._print(value)}, {out})"
        return out

    def _print_Heaviside(self, e):
        # numpy.heaviside keeps NaN (SymPy's own rule, a select on x <= 0, maps NaN to 1)
        h0 = e.args[1] if len(e.args) > 1 else sp.S.Half
        return f"numpy.heaviside({self._print(e.args[0])}, {self._print(h0)})"

    def _print_Max(self, e):  # numpy.maximum and numpy.minimum propagate NaN
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"numpy.maximum({out}, {self._print(a)})"
        return out

    def _print_Min(self, e):
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"numpy.minimum({out}, {self._print(a)})"
        return out


def _shape(printer, shape, ids):
    # sizes print under their identifiers: a size named `numpy` is the argument `numpy_2`
    env = {n: sp.Symbol(ids[n]) for n in ids if not isinstance(n, sp.MatrixSymbol)}
    return "(" + ", ".join(printer.doprint(sp.sympify(d).xreplace(env)) for d in shape) + ",)"


class _Ctx:
    """What a head's NumPy rule prints with: operand names, the printer, shapes."""

    def __init__(self, ids, pr):
        self.ids, self.pr = ids, pr
        self.imports: dict = {}  # (module, name) -> alias: a routine a head calls

    def use(self, module: str, name: str) -> str:
        """``name`` of ``module`` (conv_numpy's conv2d), imported by the generated source."""
        return self.imports.setdefault((module, name), f"_{name}")

    def op(self, x) -> str:
        if isinstance(x, sp.Transpose):
            return f"{self.ids[x.arg]}.T"
        return self.ids[x] if x in self.ids else self.pr.doprint(x)

    def shape(self, shape) -> str:
        return _shape(self.pr, shape, self.ids)

    def names_in(self, e) -> dict:
        """Names of ``e`` as their identifiers, for printing a scalar expression."""
        return {n: sp.Symbol(self.ids[n]) for n in e.atoms(sp.Symbol, sp.MatrixSymbol)
                if n in self.ids}


def build(program: Program, dtype=numpy.float64, **options) -> Kernel:
    require(program, "numpy")
    names = list(program.inputs) + list(program.dims) + [a.name for a in program.body]
    ids = identifiers(names, RESERVED)
    pr = NumpyPrinter({"fully_qualified_modules": True, "allow_unknown_functions": False})
    params = ", ".join(ids[n] for n in list(program.inputs) + list(program.dims))
    lines = [f"def symbp_numpy({params}):"]
    ctx = _Ctx(ids, pr)
    for a in program.body:
        lines.append(f"    {ids[a.name]} = {rule(a.expr).numpy(ctx, a)}  # {type(a.expr).__name__}")
    # a constant output (a scalar gradient that is 0) prints as a number
    outs = [ids[o] if o in ids else f"DTYPE({pr.doprint(o)})" for o in program.outputs]
    lines.append(f"    return ({', '.join(outs)},)")
    imports = [f"from {m} import {n} as {a}" for (m, n), a in ctx.imports.items()]
    source = "\n".join([HELPERS] + imports + ["", "\n".join(lines)]) + "\n"
    filename = f"<symbp-numpy-{abs(hash(source)):x}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns = {"numpy": numpy, "scipy": scipy, "DTYPE": numpy.dtype(dtype).type}
    exec(compile(source, filename, "exec"), ns)  # our own generated source, never user text
    return Kernel(fn=ns["symbp_numpy"], source=source)
