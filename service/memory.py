"""Keeping a long-running server's memory flat when requests bring new image sizes.

Two settings of the worker process, ``WORKER_ENVIRONMENT``, given to it by ``service.serve`` (what
``make serve`` and the Dockerfile's CMD run) and by cog.yaml's ``environment`` (an image ``cog build``
makes); a value the environment already has wins:

* ``LRU_CACHE_CAPACITY=1``: torch's per-thread cache of oneDNN convolutions (ideep's
  ``computation_cache``, default 1024 entries *per thread*) keeps, for each input shape a thread
  ran a convolution at, the primitive descriptor and primitive. coglet 0.23.1 runs predictions on
  several threads in turn, and each filled a cache of its own: most of the +58-67 MiB from the
  10th to the 40th new setting on the bundled model (docs/operations.md). oneDNN's process-wide
  cache of compiled primitives (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, 1024 for all threads
  together) is left as it is, so a miss re-makes a descriptor, not a compiled kernel. Each thread
  reads the variable at its first convolution, so ``bound_thread_caches`` (first in
  ``Predictor.setup``) still sets it where the worker was started without it.
* ``MALLOC_ARENA_MAX=2``: glibc gives each allocating thread (coglet's runtime and prediction
  threads, their OpenMP workers) an arena of its own, up to 8 per core, and a buffer freed in one
  arena cannot serve another; a prediction on a thread that had not run one before filled a new
  arena. glibc reads this at process start: only the environment can set it.

``release_freed_memory`` (after each prediction) asks glibc to return free pages to the system
(``malloc_trim(0)``: a few milliseconds); elsewhere (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

WORKER_ENVIRONMENT = {"LRU_CACHE_CAPACITY": "1", "MALLOC_ARENA_MAX": "2"}


def worker_environment(environ=os.environ) -> dict[str, str]:
    """``environ`` with ``WORKER_ENVIRONMENT`` for what it does not set: the worker process's environment."""
    return {**WORKER_ENVIRONMENT, **environ}


def bound_thread_caches(environ=os.environ) -> str:
    """Sets ``LRU_CACHE_CAPACITY`` in this process unless it is set; run before the first convolution.
    Returns the settings of ``WORKER_ENVIRONMENT`` in effect, for the setup log."""
    environ.setdefault("LRU_CACHE_CAPACITY", WORKER_ENVIRONMENT["LRU_CACHE_CAPACITY"])
    return ", ".join(f"{name}={environ.get(name, 'unset')}" for name in WORKER_ENVIRONMENT)


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Returns freed heap memory to the system where the C library can; True if it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
