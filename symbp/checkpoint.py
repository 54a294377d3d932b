"""Checkpoints: named arrays plus JSON metadata in one ``.npz``, never pickle.

A checkpoint is written atomically: to a temporary file in the same directory, flushed
and fsync'ed, then moved over the old one with ``os.replace`` (atomic on POSIX and
Windows).  A process killed mid-write therefore leaves the previous checkpoint intact;
at worst a stray ``.<name>.*.tmp`` file remains beside it, removed by the next save.

Loading trusts nothing: the file must be a complete zip of ``.npy`` members with numeric
or text dtypes (``allow_pickle=False``: an object array is refused, its pickle never
unpickled), carry symbp's format marker, and hold JSON metadata.  Anything else raises
``TrainingError`` saying what is wrong with which file.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TrainingError

MARKER = "__symbp_checkpoint__"  # holds the format version
META = "__meta__"  # a 0-d unicode array holding JSON
VERSION = 1


@dataclass
class Checkpoint:
    """What ``load`` returns: the arrays by name and the metadata dict."""

    arrays: dict
    meta: dict
    path: Path


def save(path, arrays: dict, meta: dict | None = None) -> Path:
    """Write ``arrays`` (name -> numeric ndarray) and JSON-able ``meta`` to ``path``
    atomically; the file name is used as given (``np.savez`` would append ``.npz``)."""
    path = Path(path)
    out = {MARKER: np.array(VERSION, dtype=np.int64),
           META: np.array(json.dumps(meta or {}, sort_keys=True))}
    for k, v in arrays.items():
        if k in out:
            raise TrainingError(f"checkpoint array name {k!r} is reserved")
        v = np.asarray(v)
        if v.dtype.kind not in "fiub":
            raise TrainingError(f"checkpoint array {k!r} has dtype {v.dtype}: only numbers")
        out[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Interrupted or failed before the rename: the old checkpoint is untouched.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    _remove_stale(path)
    return path


def _create_temp(path: Path) -> tuple[int, str]:
    """A new, uniquely named temporary file beside ``path``, opened for writing.

    Created with mode 0o666 so that the kernel applies the umask, as ``open()`` does: the
    checkpoint gets the permissions any other file of the user gets (mkstemp's 0o600 would
    hide it from a group that shares the run directory).  O_EXCL keeps mkstemp's safety:
    never an existing file, never through a symlink planted at that name.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise TrainingError(f"cannot create a temporary file beside {path}: 100 names taken")


def _remove_stale(path: Path, age: float = 60.0) -> None:
    # Temp files of this checkpoint left by a writer that was killed; young ones may still
    # belong to a concurrent writer, so only those older than `age` seconds go.
    now = time.time()
    for f in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - f.stat().st_mtime > age:
                f.unlink()
        except OSError:
            pass


def _fsync_dir(d: Path) -> None:
    # Make the rename itself durable; not possible on every OS (Windows), so best effort.
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path) -> Checkpoint:
    """Read a checkpoint written by ``save``; refuse anything else with ``TrainingError``."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} does not exist (or is not a file)")
    if not zipfile.is_zipfile(path):
        raise TrainingError(
            f"{path} is not a checkpoint: not an .npz (zip) archive; it may be truncated, "
            "corrupt, or a different kind of file"
        )
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for k in z.files:
                arrays[k] = z[k]
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise TrainingError(
                f"{path} contains a pickled object array: refused (symbp checkpoints hold "
                "numbers only, and unpickling can run arbitrary code)"
            ) from None
        raise TrainingError(f"{path} is corrupt: {err}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise TrainingError(f"{path} is truncated or corrupt: {err}") from None
    if MARKER not in arrays:
        raise TrainingError(
            f"{path} is not a symbp checkpoint (no {MARKER} marker): it may be an .npz "
            "saved by other code; load it with numpy.load instead"
        )
    version = arrays.pop(MARKER)
    if version.shape != () or version.dtype.kind not in "iu" or int(version) != VERSION:
        raise TrainingError(
            f"{path} has checkpoint format {version!r}; this symbp reads format {VERSION}"
        )
    try:
        meta = json.loads(str(arrays.pop(META)[()]))
    except (KeyError, ValueError, TypeError) as err:
        raise TrainingError(f"{path} has missing or corrupt metadata: {err}") from None
    if not isinstance(meta, dict):
        raise TrainingError(f"{path} has corrupt metadata: expected a JSON object")
    for k, v in arrays.items():
        if v.dtype.kind not in "fiub":
            raise TrainingError(f"{path}: array {k!r} has dtype {v.dtype}, not numbers")
    return Checkpoint(arrays, meta, path)
