"""The warm start: a compiled training step found again by the user's expression.

A second process compiling the same step used to lower, differentiate, optimize and print
the whole network (at depth 32 more than half of a warm start) only to arrive at a module
already in the disk cache.  So once a step is built, a record is filed under a key of its
expression: which cached module holds the kernel, and the plain data the runtime needs
(inputs, sizes, parameters, the workspace layout).  A later ``compile_step`` of the same
expression reads the record and loads the module, with no symbolic pass at all;
``step.program`` is rebuilt only when someone reads it.

The key is the SHA-256 of everything that determines the kernel: the expression
(``srepr``), the parameters, the optimizer's rule, dtype, target and options, the versions
of symbp (and the hash of every one of its source files), SymPy, Numba, llvmlite, NumPy and
Python, the BLAS library, and the definition of every function of the user's own in the
expression (see ``_row_print``).  An expression whose behaviour cannot be put into a key
(a node class that is not SymPy's or symbp's, a function row with methods of its own) gets
no key: it takes the full path every time.

Safety: a record is JSON (no pickle, no eval): numbers, names, and a few SymPy constructors
(``_decode``) rebuilt from them.  It carries the SHA-256 of its own body, and the module it
names is checked against its content hash and against the stamp of today's dependencies
(``cache.load_digest``); anything that does not check out is ignored and the full path
taken, which files a fresh record.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path
from types import CodeType

import sympy as sp

from . import cache
from .functions import ROWS, Activation, code, parameters
from .matrix import Tensor

FORMAT = "symbp warm record 1"
TARGETS = ("cpu", "parallel")  # the fused CPU step (symbp.backends.numba_cpu.build_step)


class Unkeyable(Exception):
    """The expression's kernel depends on something a key cannot hold: take the full path."""


# --- the key ---------------------------------------------------------------------------------


@functools.cache
def _package_hash() -> str:
    # every symbp source file: the passes and the generator decide the kernel's text
    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _versions() -> str:
    import llvmlite
    import numba
    import numpy

    from . import __version__
    from .backends.blas import LIBRARY

    return (f"symbp {__version__} {_package_hash()}, sympy {sp.__version__}, numba "
            f"{numba.__version__}, llvmlite {llvmlite.__version__}, numpy {numpy.__version__}"
            f", {sys.implementation.cache_tag}, BLAS {LIBRARY}")


# Class attributes a function row may set that are data read through ``_row_print`` below,
# and the ones Python and SymPy's metaclass add to every class.  Anything else (a method of
# the row's own: eval, _eval_derivative, a printer hook) is code the key cannot see.
_ROW_DATA = ("formula", "rule", "fdiff", "latex_name", "text", "init", "cost", "listed",
             "nargs")
_MACHINERY = {"__module__", "__qualname__", "__doc__", "__annotations__", "__dict__",
              "__weakref__", "__firstlineno__", "__static_attributes__", "_nargs",
              "_explicit_class_assumptions", "_prop_handler", "default_assumptions"}


def _own(cls) -> bool:
    """Whether ``cls`` is SymPy's or symbp's: its behaviour is covered by their versions
    and by the hash of symbp's sources."""
    return cls.__module__.split(".")[0] in ("sympy", "symbp")


def _data(v) -> str | None:
    """``v`` spelled the same in every process if it is plain data, else None."""
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return repr(v)
    if isinstance(v, (tuple, list)):
        parts = [_data(x) for x in v]
        return None if None in parts else f"{type(v).__name__}({', '.join(parts)})"
    if isinstance(v, (set, frozenset)):  # sorted: a set of str iterates in a per-process order
        parts = [_data(x) for x in v]
        return None if None in parts else f"set({', '.join(sorted(parts))})"
    if isinstance(v, dict):
        return _data(sorted(v.items(), key=repr))
    return None


def _code_of(f) -> str:
    """The compiled body of function ``f``: instructions, names and constants (not its line
    numbers).  An edited formula changes it even where it prints the same on the symbols
    tried in ``_row_print``; a row's method patched at run time changes it too."""
    c = getattr(getattr(f, "__func__", f), "__code__", None)
    return repr(f) if c is None else _code_print(c)


def _code_print(c: CodeType) -> str:
    consts = [_code_print(x) if isinstance(x, CodeType) else (_data(x) or type(x).__name__)
              for x in c.co_consts]
    return repr((c.co_code.hex(), c.co_names, c.co_varnames, consts))


# The modules whose settings decide what the generator prints (thresholds such as
# numba_cpu.SPLIT_MIN_BLOCKS, the helper tables): their sources are in the package hash,
# and their module-level constants as they are now (a program may set one) in the key.
_PIPELINE = ("symbp.backends.numba_cpu", "symbp.backends.scalar", "symbp.backends.blas",
             "symbp.functions", "symbp.grad", "symbp.ir", "symbp.matrix", "symbp.optim",
             "symbp.passes", "symbp.vjp", "symbp.runtime.step")


def _settings() -> list:
    names = [*_PIPELINE, *sorted(m for m in sys.modules if m.startswith("symbp.heads."))]
    out = []
    for name in names:
        mod = sys.modules.get(name)
        for k, v in sorted(vars(mod).items()) if mod is not None else ():
            if k.isupper() and (d := _data(v)) is not None:
                out.append(f"{name}.{k} = {d}")
    return out


def _row_print(row, uses) -> list:
    """What determines the code of a user's function ``row``: its data attributes, the
    bytecode of its formula, rule and derivative, and what they give on real symbols and
    on the arguments it has in the expression (``uses``)."""
    for k in row.__mro__:
        if k is Activation:
            break
        if _own(k):
            continue
        extra = set(vars(k)) - set(_ROW_DATA) - _MACHINERY
        if extra:
            raise Unkeyable(f"{row.__name__} defines {', '.join(sorted(extra))}")
    out = [row.__module__, row.__qualname__, sorted(row.default_assumptions.items())]
    out += [repr(getattr(row, a, None)) for a in _ROW_DATA if a not in ("formula", "rule", "fdiff")]
    out += [_code_of(f) for f in (row.formula, row.rule, row.fdiff) if f is not None]
    xs = tuple(sp.Symbol(n, real=True) for n in parameters(row))
    for args in (xs, *sorted(uses, key=sp.srepr)):
        y = row(*args)
        out += [sp.srepr(code(row)(*args)), sp.srepr(row.formula(*args)), sp.srepr(y)]
        if isinstance(y, row):
            out += [sp.srepr(y.fdiff(i)) for i in range(1, len(args) + 1)]
    return out


def _functions(f) -> list:
    """The fingerprints of the user's own function rows ``f``'s kernel prints, in name
    order: those in ``f``, those their code calls, and any row registered under the name
    of one of these (the backends print a row's routine from ``ROWS`` by its name)."""
    uses: dict = {}
    for node in sp.preorder_traversal(f):
        cls = type(node)
        if isinstance(cls, type) and issubclass(cls, Activation):
            uses.setdefault(cls, set()).add(node.args)
        elif not _own(cls):
            raise Unkeyable(f"{cls.__qualname__} is neither SymPy's nor a function row")
    todo, seen, rows = list(uses), set(), []
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        xs = [sp.Symbol(n, real=True) for n in parameters(cls)]
        todo += [type(a) for a in code(cls)(*xs).atoms(Activation)]
        named = ROWS.get(cls.__name__)
        if named is not None:
            todo.append(named)
        if not _own(cls):
            rows.append((cls.__qualname__, _row_print(cls, uses.get(cls, ()))))
        else:  # symbp's own row: its sources are hashed, but a method may be patched
            rows.append((cls.__qualname__, [_code_of(getattr(cls, a)) for a in
                                            ("formula", "rule", "fdiff") if getattr(cls, a)]))
    return [r for _, r in sorted(rows, key=lambda r: r[0])]


def key(f, wrt: tuple, optimizer, dtype, target: str, options: dict) -> str | None:
    """The record's key for this step, or None where it has none (the full path)."""
    if target not in TARGETS or not options.get("cache", True):
        return None  # no disk cache wanted, or a backend that files no record
    try:
        rule = optimizer.rule
        parts = [FORMAT, _versions(), sp.srepr(f), sp.srepr(tuple(wrt)),
                 sp.srepr((rule.hyper, rule.state, rule.per_step, rule.update)),
                 str(dtype), target, repr(sorted(options.items())), repr(_functions(f)),
                 *_settings()]
    except Exception:  # noqa: BLE001 - a row that fails here fails the full path too
        return None
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# --- records: plain data, checked --------------------------------------------------------


def _encode(x):
    """``x`` as JSON: numbers, strings, lists, and the few SymPy objects a layout holds.
    Anything else raises Unkeyable (the step then files no record)."""
    if x is None or isinstance(x, (bool, int, str, float)):
        return x
    if isinstance(x, list):
        return [_encode(v) for v in x]
    if isinstance(x, tuple):
        return {"tuple": [_encode(v) for v in x]}
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        return {"dict": {k: _encode(v) for k, v in x.items()}}
    if type(x) is sp.Integer or isinstance(x, sp.Integer):
        return {"int": int(x)}
    if type(x) is sp.Symbol:
        return {"symbol": x.name, "assume": x.assumptions0}
    if type(x) in (sp.MatrixSymbol, Tensor):
        return {type(x).__name__: x.name, "shape": [_encode(d) for d in x.shape]}
    if type(x) in (sp.Add, sp.Mul, sp.Pow):
        return {type(x).__name__: [_encode(a) for a in x.args]}
    raise Unkeyable(f"a record cannot hold {type(x).__name__}")


_OPS = {"Add": sp.Add, "Mul": sp.Mul, "Pow": sp.Pow}


def _decode(x):
    if not isinstance(x, (dict, list)):
        return x
    if isinstance(x, list):
        return [_decode(v) for v in x]
    if "tuple" in x:
        return tuple(_decode(v) for v in x["tuple"])
    if "dict" in x:
        return {k: _decode(v) for k, v in x["dict"].items()}
    if "int" in x:
        return sp.Integer(int(x["int"]))
    if "symbol" in x:
        return sp.Symbol(str(x["symbol"]), **{str(k): bool(v) for k, v in x["assume"].items()})
    if "MatrixSymbol" in x:
        return sp.MatrixSymbol(str(x["MatrixSymbol"]), *map(_decode, x["shape"]))
    if "Tensor" in x:
        return Tensor(str(x["Tensor"]), *map(_decode, x["shape"]))
    (op, args), = x.items()  # anything else raises: the record is ignored
    return _OPS[op](*map(_decode, args))


def _path(k: str) -> Path:
    return cache.cache_dir() / f"warm_{k}.json"


def _seal(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save(k: str, p, source: str, layout: dict) -> None:
    """File the record of a step built the full way (its optimized Program ``p``)."""
    try:
        body = {"kernel": cache.digest(source), "inputs": _encode(tuple(p.inputs)),
                "dims": _encode(tuple(p.dims)), "wrt": _encode(tuple(p.wrt)),
                "layout": _encode(layout)}
    except Unkeyable:
        return  # a constant input or another object: this step takes the full path again
    text = json.dumps({"format": FORMAT, "sha256": _seal(body), "body": body})
    try:
        cache.write_atomic(_path(k), text)
    except OSError:
        pass  # a read-only cache: the step works, the next process builds it again


def read(k: str) -> dict | None:
    """The record filed under ``k``, decoded, or None if there is none or it is damaged."""
    try:
        rec = json.loads(_path(k).read_text())
        body = rec["body"]
        if rec["format"] != FORMAT or rec["sha256"] != _seal(body):
            return None
        out = {n: _decode(body[n]) for n in ("inputs", "dims", "wrt", "layout")}
    except Exception:  # noqa: BLE001 - whatever is wrong with it, the full path is right
        return None
    out["kernel"] = body["kernel"]
    return out


# --- the step ------------------------------------------------------------------------------


class Outline:
    """What a step loaded by its record knows of its Program without building it: the
    inputs, sizes and parameters; ``rebuild()`` runs the passes when the whole is asked for."""

    def __init__(self, inputs, dims, wrt, rebuild):
        self.inputs, self.dims, self.wrt, self._rebuild = inputs, dims, wrt, rebuild

    def rebuild(self):
        from .errors import SymbpError

        p = self._rebuild()
        if (tuple(p.inputs), tuple(p.dims), tuple(p.wrt)) != (self.inputs, self.dims, self.wrt):
            raise SymbpError("the cached step's record disagrees with its Program: this is a "
                             "symbp bug; clear the cache (symbp.cache.clear()) and report it")
        return p


def _fits(rec: dict, f, wrt: tuple) -> bool:
    """The record names this expression's own symbols (a check on top of the key)."""
    names = f.free_symbols | set(wrt)
    return rec["wrt"] == tuple(wrt) and all(x in names for x in rec["inputs"])


def build_step(mod, f, wrt: tuple, optimizer, dtype, target: str, options: dict):
    """``mod.build_step`` of ``f``'s gradient program, or the same step from its record."""
    from .api import gradient_program
    from .passes import optimize
    from .runtime.step import FusedStep

    k = key(f, wrt, optimizer, dtype, target, options)

    def program():
        return optimize(gradient_program(f, wrt), target=target, rule=optimizer.rule)

    rec = read(k) if k else None
    if rec is not None and _fits(rec, f, wrt):
        found = cache.load_digest(rec["kernel"])
        if found is not None:
            source, module = found
            layout = rec["layout"]
            outline = Outline(rec["inputs"], rec["dims"], rec["wrt"], program)
            step = FusedStep(outline, source, layout, getattr(module, layout["name"]),
                             optimizer, dtype, target, options)
            step.warm = True
            return step
    step = mod.build_step(gradient_program(f, wrt), optimizer, dtype=dtype, target=target,
                          **options)
    if k and step is not None:
        save(k, step.program, step.source, step.layout)
    return step
