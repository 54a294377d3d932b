"""The safe expression parser: what it accepts equals SymPy built by hand; what it refuses
fails fast with a SymbpError naming the culprit, and nothing in the text ever runs."""

import builtins
import time

import pytest
import sympy as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import symbp as sb
from symbp.errors import SymbpError
from symbp.parse import LIMITS, known_functions, parse_assignments, parse_expr

S = lambda n: sp.Symbol(n, real=True)  # noqa: E731
w, x, y, b, t, a = (S(n) for n in "wxybta")

# text -> the expression built directly with SymPy and symbp
ACCEPTED = [
    ("sigmoid(w*x + b)", sb.sigmoid(w * x + b)),
    ("  sigmoid( w * x+b )\t", sb.sigmoid(w * x + b)),
    ("w*x + b", w * x + b),
    ("x - y - b", x - y - b),
    ("x - (y - b)", x - y + b),
    ("x / y / b", x / (y * b)),
    ("x / (y / b)", x * b / y),
    ("x*y/b*w", x * y * w / b),
    ("-x", -x),
    ("--x", x),
    ("+-+x", -x),
    ("-x**2", -(x**2)),
    ("(-x)**2", x**2),
    ("x**-1", 1 / x),
    ("2**3**2", sp.Integer(512)),
    ("x**y**b", x ** (y**b)),
    ("x**0.5", x ** sp.Float(0.5)),
    ("x**100", x**100),
    ("x**-100", x**-100),
    ("(2*x)**3", 8 * x**3),
    ("1/2", sp.Rational(1, 2)),
    ("0.1*x", sp.Float(0.1) * x),
    ("1e-3*x", sp.Float(1e-3) * x),
    ("3.", sp.Float(3.0)),
    (".5", sp.Float(0.5)),
    ("1_000", sp.Integer(1000)),
    ("0x10", sp.Integer(16)),
    ("pi*x", sp.pi * x),
    ("relu(x)", sb.relu(x)),
    ("leaky_relu(x, 0.1)", sb.leaky_relu(x, sp.Float(0.1))),
    ("leaky_relu(x)", sb.leaky_relu(x)),
    ("prelu(x, a)", sb.prelu(x, a)),
    ("elu(x, 2)", sb.elu(x, 2)),
    ("selu(x) + gelu(x) + gelu_tanh(x) + silu(x)",
     sb.selu(x) + sb.gelu(x) + sb.gelu_tanh(x) + sb.silu(x)),
    ("swish(x)", sb.silu(x)),
    ("softplus(x)", sb.softplus(x)),
    ("identity(x)", x),
    ("tanh(x)", sp.tanh(x)),
    ("exp(x) + log(x) + sqrt(x)", sp.exp(x) + sp.log(x) + sp.sqrt(x)),
    ("sin(x)*cos(x)/tan(y)", sp.sin(x) * sp.cos(x) / sp.tan(y)),
    ("sinh(x) + cosh(x) + erf(x)", sp.sinh(x) + sp.cosh(x) + sp.erf(x)),
    ("abs(x)", sp.Abs(x)),
    ("max(x, 0)", sp.Max(x, 0)),
    ("min(x, y, b)", sp.Min(x, y, b)),
    ("step(x)", sp.Heaviside(x, 0)),
    ("mse(sigmoid(w*x + b), t)", sb.mse(sb.sigmoid(w * x + b), t)),
    ("binary_cross_entropy(sigmoid(x), t)", sb.binary_cross_entropy(sb.sigmoid(x), t)),
    ("bce_with_logits(x, t)", sb.bce_with_logits(x, t)),
    ("cross_entropy(y, t)", sb.cross_entropy(y, t)),
    ("sigmoid(w*sigmoid(w*x + b) + b)", sb.sigmoid(w * sb.sigmoid(w * x + b) + b)),
    ("sigmoid(0)", sp.Rational(1, 2)),
    ("x_1 + W2 + alpha", S("x_1") + S("W2") + S("alpha")),
    ("I + E + N + S + Q", S("I") + S("E") + S("N") + S("S") + S("Q")),
    ("(((((x)))))", x),
    ("(sigmoid)(x)", sb.sigmoid(x)),
    ("x" + " " * (LIMITS["chars"] - 1), x),
    ("(" * LIMITS["parens"] + "x" + ")" * LIMITS["parens"], x),
    ("+".join(["x"] * 300), 300 * x),
]


@pytest.mark.parametrize("text, expected", ACCEPTED, ids=[c[0][:40] for c in ACCEPTED])
def test_accepted_equals_sympy(text, expected):
    f, symbols = parse_expr(text)
    assert f == expected, (f, expected)
    assert f.free_symbols == set(symbols.values())
    assert all(s.is_real and s.name == n for n, s in symbols.items())


def test_symbols_in_order_of_appearance_and_shared():
    f, s = parse_expr("b*x + sigmoid(w*x) + b")
    assert list(s) == ["b", "x", "w"]
    assert f == b * x + sb.sigmoid(w * x) + b


def test_functions_argument_extends_table():
    def cube(v):
        return v**3

    f, _ = parse_expr("cube(x) + sigmoid(x)", functions={"cube": cube})
    assert f == x**3 + sb.sigmoid(x)
    with pytest.raises(SymbpError, match="unknown function cube"):
        parse_expr("cube(x)")
    f, _ = parse_expr("max(x)", functions={"max": cube})  # a replaced entry: its own arity
    assert f == x**3
    with pytest.raises(SymbpError, match="plain name"):
        parse_expr("x", functions={"__cube__": cube})


def test_every_known_function_is_callable_by_name():
    for name in known_functions():
        args = {"leaky_relu": "x, 0.1", "prelu": "x, a", "rrelu": "x", "elu": "x, 1",
                "max": "x, y", "min": "x, y", "mse": "x, t", "binary_cross_entropy": "x, t",
                "bce_with_logits": "x, t", "cross_entropy": "x, t"}.get(name, "x")
        text = f"{name}({args})"
        if name == "softmax":  # C values: only inside cross_entropy
            text = "cross_entropy(softmax(x, y), t, u)"
        f, _ = parse_expr(text)
        assert isinstance(f, sp.Expr) and x in f.free_symbols


# Hostile strings: each must raise SymbpError fast.  `{canary}` is a path that an escape
# would create; the tests check it never appears.  The fragment must be in the message.
HOSTILE = [
    ("__import__('os').system('touch {canary}')", "`'`"),
    ("__import__(chr(111)+chr(115)).system(chr(116))", "bare name"),
    ("__import__(chr(111))", "unknown function __import__"),
    ("__import__", "starting with a letter"),
    ("().__class__.__bases__[0]", "`[`"),
    ("().__class__.__bases__", "attribute access"),
    ("x.__class__", "attribute access"),
    ("x.real", "attribute access"),
    ("sigmoid.__globals__", "attribute access"),
    ("(1).__add__", "attribute access"),
    ("lambda: 1", "`:`"),
    ("[x for x in y]", "`[`"),
    ("(x for x in y)", "generator expressions"),
    ("{x for x in y}", "`{`"),
    ("open('{canary}', 'w')", "`'`"),
    ("open(x)", "unknown function open"),
    ("eval('1')", "`'`"),
    ("eval(x)", "unknown function eval"),
    ("exec(x)", "unknown function exec"),
    ("compile(x)", "unknown function compile"),
    ("getattr(x, 'y')", "`'`"),
    ("getattr(x, y)", "unknown function getattr"),
    ("globals()", "unknown function globals"),
    ("locals()", "unknown function locals"),
    ("vars(x)", "unknown function vars"),
    ("breakpoint()", "unknown function breakpoint"),
    ("__builtins__", "starting with a letter"),
    ("__debug__", "starting with a letter"),
    ("_x", "starting with a letter"),
    ("a__b", "single underscores"),
    ("eval", "Python builtin"),
    ("print", "Python builtin"),
    ("x[0]", "`[`"),
    ("'a'", "strings"),
    ('"a"', "strings"),
    ("b'a'", "strings"),
    ("f'{x}'", "strings"),
    ("9**9**9", "too large"),
    ("2**2**2**2**2", "too large"),
    ("x**1000000", "too large"),
    ("x**101", "too large"),
    ("x**-101", "too large"),
    ("x**(10**10)", "too large"),
    ("((x**100)**100)**100", "too large"),
    ("x**100*x**100", "too large"),
    ("(2*x)**100*7**100*9**100*11**100*13**100", "too large"),
    ("10**100*10**100*10**100*10**100", "too large"),
    ("9" * 400, "too large"),
    ("1e999", "too large"),
    ("(" * 10000 + "x" + ")" * 10000, "characters long"),
    ("(" * 51 + "x" + ")" * 51, "nest deeper"),
    ("sigmoid(" * 60 + "x" + ")" * 60, "nest deeper"),
    ("x" * 100_000, "characters long"),
    ("x" + " " * LIMITS["chars"], "characters long"),
    ("-" * 1500 + "x", "parts"),
    ("x**" * 400 + "x", "nests deeper"),
    ("x+" * 999 + "x", "parts"),
    ("x" * 65, "at most 64"),
    ("x if y else z", "conditional"),
    ("x < y", "`<`"),
    ("x == y", "`=`"),
    ("a and b", "and/or"),
    ("a or b", "and/or"),
    ("not x", "`not`"),
    ("x is y", "comparisons"),
    ("x in y", "comparisons"),
    ("(x := 1)", "`:`"),
    ("*x", "not a valid expression"),
    ("sigmoid(*x)", "starred"),
    ("sigmoid(x=1)", "`=`"),
    ("sigmoid(x, y)", "takes 1"),
    ("sigmoid()", "takes 1"),
    ("leaky_relu(x, 1, 2)", "takes 1 to 2"),
    ("rrelu(x, y)", "cannot take these arguments"),
    ("sigmoid", "is a function"),
    ("sigmoid(x)(y)", "bare name"),
    ("foo(x)", "unknown function foo"),
    ("Symbol(x)", "unknown function Symbol"),
    ("1j", "imaginary"),
    ("x*2j", "imaginary"),
    ("True", "booleans"),
    ("None", "None"),
    ("...", "Ellipsis"),
    ("x; y", "`;`"),
    ("x\ny", "`\\n`"),
    ("x\r\nimport os", "`\\r`"),
    ("(x\n)", "`\\n`"),
    ("x # comment", "`#`"),
    ("x \\\n+ y", "`\\\\`"),
    ("x\x00", "`\\x00`"),
    ("\x1b[2Jx", "`\\x1b`"),
    ("ｅｖａｌ(x)", "`\\uff45`"),  # fullwidth: Python would NFKC-normalise it to eval
    ("еval(x)", "`\\u0435`"),  # Cyrillic e
    ("σ(x)", "only ASCII"),
    ("x\u202e", "`\\u202e`"),  # right-to-left override
    ("x\u00a0+ y", "`\\xa0`"),
    ("x // y", "operator //"),
    ("x % y", "`%`"),
    ("x @ y", "`@`"),
    ("x ^ 2", "x**2"),
    ("x & y", "`&`"),
    ("x | y", "`|`"),
    ("~x", "`~`"),
    ("x << 2", "`<`"),
    ("x, y", "tuples"),
    ("()", "tuples"),
    ("x/0", "division by zero"),
    ("x/(1 - 1)", "division by zero"),
    ("0**-1", "division by zero"),
    ("log(0)", "undefined"),
    ("", "empty"),
    ("   ", "empty"),
    ("(x", "unclosed"),
    ("x)", "unmatched"),
    ("x +", "not a valid expression"),
    ("await x", "await"),
    ("(yield x)", "yield"),
    ("import os", "not a valid expression"),
]


def _text(s: str, tmp_path) -> str:
    return s.replace("{canary}", str(tmp_path / "canary"))


@pytest.fixture
def no_eval(monkeypatch):
    """Fail the test if anything calls eval, exec or SymPy's string parser."""

    def trap(*args, **kwargs):
        raise AssertionError("the parser must never evaluate text")

    import sympy.parsing.sympy_parser as spp

    monkeypatch.setattr(builtins, "eval", trap)
    monkeypatch.setattr(builtins, "exec", trap)
    monkeypatch.setattr(spp, "parse_expr", trap)


@pytest.mark.parametrize("text, fragment", HOSTILE, ids=[ascii(h[0])[:40] for h in HOSTILE])
def test_hostile_rejected_fast(text, fragment, tmp_path, no_eval):
    text = _text(text, tmp_path)
    start = time.perf_counter()
    with pytest.raises(SymbpError) as err:
        parse_expr(text)
    elapsed = time.perf_counter() - start
    msg = str(err.value)
    assert fragment in msg, msg
    assert "\n" not in msg and len(msg) < 600 and msg.isprintable(), msg
    assert elapsed < 1.0, f"{elapsed:.3f} s"  # milliseconds when idle; slack for load
    assert not (tmp_path / "canary").exists()


def test_hostile_table_is_large():
    assert len(HOSTILE) >= 40


def test_accepted_never_evaluates_text(no_eval):
    for text, expected in ACCEPTED:
        assert parse_expr(text)[0] == expected


def test_error_names_the_column():
    with pytest.raises(SymbpError, match="at column 9: attribute access"):
        parse_expr("sigmoid(x.y)")
    with pytest.raises(SymbpError, match="character `'` at column 5"):
        parse_expr("  x('a')")
    with pytest.raises(SymbpError, match="`foo` at column 3"):
        parse_expr("  foo(x)")


# Any text from the expression alphabet (or anything at all): parsed, or refused with a
# SymbpError, quickly; never another exception.
ALPHABET = "xyw12.e+-*/() ,_" + "sigmoidrelupxa"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_random_text_parses_or_refuses(text):
    start = time.perf_counter()
    try:
        f, _ = parse_expr(text)
        assert isinstance(f, sp.Expr)
    except SymbpError:
        pass
    assert time.perf_counter() - start < 1.0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_any_unicode_parses_or_refuses(text):
    try:
        parse_expr(text)
    except SymbpError as e:
        assert "\n" not in str(e) and str(e).isprintable()


# --- NAME=NUMBER assignments for --at ----------------------------------------------------

ASSIGN_OK = [
    (["w=0.5", "x=1"], {"w": 0.5, "x": 1.0}),
    (["w=0.5,x=1, b=-1e-3"], {"w": 0.5, "x": 1.0, "b": -1e-3}),
    ([" w = -.5 "], {"w": -0.5}),
    (["x=+2", "y=3."], {"x": 2.0, "y": 3.0}),
    ("w=1", {"w": 1.0}),
    ([], {}),
]


@pytest.mark.parametrize("items, expected", ASSIGN_OK)
def test_assignments(items, expected):
    assert parse_assignments(items) == expected


ASSIGN_BAD = [
    (["w"], "NAME=NUMBER"),
    (["w=x"], "not a number"),
    (["w=1+1"], "not a number"),
    (["w=__import__('os')"], "not a number"),
    (["__class__=1"], "NAME=NUMBER"),
    (["w.x=1"], "NAME=NUMBER"),
    (["w=1e999"], "too large"),
    (["w=nan"], "not a number"),
    (["w=inf"], "not a number"),
    (["w=1", "w=2"], "twice"),
    (["=1"], "NAME=NUMBER"),
    (["w=1;x=2"], "not a number"),
    (["w=0x10"], "not a number"),
    (["w=1j"], "not a number"),
    (["w=\u0661"], "not a number"),  # Arabic-Indic digit one: float() would accept it
    (["x" * 3000 + "=1"], "characters long"),
    ([f"v{i}=1" for i in range(LIMITS["assignments"] + 1)], "at most"),
]


@pytest.mark.parametrize("items, fragment", ASSIGN_BAD, ids=[ascii(a[0])[:30] for a in ASSIGN_BAD])
def test_bad_assignments(items, fragment):
    with pytest.raises(SymbpError, match=fragment.replace("(", r"\(")):
        parse_assignments(items)


# --- softmax + cross-entropy on scalars: the chapter's example ----------------------------


def test_softmax_cross_entropy_gradient_is_y_minus_t():
    f, s = parse_expr("cross_entropy(softmax(z1, z2, z3), t1, t2, t3)")
    z = [s[f"z{i}"] for i in (1, 2, 3)]
    t = [s[f"t{i}"] for i in (1, 2, 3)]
    at = dict(zip(z, (1.0, 2.0, 0.5))) | dict(zip(t, (0.0, 1.0, 0.0)))
    # independent reference: the softmax written out here, differentiated by sympy.diff
    e = [sp.exp(v) for v in z]
    ref = -sum(ti * sp.log(ei / sum(e)) for ei, ti in zip(e, t))
    assert float(f.subs(at)) == pytest.approx(float(ref.subs(at)), rel=1e-12)
    y = [float((ei / sum(e)).subs(at)) for ei in e]
    for zi, yi, ti in zip(z, y, (0.0, 1.0, 0.0)):
        assert float(sp.diff(f, zi).subs(at)) == pytest.approx(yi - ti, rel=1e-12)


@pytest.mark.parametrize("text, fragment", [
    ("softmax(a, b)", "gives 2 values, not one"),
    ("softmax(a, b) + 1", "gives 2 values"),
    ("sigmoid(softmax(a, b))", "gives 2 values"),
    ("cross_entropy(a, softmax(a, b))", "gives 2 values"),
    ("cross_entropy(softmax(a, b), t)", "softmax has 2 values but 1 target"),
    ("cross_entropy(p, t, u)", "takes 2 arguments"),
    ("softmax(a)", "takes 2 to 16 argument"),
])
def test_softmax_outside_cross_entropy_is_refused(text, fragment):
    with pytest.raises(SymbpError, match=fragment):
        parse_expr(text)
