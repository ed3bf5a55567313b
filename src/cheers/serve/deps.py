"""The server's optional dependencies (the `serve` extra): a clear install hint instead of a bare ImportError."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def require(module: str) -> ModuleType:
    """Import `module`, or say which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"`cheers serve` needs {module}: pip install 'cheers[serve]'") from None


def require_all() -> None:
    """Every package the server needs, checked before anything slow (loading the model) starts."""
    for mod in ("fastapi", "uvicorn", "prometheus_client"):
        require(mod)
    if not (importlib.util.find_spec("python_multipart") or importlib.util.find_spec("multipart")):
        raise ImportError("`cheers serve` needs python-multipart (image uploads): pip install 'cheers[serve]'")
