"""One BLAS matrix product for generated njit kernels: ``gemm(A, B, C, alpha, beta)``.

Computes ``C = alpha * A @ B + beta * C`` in place with one BLAS ``?gemm`` call (which
library: below).  Why not ``np.dot(A, B, out)``:

- ``beta`` lets a kernel add a product into an array: the SGD update ``W -= lr * A @ B``
  is one call with ``alpha = -lr, beta = 1``; no gradient buffer is written and read back.
- ``np.dot`` compiles a separate implementation for every layout combination of its
  operands (C @ C, C @ F for ``W.T``, F @ C for ``X.T``): ~0.15 s of compile time each.
  This is an intrinsic: its few instructions are emitted inline, for every layout.

``A`` and ``B`` are 2-D arrays of one float dtype in C or F layout (``X.T`` of a C array
is F: transposed for free); ``C`` is C-contiguous.  Sizes are checked: a mismatch raises
ValueError.  ``alpha`` and ``beta`` are cast to the arrays' dtype.

Which BLAS (``LIBRARY`` names it, ``SYMBP_BLAS`` forces one):

- **On Intel CPUs, Intel's MKL where it is installed** (``pip install 'symbp[mkl]'``, the
  ``mkl`` wheel; ``SYMBP_BLAS=mkl`` asks for it on any CPU): its ILP64 ``sgemm_64``,
  called by address as OpenBLAS is.  On this project's Intel Xeon (Sapphire Rapids
  class, AVX-512, where OpenBLAS runs its SkylakeX kernels) the products of a step, one
  thread, took 20.0 against 23.8 ms at batch 4096 and width 256, 5.2 against 6.5 at batch
  64 and width 1024, 2.35 against 2.68 at batch 512; 33 against 31 ms at width 2048, the
  one shape where OpenBLAS won (bench/RESULTS.md): on one MKL thread, products of a few
  rows by such a wide B now go to OpenBLAS (``MKL_STRIDED``).  The float32 products of at most
  ``SMALL`` multiply-adds stay on OpenBLAS (symbp's own copy below, else NumPy's, with
  OpenBLAS's own choice of kernels): on MKL, steps made of them were 30 %
  faster at batch 1 (width 256) and 9 % at depth 16 (width 64, batch 32), but 7-15 %
  slower at depth 1 and at width 16 and 6 % slower on W1 (64-128-64-10, batch 32), where
  OpenBLAS's kernels for small products win.  The float64 products stay there too:
  MKL's dgemm was 14-27 % faster on two of three shapes measured and 10 % slower on the
  third (batch 64, width 1024), no clear gain.  MKL's threads are Intel OpenMP's, loaded
  with ``KMP_BLOCKTIME=13`` (``_mkl``); its thread count is set for the calling thread.
- **Elsewhere, symbp's own OpenBLAS** (``SYMBP_BLAS`` unset or ``own``): the
  ``scipy-openblas64`` wheel (a dependency on x86-64) of the build NumPy bundles, loaded
  as a second instance, with OpenBLAS's own choice of kernels (the same as NumPy's copy)
  except on AMD Zen 4.  A copy of its own so that its idle threads' spin can be set short
  (``THREAD_TIMEOUT``; NumPy's copy, loaded first, spins 0.1 s: with it, auto threads
  were 11-15 % slower than one fixed thread next to a busy neighbour on the Intel Xeon,
  1.02-1.04 on this copy, bench/RESULTS.md) and its thread count is nobody else's.
  **On AMD Zen 4, with its AVX2 (Haswell) kernels**: loaded with
  ``OPENBLAS_CORETYPE=Haswell``.  On a CPU with AVX-512, OpenBLAS
  picks its SkylakeX kernels, written for Intel's full-width AVX-512 units; Zen 4 splits
  each 512-bit operation in two, and the Haswell kernels ran the float32 products of
  bench/where.py 5-28 % faster on one core (batch 64, width 1024: 1.30 / 1.32 / 1.36 ms
  against 1.67 / 1.66 / 1.89 for ``H @ W``, ``H.T @ G``, ``G @ W.T``).  Not float64 (no
  clear gain: ``_kernels_openblas``), and not the small float32 ones: SkylakeX has
  kernels for small products that skip packing, Haswell none (batch 1, 256 -> 256: 22
  against 8.7 µs), so those of at most 64^3 multiply-adds (``SMALL``) still go to NumPy's
  copy (``_kernels_openblas`` says why 64^3).  The rule
  (``_core_for_this_cpu``): an AuthenticAMD CPU of family 25 on which NumPy's OpenBLAS
  chose an AVX-512 core; nothing else is measured, so every other CPU keeps OpenBLAS's
  own choice.  The wheel is pinned to 0.3.31 (pyproject.toml says why).
  ``SYMBP_OPENBLAS_CORETYPE=<core>`` loads this copy with another core (``SkylakeX``,
  ...), ``=default`` with OpenBLAS's own choice.
- **NumPy's own OpenBLAS** (``SYMBP_BLAS=numpy``, or the wheel is missing: not x86-64):
  ``scipy_sgemm_64_`` in ``numpy.libs``.  On one
  core, called from njit code, it took 1.83 ms against 2.92 ms for SciPy's on the forward
  product of a batch-64 layer 1024 -> 1024 (float32), within 10 % either way elsewhere.
  NumPy's library is the user's too: ``symbp.runtime.threads.BLAS`` gives back the user's
  thread count after every kernel call (symbp's own copy is nobody else's: no give-back).
- **SciPy's** (``SYMBP_BLAS=scipy``, or NumPy bundles none), as ``np.dot`` in njit code.

The products' bits depend on the library and its kernels (their order of summation), as
they do on the thread count; every choice is checked against the NumPy reference in the
tests.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

_KIND = {types.float32: "s", types.float64: "d"}


CHOICES = ("", "own", "numpy", "scipy", "mkl")


def _choice() -> str:
    choice = os.environ.get("SYMBP_BLAS", "").lower()
    if choice not in CHOICES:
        from ..errors import SymbpError

        raise SymbpError(f"SYMBP_BLAS={choice!r}: the kernels' BLAS is 'own' (symbp's copy "
                         "of OpenBLAS, on AMD Zen 4 with its AVX2 kernels), 'numpy' (NumPy's "
                         "bundled OpenBLAS), 'scipy' (SciPy's) or 'mkl' (Intel's MKL, pip "
                         "install 'symbp[mkl]'); unset: the best of these for this CPU")
    return choice


def _bind(lib, beside=None) -> None:
    """The kernels' symbols, each an ILP64 Fortran ``?gemm``: ``symbp_sgemm64`` ``lib``'s,
    and with a library ``beside`` it (NumPy's copy beside symbp's own or MKL), that one's
    for ``symbp_sgemm64_small`` (float32 products of at most ``SMALL`` multiply-adds) and
    for both float64 symbols; else ``lib``'s for all four."""
    other = beside or lib
    for symbol, of in (("symbp_sgemm64", lib), ("symbp_sgemm64_small", other),
                       ("symbp_dgemm64", other), ("symbp_dgemm64_small", other)):
        binding.add_symbol(symbol, ctypes.cast(gemm_of(of, symbol[6]), ctypes.c_void_p).value)
    if is_mkl(lib):  # the calling thread's MKL thread count: MKL_STRIDED's rule reads it
        binding.add_symbol(THREADS_SYMBOL, ctypes.cast(threads_of(lib)[0], ctypes.c_void_p).value)


def gemm_of(lib, kind: str):
    """``lib``'s ILP64 Fortran ``?gemm`` (``kind`` s or d): MKL's ``sgemm_64``, the
    scipy-openblas builds' ``scipy_sgemm_64_``."""
    return getattr(lib, f"{kind}gemm_64" if is_mkl(lib) else f"scipy_{kind}gemm_64_")


def is_mkl(lib) -> bool:
    return getattr(lib, "_symbp_mkl", False)


def threads_of(lib):
    """``(get, set)``: ctypes functions reading and setting ``lib``'s thread count.  MKL's
    is set for the calling thread (``MKL_Set_Num_Threads_Local``: its C interface; the
    lower-case names are Fortran's, by reference), the thread that runs the kernel;
    OpenBLAS has one count for the process."""
    if is_mkl(lib):
        return lib.MKL_Get_Max_Threads, lib.MKL_Set_Num_Threads_Local
    return lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_


def _numpy_openblas():
    """NumPy's bundled OpenBLAS, ILP64 (``ctypes.CDLL``), or None: not bundled (a conda or
    Accelerate build of NumPy), or not the ILP64 scipy-openblas."""
    root = os.path.dirname(os.path.dirname(np.__file__))
    found = sorted(glob.glob(os.path.join(root, "numpy.libs", "libscipy_openblas64_*"))
                   + glob.glob(os.path.join(os.path.dirname(np.__file__), ".dylibs",
                                            "libscipy_openblas64_*")))
    for path in found:
        try:
            lib = ctypes.CDLL(path)  # NumPy loaded it already: this is the same copy
            lib.scipy_openblas_get_corename64_.restype = ctypes.c_char_p
            lib.scipy_sgemm_64_, lib.scipy_dgemm_64_  # noqa: B018  (both there, or next)
            return lib
        except (OSError, AttributeError):
            continue
    return None


AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids")


def _core_for_this_cpu(numpy_lib) -> str | None:
    """The OpenBLAS core type for symbp's own copy, or None: keep OpenBLAS's choice, with
    every product on that copy.  ``SYMBP_OPENBLAS_CORETYPE`` if set (``default``: None);
    else Haswell on Zen 4 (AuthenticAMD, family 25, and NumPy's OpenBLAS chose an AVX-512
    core), measured above; else None."""
    forced = os.environ.get("SYMBP_OPENBLAS_CORETYPE", "").strip()
    if forced:
        return None if forced.lower() == "default" else forced
    if numpy_lib is None:
        return None
    chosen = (numpy_lib.scipy_openblas_get_corename64_() or b"").decode().lower()
    if chosen not in AVX512_CORES:
        return None
    fields = _cpu()
    amd, zen4 = fields.get("vendor_id") == "AuthenticAMD", fields.get("cpu family") == "25"
    return "Haswell" if amd and zen4 else None


def _cpu() -> dict:
    """The first processor's fields in /proc/cpuinfo (``vendor_id``, ``cpu family``, ...);
    empty where there is none (not Linux: nothing there is measured)."""
    try:
        with open("/proc/cpuinfo") as f:
            head = f.read(4096)
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (
        line.split(":", 1) for line in head.splitlines() if ":" in line)}


# OpenBLAS's idle threads spin 2^THREAD_TIMEOUT TSC ticks after their work before they
# sleep.  Its default, 2^28, is ~0.1 s: after a two-thread step, or a probe of two threads
# by the thread tuner, symbp's second OpenBLAS thread spun on for 0.105 s of CPU
# (bench/RESULTS.md), taking a core from the one-thread steps that followed and from any
# neighbour process.  2^25 is ~13 ms at 2.6 GHz: longer than the gaps between one step's
# products, between steps, and than most of the tuner's probes of one thread, so two-thread
# steps still find the thread awake.  (2^22, ~1.6 ms, let it sleep through such probes:
# the idle machine's two-thread steps after them came out slower, and the tuner switched
# more.)
THREAD_TIMEOUT = 25


def _own_openblas(core: str | None):
    """symbp's own copy of OpenBLAS (the ``scipy_openblas64`` package's library, a file
    apart from NumPy's, so a second instance with its own state and threads), loaded with
    ``OPENBLAS_CORETYPE=core`` (None: OpenBLAS's own choice) and, unless the user set one,
    ``OPENBLAS_THREAD_TIMEOUT=THREAD_TIMEOUT``.  None if the package is
    missing; a SymbpError if the library did not take that core (a name OpenBLAS does not
    know: it keeps its own choice)."""
    import importlib.util

    spec = importlib.util.find_spec("scipy_openblas64")  # its __init__ is not run
    if spec is None or not spec.submodule_search_locations:
        return None
    where = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    found = sorted(glob.glob(os.path.join(where, "libscipy_openblas64_*.so"))
                   + glob.glob(os.path.join(where, "libscipy_openblas64_*.dylib")))
    if not found:
        return None
    setting = {"OPENBLAS_CORETYPE": core} if core is not None else {}
    if "OPENBLAS_THREAD_TIMEOUT" not in os.environ:  # the user's own value is kept
        setting["OPENBLAS_THREAD_TIMEOUT"] = str(THREAD_TIMEOUT)
    before = {k: os.environ.get(k) for k in setting}
    try:  # read once, by the library's constructor, while it loads
        os.environ.update(setting)
        lib = ctypes.CDLL(found[0])
        lib.scipy_openblas_get_corename64_.restype = ctypes.c_char_p
        got = (lib.scipy_openblas_get_corename64_() or b"").decode()
    except (OSError, AttributeError):
        return None
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if core is not None and got.lower() != core.lower():
        from ..errors import SymbpError

        raise SymbpError(f"SYMBP_OPENBLAS_CORETYPE={core!r}: OpenBLAS does not know this "
                         f"core type and ran {got!r}; give one it knows (Haswell, Zen, "
                         "SkylakeX, Cooperlake, SapphireRapids, ...) or 'default' for "
                         "OpenBLAS's own choice")
    lib._symbp_own = True  # not NumPy's copy: nobody else's thread count
    return lib


# Intel OpenMP's idle threads (MKL's) spin KMP_BLOCKTIME ms after a parallel region before
# they sleep: 200 by default, the same cost as OpenBLAS's spin above; 13 ms, as there.
KMP_BLOCKTIME = 13


def _mkl_path() -> str | None:
    """``libmkl_rt`` of the ``mkl`` wheel (``pip install 'symbp[mkl]'``): the wheel puts it
    in the environment's ``lib`` folder.  None if it is not there."""
    import site
    import sys

    roots = [sys.prefix, sys.base_prefix]
    try:
        roots.append(site.getuserbase())
    except AttributeError:  # a site module without it (embedded Pythons)
        pass
    for root in dict.fromkeys(roots):
        found = sorted(glob.glob(os.path.join(root, "lib", "libmkl_rt.so*")), key=len)
        if found:
            return found[0]
    return None


def _mkl(path: str):
    """Intel's MKL (``libmkl_rt`` at ``path``, its ILP64 ``?gemm_64``), loaded with
    ``KMP_BLOCKTIME=KMP_BLOCKTIME`` unless the user set one, or None if it does not load.
    Intel OpenMP reads its settings when MKL first loads its threading layer,
    which ``MKL_Get_Max_Threads`` does here, while the setting is in place; if OpenMP was
    already started (another library loaded it), its settings stay as they are."""
    setting = {} if "KMP_BLOCKTIME" in os.environ else {"KMP_BLOCKTIME": str(KMP_BLOCKTIME)}
    try:
        os.environ.update(setting)
        lib = ctypes.CDLL(path)
        lib.sgemm_64, lib.dgemm_64, lib.MKL_Set_Num_Threads_Local  # noqa: B018
        lib.MKL_Get_Max_Threads()
        buf = ctypes.create_string_buffer(200)
        lib.MKL_Get_Version_String(buf, len(buf))
        version = buf.value.decode(errors="replace").split(" for ")[0].strip()
    except (OSError, AttributeError):
        return None
    finally:
        for k in setting:
            os.environ.pop(k, None)
    lib._symbp_mkl = True
    lib._symbp_version = version or "Intel MKL"
    return lib


def _mkl_for_this_cpu() -> bool:
    """MKL by default: on an Intel CPU (GenuineIntel), where it is installed.  Measured on
    this project's Intel Xeon (Sapphire Rapids class, AVX-512): the products of a step 13-20
    % faster than NumPy's OpenBLAS at batch 64-4096 and width 256-1024, 7 % slower at
    width 2048 (bench/RESULTS.md), whose slow products now go to OpenBLAS
    (``MKL_STRIDED``).  Not on AMD: not measured there, and MKL is tuned for
    Intel's cores."""
    return _cpu().get("vendor_id") == "GenuineIntel"


def _kernels_openblas():
    """(library, the OpenBLAS beside it or None, whether the library is NumPy's copy, name)
    for the kernels' ``symbp_?gemm64`` and ``symbp_?gemm64_small`` (``_bind``); library
    None: SciPy's through Numba.  Beside MKL: symbp's own copy (else NumPy's).

    With symbp's own copy on Haswell kernels, float64 products stay on NumPy's copy: the
    Haswell dgemm was 2-8 % slower on Zen 4 at batch 64 (widths 256-2048, W2's shapes) and
    12 % faster at batch 4096, no clear gain (bench/RESULTS.md).  So do the float32
    products of at most ``SMALL`` (64^3) multiply-adds.  OpenBLAS's SkylakeX build has
    kernels for small products that skip packing, the Haswell one has none, and packing a
    small product costs more than it computes (batch 1, 256 -> 256: 8.7 µs against 22).
    64^3, not the 100^3 up to which SkylakeX takes its small kernels: OpenBLAS runs a
    product of at most 64^3 multiply-adds on the calling thread whatever its thread count
    (``interface/gemm.c``, ``SMP_THRESHOLD_MIN * GEMM_MULTITHREAD_THRESHOLD``), so NumPy's
    thread pool never wakes in a float32 kernel: two pools taking turns in one step fight
    for the cores (a float32 step of width 1024 on two threads took 21 ms with both pools
    awake, 4.7 ms with one)."""
    choice = _choice()
    if choice == "scipy":
        return None, None, False, "SciPy's OpenBLAS (numba_xxgemm)"
    numpy_lib = _numpy_openblas()
    path = _mkl_path() if choice in ("", "mkl") else None
    by_default = (choice == "" and not os.environ.get("SYMBP_OPENBLAS_CORETYPE", "").strip()
                  and path is not None and _mkl_for_this_cpu())
    if choice == "mkl" or by_default:
        lib = _mkl(path) if path is not None else None
        if lib is None and choice == "mkl":
            from ..errors import SymbpError

            raise SymbpError("SYMBP_BLAS='mkl': Intel's MKL is not installed here (the "
                             "kernels look for the mkl wheel's libmkl_rt in this "
                             "environment's lib folder): pip install 'symbp[mkl]', or unset "
                             "it")
        if lib is not None:
            # beside it symbp's own OpenBLAS (its threads' spin is short), else NumPy's
            own = _own_openblas(None)
            beside = own or numpy_lib
            _bind(lib, beside)
            name = f"{lib._symbp_version} (?gemm_64)"
            if beside is not None:
                whose = "symbp's" if own is not None else "NumPy's"
                low, high, step, floats = STRIDED
                name += (f"; float32 up to {SMALL:.0f} multiply-adds, A @ B of {low + 1}-{high} "
                         f"rows by a B of {floats * 4 / 2 ** 20:.0f} MB or more whose width "
                         f"is a multiple of {step} on one MKL thread, and float64 {whose} "
                         f"OpenBLAS ({beside.scipy_openblas_get_corename64_().decode()} "
                         "kernels)")
            return lib, beside, False, name
    core = _core_for_this_cpu(numpy_lib) if choice != "numpy" else None
    if choice in ("", "own"):  # symbp's own copy wherever its wheel is: its spin is short
        lib = _own_openblas(core)
        asked = os.environ.get("SYMBP_OPENBLAS_CORETYPE", "").strip().lower()
        if lib is None and (choice == "own" or asked not in ("", "default")):
            from ..errors import SymbpError

            what = "SYMBP_BLAS='own'" if choice == "own" else "SYMBP_OPENBLAS_CORETYPE"
            raise SymbpError(f"{what}: symbp's copy of OpenBLAS is the scipy-openblas64 "
                             "package, which is not installed: pip install "
                             "'scipy-openblas64>=0.3.31,<0.3.32', or unset it")
        if lib is not None:
            small = numpy_lib if core is not None else None
            _bind(lib, small)
            name = lib.scipy_openblas_get_corename64_().decode()
            name = f"symbp's OpenBLAS ({name} kernels, scipy_?gemm_64_)"
            if small is not None:
                name += (f"; float32 up to {SMALL:.0f} multiply-adds and float64 NumPy's ("
                         f"{small.scipy_openblas_get_corename64_().decode()} kernels)")
            return lib, small, False, name
    if numpy_lib is not None:
        _bind(numpy_lib)
        name = numpy_lib.scipy_openblas_get_corename64_().decode()
        return numpy_lib, None, True, f"NumPy's OpenBLAS ({name} kernels, scipy_?gemm_64_)"
    return None, None, False, "SciPy's OpenBLAS (numba_xxgemm)"


def _arraymath_without_scipy_linalg() -> None:
    """Import ``numba.np.arraymath`` without importing the ``scipy.linalg`` package.

    At import, ``numba.np.arraymath`` asks ``numba.np.linalg.ensure_blas()`` whether BLAS is
    there (only ``np.dot`` of two vectors uses the answer), and that imports
    ``scipy.linalg.cython_blas``: the whole ``scipy.linalg`` package with its array-API
    layer, 0.1 s of a warm start's 0.4 s (bench/warm_floor.py).  The kernels call OpenBLAS
    by address (below), so nothing here needs SciPy's.  Same answer, asked without the
    import: SciPy's ``linalg/cython_blas`` extension is on disk, and Numba's own check of
    its integer width passes (a mismatch raises as it would).  Numba's code that calls
    SciPy's BLAS (``np.dot`` in njit code, ``SYMBP_BLAS=scipy``) still calls the real
    ``ensure_blas`` when it compiles, which imports the module then.  Nothing is done when
    either module is already imported, or when Numba no longer has these names."""
    import importlib.util
    import sys

    if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return
    from numba.np import linalg

    real, width = getattr(linalg, "ensure_blas", None), getattr(
        linalg, "_check_lapack_int_width", None)
    if real is None or width is None:
        return

    def ensure_blas():
        spec = importlib.util.find_spec("scipy")
        where = (os.path.join(os.path.dirname(spec.origin), "linalg")
                 if spec is not None and spec.origin else None)
        if where is None or not glob.glob(os.path.join(where, "cython_blas.*")):
            raise ImportError("scipy.linalg.cython_blas is missing")
        width()

    linalg.ensure_blas = ensure_blas
    try:
        from numba.np import arraymath
    finally:
        linalg.ensure_blas = real
    if getattr(arraymath, "ensure_blas", None) is ensure_blas:
        arraymath.ensure_blas = real


_arraymath_without_scipy_linalg()
# OPENBLAS: the library the kernels call by address (MKL or OpenBLAS; None: SciPy's,
# through Numba); OPENBLAS_SMALL: the OpenBLAS that takes float64 and the float32 products
# of at most SMALL multiply-adds from it (NumPy's copy beside symbp's own on Zen 4, symbp's
# own or NumPy's beside MKL; else None); SHARED: OPENBLAS is NumPy's copy, the user's too;
# SMALL_SHARED: OPENBLAS_SMALL is; LIBRARY: their names, in the cache key
SMALL = 64.0 ** 3
# MKL's float32 A @ B with both in C layout, a few rows in A and B's rows a multiple of 8 KB
# apart (a width of 2048, 4096, 6144 floats), B at least 8 MB: MKL takes 1.2-2.2x
# OpenBLAS's time there on an Intel Xeon (64 x 2048 x 2048: 6.3-10.1 ms against 5.4-6.0;
# 16 rows or 192 and more, another width or layout: MKL is faster, bench/RESULTS.md).  Those
# products go to the OpenBLAS beside MKL: (rows above, rows at most, width step, B's floats
# at least).  MKL_STRIDED: STRIDED where the kernels call MKL, else None.
STRIDED = (16, 160, 2048, 2.0 ** 21)
# ... and only while MKL runs on one thread (the thread count the runtime set for the
# calling thread, read by the kernel through this symbol: int32 of no arguments).  With
# two, MKL is as fast there, and two pools taking turns in one step fight for the cores
# (width 2048 at batch 64 unpinned on two threads: 25.9 ms against 12.8 on MKL alone).
THREADS_SYMBOL = "symbp_mkl_threads"
OPENBLAS, OPENBLAS_SMALL, SHARED, LIBRARY = _kernels_openblas()
SMALL_SHARED = OPENBLAS_SMALL is not None and not getattr(OPENBLAS_SMALL, "_symbp_own", False)
MKL_STRIDED = (STRIDED if OPENBLAS is not None and is_mkl(OPENBLAS) and OPENBLAS_SMALL is not None
               else None)


def to_beside(kind: str, a_layout: str, b_layout: str, m: int, k: int, n: int,
              threads: int = 1) -> bool:
    """Whether the kernels' ``A (m×k) @ B (k×n)`` calls ``symbp_?gemm64_small`` rather than
    ``symbp_?gemm64``: a product of at most SMALL multiply-adds, or a float32 one that
    MKL_STRIDED names while MKL has ``threads`` threads; what ``gemm`` and ``native`` lower,
    for the tests.  (``_bind``: the OpenBLAS beside the kernels' library, where there is
    one, takes the small symbols and every float64 product.)"""
    if m * n * k <= SMALL:
        return True
    if kind != "s" or MKL_STRIDED is None or (a_layout, b_layout) != ("C", "C"):
        return False
    low, high, step, floats = MKL_STRIDED
    return low < m <= high and n % step == 0 and float(k) * n >= floats and threads == 1


@intrinsic
def gemm(typingctx, a, b, c, alpha, beta):
    arrays = (a, b, c)
    if not all(isinstance(x, types.Array) and x.ndim == 2 for x in arrays):
        raise TypingError("symbp gemm: A, B and C must be 2-D arrays")
    if len({x.dtype for x in arrays}) != 1 or a.dtype not in _KIND:
        raise TypingError(f"symbp gemm: one float dtype for A, B, C, got "
                          f"{a.dtype}, {b.dtype}, {c.dtype}")
    if a.layout not in "CF" or b.layout not in "CF" or c.layout != "C":
        raise TypingError(f"symbp gemm: A and B must be C or F contiguous and C C-contiguous, "
                          f"got layouts {a.layout}, {b.layout}, {c.layout}")
    if not all(isinstance(x, (types.Float, types.Integer)) for x in (alpha, beta)):
        raise TypingError("symbp gemm: alpha and beta must be numbers")
    if OPENBLAS is None:
        from numba.np.linalg import ensure_blas

        ensure_blas()
    sig = types.none(a, b, c, alpha, beta)

    def codegen(context, builder, sig, args):
        aty, bty, cty, alty, bety = sig.args
        dt = aty.dtype
        A, B, C = (make_array(t)(context, builder, v) for t, v in zip(sig.args[:3], args[:3]))
        m, k = cgutils.unpack_tuple(builder, A.shape)
        k2, n = cgutils.unpack_tuple(builder, B.shape)
        cm, cn = cgutils.unpack_tuple(builder, C.shape)
        bad = builder.or_(builder.icmp_signed("!=", k, k2),
                          builder.or_(builder.icmp_signed("!=", m, cm),
                                      builder.icmp_signed("!=", n, cn)))
        with builder.if_then(bad, likely=False):
            context.call_conv.return_user_exc(
                builder, ValueError, ("symbp gemm: the sizes of A @ B and C disagree",))
        one = ir.Constant(k.type, 1)

        def lead(ty, shape):  # BLAS's leading dimension, at least 1 (an empty batch)
            rows, cols = cgutils.unpack_tuple(builder, shape)
            ld = cols if ty.layout == "C" else rows
            return builder.select(builder.icmp_signed("<", ld, one), one, ld)

        # Row-major C = A @ B is column-major C^T = B^T @ A^T: a C-layout operand read
        # column-major is its own transpose (no flag), an F-layout one needs 't'.
        char = ir.IntType(8)
        flag = {"C": ord("n"), "F": ord("t")}
        scal = [cgutils.alloca_once_value(builder, context.cast(builder, v, t, dt))
                for v, t in zip(args[3:], (alty, bety))]
        operands = (flag[bty.layout], flag[aty.layout], n, m, k, scal[0],
                    B.data, lead(bty, B.shape), A.data, lead(aty, A.shape), scal[1],
                    C.data, lead(cty, C.shape))
        if OPENBLAS is not None:
            _openblas_gemm(context, builder, _KIND[dt], operands, char, k.type,
                           (aty.layout, bty.layout))
        else:
            _scipy_gemm(context, builder, _KIND[dt], operands, char, k.type)
        return context.get_dummy_value()

    return sig, codegen


# symbp.backends.native lowers calls of this object itself (same checks, same calls): a
# change here is a change there
gemm.symbp_native = "gemm"


def _openblas_gemm(context, builder, kind, operands, char, intp, layouts):
    """The call into ``OPENBLAS`` (MKL, symbp's OpenBLAS or NumPy's) or the library beside
    it (``to_beside``): Fortran ``?gemm_`` with 64-bit integers, every argument by
    reference.  ``layouts``: A's and B's (C or F)."""
    ta, tb, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc = operands
    ref = lambda v: cgutils.alloca_once_value(builder, v)  # noqa: E731
    fl = lambda x: ref(ir.Constant(char, x))  # noqa: E731
    void_p = ir.IntType(8).as_pointer()
    i64 = ir.IntType(64)
    fnty = ir.FunctionType(ir.VoidType(), [void_p] * 13 + [i64, i64])
    one = ir.Constant(i64, 1)  # the hidden lengths of the two 'n'/'t' strings
    args = [builder.bitcast(x, void_p) for x in (
        fl(ta), fl(tb), ref(n), ref(m), ref(k), alpha, b, ref(ldb), a, ref(lda), beta, c,
        ref(ldc))] + [one, one]
    # multiply-adds in float64, as OpenBLAS counts them: no integer overflow
    f64 = ir.DoubleType()
    mnk = builder.fmul(builder.fmul(builder.sitofp(m, f64), builder.sitofp(n, f64)),
                       builder.sitofp(k, f64))
    beside = builder.fcmp_ordered("<=", mnk, ir.Constant(f64, SMALL))
    if kind == "s" and MKL_STRIDED is not None and layouts == ("C", "C"):
        low, high, step, floats = MKL_STRIDED  # to_beside's rule
        i64 = m.type
        few = builder.and_(builder.icmp_signed(">", m, ir.Constant(i64, low)),
                           builder.icmp_signed("<=", m, ir.Constant(i64, high)))
        wide = builder.and_(
            builder.icmp_signed("==", builder.srem(n, ir.Constant(i64, step)),
                                ir.Constant(i64, 0)),
            builder.fcmp_ordered(">=", builder.fmul(builder.sitofp(k, f64),
                                                    builder.sitofp(n, f64)),
                                 ir.Constant(f64, floats)))
        # MKL's thread count read only for such a product: a call of a few ns
        flag = cgutils.alloca_once_value(builder, beside)
        with builder.if_then(builder.and_(few, wide), likely=False):
            i32 = ir.IntType(32)
            get = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, []),
                                                 THREADS_SYMBOL)
            one = builder.icmp_signed("==", builder.call(get, []), ir.Constant(i32, 1))
            builder.store(builder.or_(builder.load(flag), one), flag)
        beside = builder.load(flag)
    with builder.if_else(beside) as (small, large):
        for branch, symbol in ((small, f"symbp_{kind}gemm64_small"),
                               (large, f"symbp_{kind}gemm64")):
            with branch:
                builder.call(cgutils.get_or_insert_function(builder.module, fnty, symbol),
                             args)


def _scipy_gemm(context, builder, kind, operands, char, intp):
    """The call into SciPy's OpenBLAS through Numba's ``numba_xxgemm`` helper."""
    ta, tb, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc = operands
    void_p = ir.IntType(8).as_pointer()
    fnty = ir.FunctionType(ir.IntType(32), [char, char, char, intp, intp, intp, void_p,
                                            void_p, intp, void_p, intp, void_p, void_p,
                                            intp])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
    res = builder.call(fn, (
        ir.Constant(char, ord(kind)), ir.Constant(char, ta), ir.Constant(char, tb), n, m, k,
        builder.bitcast(alpha, void_p), builder.bitcast(b, void_p), ldb,
        builder.bitcast(a, void_p), lda, builder.bitcast(beta, void_p),
        builder.bitcast(c, void_p), ldc))
    with builder.if_then(cgutils.is_not_null(builder, res), likely=False):
        context.call_conv.return_user_exc(
            builder, RuntimeError, ("symbp gemm: BLAS could not be loaded (SciPy)",))
