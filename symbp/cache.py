"""The disk cache of generated modules, so a second process starts fast.

Numba can cache machine code only for functions that live in a real file (``cache=True``
fails for exec'd source).  So generated source is written to ``gen_<sha256>.py`` under the
cache directory (``$SYMBP_CACHE_DIR``, default ``~/.cache/symbp``) and imported from
there; Numba keeps its own index and object files next to it in ``__pycache__``.  A
module that symbp's own lowering compiles (``symbp.backends.native``, the 'cpu' kernels)
keeps its object code there too, as ``gen_<sha256>.native``, behind the SHA-256 of its
bytes and of its recipe (that lowering's code, LLVM's version, the CPU).

The key is the SHA-256 of the source *and* of everything its machine code depends on
besides: symbp's version, the Numba, llvmlite and NumPy versions, Python's, and the
contents of every symbp module the source imports (``symbp.backends.blas``'s gemm is
compiled into each kernel), followed through their own symbp imports.  Numba's own index
checks only the generated file's timestamp, so without this an upgraded helper module
would run next to machine code compiled against the old one.  The key's ingredients are
written at the end of the file, below the source (line numbers stay those of
``fn.source``).

Safety: files are written atomically (a temporary file, then ``os.replace``), so two
processes compiling the same program at once both see either no file or a whole one.  A
file whose content does not hash to its name is rewritten; Numba cache files that fail
to load are deleted and the module is compiled afresh.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from .errors import SymbpError

_loaded: dict[str, ModuleType] = {}  # this process: digest -> module
_PARSE = threading.Lock()


def parse(text, filename: str = "<unknown>", mode: str = "exec") -> ast.AST:
    """``ast.parse``, one thread at a time: CPython 3.11's parser is not safe to run from
    two threads at once ("AST constructor recursion depth mismatch", CPython issue
    106905), and steps compiled in threads at once each parse their module."""
    with _PARSE:
        return ast.parse(text, filename, mode)


def cache_dir() -> Path:
    """Where generated modules live: ``$SYMBP_CACHE_DIR`` or ``~/.cache/symbp``."""
    d = os.environ.get("SYMBP_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "symbp"


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a name inside a module (`from m import f`), not a module
        return None
    return Path(spec.origin) if spec is not None and spec.has_location else None


def _symbp_imports(nodes, package: str) -> list[str]:
    """The symbp modules these statements import, absolute or relative to ``package``."""
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""),
                                                   package)
            except ImportError:  # a relative import outside any package
                continue
            # `from symbp.backends import blas` imports the module symbp.backends.blas
            found += [base] + [f"{base}.{a.name}" for a in node.names]
    return [n for n in found if n.split(".")[0] == "symbp" and _module_file(n)]


@functools.cache
def _imports_of_module(name: str) -> tuple[str, ...]:
    path = _module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    # imports inside functions count too (blas.py imports in its typing function)
    return tuple(_symbp_imports(ast.walk(parse(path.read_bytes(), str(path))), package))


def dependencies(source: str) -> list[str]:
    """Every symbp module ``source`` imports, and the symbp modules those import."""
    try:
        # generated code imports at the top: walking every loop of a kernel costs ~10 ms
        todo = _symbp_imports(parse(source).body, "")
    except SyntaxError:  # it cannot compile either: load() reports it with its file
        todo = []
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _imports_of_module(name)
    return sorted(seen)


@functools.cache
def _file_hash(name: str) -> str:
    # once per process: an installed module does not change under a running program
    return hashlib.sha256(_module_file(name).read_bytes()).hexdigest()


def stamp(source: str) -> str:
    """What ``source``'s machine code depends on besides its text, as comment lines."""
    import llvmlite
    import numba
    import numpy

    from . import __version__

    versions = (f"symbp {__version__}, numba {numba.__version__}, llvmlite "
                f"{llvmlite.__version__}, numpy {numpy.__version__}, "
                f"{sys.implementation.cache_tag}")
    lines = ["# --- symbp.cache key: the source above, compiled against ---", f"# {versions}"]
    deps = dependencies(source)
    lines += [f"# {name} sha256:{_file_hash(name)}" for name in deps]
    if "symbp.backends.blas" in deps:  # the same gemm calls one library or another
        from .backends.blas import LIBRARY

        lines.append(f"# BLAS: {LIBRARY}")
    return "\n".join(lines) + "\n"


def _text(source: str) -> str:
    """The file's content: the source, then the ingredients of its key."""
    return source + ("" if source.endswith("\n") else "\n") + "\n" + stamp(source)


def digest(source: str) -> str:
    return hashlib.sha256(_text(source).encode()).hexdigest()


def path_for(source: str) -> Path:
    return _path(cache_dir(), digest(source))


def _path(d: Path, key: str) -> Path:
    return d / f"gen_{key}.py"


def write_atomic(path: Path, text: str | bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _ensure_file(path: Path, text: str) -> None:
    """The file holds exactly ``text``; a truncated or foreign file is replaced."""
    try:
        if path.read_text() == text:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    write_atomic(path, text)


def _numba_files(path: Path) -> list[Path]:
    pyc = path.parent / "__pycache__"
    return sorted(pyc.glob(path.stem + ".*.nb[ic]")) if pyc.is_dir() else []


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)  # compiles (or loads) the kernels: signatures given
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load(source: str) -> ModuleType:
    """Import generated ``source`` through its content-hashed file (once per process)."""
    text = _text(source)
    return _load(text, hashlib.sha256(text.encode()).hexdigest())


_MARK = "\n\n# --- symbp.cache key"  # where the stamp begins (see ``_text``)


def load_digest(key: str) -> tuple[str, ModuleType] | None:
    """``(source, module)`` of the cached file ``gen_<key>.py`` if it is whole (it hashes
    to its name) and current (its stamp is today's: same versions, same helper modules);
    None otherwise, and the caller generates the source afresh."""
    try:
        text = _path(cache_dir(), key).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    at = text.rfind(_MARK)
    if at < 0 or hashlib.sha256(text.encode()).hexdigest() != key:
        return None
    source = text[:at + 1]
    if _text(source) != text:
        return None
    return source, _load(text, key)


def _load(text: str, key: str) -> ModuleType:
    if key in _loaded:
        return _loaded[key]
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SymbpError(
            f"cannot create the symbp cache directory {d} ({err}): set SYMBP_CACHE_DIR "
            "to a writeable directory"
        ) from err
    path = _path(d, key)
    name = f"symbp_gen_{key[:20]}"
    _ensure_file(path, text)
    module = _native(text, path, name)
    if module is not None:
        _loaded[key] = module
        return module
    try:
        module = _import(path, name)
    except Exception as first:
        # A damaged Numba cache entry (truncated pickle, foreign file) fails to load:
        # drop this module's cache files and compile once more from the source.
        stale = _numba_files(path)
        for f in stale:
            try:
                f.unlink()
            except FileNotFoundError:
                pass
        _ensure_file(path, text)
        try:
            module = _import(path, name)
        except Exception as err:
            raise _compile_error(err, path) from err
        if not stale:  # nothing was damaged, yet the retry worked: keep the first story
            _ = first
    _loaded[key] = module
    return module


def _native(text: str, path: Path, name: str) -> ModuleType | None:
    """The module's kernels compiled by symbp's own lowering (``symbp.backends.native``),
    its machine code kept in ``__pycache__/<file>.native``; None when the module is not
    one it takes (Numba then compiles it, as it compiles every module under
    ``SYMBP_LOWER=numba``)."""
    if "from numba import njit" not in text:
        return None
    from .backends import native

    kernels = native.load(text, path.parent / "__pycache__" / (path.stem + ".native"))
    if kernels is None:
        return None
    module = ModuleType(name)
    module.__file__ = str(path)
    module.__dict__.update(kernels)
    return module


def _compile_error(err: Exception, path: Path) -> SymbpError:
    """Numba's TypingErrors are long: keep the first meaningful line and the file."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # Numba colours its messages
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = next((ln for ln in lines if not ln.startswith(("-", "During:", "File", "Failed in"))),
                 type(err).__name__)
    where = next((ln for ln in lines if str(path.name) in ln), str(path))
    return SymbpError(
        f"generated code failed to compile: {first} ({where}). This is a symbp bug: "
        "please report it with the generated file"
    )


def clear() -> int:
    """Delete every cached module, its Numba files and the steps' records (``symbp.warm``);
    returns how many files went."""
    d = cache_dir()
    n = 0
    for pattern in ("gen_*.py", "__pycache__/gen_*", "warm_*.json"):
        for f in d.glob(pattern):
            try:
                f.unlink()
                n += 1
            except FileNotFoundError:
                pass
    _loaded.clear()
    return n
