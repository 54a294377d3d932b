"""The disk cache of generated modules, so a second process starts fast.

Numba can cache machine code only for functions that live in a real file (``cache=True``
fails for exec'd source).  So generated source is written to ``gen_<sha256>.py`` under the
cache directory (``$SYMBP_CACHE_DIR``, default ``~/.cache/symbp``) and imported from
there; Numba keeps its own index and object files next to it in ``__pycache__``.

Safety: files are written atomically (a temporary file, then ``os.replace``), so two
processes compiling the same program at once both see either no file or a whole one.  A
file whose content does not hash to its name is rewritten; Numba cache files that fail
to load are deleted and the module is compiled afresh.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from .errors import SymbpError

_loaded: dict[str, ModuleType] = {}  # this process: digest -> module


def cache_dir() -> Path:
    """Where generated modules live: ``$SYMBP_CACHE_DIR`` or ``~/.cache/symbp``."""
    d = os.environ.get("SYMBP_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "symbp"


def digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def path_for(source: str) -> Path:
    return _path(cache_dir(), digest(source))


def _path(d: Path, key: str) -> Path:
    return d / f"gen_{key}.py"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _ensure_file(path: Path, source: str) -> None:
    """The file holds exactly ``source``; a truncated or foreign file is replaced."""
    try:
        if path.read_text() == source:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    _write_atomic(path, source)


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
    key = digest(source)
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
    _ensure_file(path, source)
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
        _ensure_file(path, source)
        try:
            module = _import(path, name)
        except Exception as err:
            raise _compile_error(err, path) from err
        if not stale:  # nothing was damaged, yet the retry worked: keep the first story
            _ = first
    _loaded[key] = module
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
    """Delete every cached module and its Numba files; returns how many files went."""
    d = cache_dir()
    n = 0
    for pattern in ("gen_*.py", "__pycache__/gen_*"):
        for f in d.glob(pattern):
            try:
                f.unlink()
                n += 1
            except FileNotFoundError:
                pass
    _loaded.clear()
    return n
