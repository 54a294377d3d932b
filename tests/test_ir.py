"""verify: it passes what lowering and grad build, and catches broken programs."""

import dataclasses

import pytest
import sympy as sp

import symbp as sb
from symbp.errors import ShapeError, SymbpError
from symbp.ir import Assign, Program, lower, make_map, verify
from symbp.matrix import placeholders

x, y = sp.symbols("x y", real=True)
N = sp.Symbol("N")
X, W = sp.MatrixSymbol("X", N, 3), sp.MatrixSymbol("W", 3, 2)
T = sp.MatrixSymbol("T", N, 2)
t1, t2 = sp.symbols("t1 t2", real=True)


def good():
    return verify(lower(sb.mse(sb.tanh(X * W), T)))


def test_lowered_and_gradient_programs_verify():
    verify(good())
    verify(sb.gradient_program(sb.mse(sb.tanh(X * W), T), [W]))
    verify(lower(sp.Piecewise((x**2, x > 0), (y, True))))


def _with_body(p, body):
    return dataclasses.replace(p, body=tuple(body))


BROKEN = [
    ("use before definition",
     lambda: Program((x,), (), (Assign(t1, t2 * x), Assign(t2, x + 1)), (t1,)),
     SymbpError, "t2 used before definition"),
    ("assigned twice",
     lambda: Program((x,), (), (Assign(t1, x + 1), Assign(t1, x * 2)), (t1,)),
     SymbpError, "assigned twice"),
    ("output never assigned", lambda: Program((x,), (), (Assign(t1, x + 1),), (t2,)),
     SymbpError, "never assigned"),
    ("name shape disagrees", lambda: Program(
        (X, W), (N,), (Assign(sp.MatrixSymbol("m", N, 3), sp.MatMul(X, W)),), ()),
     ShapeError, "m is (N, 3)"),
    ("unknown matrix head", lambda: Program(
        (X,), (N,), (Assign(sp.MatrixSymbol("m", N, 3), sp.MatAdd(X, X)),), ()),
     SymbpError, "unknown matrix head MatAdd"),
    ("map with a free symbol", lambda: Program(
        (X,), (N,), (Assign(sp.MatrixSymbol("m", N, 3), _free_map()),), ()),
     SymbpError, "free symbols"),
    ("Piecewise reads an undefined name",
     lambda: Program((x,), (), (Assign(t1, sp.Piecewise((t2, x > 0), (x, True))),), (t1,)),
     SymbpError, "t2 used before definition"),
]


def _free_map():
    v = placeholders(1)
    m = make_map(sp.Lambda(v, v[0]), (N, 3), [X])
    return type(m)(sp.Lambda(v, v[0] * y), (N, 3), X)


@pytest.mark.parametrize("make,cls,words", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_verify_catches(make, cls, words):
    with pytest.raises(cls, match=words.replace("(", r"\(").replace(")", r"\)")):
        verify(make())


def test_verify_catches_a_shuffled_real_program():
    p = good()
    body = list(p.body)
    body[0], body[-1] = body[-1], body[0]
    with pytest.raises(SymbpError, match="used before definition"):
        verify(_with_body(p, body))
