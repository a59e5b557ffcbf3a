"""BLAS and threads: which BLAS library NumPy uses, limiting it to n threads for a block, and how many worker
threads the engine runs by default. Host-level: nothing here knows about networks."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

_LOCK = threading.Lock()
MAX_THREADS = 8
_CONTROLLER: ThreadpoolController | None = None


def _controller() -> ThreadpoolController:
    """threadpoolctl's view of the BLAS libraries loaded in this process (OpenBLAS, MKL, BLIS), made once."""
    global _CONTROLLER
    with _LOCK:
        if _CONTROLLER is None:
            _CONTROLLER = ThreadpoolController()
        return _CONTROLLER


def _blas_pools() -> list[Any]:
    return [lib for lib in _controller().lib_controllers if lib.user_api == "blas"]


def _numpy_blas() -> str | None:
    """The BLAS numpy was built against, from its build configuration (`numpy.show_config`), e.g.
    'scipy-openblas 0.3.31.188.0'; None when numpy does not say."""
    try:
        dep = np.__config__.CONFIG["Build Dependencies"]["blas"]  # type: ignore[attr-defined]
        return f"{dep['name']} {dep.get('version', '')}".strip()
    except (AttributeError, KeyError, TypeError):
        return None


def blas_info() -> dict[str, Any]:
    """The BLAS in use: {'library': the loaded shared object or None, 'numpy_build': what numpy was built
    against, 'config': its implementation, version and architecture, 'threads': its current thread count or
    None, 'controllable': whether the engine can limit it to one thread per worker}."""
    pools = _blas_pools()
    if not pools:
        return {"library": None, "numpy_build": _numpy_blas(), "config": None, "threads": None, "controllable": False}
    lib = pools[0]
    info = lib.info()
    config = " ".join(str(x) for x in (info.get("internal_api"), info.get("version"), info.get("architecture")) if x)
    return {
        "library": lib.filepath,
        "numpy_build": _numpy_blas(),
        "config": config or None,
        "threads": int(lib.num_threads),
        "controllable": True,
    }


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the block with BLAS limited to `n` threads (None: as it is), then restore its count."""
    pools = _blas_pools()
    if n is None or not pools or all(lib.num_threads == n for lib in pools):
        yield
        return
    with _controller().limit(limits=n, user_api="blas"):
        yield


def worker_threads() -> int:
    """Worker threads of the engine: $CNNCLI_THREADS, else the processors this process may use (≤ 8).

    One when BLAS cannot be limited to one thread per worker (threadpoolctl finds no BLAS it can control):
    workers each driving a multi-threaded BLAS would oversubscribe the cores.
    """
    env = os.environ.get("CNNCLI_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if not _blas_pools():
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_THREADS))
