"""Optional frameworks, imported where used: a missing one is an ImportError naming the extra."""

from __future__ import annotations

import sys
from types import ModuleType


def torch_if_loaded() -> ModuleType | None:
    """torch, if the program has imported it (never imports it: a value cannot be a torch
    tensor unless torch is loaded)."""
    return sys.modules.get("torch")


def require_torch(what: str) -> ModuleType:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised in the no-torch test
        raise ImportError(
            f"{what} needs PyTorch, which is not installed: pip install 'ckptstore[torch]' "
            f"(or use framework=\"numpy\")"
        ) from e
    return torch
