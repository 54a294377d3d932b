"""Generated kernels lowered to LLVM by symbp itself: the Numba front end skipped.

A generated module (``numba_cpu.generate``) is plain Python in a small dialect: scalar
arithmetic in typed constants (``DT(0.5)``), ``for`` loops over ``range``, conditional
expressions, ``math`` functions, array entries ``a[i, j]`` and the backends' intrinsics
(``_gemm``, ``_view``, ``_rows``, ``_array``).  Numba compiles such a module in 1.5-2.5 s
on this project's machine whatever its depth, and about three quarters of that is its
own Python (bytecode analysis, type inference, lowering one instruction at a time); LLVM
is the rest (bench/RESULTS.md, "The kernels' own lowering").  This module reads the
module's syntax tree, types it as Numba would (the same promotions: float32 with int64
is float64, ``/`` of ints is float64), writes LLVM IR text and has LLVM optimise it with
Numba's settings (O3, loop vectorisation, the host CPU): the same operations in the same
order, so the kernels compute the same bits, which tests/test_native.py checks against
Numba on every function row, loss and optimizer.

Anything outside the dialect (a ``prange``, a slice, a tuple indexed at run time, an
option such as ``boundscheck``) raises ``Unsupported`` and the module goes to Numba as
before: this lowering is a fast path, never a second meaning.  ``SYMBP_LOWER=numba``
sends every module to Numba.

The compiled module exports one CPython function per kernel (``METH_FASTCALL``): it
checks each argument as Numba's dispatch does for the kernel's signature (an ndarray of
that dtype, rank, C layout, aligned and writeable; an int; a float), raising TypeError
otherwise, and returns what Numba would box (a float, or a tuple of floats).  A kernel's
``raise ValueError(...)`` becomes a status code and the same exception.  Machine code is
kept on disk next to the module (``__pycache__/gen_<key>.native``) behind the SHA-256 of
its recipe (this file, LLVM's version, the CPU) and of its bytes: a damaged or foreign
file is compiled afresh, never loaded.
"""

from __future__ import annotations

import ast
import ctypes
import hashlib
import math
import os
import struct
import threading
import warnings
from dataclasses import dataclass

import numpy as np


class Unsupported(Exception):
    """A construct outside the dialect: Numba compiles this module."""


# --- types ---------------------------------------------------------------------------------

I64, F32, F64, BOOL = "i64", "f32", "f64", "bool"
LL = {I64: "i64", F32: "float", F64: "double", BOOL: "i1"}
NAMES = {"float32": F32, "float64": F64, "int64": I64, "intp": I64}
DTYPE_NAME = {F32: "float32", F64: "float64", I64: "int64"}
FLOATS = (F32, F64)


@dataclass(frozen=True)
class ArrT:
    kind: str
    ndim: int
    layout: str  # "C", or "F" (the transpose of a C array)


class Val:
    """A scalar: its kind and its LLVM operand (``c``: the Python value of a constant)."""

    __slots__ = ("t", "r", "c")

    def __init__(self, t, r, c=None):
        self.t, self.r, self.c = t, r, c


class Arr:
    """An array: its type, data pointer and sizes (LLVM operands)."""

    __slots__ = ("t", "data", "shape")

    def __init__(self, t: ArrT, data: str, shape: list):
        self.t, self.data, self.shape = t, data, shape


class Tup:
    __slots__ = ("items",)

    def __init__(self, items):
        self.items = list(items)


@dataclass(frozen=True)
class Obj:
    """A compile-time name: a module (math, np), a dtype (DT), a builtin or a function."""

    what: str
    name: str


def const_text(t: str, value) -> str:
    if t == BOOL:
        return "true" if value else "false"
    if t == I64:
        return str(int(value))
    v = float(np.float32(value)) if t == F32 else float(value)
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", v))[0]


def const(t: str, value) -> Val:
    if t == F32:  # an int rounds once, as sitofp does (not through float64 first)
        exact = isinstance(value, int) and not isinstance(value, bool)
        value = float(np.float32(np.int64(value) if exact else value))
    elif t == F64:
        value = float(value)
    elif t == I64:
        value = int(value)
        if not -2**63 <= value < 2**63:
            raise Unsupported("an integer constant out of int64's range")
    else:
        value = bool(value)
    return Val(t, const_text(t, value), value)


def promote(a: str, b: str) -> str:
    """Numba's (NumPy's) scalar promotion of two kinds."""
    if a == b:
        return a if a != BOOL else BOOL
    kinds = {a, b}
    if kinds <= {BOOL, I64}:
        return I64
    if F64 in kinds or I64 in kinds:
        return F64  # int64 with float32 is float64, as in NumPy
    return F32  # float32 with bool


def parse_signature(text: str) -> list:
    """Numba's signature string of a kernel -> its argument types."""
    body = text.strip()
    if not (body.startswith("(") and body.endswith(")")):
        raise Unsupported("a signature with a return type")
    out = []
    for part in _split(body[1:-1]):
        part = part.strip()
        if not part:
            continue
        if "[" in part:
            name, dims = part[:-1].split("[", 1)
            axes = [d.strip() for d in dims.split(",")]
            if name.strip() not in NAMES or axes[-1] != "::1" or any(a != ":" for a in axes[:-1]):
                raise Unsupported(f"argument type {part}")
            out.append(ArrT(NAMES[name.strip()], len(axes), "C"))
        elif part in NAMES:
            out.append(NAMES[part])
        else:
            raise Unsupported(f"argument type {part}")
    return out


def _split(text: str) -> list:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


# --- math: what Numba calls for each function (numba/cpython/mathimpl.py) ---------------------

INTRINSIC = {"exp": "llvm.exp", "log": "llvm.log", "log10": "llvm.log10", "log2": "llvm.log2",
             "sin": "llvm.sin", "cos": "llvm.cos", "fabs": "llvm.fabs", "exp2": "llvm.exp2"}
EXTERN = {n: (n + "f", n) for n in ("log1p", "expm1", "erf", "erfc", "tan", "asin", "acos",
                                     "atan", "asinh", "acosh", "atanh", "sinh", "cosh", "tanh",
                                     "sqrt", "lgamma")}
MATH_CONST = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf, "nan": math.nan}

# CPython and NumPy: the fields the wrapper reads (checked against a real array at load)
OB_TYPE, AR_DATA, AR_ND, AR_DIMS, AR_DESCR, AR_FLAGS = 8, 16, 24, 32, 56, 64
DESCR_BYTEORDER, DESCR_TYPENUM = 26, 28
C_CONTIGUOUS, ALIGNED, WRITEABLE = 0x1, 0x100, 0x400
# NumPy's type numbers per kind: int64 is C's long or long long, whichever is 8 bytes here
TYPENUMS = {F32: (np.dtype("f4").num,), F64: (np.dtype("f8").num,),
            I64: tuple(sorted({np.dtype(c).num for c in "lq" if np.dtype(c).itemsize == 8}))}
METH_FASTCALL = 0x80
EXCEPTIONS = {"TypeError": TypeError, "ValueError": ValueError, "RuntimeError": RuntimeError,
              "OverflowError": OverflowError}


# --- one function's IR ----------------------------------------------------------------------


class Fn:
    """The IR of one function being written: blocks of lines, allocas kept for the entry."""

    def __init__(self, mod: Module, name: str):
        self.mod, self.name = mod, name
        self.lines: list[str] = []
        self.allocas: list[str] = []
        self.n = 0
        self.vars: dict = {}
        self.loops: list = []  # (continue label, break label)
        self.done = False  # the current block has its terminator
        self.returns: list = []  # the kinds of the values returned, per return

    def tmp(self) -> str:
        self.n += 1
        return f"%v{self.n}"

    def label(self, stem: str) -> str:
        self.n += 1
        return f"{stem}{self.n}"

    def emit(self, line: str) -> None:
        if self.done:  # code after a return or raise: a block of its own, never reached
            self.lines.append(f"{self.label('dead')}:")
            self.done = False
        self.lines.append("  " + line)

    def op(self, text: str) -> str:
        r = self.tmp()
        self.emit(f"{r} = {text}")
        return r

    def term(self, line: str) -> None:
        self.emit(line)
        self.done = True

    def block(self, name: str) -> None:
        if not self.done:
            self.lines.append(f"  br label %{name}")
        self.lines.append(f"{name}:")
        self.done = False

    def alloca(self, ty: str) -> str:
        r = self.tmp()
        self.allocas.append(f"  {r} = alloca {ty}")
        return r


# --- the module ------------------------------------------------------------------------------


class Module:
    """One generated module, lowered: ``kernels`` (name -> argument types) and IR text."""

    def __init__(self, source: str):
        self.tag = hashlib.sha256(source.encode()).hexdigest()[:24]
        from ..cache import parse

        self.tree = parse(source)
        self.globals: dict = {"math": Obj("module", "math"), "np": Obj("module", "np"),
                              "range": Obj("builtin", "range"), "abs": Obj("builtin", "abs"),
                              "float": Obj("dtype", F64), "int": Obj("dtype", I64),
                              "ValueError": Obj("exc", "ValueError"),
                              "RuntimeError": Obj("exc", "RuntimeError")}
        self.defs: dict = {}  # name -> (FunctionDef, decorator keywords)
        self.kernels: dict = {}  # name -> argument types
        self.out: list[str] = []  # finished functions
        self.decls: dict = {}  # declared external name -> declaration
        self.made: dict = {}  # (function, argument types) -> (IR name, return kinds)
        self.errors: list = []  # status k -> (exception, message)
        self.strings: dict = {}  # text -> global name
        self.making: set = set()
        self._read()

    # the module's top level: imports, DT/ACC, functions
    def _read(self) -> None:
        for node in self.tree.body:
            if isinstance(node, ast.Import):
                for a in node.names:
                    if (a.name, a.asname or a.name) not in (("math", "math"), ("numpy", "np")):
                        raise Unsupported(f"import {a.name}")
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if (node.module, a.name) in (("numba", "njit"), ("numba", "prange")):
                        continue
                    self.globals[a.asname or a.name] = Obj("intrinsic", _intrinsic(
                        node.module, a.name))
            elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
                    node.targets[0], ast.Name):
                v = node.value
                if (isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name)
                        and v.value.id == "np" and v.attr in NAMES):
                    self.globals[node.targets[0].id] = Obj("dtype", NAMES[v.attr])
                else:
                    raise Unsupported("a module-level assignment")
            elif isinstance(node, ast.FunctionDef):
                self._function(node)
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # a docstring
            else:
                raise Unsupported(f"module-level {type(node).__name__}")

    def _function(self, node: ast.FunctionDef) -> None:
        if len(node.decorator_list) != 1:
            raise Unsupported("a function without exactly one decorator")
        dec = node.decorator_list[0]
        if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Name)
                and dec.func.id == "njit"):
            raise Unsupported("a decorator other than njit(...)")
        kw = {}
        for k in dec.keywords:
            if not isinstance(k.value, ast.Constant):
                raise Unsupported("a non-constant njit option")
            kw[k.arg] = k.value.value
        if kw.get("error_model") != "numpy" or set(kw) - {"error_model", "cache", "inline"}:
            raise Unsupported(f"njit options {sorted(kw)}")
        if kw.get("inline", "never") not in ("always", "never"):
            raise Unsupported("inline= other than always")
        a = node.args
        if a.vararg or a.kwarg or a.kwonlyargs or a.defaults or a.posonlyargs:
            raise Unsupported("a function with defaults or starred arguments")
        self.defs[node.name] = (node, kw)
        self.globals[node.name] = Obj("function", node.name)
        if dec.args:
            if len(dec.args) != 1 or not isinstance(dec.args[0], ast.Constant):
                raise Unsupported("a signature that is not one string")
            types = parse_signature(dec.args[0].value)
            if len(types) != len(a.args):
                raise Unsupported("a signature of another length than the arguments")
            self.kernels[node.name] = types

    # --- shared pieces -----------------------------------------------------------------------
    def declare(self, name: str, text: str) -> str:
        self.decls.setdefault(name, text)
        return "@" + name

    def error(self, exc: str, message: str) -> int:
        key = (exc, message)
        if key not in self.errors:
            self.errors.append(key)
        return self.errors.index(key) + 1

    def string(self, text: str) -> str:
        if text not in self.strings:
            self.strings[text] = f"@s{len(self.strings)}"
        return self.strings[text]

    def compile(self) -> str:
        """The module's IR: every kernel, what they call, and one wrapper per kernel."""
        for name, types in self.kernels.items():
            fname, rets = self.make(name, tuple(types))
            self.wrapper(name, types, fname, rets)
        lines = list(self.decls.values())
        for text, g in self.strings.items():
            data = text.encode() + b"\0"
            body = "".join(chr(c) if 32 <= c < 127 and c not in (34, 92) else f"\\{c:02X}"
                           for c in data)
            lines.append(f'{g} = private unnamed_addr constant [{len(data)} x i8] c"{body}"')
        return "\n".join(lines + self.out) + "\n"

    # --- functions ---------------------------------------------------------------------------
    def make(self, name: str, types: tuple):
        """Compile function ``name`` for argument types ``types`` (once): its IR name and
        the kinds it returns (None: nothing)."""
        key = (name, types)
        if key in self.made:
            return self.made[key]
        if key in self.making:
            raise Unsupported("a recursive function")
        self.making.add(key)
        node, kw = self.defs[name]
        fname = f'@"f{len(self.made)}.{name}"'  # quoted: a routine may be named _α
        fn = Fn(self, fname)
        params = []
        for k, (arg, t) in enumerate(zip(node.args.args, types)):
            fn.vars[arg.arg] = self.param(fn, k, t, params)
        Body(fn).statements(node.body)
        if not fn.done:
            if fn.returns and fn.returns[0] is not None:
                raise Unsupported("a function that may end without its return value")
            fn.returns.append(None)
            fn.term("ret i32 0")
        rets = fn.returns[0]
        if any(r != rets for r in fn.returns):
            raise Unsupported("returns of different types")
        rparams = [f"ptr %ret{k}" for k in range(len(rets or ()))]
        attrs = " alwaysinline" if kw.get("inline") == "always" else ""
        head = f"define internal i32 {fname}({', '.join(params + rparams)}){attrs} {{"
        body = ["entry:"] + fn.allocas + ["  br label %start", "start:"] + fn.lines
        self.out.append("\n".join([head] + body + ["}"]))
        self.made[key] = (fname, rets)
        self.making.discard(key)
        return fname, rets

    def param(self, fn: Fn, index: int, t, params: list):
        """The parameters argument ``index`` of type ``t`` takes, as a value of the body
        (named by position: a Python name may hold letters LLVM's names do not, α)."""
        name = str(index)
        if isinstance(t, ArrT):
            data = f"%a{name}"
            shape = [f"%a{name}.{k}" for k in range(t.ndim)]
            params += [f"ptr {data}"] + [f"i64 {s}" for s in shape]
            return ("let", Arr(t, data, shape))
        if isinstance(t, tuple):  # a tuple of scalars, item by item
            items = []
            for k, it in enumerate(t):
                if isinstance(it, (ArrT, tuple)):
                    raise Unsupported("a tuple of arrays as an argument")
                r = f"%a{name}.{k}"
                params.append(f"{LL[it]} {r}")
                items.append(Val(it, r))
            return ("let", Tup(items))
        r = f"%a{name}"
        params.append(f"{LL[t]} {r}")
        slot = fn.alloca(LL[t])
        fn.allocas.append(f"  store {LL[t]} {r}, ptr {slot}")
        return ("var", t, slot)

    # --- the CPython entry point of a kernel ------------------------------------------------
    def wrapper(self, name: str, types: list, fname: str, rets) -> None:
        fn = Fn(self, f'@"py.{name}"')
        d = self.declare
        d("PyErr_SetString", "declare void @PyErr_SetString(ptr, ptr)")
        d("PyErr_Occurred", "declare ptr @PyErr_Occurred()")
        d("PyType_IsSubtype", "declare i32 @PyType_IsSubtype(ptr, ptr)")
        d("symbp_ndarray", "@symbp_ndarray = external global i8")
        for e in EXCEPTIONS:  # the exception classes themselves (symbols of _setup)
            d(e, f"@symbp_exc_{e} = external global i8")

        def fail(exc: str, message: str) -> None:
            fn.emit(f"call void @PyErr_SetString(ptr @symbp_exc_{exc}, "
                    f"ptr {self.string(message)})")
            fn.term("ret ptr null")

        def check(bad: str, exc: str, message: str) -> None:
            ok, no = fn.label("ok"), fn.label("bad")
            fn.term(f"br i1 {bad}, label %{no}, label %{ok}")
            fn.block(no)
            fail(exc, message)
            fn.block(ok)

        node = self.defs[name][0]
        check(fn.op(f"icmp ne i64 %nargs, {len(types)}"), "TypeError",
              f"{name}() takes {len(types)} arguments")
        args = []
        for k, (t, a) in enumerate(zip(types, node.args.args)):
            p = fn.op(f"getelementptr ptr, ptr %args, i64 {k}")
            o = fn.op(f"load ptr, ptr {p}")
            if isinstance(t, ArrT):
                what = (f"{name}() argument {k + 1} ({a.arg}) must be a writeable, aligned, "
                        f"C-contiguous {DTYPE_NAME[t.kind]} array of {t.ndim} dimension(s)")
                ty = fn.op(f"load ptr, ptr {self._field(fn, o, OB_TYPE)}")
                exact = fn.op(f"icmp eq ptr {ty}, @symbp_ndarray")
                same, other, then = fn.label("arr"), fn.label("sub"), fn.label("isarr")
                fn.term(f"br i1 {exact}, label %{same}, label %{other}")
                fn.block(other)
                sub = fn.op(f"call i32 @PyType_IsSubtype(ptr {ty}, ptr @symbp_ndarray)")
                check(fn.op(f"icmp eq i32 {sub}, 0"), "TypeError", what)
                fn.term(f"br label %{then}")
                fn.block(same)
                fn.term(f"br label %{then}")
                fn.block(then)
                nd = fn.op(f"load i32, ptr {self._field(fn, o, AR_ND)}")
                bad = fn.op(f"icmp ne i32 {nd}, {t.ndim}")
                flags = fn.op(f"load i32, ptr {self._field(fn, o, AR_FLAGS)}")
                need = C_CONTIGUOUS | ALIGNED | WRITEABLE
                have = fn.op(f"and i32 {flags}, {need}")
                bad = fn.op(f"or i1 {bad}, {fn.op(f'icmp ne i32 {have}, {need}')}")
                descr = fn.op(f"load ptr, ptr {self._field(fn, o, AR_DESCR)}")
                num = fn.op(f"load i32, ptr {self._field(fn, descr, DESCR_TYPENUM)}")
                okt = "false"
                for n in TYPENUMS[t.kind]:
                    okt = fn.op(f"or i1 {okt}, {fn.op(f'icmp eq i32 {num}, {n}')}")
                bad = fn.op(f"or i1 {bad}, {fn.op(f'xor i1 {okt}, true')}")
                order = fn.op(f"load i8, ptr {self._field(fn, descr, DESCR_BYTEORDER)}")
                big = ord(">")  # a byte order other than the machine's: Numba refuses it too
                bad = fn.op(f"or i1 {bad}, {fn.op(f'icmp eq i8 {order}, {big}')}")
                check(bad, "TypeError", what)
                data = fn.op(f"load ptr, ptr {self._field(fn, o, AR_DATA)}")
                dims = fn.op(f"load ptr, ptr {self._field(fn, o, AR_DIMS)}")
                args.append(f"ptr {data}")
                for j in range(t.ndim):
                    q = fn.op(f"getelementptr i64, ptr {dims}, i64 {j}")
                    args.append(f"i64 {fn.op(f'load i64, ptr {q}')}")
            else:
                if t == I64:
                    d("PyLong_AsLongLong", "declare i64 @PyLong_AsLongLong(ptr)")
                    v = fn.op(f"call i64 @PyLong_AsLongLong(ptr {o})")
                    maybe = fn.op(f"icmp eq i64 {v}, -1")
                else:
                    d("PyFloat_AsDouble", "declare double @PyFloat_AsDouble(ptr)")
                    v = fn.op(f"call double @PyFloat_AsDouble(ptr {o})")
                    maybe = fn.op(f"fcmp oeq double {v}, -1.0")
                err, ok = fn.label("maybe"), fn.label("val")
                fn.term(f"br i1 {maybe}, label %{err}, label %{ok}")
                fn.block(err)
                occurred = fn.op("call ptr @PyErr_Occurred()")
                kind = "an integer" if t == I64 else "a number"
                check(fn.op(f"icmp ne ptr {occurred}, null"), "TypeError",
                      f"{name}() argument {k + 1} ({a.arg}) must be {kind}")
                fn.block(ok)
                if t == F32:
                    v = fn.op(f"fptrunc double {v} to float")
                args.append(f"{LL[t]} {v}")
        slots = [fn.alloca(LL[r]) for r in rets or ()]
        status = fn.op(f"call i32 {fname}({', '.join(args + [f'ptr {s}' for s in slots])})")
        good, bad = fn.label("good"), fn.label("raised")
        fn.term(f"br i1 {fn.op(f'icmp eq i32 {status}, 0')}, label %{good}, label %{bad}")
        fn.block(bad)
        for k, (exc, message) in enumerate(self.errors):
            check(fn.op(f"icmp eq i32 {status}, {k + 1}"), exc, message)
        fail("RuntimeError", "symbp: a kernel returned an unknown status")
        fn.block(good)
        if rets is None:
            d("symbp_None", "@symbp_None = external global i8")
            d("Py_IncRef", "declare void @Py_IncRef(ptr)")
            fn.emit("call void @Py_IncRef(ptr @symbp_None)")
            fn.term("ret ptr @symbp_None")
        else:
            boxed = [self._box(fn, r, s) for r, s in zip(rets, slots)]
            if isinstance(rets, tuple) and not getattr(rets, "bare", False):
                d("PyTuple_New", "declare ptr @PyTuple_New(i64)")
                d("PyTuple_SetItem", "declare i32 @PyTuple_SetItem(ptr, i64, ptr)")
                tup = fn.op(f"call ptr @PyTuple_New(i64 {len(boxed)})")
                for k, b in enumerate(boxed):
                    fn.emit(f"call i32 @PyTuple_SetItem(ptr {tup}, i64 {k}, ptr {b})")
                fn.term(f"ret ptr {tup}")
            else:
                fn.term(f"ret ptr {boxed[0]}")
        head = f'define internal ptr @"py.{name}"(ptr %self, ptr %args, i64 %nargs) {{'
        body = ["entry:"] + fn.allocas + ["  br label %start", "start:"] + fn.lines
        self.out.append("\n".join([head] + body + ["}"]))
        nm = self.string(name)
        # the one symbol the module exports per kernel (its tag keeps modules apart in the
        # process's one engine): the PyMethodDef that PyCFunction_NewEx reads
        self.out.append(f'@"{entry(self.tag, name)}" = global {{ptr, ptr, i32, ptr}} '
                        f'{{ptr {nm}, ptr @"py.{name}", i32 {METH_FASTCALL}, ptr null}}')

    def _field(self, fn: Fn, base: str, offset: int) -> str:
        return fn.op(f"getelementptr i8, ptr {base}, i64 {offset}")

    def _box(self, fn: Fn, kind: str, slot: str) -> str:
        v = fn.op(f"load {LL[kind]}, ptr {slot}")
        if kind in FLOATS:
            self.declare("PyFloat_FromDouble", "declare ptr @PyFloat_FromDouble(double)")
            if kind == F32:
                v = fn.op(f"fpext float {v} to double")
            return fn.op(f"call ptr @PyFloat_FromDouble(double {v})")
        if kind == I64:
            self.declare("PyLong_FromLongLong", "declare ptr @PyLong_FromLongLong(i64)")
            return fn.op(f"call ptr @PyLong_FromLongLong(i64 {v})")
        self.declare("PyBool_FromLong", "declare ptr @PyBool_FromLong(i64)")
        return fn.op(f"call ptr @PyBool_FromLong(i64 {fn.op(f'zext i1 {v} to i64')})")


def _intrinsic(module: str, name: str) -> str:
    """The kind of a backend intrinsic the module imports: the object itself must say it
    is one this lowering knows (``symbp_native``), so a replaced or changed ``gemm`` goes
    to Numba rather than being lowered as the one known here."""
    import importlib

    if module not in ("symbp.backends.blas", "symbp.backends.views", "symbp.backends.address"):
        raise Unsupported(f"from {module} import {name}")
    kind = getattr(getattr(importlib.import_module(module), name, None), "symbp_native", None)
    if kind not in ("gemm", "view", "rows", "array") or kind != name:
        raise Unsupported(f"{module}.{name} is not an intrinsic this lowering knows")
    return kind


def entry(tag: str, name: str) -> str:
    return f"symbp.{tag}.{name}"


class Rets(tuple):
    """The kinds a function returns: a tuple of scalars, or one scalar (``bare``)."""

    bare = False


class Bare(Rets):
    bare = True


# --- statements and expressions --------------------------------------------------------------


class Body:
    """Lowers one function's statements into ``fn``."""

    def __init__(self, fn: Fn):
        self.fn, self.mod = fn, fn.mod

    # --- statements ----------------------------------------------------------------------------
    def statements(self, nodes) -> None:
        for node in nodes:
            self.statement(node)

    def statement(self, node) -> None:
        fn = self.fn
        if isinstance(node, ast.Assign):
            value = self.expr(node.value)
            for target in node.targets:
                self.assign(target, value)
        elif isinstance(node, ast.AugAssign):
            self.augassign(node)
        elif isinstance(node, ast.Expr):
            if not isinstance(node.value, ast.Constant):
                self.expr(node.value)
        elif isinstance(node, ast.For):
            self.for_(node)
        elif isinstance(node, ast.While):
            self.while_(node)
        elif isinstance(node, ast.If):
            self.if_(node)
        elif isinstance(node, ast.Return):
            self.return_(node)
        elif isinstance(node, ast.Raise):
            self.raise_(node)
        elif isinstance(node, ast.Pass):
            pass
        elif isinstance(node, (ast.Break, ast.Continue)):
            if not fn.loops:
                raise Unsupported("break outside a loop")
            cont, brk = fn.loops[-1]
            fn.term(f"br label %{brk if isinstance(node, ast.Break) else cont}")
        else:
            raise Unsupported(f"statement {type(node).__name__}")

    def assign(self, target, value) -> None:
        fn = self.fn
        if isinstance(target, ast.Name):
            self.bind(target.id, value)
        elif isinstance(target, ast.Subscript):
            arr, ptr = self.element(target)
            v = self.cast(self.scalar(value), arr.t.kind)
            fn.emit(f"store {LL[arr.t.kind]} {v.r}, ptr {ptr}")
        elif isinstance(target, ast.Tuple):
            if not isinstance(value, Tup) or len(value.items) != len(target.elts):
                raise Unsupported("unpacking something other than a tuple of that length")
            for t, v in zip(target.elts, value.items):
                self.assign(t, v)
        else:
            raise Unsupported(f"assignment to {type(target).__name__}")

    def bind(self, name: str, value) -> None:
        fn = self.fn
        old = fn.vars.get(name)
        if isinstance(value, Val):
            if old is None:
                slot = fn.alloca(LL[value.t])
                fn.vars[name] = ("var", value.t, slot)
            elif old[0] != "var" or old[1] != value.t:
                raise Unsupported(f"{name} takes values of two types")
            fn.emit(f"store {LL[value.t]} {value.r}, ptr {fn.vars[name][2]}")
        elif isinstance(value, Arr):
            if old is None:
                slots = [fn.alloca("ptr")] + [fn.alloca("i64") for _ in value.shape]
                fn.vars[name] = ("arr", value.t, slots)
            elif old[0] != "arr" or old[1] != value.t:
                raise Unsupported(f"{name} takes values of two types")
            slots = fn.vars[name][2]
            fn.emit(f"store ptr {value.data}, ptr {slots[0]}")
            for s, slot in zip(value.shape, slots[1:]):
                fn.emit(f"store i64 {s}, ptr {slot}")
        elif isinstance(value, Tup):
            # a tuple is its items' values: it must be made once, where every later use
            # sees it (the kernel's top level), and items stored before they are read
            if old is not None or fn.loops or self.nested:
                raise Unsupported(f"tuple {name} assigned twice or inside a block")
            fn.vars[name] = ("let", value)
        else:
            raise Unsupported(f"{name} bound to {value}")

    nested = 0  # depth of the loops and if/else blocks being lowered

    def augassign(self, node) -> None:
        fn = self.fn
        op = type(node.op)
        if isinstance(node.target, ast.Name):
            old = self.load_name(node.target.id)
            self.bind(node.target.id, self.binop(op, old, self.scalar(self.expr(node.value))))
        elif isinstance(node.target, ast.Subscript):
            arr, ptr = self.element(node.target)
            k = arr.t.kind
            old = Val(k, fn.op(f"load {LL[k]}, ptr {ptr}"))
            new = self.cast(self.binop(op, old, self.scalar(self.expr(node.value))), k)
            fn.emit(f"store {LL[k]} {new.r}, ptr {ptr}")
        else:
            raise Unsupported("augmented assignment to this target")

    def for_(self, node) -> None:
        fn = self.fn
        if node.orelse or not isinstance(node.target, ast.Name):
            raise Unsupported("for with else or a tuple target")
        it = node.iter
        if isinstance(it, ast.Name):  # a tuple made above: one copy of the body per item
            v = self.load_name(it.id)
            if not isinstance(v, Tup):
                raise Unsupported("a loop over something other than range or a tuple")
            end = fn.label("tupend")
            for item in v.items:
                nxt = fn.label("tupnext")
                fn.loops.append((nxt, end))
                self.bind_loose(node.target.id, item)
                self.statements(node.body)
                fn.loops.pop()
                fn.block(nxt)
            fn.block(end)
            return
        if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name)
                and isinstance(self.mod.globals.get(it.func.id), Obj)
                and self.mod.globals[it.func.id].name in ("range", "prange")
                and it.func.id not in fn.vars and not it.keywords):
            raise Unsupported("a loop over something other than range")
        if it.func.id == "prange":
            raise Unsupported("prange")
        args = [self.cast(self.scalar(self.expr(a)), I64) for a in it.args]
        if len(args) == 1:
            start, stop, step = const(I64, 0), args[0], const(I64, 1)
        elif len(args) == 2:
            (start, stop), step = args, const(I64, 1)
        elif len(args) == 3:
            start, stop, step = args
            if step.c is None or step.c == 0:
                raise Unsupported("range with a step that is not a nonzero constant")
        else:
            raise Unsupported("range of more than three arguments")
        counter = fn.alloca("i64")
        fn.emit(f"store i64 {start.r}, ptr {counter}")
        head, body, latch, end = (fn.label(s) for s in ("head", "body", "latch", "end"))
        fn.block(head)
        i = fn.op(f"load i64, ptr {counter}")
        cmp = "slt" if step.c > 0 else "sgt"
        fn.term(f"br i1 {fn.op(f'icmp {cmp} i64 {i}, {stop.r}')}, label %{body}, label %{end}")
        fn.block(body)
        self.bind(node.target.id, Val(I64, i))
        fn.loops.append((latch, end))
        self.nested += 1
        self.statements(node.body)
        self.nested -= 1
        fn.loops.pop()
        fn.block(latch)
        i2 = fn.op(f"load i64, ptr {counter}")
        fn.emit(f"store i64 {fn.op(f'add i64 {i2}, {step.r}')}, ptr {counter}")
        fn.term(f"br label %{head}")
        fn.block(end)

    def bind_loose(self, name: str, value) -> None:
        """A loop variable over a tuple's items, bound to each in turn: an array item is
        its value (the tuple was made above), a scalar goes through its variable."""
        if isinstance(value, Arr):
            self.fn.vars[name] = ("let", value)
        else:
            self.bind(name, value)

    def while_(self, node) -> None:
        fn = self.fn
        if node.orelse:
            raise Unsupported("while with else")
        head, body, end = fn.label("whead"), fn.label("wbody"), fn.label("wend")
        fn.block(head)
        c = self.truth(self.expr(node.test))
        fn.term(f"br i1 {c.r}, label %{body}, label %{end}")
        fn.block(body)
        fn.loops.append((head, end))
        self.nested += 1
        self.statements(node.body)
        self.nested -= 1
        fn.loops.pop()
        if not fn.done:
            fn.term(f"br label %{head}")
        fn.block(end)

    def if_(self, node) -> None:
        fn = self.fn
        c = self.truth(self.expr(node.test))
        then, other, end = fn.label("then"), fn.label("else"), fn.label("endif")
        fn.term(f"br i1 {c.r}, label %{then}, label %{other}")
        self.nested += 1
        fn.block(then)
        self.statements(node.body)
        if not fn.done:
            fn.term(f"br label %{end}")
        fn.block(other)
        self.statements(node.orelse)
        self.nested -= 1
        fn.block(end)

    def return_(self, node) -> None:
        fn = self.fn
        if node.value is None:
            kinds = None
        else:
            v = self.expr(node.value)
            if isinstance(v, Val):
                kinds, vals = Bare((v.t,)), [v]
            elif isinstance(v, Tup) and all(isinstance(x, Val) for x in v.items):
                kinds, vals = Rets(x.t for x in v.items), v.items
            else:
                raise Unsupported("returning an array")
            for k, x in enumerate(vals):
                fn.emit(f"store {LL[x.t]} {x.r}, ptr %ret{k}")
        fn.returns.append(kinds)
        fn.term("ret i32 0")

    def raise_(self, node) -> None:
        e = node.exc
        if not (isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and len(e.args) == 1
                and isinstance(e.args[0], ast.Constant) and isinstance(e.args[0].value, str)
                and isinstance(self.mod.globals.get(e.func.id), Obj)
                and self.mod.globals[e.func.id].what == "exc"):
            raise Unsupported("a raise other than ValueError('...')")
        self.fn.term(f"ret i32 {self.mod.error(e.func.id, e.args[0].value)}")

    # --- names -----------------------------------------------------------------------------
    def load_name(self, name: str):
        fn = self.fn
        v = fn.vars.get(name)
        if v is None:
            g = self.mod.globals.get(name)
            if g is None:
                raise Unsupported(f"unknown name {name}")
            return g
        if v[0] == "var":
            return Val(v[1], fn.op(f"load {LL[v[1]]}, ptr {v[2]}"))
        if v[0] == "arr":
            slots = v[2]
            return Arr(v[1], fn.op(f"load ptr, ptr {slots[0]}"),
                       [fn.op(f"load i64, ptr {s}") for s in slots[1:]])
        return v[1]

    # --- expressions -----------------------------------------------------------------------
    def scalar(self, v) -> Val:
        if not isinstance(v, Val):
            raise Unsupported(f"a scalar expected, got {type(v).__name__}")
        return v

    def expr(self, node):
        fn = self.fn
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool):
                return const(BOOL, v)
            if isinstance(v, int):
                return const(I64, v)
            if isinstance(v, float):
                return const(F64, v)
            raise Unsupported(f"constant {v!r}")
        if isinstance(node, ast.Name):
            return self.load_name(node.id)
        if isinstance(node, ast.BinOp):
            return self.binop(type(node.op), self.scalar(self.expr(node.left)),
                              self.scalar(self.expr(node.right)))
        if isinstance(node, ast.UnaryOp):
            v = self.scalar(self.expr(node.operand))
            if isinstance(node.op, ast.USub):
                if v.t in FLOATS:
                    if v.c is not None:
                        return const(v.t, -v.c)
                    return Val(v.t, fn.op(f"fsub {LL[v.t]} {const_text(v.t, -0.0)}, {v.r}"))
                v = self.cast(v, I64)
                if v.c is not None:
                    return const(I64, -v.c)
                return Val(I64, fn.op(f"sub i64 0, {v.r}"))
            if isinstance(node.op, ast.UAdd):
                return v if v.t != BOOL else self.cast(v, I64)
            if isinstance(node.op, ast.Not):
                return Val(BOOL, fn.op(f"xor i1 {self.truth(v).r}, true"))
            raise Unsupported("unary ~")
        if isinstance(node, ast.Compare):
            if len(node.ops) != 1:
                raise Unsupported("a chained comparison")
            return self.compare(type(node.ops[0]), self.scalar(self.expr(node.left)),
                                self.scalar(self.expr(node.comparators[0])))
        if isinstance(node, ast.BoolOp):
            return self.boolop(node)
        if isinstance(node, ast.IfExp):
            return self.ifexp(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Attribute):
            return self.attribute(node)
        if isinstance(node, ast.Subscript):
            return self.subscript(node)
        if isinstance(node, ast.Tuple):
            return Tup(self.expr(e) for e in node.elts)
        raise Unsupported(f"expression {type(node).__name__}")

    def cast(self, v: Val, t: str) -> Val:
        fn = self.fn
        if v.t == t:
            return v
        if v.c is not None and t != BOOL and not (v.t in FLOATS and t == I64):
            return const(t, v.c)
        a, b = LL[v.t], LL[t]
        if t == BOOL:
            if v.t in FLOATS:
                return Val(BOOL, fn.op(f"fcmp une {a} {v.r}, {const_text(v.t, 0.0)}"))
            return Val(BOOL, fn.op(f"icmp ne {a} {v.r}, 0"))
        if v.t == BOOL:
            return Val(t, fn.op(f"{'zext' if t == I64 else 'uitofp'} i1 {v.r} to {b}"))
        if v.t == I64:
            return Val(t, fn.op(f"sitofp i64 {v.r} to {b}"))
        if t == I64:
            return Val(t, fn.op(f"fptosi {a} {v.r} to i64"))
        return Val(t, fn.op(f"{'fpext' if t == F64 else 'fptrunc'} {a} {v.r} to {b}"))

    def truth(self, v) -> Val:
        return self.cast(self.scalar(v), BOOL)

    def binop(self, op, a: Val, b: Val) -> Val:
        fn = self.fn
        if op in (ast.BitOr, ast.BitAnd, ast.BitXor):
            if a.t in FLOATS or b.t in FLOATS:
                raise Unsupported("a bitwise operation on floats")
            t = BOOL if a.t == b.t == BOOL else I64
            a, b = self.cast(a, t), self.cast(b, t)
            name = {ast.BitOr: "or", ast.BitAnd: "and", ast.BitXor: "xor"}[op]
            return Val(t, fn.op(f"{name} {LL[t]} {a.r}, {b.r}"))
        t = promote(a.t, b.t)
        if t == BOOL:
            t = I64
        if op is ast.Div and t == I64:
            t = F64
        a, b = self.cast(a, t), self.cast(b, t)
        if t in FLOATS:
            name = {ast.Add: "fadd", ast.Sub: "fsub", ast.Mult: "fmul", ast.Div: "fdiv"}.get(op)
            if name is None:
                raise Unsupported(f"{op.__name__} of floats")
            return Val(t, fn.op(f"{name} {LL[t]} {a.r}, {b.r}"))
        if op in (ast.FloorDiv, ast.Mod):
            return self.divmod(op, a, b)
        name = {ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul"}.get(op)
        if name is None:
            raise Unsupported(f"{op.__name__} of integers")
        if a.c is not None and b.c is not None:
            v = {"add": a.c + b.c, "sub": a.c - b.c, "mul": a.c * b.c}[name]
            if -2**63 <= v < 2**63:
                return const(I64, v)
        return Val(I64, fn.op(f"{name} i64 {a.r}, {b.r}"))

    def divmod(self, op, a: Val, b: Val) -> Val:
        """Python's floor division and modulo of int64s, as Numba's numpy error model
        has them: 0 for a zero divisor (and for INT64_MIN // -1)."""
        self.mod.declare("symbp.divmod", DIVMOD)
        q, r = self.fn.alloca("i64"), self.fn.alloca("i64")
        self.fn.emit(f"call void @symbp.divmod(i64 {a.r}, i64 {b.r}, ptr {q}, ptr {r})")
        return Val(I64, self.fn.op(f"load i64, ptr {q if op is ast.FloorDiv else r}"))

    def compare(self, op, a: Val, b: Val) -> Val:
        fn = self.fn
        t = promote(a.t, b.t)
        a, b = self.cast(a, t), self.cast(b, t)
        if t in FLOATS:
            cond = {ast.Lt: "olt", ast.LtE: "ole", ast.Gt: "ogt", ast.GtE: "oge",
                    ast.Eq: "oeq", ast.NotEq: "une"}.get(op)
            if cond is None:
                raise Unsupported(f"comparison {op.__name__}")
            return Val(BOOL, fn.op(f"fcmp {cond} {LL[t]} {a.r}, {b.r}"))
        cond = {ast.Lt: "slt", ast.LtE: "sle", ast.Gt: "sgt", ast.GtE: "sge", ast.Eq: "eq",
                ast.NotEq: "ne"}.get(op)
        if cond is None:
            raise Unsupported(f"comparison {op.__name__}")
        if t == BOOL and cond not in ("eq", "ne"):
            a, b = self.cast(a, I64), self.cast(b, I64)
            t = I64
        return Val(BOOL, fn.op(f"icmp {cond} {LL[t]} {a.r}, {b.r}"))

    def boolop(self, node) -> Val:
        """``a or b`` / ``a and b`` of booleans, short-circuit as Python evaluates them."""
        fn = self.fn
        is_or = isinstance(node.op, ast.Or)
        slot = fn.alloca("i1")
        end = fn.label("bend")
        for k, e in enumerate(node.values):
            v = self.scalar(self.expr(e))
            if v.t != BOOL:
                raise Unsupported("and/or of values that are not booleans")
            fn.emit(f"store i1 {v.r}, ptr {slot}")
            if k < len(node.values) - 1:
                nxt = fn.label("bnext")
                yes, no = (end, nxt) if is_or else (nxt, end)
                fn.term(f"br i1 {v.r}, label %{yes}, label %{no}")
                fn.block(nxt)
        fn.block(end)
        return Val(BOOL, fn.op(f"load i1, ptr {slot}"))

    def ifexp(self, node) -> Val:
        fn = self.fn
        c = self.truth(self.expr(node.test))
        then, other, end = fn.label("ithen"), fn.label("ielse"), fn.label("iend")
        fn.term(f"br i1 {c.r}, label %{then}, label %{other}")
        # each arm is lowered into its block; the first arm's kind is known only once the
        # second's is, so its cast to the common kind is put in afterwards, before its
        # branch to the join, where a phi takes both
        fn.block(then)
        a = self.scalar(self.expr(node.body))
        a_end_lines = len(fn.lines)
        a_label = self._current()
        fn.term(f"br label %{end}")
        fn.block(other)
        b = self.scalar(self.expr(node.orelse))
        t = promote(a.t, b.t)
        b = self.cast(b, t)
        b_label = self._current()
        fn.term(f"br label %{end}")
        if a.t != t:  # the first arm's cast goes in before its branch to the join
            keep = fn.lines[a_end_lines + 1:]
            del fn.lines[a_end_lines:]
            fn.done = False
            a = self.cast(a, t)
            a_label = self._current()
            fn.term(f"br label %{end}")
            fn.lines += keep
        fn.lines.append(f"{end}:")
        fn.done = False
        return Val(t, fn.op(f"phi {LL[t]} [{a.r}, %{a_label}], [{b.r}, %{b_label}]"))

    def _current(self) -> str:
        for line in reversed(self.fn.lines):
            if line.endswith(":") and not line.startswith(" "):
                return line[:-1]
        return "start"

    def attribute(self, node):
        base = self.expr(node.value)
        if isinstance(base, Obj) and base.what == "module":
            if base.name == "math" and node.attr in MATH_CONST:
                return const(F64, MATH_CONST[node.attr])
            if base.name == "np" and node.attr in NAMES:
                return Obj("dtype", NAMES[node.attr])
            if base.name == "math":
                return Obj("math", node.attr)
            raise Unsupported(f"np.{node.attr}")
        if isinstance(base, Arr):
            if node.attr == "shape":
                return Tup(Val(I64, s) for s in base.shape)
            if node.attr == "size":
                n = const(I64, 1)
                for s in base.shape:
                    n = self.binop(ast.Mult, n, Val(I64, s))
                return n
            if node.attr == "T" and base.t.ndim == 2:
                layout = "F" if base.t.layout == "C" else "C"
                return Arr(ArrT(base.t.kind, 2, layout), base.data, base.shape[::-1])
            if node.attr == "ndim":
                return const(I64, base.t.ndim)
        raise Unsupported(f"attribute .{node.attr}")

    def subscript(self, node):
        base = self.expr(node.value)
        if isinstance(base, Tup):
            k = self.scalar(self.expr(node.slice))
            if k.c is None or k.t != I64 or not -len(base.items) <= k.c < len(base.items):
                raise Unsupported("a tuple indexed at run time")
            return base.items[k.c]
        if isinstance(base, Arr):
            arr, ptr = self.element(node, base)
            return Val(arr.t.kind, self.fn.op(f"load {LL[arr.t.kind]}, ptr {ptr}"))
        raise Unsupported("indexing something other than an array or a tuple")

    def element(self, node, base=None):
        """The array and the address of entry ``a[i, j]`` (negative indices wrap, as in
        Numba; no bounds check, as in Numba without boundscheck)."""
        fn = self.fn
        arr = self.expr(node.value) if base is None else base
        if not isinstance(arr, Arr):
            raise Unsupported("indexing something other than an array")
        idx = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if len(idx) != arr.t.ndim:
            raise Unsupported("an index of another rank than its array")
        vals = []
        for e, dim in zip(idx, arr.shape):
            if isinstance(e, ast.Slice):
                raise Unsupported("a slice")
            v = self.scalar(self.expr(e))
            if v.t not in (I64, BOOL):
                raise Unsupported("a float index")
            v = self.cast(v, I64)
            if v.c is None or v.c < 0:
                neg = fn.op(f"icmp slt i64 {v.r}, 0")
                v = Val(I64, fn.op(f"select i1 {neg}, i64 {fn.op(f'add i64 {v.r}, {dim}')}, "
                                   f"i64 {v.r}"))
            vals.append(v)
        order = range(arr.t.ndim) if arr.t.layout == "C" else range(arr.t.ndim - 1, -1, -1)
        flat = None
        for k in order:  # row-major over the layout's own order of axes
            v = vals[k]
            flat = v.r if flat is None else fn.op(
                f"add i64 {fn.op(f'mul i64 {flat}, {arr.shape[k]}')}, {v.r}")
        ptr = fn.op(f"getelementptr {LL[arr.t.kind]}, ptr {arr.data}, i64 {flat}")
        return arr, ptr

    # --- calls ---------------------------------------------------------------------------------
    def call(self, node):
        fn = self.fn
        if node.keywords:
            raise Unsupported("a call with keywords")
        f = self.expr(node.func)
        if not isinstance(f, Obj):
            raise Unsupported("a call of a value")
        args = [self.expr(a) for a in node.args]
        if f.what == "dtype":
            if len(args) != 1:
                raise Unsupported("a dtype called with other than one argument")
            v = self.scalar(args[0])
            if f.name == I64 and v.t in FLOATS:
                return Val(I64, fn.op(f"fptosi {LL[v.t]} {v.r} to i64"))
            return self.cast(v, f.name)
        if f.what == "builtin":
            if f.name == "abs" and len(args) == 1:
                v = self.scalar(args[0])
                if v.t in FLOATS:
                    return self.intrinsic("llvm.fabs", v.t, [v])
                v = self.cast(v, I64)
                neg = fn.op(f"icmp slt i64 {v.r}, 0")
                return Val(I64, fn.op(f"select i1 {neg}, i64 {fn.op(f'sub i64 0, {v.r}')}, "
                                      f"i64 {v.r}"))
            raise Unsupported(f"builtin {f.name}")
        if f.what == "math":
            return self.math(f.name, [self.scalar(a) for a in args])
        if f.what == "intrinsic":
            return getattr(self, "i_" + f.name)(*args)
        if f.what == "function":
            return self.user(f.name, args)
        raise Unsupported(f"a call of {f}")

    def intrinsic(self, name: str, t: str, args: list) -> Val:
        ty = LL[t]
        full = f"{name}.{'f32' if t == F32 else 'f64'}"
        sig = ", ".join([ty] * len(args))
        self.mod.declare(full, f"declare {ty} @{full}({sig})")
        text = ", ".join(f"{ty} {a.r}" for a in args)
        return Val(t, self.fn.op(f"call {ty} @{full}({text})"))

    def math(self, name: str, args: list) -> Val:
        if name in ("isnan", "isinf", "isfinite") and len(args) == 1:
            v = args[0]
            if v.t not in FLOATS:
                return const(BOOL, name == "isfinite")
            fn, ty = self.fn, LL[v.t]
            if name == "isnan":
                return Val(BOOL, fn.op(f"fcmp uno {ty} {v.r}, {v.r}"))
            a = self.intrinsic("llvm.fabs", v.t, [v])
            inf = const_text(v.t, math.inf)
            return Val(BOOL, fn.op(f"fcmp {'oeq' if name == 'isinf' else 'one'} {ty} {a.r}, {inf}"))
        if name == "pow" and len(args) == 2 and args[0].t in FLOATS and args[1].t in (I64, BOOL):
            return self.powi(self.cast(args[0], F64), self.cast(args[1], I64))
        if name in ("pow", "copysign", "atan2") and len(args) == 2:
            a, b = args
            if a.t != b.t and a.t in FLOATS and b.t in FLOATS:  # Numba: the float64 case
                a, b = self.cast(a, F64), self.cast(b, F64)
                args = [a, b]
            if a.t != b.t or a.t not in FLOATS:
                raise Unsupported(f"math.{name} of mixed types")
            if name == "atan2":
                return self.extern(("atan2f", "atan2"), a.t, args)
            return self.intrinsic(f"llvm.{name}", a.t, args)
        if len(args) != 1 or (name not in INTRINSIC and name not in EXTERN):
            raise Unsupported(f"math.{name}")
        v = args[0]
        if v.t not in FLOATS:
            v = self.cast(v, F64)  # Numba: an integer argument goes through float64
        if name in INTRINSIC:
            return self.intrinsic(INTRINSIC[name], v.t, [v])
        return self.extern(EXTERN[name], v.t, [v])

    def powi(self, a: Val, b: Val) -> Val:
        """``math.pow(float, int)`` as Numba computes it: squarings (float64), 1/r for a
        negative exponent, libm's pow beyond 2**16 (numba/cpython/numbers.py)."""
        fn = self.fn
        self.mod.declare("llvm.pow.f64", "declare double @llvm.pow.f64(double, double)")
        self.mod.declare("symbp.powi", POWI.format(
            code=self.mod.error("OverflowError", "math.pow: the exponent -2**63")))
        slot = fn.alloca("double")
        self.propagate(fn.op(f"call i32 @symbp.powi(double {a.r}, i64 {b.r}, ptr {slot})"))
        return Val(F64, fn.op(f"load double, ptr {slot}"))

    def extern(self, names, t: str, args: list) -> Val:
        name = names[0] if t == F32 else names[1]
        ty = LL[t]
        sig = ", ".join([ty] * len(args))
        self.mod.declare(name, f"declare {ty} @{name}({sig}) nounwind readonly")
        text = ", ".join(f"{ty} {a.r}" for a in args)
        return Val(t, self.fn.op(f"call {ty} @{name}({text})"))

    def user(self, name: str, args: list):
        fn = self.fn
        types = []
        for a in args:
            if isinstance(a, Val):
                types.append(a.t)
            elif isinstance(a, Arr):
                types.append(a.t)
            elif isinstance(a, Tup) and all(isinstance(x, Val) for x in a.items):
                types.append(tuple(x.t for x in a.items))
            else:
                raise Unsupported("an argument that is neither a scalar nor an array")
        fname, rets = self.mod.make(name, tuple(types))
        text = []
        for a in args:
            if isinstance(a, Val):
                text.append(f"{LL[a.t]} {a.r}")
            elif isinstance(a, Arr):
                text += [f"ptr {a.data}"] + [f"i64 {s}" for s in a.shape]
            else:
                text += [f"{LL[x.t]} {x.r}" for x in a.items]
        slots = [fn.alloca(LL[r]) for r in rets or ()]
        status = fn.op(f"call i32 {fname}({', '.join(text + [f'ptr {s}' for s in slots])})")
        self.propagate(status)
        if rets is None:
            return Tup([])
        vals = [Val(r, fn.op(f"load {LL[r]}, ptr {s}")) for r, s in zip(rets, slots)]
        return vals[0] if rets.bare else Tup(vals)

    def propagate(self, status: str) -> None:
        """A callee's raise, raised on: its status returned as it is."""
        self.return_if(self.fn.op(f"icmp ne i32 {status}, 0"), status)

    def check(self, bad: str, message: str) -> None:
        """``raise ValueError(message)`` where ``bad`` holds."""
        self.return_if(bad, str(self.mod.error("ValueError", message)))

    def return_if(self, bad: str, status: str) -> None:
        fn = self.fn
        ok, no = fn.label("ok"), fn.label("raise")
        fn.term(f"br i1 {bad}, label %{no}, label %{ok}")
        fn.block(no)
        fn.term(f"ret i32 {status}")
        fn.block(ok)

    # --- the backends' intrinsics (symbp.backends.views, address and blas) --------------------
    def sizes(self, shape) -> list:
        """The int64 sizes of a shape argument (an int or a tuple of ints)."""
        items = shape.items if isinstance(shape, Tup) else [shape]
        if not items or any(self.scalar(v).t not in (I64, BOOL) for v in items):
            raise Unsupported("a shape that is not one or more integers")
        return [self.cast(v, I64) for v in items]

    VIEW = "symbp: a workspace view reaches outside its array"

    def i_view(self, buf, start, shape):
        fn = self.fn
        if not (isinstance(buf, Arr) and buf.t.ndim == 1 and buf.t.layout == "C"):
            raise Unsupported("_view of something other than a 1-D C array")
        at = self.cast(self.scalar(start), I64)
        dims = self.sizes(shape)
        n, bad = "1", fn.op(f"icmp slt i64 {at.r}, 0")
        for d in dims:
            bad = fn.op(f"or i1 {bad}, {fn.op(f'icmp slt i64 {d.r}, 0')}")
            n = fn.op(f"mul i64 {n}, {d.r}")
        end = fn.op(f"add i64 {at.r}, {n}")
        bad = fn.op(f"or i1 {bad}, {fn.op(f'icmp sgt i64 {end}, {buf.shape[0]}')}")
        self.check(bad, self.VIEW)
        data = fn.op(f"getelementptr {LL[buf.t.kind]}, ptr {buf.data}, i64 {at.r}")
        return Arr(ArrT(buf.t.kind, len(dims), "C"), data, [d.r for d in dims])

    def i_rows(self, a, lo, hi):
        fn = self.fn
        if not (isinstance(a, Arr) and a.t.layout == "C"):
            raise Unsupported("_rows of something other than a C array")
        lo, hi = self.cast(self.scalar(lo), I64), self.cast(self.scalar(hi), I64)
        bad = fn.op(f"or i1 {fn.op(f'icmp slt i64 {lo.r}, 0')}, "
                    f"{fn.op(f'icmp sgt i64 {lo.r}, {hi.r}')}")
        bad = fn.op(f"or i1 {bad}, {fn.op(f'icmp sgt i64 {hi.r}, {a.shape[0]}')}")
        self.check(bad, self.VIEW)
        step = lo.r
        for s in a.shape[1:]:
            step = fn.op(f"mul i64 {step}, {s}")
        data = fn.op(f"getelementptr {LL[a.t.kind]}, ptr {a.data}, i64 {step}")
        return Arr(a.t, data, [fn.op(f"sub i64 {hi.r}, {lo.r}")] + a.shape[1:])

    def i_array(self, address, shape, dtype):
        if not (isinstance(dtype, Obj) and dtype.what == "dtype"):
            raise Unsupported("_array of something other than a dtype")
        address = self.scalar(address)
        if address.t != I64:
            raise Unsupported("_array of an address that is not an int64")
        dims = self.sizes(shape)
        data = self.fn.op(f"inttoptr i64 {address.r} to ptr")
        return Arr(ArrT(dtype.name, len(dims), "C"), data, [d.r for d in dims])

    def i_gemm(self, a, b, c, alpha, beta):
        """``C = alpha A @ B + beta C`` by OpenBLAS, as ``symbp.backends.blas.gemm``."""
        from . import blas

        fn = self.fn
        if blas.OPENBLAS is None:
            raise Unsupported("BLAS through SciPy (numba_xxgemm)")
        arrays = (a, b, c)
        if not all(isinstance(x, Arr) and x.t.ndim == 2 for x in arrays):
            raise Unsupported("_gemm of other than 2-D arrays")
        kind = a.t.kind
        if kind not in FLOATS or b.t.kind != kind or c.t.kind != kind or c.t.layout != "C":
            raise Unsupported("_gemm of mixed dtypes or an F-layout C")
        m, k = a.shape
        k2, n = b.shape
        cm, cn = c.shape
        bad = fn.op(f"icmp ne i64 {k}, {k2}")
        bad = fn.op(f"or i1 {bad}, {fn.op(f'icmp ne i64 {m}, {cm}')}")
        bad = fn.op(f"or i1 {bad}, {fn.op(f'icmp ne i64 {n}, {cn}')}")
        self.check(bad, "symbp gemm: the sizes of A @ B and C disagree")

        def lead(x):  # BLAS's leading dimension, at least 1 (an empty batch)
            rows, cols = x.shape
            ld = cols if x.t.layout == "C" else rows
            small = fn.op(f"icmp slt i64 {ld}, 1")
            return fn.op(f"select i1 {small}, i64 1, i64 {ld}")

        def ref(ty, value):
            slot = fn.alloca(ty)
            fn.emit(f"store {ty} {value}, ptr {slot}")
            return slot

        ty = LL[kind]
        flag = {"C": ord("n"), "F": ord("t")}
        al = ref(ty, self.cast(self.scalar(alpha), kind).r)
        be = ref(ty, self.cast(self.scalar(beta), kind).r)
        args = [ref("i8", flag[b.t.layout]), ref("i8", flag[a.t.layout]), ref("i64", n),
                ref("i64", m), ref("i64", k), al, b.data, ref("i64", lead(b)), a.data,
                ref("i64", lead(a)), be, c.data, ref("i64", lead(c))]
        text = ", ".join(f"ptr {x}" for x in args) + ", i64 1, i64 1"
        f64 = [fn.op(f"sitofp i64 {x} to double") for x in (m, n, k)]
        mnk = fn.op(f"fmul double {fn.op(f'fmul double {f64[0]}, {f64[1]}')}, {f64[2]}")
        small = fn.op(f"fcmp ole double {mnk}, {const_text(F64, blas.SMALL)}")
        kc = "s" if kind == F32 else "d"
        if kc == "s" and blas.MKL_STRIDED is not None and (a.t.layout, b.t.layout) == ("C", "C"):
            low, high, step, floats = blas.MKL_STRIDED  # blas.to_beside's rule
            few = fn.op(f"and i1 {fn.op(f'icmp sgt i64 {m}, {low}')}, "
                        f"{fn.op(f'icmp sle i64 {m}, {high}')}")
            aligned = fn.op(f"icmp eq i64 {fn.op(f'srem i64 {n}, {step}')}, 0")
            kn = fn.op(f"fmul double {f64[2]}, {f64[1]}")
            big = fn.op(f"fcmp oge double {kn}, {const_text(F64, floats)}")
            wide = fn.op(f"and i1 {aligned}, {big}")
            # MKL's thread count read only for such a product (blas.THREADS_SYMBOL)
            flag = fn.alloca("i1")
            fn.emit(f"store i1 {small}, ptr {flag}")
            ask, after = fn.label("gthreads"), fn.label("gchosen")
            fn.term(f"br i1 {fn.op(f'and i1 {few}, {wide}')}, label %{ask}, label %{after}")
            fn.block(ask)
            sym = blas.THREADS_SYMBOL
            self.mod.declare(sym, f"declare i32 @{sym}()")
            one = fn.op(f"icmp eq i32 {fn.op(f'call i32 @{sym}()')}, 1")
            fn.emit(f"store i1 {fn.op(f'or i1 {small}, {one}')}, ptr {flag}")
            fn.term(f"br label %{after}")
            fn.block(after)
            small = fn.op(f"load i1, ptr {flag}")
        lo, hi, end = fn.label("gsmall"), fn.label("glarge"), fn.label("gend")
        fn.term(f"br i1 {small}, label %{lo}, label %{hi}")
        for label, symbol in ((lo, f"symbp_{kc}gemm64_small"), (hi, f"symbp_{kc}gemm64")):
            fn.block(label)
            self.mod.declare(symbol, f"declare void @{symbol}({', '.join(['ptr'] * 13)}, i64, i64)")
            fn.emit(f"call void @{symbol}({text})")
            fn.term(f"br label %{end}")
        fn.block(end)
        return Tup([])


POWI = """define internal i32 @symbp.powi(double %a0, i64 %b, ptr %out) alwaysinline {{
entry:
  %neg = icmp slt i64 %b, 0
  %nb = sub i64 0, %b
  %e0 = select i1 %neg, i64 %nb, i64 %b
  %over = icmp slt i64 %e0, 0
  br i1 %over, label %overflow, label %size
overflow:
  ret i32 {code}
size:
  %big = icmp sgt i64 %e0, 65536
  br i1 %big, label %libm, label %loop
libm:
  %fb = sitofp i64 %b to double
  %p = call double @llvm.pow.f64(double %a0, double %fb)
  store double %p, ptr %out
  ret i32 0
loop:
  %r = phi double [1.0, %size], [%r2, %next]
  %a = phi double [%a0, %size], [%a2, %next]
  %e = phi i64 [%e0, %size], [%e2, %next]
  %more = icmp ne i64 %e, 0
  br i1 %more, label %step, label %done
step:
  %bit = and i64 %e, 1
  %odd = icmp ne i64 %bit, 0
  %ra = fmul double %r, %a
  %r2 = select i1 %odd, double %ra, double %r
  %e2 = ashr i64 %e, 1
  %a2 = fmul double %a, %a
  br label %next
next:
  br label %loop
done:
  %inv = fdiv double 1.0, %r
  %res = select i1 %neg, double %inv, double %r
  store double %res, ptr %out
  ret i32 0
}}"""


DIVMOD = """define internal void @symbp.divmod(i64 %x, i64 %y, ptr %q, ptr %r) alwaysinline {
entry:
  %zero = icmp eq i64 %y, 0
  %minx = icmp eq i64 %x, -9223372036854775808
  %m1 = icmp eq i64 %y, -1
  %over = and i1 %minx, %m1
  %none = or i1 %zero, %over
  br i1 %none, label %nothing, label %go
nothing:
  store i64 0, ptr %q
  store i64 0, ptr %r
  ret void
go:
  %d = sdiv i64 %x, %y
  %m = srem i64 %x, %y
  %nz = icmp ne i64 %m, 0
  %xor = xor i64 %m, %y
  %diff = icmp slt i64 %xor, 0
  %fix = and i1 %nz, %diff
  %d1 = sub i64 %d, 1
  %m1v = add i64 %m, %y
  %dq = select i1 %fix, i64 %d1, i64 %d
  %mr = select i1 %fix, i64 %m1v, i64 %m
  store i64 %dq, ptr %q
  store i64 %mr, ptr %r
  ret void
}"""


# --- LLVM: the target machine, compiling, loading --------------------------------------------

_llvm = None  # (llvmlite.binding, a target machine, Numba's config, the engine)
_CPU = ""  # the CPU the target machines compile for: name, triple, features (set by _setup)
_ABI_OK = None


def _setup():
    """LLVM for this process: a target machine as Numba's (the host CPU, O3) for compiling,
    and one MCJIT engine (it owns a second one) that every module's object code joins."""
    global _llvm, _CPU
    if _llvm is None:
        import llvmlite.binding as ll
        from numba.core import config
        from numba.core.codegen import get_host_cpu_features

        from . import blas  # noqa: F401  (registers the BLAS symbols the kernels call)

        ll.initialize_native_target()
        ll.initialize_native_asmprinter()

        target = ll.Target.from_triple(ll.get_process_triple())
        cpu = config.CPU_NAME or ll.get_host_cpu_name()
        features = (config.CPU_FEATURES if config.CPU_FEATURES is not None
                    else get_host_cpu_features())
        reloc = ("static" if target.name.startswith("x86") else
                 "pic" if target.name.startswith("ppc") else "default")
        _CPU = f"{cpu} {target.triple} {features}"

        def machine():  # as Numba's JIT makes it (numba/core/codegen.py)
            return target.create_target_machine(cpu=cpu, features=features, opt=3,
                                                reloc=reloc, codemodel="jitdefault", jit=True)

        # objects the wrapper uses, by symbols of symbp's own: Numba binds the name
        # PyExc_TypeError to the class itself, CPython to a pointer to it
        ll.add_symbol("symbp_ndarray", id(np.ndarray))
        ll.add_symbol("symbp_None", id(None))
        for e in EXCEPTIONS:
            ll.add_symbol(f"symbp_exc_{e}", id(EXCEPTIONS[e]))
        engine = ll.create_mcjit_compiler(ll.parse_assembly(""), machine())
        _llvm = (ll, machine(), config, engine)
    return _llvm


def abi_ok() -> bool:
    """Whether this CPython and NumPy lay out arrays as the wrapper reads them."""
    global _ABI_OK
    if _ABI_OK is None:
        a = np.zeros((3, 5), np.float32)
        at = id(a)

        def word(off, ty):
            return ty.from_address(at + off).value

        try:
            descr = word(AR_DESCR, ctypes.c_void_p)
            _ABI_OK = (struct.calcsize("P") == 8
                       and word(OB_TYPE, ctypes.c_void_p) == id(np.ndarray)
                       and word(AR_DATA, ctypes.c_void_p) == a.ctypes.data
                       and word(AR_ND, ctypes.c_int) == 2
                       and ctypes.c_int.from_address(descr + DESCR_TYPENUM).value
                       in TYPENUMS[F32]
                       and descr == id(a.dtype)
                       and [ctypes.c_ssize_t.from_address(word(AR_DIMS, ctypes.c_void_p)
                                                          + 8 * k).value
                            for k in range(2)] == [3, 5]
                       and word(AR_FLAGS, ctypes.c_int) & (C_CONTIGUOUS | ALIGNED | WRITEABLE)
                       == C_CONTIGUOUS | ALIGNED | WRITEABLE
                       and np.dtype(">f4").byteorder == ">"
                       and ctypes.c_char.from_address(id(np.dtype(">f4")) + DESCR_BYTEORDER).value
                       == b">")
        except (ValueError, OverflowError):
            _ABI_OK = False
    return _ABI_OK


def enabled() -> bool:
    choice = os.environ.get("SYMBP_LOWER", "native")
    if choice not in ("native", "numba"):
        from ..errors import SymbpError

        raise SymbpError(f"SYMBP_LOWER={choice!r}: use 'native' (the default) or 'numba'")
    return choice == "native" and abi_ok()


def translate(source: str) -> Module:
    """The module's IR (``Module.compile()``), or Unsupported."""
    m = Module(source)
    if not m.kernels:
        raise Unsupported("no kernel with a signature")
    m.ir = m.compile()
    return m


def _optimise(ir_text: str):
    ll, tm, config, _ = _setup()
    mod = ll.parse_assembly(ir_text)
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    mod.verify()
    pto = ll.create_pipeline_tuning_options()
    pto.speed_level = 3
    pto.loop_vectorization = bool(config.LOOP_VECTORIZE)
    pto.slp_vectorization = bool(config.SLP_VECTORIZE)
    pb = ll.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_object(mod)


class Info:
    """What a native kernel is, for the code that asks (``fn.__self__``)."""

    native = True

    def __init__(self, name: str, types: list, rets, from_disk: bool):
        self.name, self.types, self.rets = name, types, rets
        self.from_disk = from_disk  # its machine code was read from the cache directory
        self.signatures = [tuple(types)]

    def returns_floats_of(self, kind: str) -> bool:
        return (self.rets is not None and not self.rets.bare
                and all(r == kind for r in self.rets))


def load(source: str, obj_path) -> dict | None:
    """name -> CPython function of every kernel of ``source``, compiled here (or read from
    ``obj_path``); None when the module is outside the dialect (Numba compiles it)."""
    if not enabled():
        return None
    try:
        m = translate(source)
    except Unsupported:
        return None
    with _LOCK:  # one engine for the process: threads compiling at once take turns
        obj = _read(obj_path)
        from_disk = obj is not None
        if obj is None:
            try:
                obj = _optimise(m.ir)
            except RuntimeError as err:  # LLVM refused the IR: a bug here, not the user's
                warnings.warn(f"symbp: the kernels' own lowering failed ({err}); Numba "
                              "compiles this module. Please report it with the module "
                              f"{obj_path.name[:-len('.native')]}.py", RuntimeWarning,
                              stacklevel=3)
                return None
            _write(obj_path, obj)
        ll, _, _, engine = _setup()
        if m.tag not in _added:  # the same module loaded again (a test's fresh cache): once
            engine.add_object_file(ll.ObjectFileRef.from_data(obj))
            engine.finalize_object()
            _added.add(m.tag)
    new = ctypes.pythonapi.PyCFunction_NewEx
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.py_object, ctypes.c_void_p]
    out = {}
    for name, types in m.kernels.items():
        rets = m.made[(name, tuple(types))][1]
        at = engine.get_global_value_address(entry(m.tag, name))
        if not at:
            raise RuntimeError(f"symbp: the compiled module lacks {name}")
        out[name] = new(at, Info(name, types, rets, from_disk), None)
    return out


_added: set = set()  # the tags of the modules in the engine
_LOCK = threading.RLock()


def _recipe() -> bytes:
    """What object code depends on besides its module's text (which names its file): this
    lowering's own code, LLVM's version and the CPU it was compiled for (a cache directory
    shared by two machines must not run one's code on the other)."""
    global _RECIPE
    if _RECIPE is None:
        import llvmlite

        _setup()
        with open(__file__, "rb") as f:
            own = f.read()
        _RECIPE = hashlib.sha256(own + f"\0{llvmlite.__version__}\0{_CPU}".encode()).digest()
    return _RECIPE


_RECIPE = None


def _read(path) -> bytes | None:
    """The object code kept at ``path`` if it is whole (its SHA-256 follows the recipe's at
    the head of the file) and of today's recipe; None otherwise (compiled afresh)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    recipe, digest, body = data[:32], data[32:64], data[64:]
    ok = len(data) > 64 and recipe == _recipe() and hashlib.sha256(body).digest() == digest
    return body if ok else None


def _write(path, obj: bytes) -> None:
    from ..cache import write_atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, _recipe() + hashlib.sha256(obj).digest() + obj)
    except OSError:
        pass  # a read-only cache: compiled again next time
