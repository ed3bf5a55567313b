"""Cheers: one model for image understanding, text-to-image generation, editing and chat.

    from cheers import Cheers
    pipe = Cheers.from_pretrained("ai9stars/Cheers")

The public names are imported on first use, so `import cheers` (and `cheers --help`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Cheers": "cheers.pipeline",
    "CheersConfig": "cheers.config",
    "CheersModel": "cheers.model.cheers",
}
__all__ = ["Cheers", "CheersConfig", "CheersModel", "__version__"]

if TYPE_CHECKING:
    from cheers.config import CheersConfig
    from cheers.model.cheers import CheersModel
    from cheers.pipeline import Cheers


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'cheers' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
