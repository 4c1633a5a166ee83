"""The numba switch and the thread count: what every compiled kernel starts from.

numba is loaded once, at import. Without it (it cannot load here, or
LLAMAZIP_NO_NUMBA=1) `numba` is None, `jit` leaves functions as plain Python
that nothing calls, and the weight matrices take their numpy path.

Kernels are compiled for a CPU family (cpu_family.py: the target a bundle's
shipped kernels were compiled for) with `cache=True` (on-disk), `fastmath`
(reductions do not vectorise without it: 4x on f32) and `nogil` (the server
decodes on its own thread while others parse requests).
"""

from __future__ import annotations

import os
import sys
import threading
import types
import warnings

from . import cpu_family


def _load_numba():
    """The numba module, or None when it is switched off or cannot load."""
    if os.environ.get("LLAMAZIP_NO_NUMBA") == "1":
        return None
    cpu_family.apply()  # before numba reads its configuration (its compile target)
    # numba reads a .numba_config.yaml from the working directory when PyYAML is
    # importable (~9 ms to import it). Kept out, and its warning that it cannot
    # read such a file silenced: what a run computes must not depend on the
    # folder it starts in.
    yaml_blocked = "yaml" not in sys.modules
    if yaml_blocked:
        sys.modules["yaml"] = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="A Numba config file is found")
            import numba
            # Imported earlier (by a test, say), numba read its target before apply() set it.
            numba.core.config.reload_config()
    except Exception as e:  # ImportError, or a broken llvmlite/numpy pairing
        print(f"warning: numba cannot load ({type(e).__name__}: {e}); using the slower numpy kernels",
              file=sys.stderr)
        return None
    finally:
        if yaml_blocked and sys.modules.get("yaml", 0) is None:
            del sys.modules["yaml"]
    # NUMBA_DISABLE_JIT=1 (a debugging switch) would run the kernels as Python,
    # where the LLVM intrinsics cannot run.
    return None if numba.config.DISABLE_JIT else numba


def _load_cached_kernels_without_refresh(numba) -> None:
    """Loading a kernel from numba's disk cache first "refreshes" its compiler:
    it imports and registers every typing and lowering module (~250), ~0.1 s of
    a 0.6 s start to the first token. A cached kernel is compiled code and needs
    only numba's runtime (NRT) to run. A kernel missing from the cache compiles
    as before: numba's compiler refreshes on its own (CompilerBase). Left alone
    where numba's cache does not have the methods this relies on."""
    cache = numba.core.caching.Cache
    if not all(callable(getattr(cache, name, None)) for name in ("_load_overload", "_guard_against_spurious_io_errors")):
        return
    from numba.core.runtime import nrt

    def load_overload(self, sig, target_context):
        nrt.rtsys.initialize(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)
    cache.load_overload = load_overload


def _skip_numba_extensions(numba) -> None:
    """Before its first compile or cache load numba runs the `numba_extensions`
    entry points of every installed distribution (~7 ms reading their metadata).
    The kernels use no extension, and a bundle runs beside whatever the host's
    Python has installed: no package there may change how they compile."""
    numba.core.entrypoints._already_initialized = True


numba = _load_numba()
if numba is not None:
    _load_cached_kernels_without_refresh(numba)
    _skip_numba_extensions(numba)

# fastmath without reassociation (`ordered` kernels): LLVM keeps the order of float
# operations as written. The int8 kernels need it to round alike however they are
# compiled: with full fastmath, a parallel kernel loaded from numba's cache rounded
# differently from the same kernel just compiled (last bits, Q5_0/Q5_1/K-quants),
# and the batched kernels (int8_batch.py) from the matvecs.
ORDERED_FASTMATH = {"nnan", "ninf", "nsz", "arcp", "contract", "afn"}

if numba is not None:
    prange = numba.prange

    def jit(parallel: bool = False, ordered: bool = False):
        fastmath = ORDERED_FASTMATH if ordered else True
        return numba.njit(parallel=parallel, fastmath=fastmath, cache=True, nogil=True)
else:
    prange = range

    def jit(parallel: bool = False, ordered: bool = False):
        return lambda fn: fn


def serial_and_parallel(fn, ordered: bool = False):
    """fn compiled twice: (serial, parallel). Each from a copy of fn under its own
    name: numba's disk cache files a kernel under its function's name and line,
    not its options, so two kernels of one function loaded each other's code (a
    parallel one that ran on one thread, as the serial one cached first)."""
    def named(suffix: str):
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__,
                                  fn.__closure__)
        copy.__qualname__ = fn.__qualname__ + suffix
        copy.__doc__ = fn.__doc__
        return copy
    return jit(ordered=ordered)(named("_serial")), jit(parallel=True, ordered=ordered)(named("_parallel"))


def numba_enabled() -> bool:
    return numba is not None


_threads: int | None = None  # from set_threads(); None leaves numba's default (all cores)
_applied = threading.local()  # numba's thread count is per calling thread


def set_threads(n: int) -> None:
    """Use n threads (clamped to [1, available]) in every later kernel call, from any thread.

    The numpy path leaves threading to numpy's BLAS and ignores this.
    """
    global _threads
    if numba is not None:
        _threads = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))


def apply_threads() -> None:
    """Make this thread's next kernel calls use set_threads()'s count (call before each kernel)."""
    if _threads is not None and getattr(_applied, "threads", None) != _threads:
        numba.set_num_threads(_threads)
        _applied.threads = _threads


def num_threads() -> int:
    """The threads a kernel called now would use."""
    return numba.get_num_threads() if numba is not None else 1
