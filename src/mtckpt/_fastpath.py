"""Which implementation of the fast path runs: the C extension or its Python twin.

Chosen once, on the first call of :func:`backend` (never at import), from the
environment variable ``MTCKPT_NATIVE``:

- ``auto`` (the default): the extension if it is built, else the Python fallback, with
  one warning that checkpoints will be slower;
- ``require``: the extension, or ImportError saying how to build it;
- ``off``: the Python fallback.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import types
import warnings

logger = logging.getLogger(__name__)

ENV_VAR = "MTCKPT_NATIVE"
MODES = ("auto", "require", "off")
_BUILD_HINT = (
    "build it with `pip install .` (or `pip install -e .`) in the mtckpt source tree, "
    "which needs a C compiler and the Python headers"
)

_lock = threading.Lock()
_chosen: tuple[str, types.ModuleType] | None = None  # (backend name, module), once chosen


def _import_native() -> types.ModuleType:
    return importlib.import_module("mtckpt._native")


def _import_fallback() -> types.ModuleType:
    return importlib.import_module("mtckpt._fallback")


def _load_native(why: str) -> types.ModuleType:
    try:
        return _import_native()
    except ImportError as exc:
        raise ImportError(
            f"{why}, but the native fast path mtckpt._native is not built ({exc}); {_BUILD_HINT}"
        ) from exc


def _mode_from_env() -> str:
    raw = os.environ.get(ENV_VAR, "")
    mode = raw.strip().lower() or "auto"
    if mode not in MODES:
        allowed = ", ".join(MODES)
        raise ValueError(f"{ENV_VAR}={raw!r} is not valid; use one of: {allowed}")
    return mode


def _choose() -> tuple[str, types.ModuleType]:
    mode = _mode_from_env()
    if mode == "off":
        return "python", _import_fallback()
    if mode == "require":
        return "native", _load_native(f"{ENV_VAR}=require")
    try:
        return "native", _import_native()
    except ImportError as exc:
        message = (
            f"mtckpt's native fast path (mtckpt._native) is not available ({exc}); using "
            f"the pure-Python fallback, so checkpoints will be slower. To fix it, "
            f"{_BUILD_HINT}; set {ENV_VAR}=off to silence this."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        logger.warning(message)
        return "python", _import_fallback()


def _current() -> tuple[str, types.ModuleType]:
    global _chosen
    chosen = _chosen
    if chosen is None:
        with _lock:
            if _chosen is None:
                _chosen = _choose()
            chosen = _chosen
    return chosen


def backend() -> types.ModuleType:
    """The module in use, ``mtckpt._native`` or ``mtckpt._fallback``, chosen on first call."""
    return _current()[1]


def backend_name() -> str:
    """``"native"`` or ``"python"``: which backend :func:`backend` returns."""
    return _current()[0]


def select(name: str) -> None:
    """Force a backend: ``"native"`` (ImportError if not built) or ``"python"``."""
    global _chosen
    if name == "native":
        chosen = ("native", _load_native("select('native') was asked"))
    elif name == "python":
        chosen = ("python", _import_fallback())
    else:
        raise ValueError(f"unknown fast-path backend {name!r}; use 'native' or 'python'")
    with _lock:
        _chosen = chosen
