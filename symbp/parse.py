"""Safe parsing of expression strings typed on the command line.

``parse_expr("sigmoid(w*x + b)")`` returns the SymPy expression and its symbols.  Nothing
in the text is ever executed: Python's parser builds a syntax tree, and a whitelist walk
builds the SymPy expression node by node from numbers, names, ``+ - * / **``, unary
minus and calls of known functions by bare name.  Everything else (attributes,
subscripts, strings, lambdas, comparisons, keyword arguments, ...) is rejected with a
``SymbpError`` naming the culprit, its column, and what is allowed.

Absurd inputs fail fast, before any expensive work: the text is bounded in length,
characters and parenthesis depth *before* ``ast.parse`` (which itself recurses on deep
nesting), the tree is bounded in size and depth, and powers are bounded so that
``9**9**9`` or ``x**1000000`` never reach SymPy's arithmetic.
"""

from __future__ import annotations

import ast
import builtins
import keyword
import math
import re
from collections.abc import Callable, Iterable

import sympy as sp

from . import functions as F
from .errors import SymbpError

__all__ = ["parse_expr", "parse_assignments", "known_functions", "LIMITS"]

# Bounds on what a person could reasonably type; each has its own error message.
LIMITS = {
    "chars": 2000,  # length of the text
    "parens": 50,  # parenthesis nesting depth, checked on the raw text
    "depth": 100,  # nesting of the syntax tree (chains like a+b+c count once)
    "nodes": 1000,  # syntax tree nodes
    "power": 100,  # |n| of any numeric exponent, and of every power in the result
    "bits": 1024,  # size of an exact number (numerator and denominator), ~308 digits
    "name": 64,  # length of a name
    "assignments": 200,  # NAME=NUMBER pairs in one parse_assignments call
}

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")
# Printable ASCII that can occur in an allowed expression; everything else is refused
# before parsing (this also stops Unicode look-alikes, which Python would NFKC-normalise
# into ordinary identifiers, and control characters that could rewrite a terminal).
ALLOWED_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ \t+-*/().,"
)
# Why a character is refused, for the ones people (or attackers) type most.
CHAR_HINTS = {
    "^": "for powers write x**2",
    "[": "subscripts and lists are not allowed",
    "]": "subscripts and lists are not allowed",
    "{": "sets, dicts and f-strings are not allowed",
    "}": "sets, dicts and f-strings are not allowed",
    "'": "strings are not allowed",
    '"': "strings are not allowed",
    "=": "assignments, keyword arguments and comparisons are not allowed",
    "<": "comparisons are not allowed",
    ">": "comparisons are not allowed",
    "!": "comparisons are not allowed",
    ":": "lambdas, slices and := are not allowed",
    ";": "one expression only",
    "\n": "one line only",
    "\r": "one line only",
    "%": "only + - * / ** are allowed",
    "@": "only + - * / ** are allowed",
    "&": "only + - * / ** are allowed",
    "|": "only + - * / ** are allowed",
    "~": "only + - * / ** are allowed",
    "#": "comments are not allowed",
    "\\": "backslashes are not allowed",
}
CONSTANTS = {"pi": sp.pi}
# Names refused as symbols: Python's builtins and keywords.  A symbol named `eval` is
# harmless here, but it is never what a person meant, and generated code must not see it.
RESERVED = (frozenset(dir(builtins)) | frozenset(keyword.kwlist)) - {"abs", "max", "min"}

OPERATORS = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**",
    ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.LShift: "<<",
    ast.RShift: ">>", ast.BitOr: "|", ast.BitXor: "^", ast.BitAnd: "&",
}
# What each refused syntax is called in an error message.
REFUSED = {
    ast.Attribute: "attribute access is", ast.Subscript: "subscripts are",
    ast.Slice: "slices are", ast.Lambda: "lambdas are", ast.ListComp: "comprehensions are",
    ast.SetComp: "comprehensions are", ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "generator expressions are", ast.List: "lists are",
    ast.Tuple: "tuples are", ast.Set: "sets are", ast.Dict: "dicts are",
    ast.Compare: "comparisons are", ast.BoolOp: "and/or are",
    ast.IfExp: "conditional expressions are", ast.NamedExpr: "assignments (:=) are",
    ast.Starred: "starred arguments are", ast.JoinedStr: "f-strings are",
    ast.FormattedValue: "f-strings are", ast.Await: "await is", ast.Yield: "yield is",
    ast.YieldFrom: "yield is",
}
ALLOWED = "numbers, names, + - * / **, ( ) and known functions (listed by symbp derive --help)"

# name: (least, most) positional arguments of the functions that are not rows of
# symbp.functions (a row's are read from the row); absent: exactly one.
ARITY = {
    "max": (2, 16), "min": (2, 16), "mse": (2, 2), "binary_cross_entropy": (2, 2),
    "bce_with_logits": (2, 2), "cross_entropy": (2, 17), "softmax": (2, 16),
}


def arity(name: str, fn) -> tuple[int, int]:
    """(least, most) positional arguments of the known function ``name``."""
    if name in ARITY:
        return ARITY[name]
    return F.arity(fn) if F.FUNCTIONS.get(name) is fn else (1, 1)


# softmax(z1, ..., zC) is C values, not one: it may only be cross_entropy's first argument,
# cross_entropy(softmax(z1, z2, z3), t1, t2, t3) = −Σᵢ tᵢ log softmaxᵢ(z), one scalar.
VECTOR_ARGUMENT = {"cross_entropy": 0}


def known_functions() -> dict[str, Callable]:
    """The functions an expression may call, by name: symbp's activations and losses
    (``symbp.functions.FUNCTIONS``) plus the elementary ones."""
    table = dict(F.FUNCTIONS)
    table.update(
        exp=sp.exp, log=sp.log, sqrt=sp.sqrt, sin=sp.sin, cos=sp.cos, tan=sp.tan,
        tanh=sp.tanh, sinh=sp.sinh, cosh=sp.cosh, erf=sp.erf, abs=sp.Abs, max=sp.Max,
        min=sp.Min, step=F.step, mse=F.mse, binary_cross_entropy=F.binary_cross_entropy,
        bce_with_logits=F.bce_with_logits, cross_entropy=_cross_entropy, softmax=_softmax,
    )
    return table


class _Vector(tuple):
    """The C values of softmax(z1, ..., zC), alive only inside the parser."""


def _softmax(*z):
    return _Vector(F.softmax(list(z)))


def _cross_entropy(p, *t):
    """cross_entropy(p, t) of one probability, or of softmax(z1, ..., zC) against t1..tC."""
    if not isinstance(p, _Vector):
        if len(t) != 1:
            raise SymbpError("cross_entropy(p, t) takes 2 arguments; for classes write "
                             "cross_entropy(softmax(z1, z2, z3), t1, t2, t3)")
        return F.cross_entropy(p, t[0])
    if len(t) != len(p):
        raise SymbpError(f"cross_entropy: softmax has {len(p)} values but {len(t)} "
                         "target(s) follow; give one target per class")
    return -sp.Add(*[ti * sp.log(pi) for pi, ti in zip(p, t)])


def _show(s: str, limit: int = 40) -> str:
    """The culprit, quoted and shortened; non-printable or non-ASCII text is escaped."""
    s = s if len(s) <= limit else s[: limit - 3] + "..."
    return "`" + ascii(s)[1:-1] + "`"


def _check_text(text) -> tuple[str, int]:
    """Length, characters and parentheses of the raw text; returns it stripped and the
    number of characters stripped on the left (to report columns of the original)."""
    if not isinstance(text, str):
        raise SymbpError(f"an expression must be a string, not {type(text).__name__}")
    if len(text) > LIMITS["chars"]:
        raise SymbpError(f"the expression is {len(text)} characters long; at most "
                         f"{LIMITS['chars']} are allowed")
    stripped = text.lstrip(" \t")
    left = len(text) - len(stripped)
    stripped = stripped.rstrip(" \t")
    if not stripped:
        raise SymbpError("the expression is empty; write one like sigmoid(w*x + b)")
    depth = deepest = 0
    for i, c in enumerate(text):
        if c not in ALLOWED_CHARS:
            if ord(c) > 127:
                hint = "only ASCII is allowed (write Greek letters by name: alpha, beta)"
            else:
                hint = CHAR_HINTS.get(c, "it cannot occur in an expression")
            raise SymbpError(f"character {_show(c)} at column {i + 1} is not allowed: {hint}")
        if c == "(":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > LIMITS["parens"]:
                raise SymbpError(f"parentheses nest deeper than {LIMITS['parens']} levels "
                                 f"(at column {i + 1})")
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise SymbpError(f"unmatched `)` at column {i + 1}")
    if depth:
        raise SymbpError(f"{depth} unclosed `(`")
    return stripped, left


def parse_expr(text: str, functions: dict[str, Callable] | None = None
               ) -> tuple[sp.Expr, dict[str, sp.Symbol]]:
    """Parse ``text`` safely into a SymPy expression; return it with its symbols by name.

    Allowed: integer and decimal numbers, names (``[A-Za-z][A-Za-z0-9_]*``, no ``__``,
    not a Python builtin), ``+ - * / **``, unary ``-``/``+``, parentheses, the constant
    ``pi``, and calls of known functions by bare name with positional arguments
    (``leaky_relu(x, 0.1)``).  Names become real ``sympy.Symbol``s.  ``functions`` adds
    callables to (or replaces entries of) ``known_functions()``.  Anything else raises
    ``SymbpError`` naming the culprit and its column; nothing in ``text`` is executed.

    >>> f, s = parse_expr("sigmoid(w*x + b)")
    >>> sorted(s)
    ['b', 'w', 'x']
    """
    table = known_functions()
    if functions:
        for name, fn in functions.items():
            if not (isinstance(name, str) and NAME.match(name) and callable(fn)):
                raise SymbpError(f"functions: {name!r} must be a plain name mapped to a callable")
        table.update(functions)
    src, left = _check_text(text)
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as e:
        col = (e.offset or 1) + left
        raise SymbpError(f"not a valid expression at column {col}: {e.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise SymbpError("the expression is too deeply nested") from None
    n = sum(1 for node in ast.walk(tree) if isinstance(node, ast.expr))
    if n > LIMITS["nodes"]:
        raise SymbpError(f"the expression has {n} parts; at most {LIMITS['nodes']} are allowed")
    builder = _Builder(src, left, table)
    f = builder.build(tree.body, 0)
    _check_result(f)
    return f, builder.symbols


class _Builder:
    """The whitelist walk: one method per allowed node, everything else refused."""

    def __init__(self, src: str, left: int, table: dict[str, Callable]):
        self.src, self.left, self.table = src, left, table
        self.symbols: dict[str, sp.Symbol] = {}
        defaults = known_functions()  # their arity is in ARITY or their row, or one argument
        self.builtin = {n for n, fn in table.items() if defaults.get(n) is fn}

    def where(self, node) -> str:
        seg = ast.get_source_segment(self.src, node) or type(node).__name__
        return f"{_show(seg)} at column {node.col_offset + self.left + 1}"

    def refuse(self, node, what: str) -> SymbpError:
        return SymbpError(f"{self.where(node)}: {what} not allowed; allowed: {ALLOWED}")

    def build(self, node, depth: int, vector_ok: bool = False) -> sp.Expr:
        out = self._build(node, depth)
        if isinstance(out, _Vector) and not vector_ok:
            raise SymbpError(f"{self.where(node)}: softmax(...) gives {len(out)} values, not "
                             "one; use it as cross_entropy(softmax(z1, z2, z3), t1, t2, t3)")
        return out

    def _build(self, node, depth: int) -> sp.Expr:
        if depth > LIMITS["depth"]:
            raise SymbpError(f"the expression nests deeper than {LIMITS['depth']} levels")
        kind = type(node)
        if kind is ast.Constant:
            return self.number(node)
        if kind is ast.Name:
            return self.name(node)
        if kind is ast.UnaryOp:
            return self.unary(node, depth)
        if kind is ast.BinOp:
            return self.binop(node, depth)
        if kind is ast.Call:
            return self.call(node, depth)
        raise self.refuse(node, REFUSED.get(kind, f"{kind.__name__} is"))

    def number(self, node) -> sp.Expr:
        v = node.value
        if type(v) is int:
            if v.bit_length() > LIMITS["bits"]:
                raise SymbpError(f"{self.where(node)}: the number is too large (more than "
                                 f"{LIMITS['bits']} bits)")
            return sp.Integer(v)
        if type(v) is float:
            if not math.isfinite(v):
                raise SymbpError(f"{self.where(node)}: the number is too large for a float")
            return sp.Float(v)
        what = {bool: "booleans are", complex: "imaginary numbers are", str: "strings are",
                bytes: "bytes are"}.get(type(v), f"{v!r} is")
        raise self.refuse(node, what)

    def name(self, node) -> sp.Expr:
        s = node.id
        if s in CONSTANTS:
            return CONSTANTS[s]
        if s in self.table:
            raise SymbpError(f"{self.where(node)}: {s} is a function; call it, as in {s}(x)")
        if not NAME.match(s) or "__" in s:
            raise SymbpError(f"{self.where(node)}: a name must be letters, digits and single "
                             "underscores, starting with a letter")
        if len(s) > LIMITS["name"]:
            raise SymbpError(f"{self.where(node)}: names are at most {LIMITS['name']} characters")
        if s in RESERVED:
            raise SymbpError(f"{self.where(node)}: {s} is a Python builtin, not allowed as a "
                             "name; pick another name")
        if s not in self.symbols:
            self.symbols[s] = sp.Symbol(s, real=True)
        return self.symbols[s]

    def unary(self, node, depth: int) -> sp.Expr:
        sign = 1
        while type(node) is ast.UnaryOp:  # a run of signs, --x, is one level
            if type(node.op) is ast.USub:
                sign = -sign
            elif type(node.op) is not ast.UAdd:
                op = "not" if type(node.op) is ast.Not else "~"
                raise self.refuse(node, f"`{op}` is")
            node = node.operand
        x = self.build(node, depth + 1)
        return -x if sign < 0 else x

    def binop(self, node, depth: int) -> sp.Expr:
        op = type(node.op)
        if op not in (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow):
            hint = " (for powers write x**2)" if op is ast.BitXor else ""
            raise self.refuse(node, f"the operator {OPERATORS.get(op, op.__name__)} is" + hint)
        if op is ast.Pow:
            return self.power(node, depth)
        # a+b-c+... (or a*b/c*...) is one left-leaning chain: flatten it, one level deep
        group = (ast.Add, ast.Sub) if op in (ast.Add, ast.Sub) else (ast.Mult, ast.Div)
        top, parts = node, []
        while type(node) is ast.BinOp and type(node.op) in group:
            parts.append((type(node.op), node.right))
            node = node.left
        parts.append((group[0], node))
        terms = []
        for kind, sub in reversed(parts):
            x = self.build(sub, depth + 1)
            if kind is ast.Sub:
                x = -x
            elif kind is ast.Div:
                if x == 0:
                    raise SymbpError(f"{self.where(sub)}: division by zero")
                x = 1 / x
            terms.append(x)
        out = sp.Add(*terms) if group[0] is ast.Add else sp.Mul(*terms)
        _check_size(out, top)
        return out

    def power(self, node, depth: int) -> sp.Expr:
        base = self.build(node.left, depth + 1)
        n = self.build(node.right, depth + 1)
        if n.is_Number:
            if abs(n) > LIMITS["power"]:
                raise SymbpError(f"{self.where(node)}: the exponent {_short(n)} is too large; "
                                 f"|exponent| <= {LIMITS['power']} is allowed")
            # (2*x)**n multiplies each exact number's size by n: refuse before computing
            if _bits(base) * abs(float(n)) > LIMITS["bits"]:
                raise SymbpError(f"{self.where(node)}: the result would be too large a number")
            if base == 0 and n < 0:
                raise SymbpError(f"{self.where(node)}: division by zero")
        out = base**n
        _check_size(out, node)
        return out

    def call(self, node, depth: int) -> sp.Expr:
        if type(node.func) is not ast.Name:
            raise self.refuse(node, "calling anything but a function's bare name is")
        name = node.func.id
        if name not in self.table:
            known = ", ".join(sorted(self.table))
            raise SymbpError(f"{self.where(node.func)}: unknown function {name}; known: {known}")
        if node.keywords:
            raise SymbpError(f"{self.where(node)}: keyword arguments are not allowed; pass "
                             f"arguments by position, as in leaky_relu(x, 0.1)")
        least, most = arity(name, self.table[name]) if name in self.builtin else (0, 16)
        if not least <= len(node.args) <= most:
            want = str(least) if least == most else f"{least} to {most}"
            raise SymbpError(f"{self.where(node)}: {name} takes {want} argument(s), "
                             f"got {len(node.args)}")
        vec = VECTOR_ARGUMENT.get(name) if name in self.builtin else None
        args = [self.build(a, depth + 1, vector_ok=i == vec) for i, a in enumerate(node.args)]
        try:
            out = self.table[name](*args)
        except SymbpError as e:
            raise SymbpError(f"{self.where(node)}: {e}") from None
        except Exception as e:  # a function refusing its arguments (rrelu's bounds, ...)
            raise SymbpError(f"{self.where(node)}: {name} cannot take these arguments "
                             f"({type(e).__name__}: {e})") from None
        if isinstance(out, _Vector) and name in self.builtin:
            for x in out:
                _check_size(x, node)
            return out
        if not isinstance(out, sp.Expr):
            raise SymbpError(f"{self.where(node)}: {name} does not give a scalar expression")
        _check_size(out, node)
        return out


def _short(n) -> str:
    s = str(n)
    return s if len(s) <= 20 else s[:17] + "..."


def _bits(e) -> int:
    """The size in bits of the largest exact number in ``e`` (numerator or denominator)."""
    return max((max(abs(int(r.p)).bit_length(), int(r.q).bit_length())
                for r in e.atoms(sp.Rational)), default=0)


def _check_size(e, node) -> None:
    # SymPy folds numbers and powers on its own ((x**100)**100 is x**10000): look at the
    # result, not only at what was typed.
    if _bits(e) > LIMITS["bits"]:
        raise SymbpError(f"a number in the expression (near column {node.col_offset + 1}) is "
                         f"too large: more than {LIMITS['bits']} bits")
    for p in e.atoms(sp.Pow):
        if p.exp.is_Number and abs(p.exp) > LIMITS["power"]:
            raise SymbpError(f"the power {_short(p)} (near column {node.col_offset + 1}) is too "
                             f"large; |exponent| <= {LIMITS['power']} is allowed")


def _check_result(f) -> None:
    if f.has(sp.zoo, sp.oo, -sp.oo, sp.nan):
        raise SymbpError(f"the expression is undefined ({_short(f)}): a division by zero "
                         "or log(0)?")


def parse_assignments(items: Iterable[str]) -> dict[str, float]:
    """Parse ``["w=0.5", "x=1"]`` (or ``"w=0.5,x=1"`` in one item) into ``{name: value}``.

    Only ``NAME=NUMBER``: a name as in ``parse_expr`` and a decimal number such as
    ``-0.5`` or ``1e-3``.  A name given twice, or anything else, raises ``SymbpError``.
    """
    if isinstance(items, str):
        items = [items]
    out: dict[str, float] = {}
    for item in items:
        if not isinstance(item, str):
            raise SymbpError(f"an assignment must be a string like w=0.5, not "
                             f"{type(item).__name__}")
        if len(item) > LIMITS["chars"]:
            raise SymbpError(f"an assignment is {len(item)} characters long; at most "
                             f"{LIMITS['chars']} are allowed")
        for part in item.split(","):
            part = part.strip(" \t")
            if not part:
                continue
            name, eq, value = (s.strip(" \t") for s in part.partition("="))
            if not eq or not NAME.match(name) or "__" in name or len(name) > LIMITS["name"]:
                raise SymbpError(f"{_show(part)}: expected NAME=NUMBER, as in w=0.5")
            if not NUMBER.match(value):
                raise SymbpError(f"{_show(part)}: {_show(value)} is not a number; expected "
                                 "NAME=NUMBER, as in w=0.5 or b=-1e-3")
            v = float(value)
            if not math.isfinite(v):
                raise SymbpError(f"{_show(part)}: the number is too large for a float")
            if name in out:
                raise SymbpError(f"{name} is given twice")
            out[name] = v
            if len(out) > LIMITS["assignments"]:
                raise SymbpError(f"at most {LIMITS['assignments']} assignments are allowed")
    return out
