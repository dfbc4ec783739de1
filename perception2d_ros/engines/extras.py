"""Optional extras: features that need packages the runtime install (`make demo`) leaves out.

PyTorch is one: the runtime runs every model with ONNX Runtime or TensorRT, while
``backend: torch``, ``detect.device_frames`` and ``perception2d models export`` (plus the parity
tests) need torch and the official reference packages from ``requirements/torch.txt``.
"""
from __future__ import annotations

import importlib.util

TORCH_EXTRA_HINT = ("install the optional torch extra: `.venv/bin/pip install -r "
                    "requirements/torch.txt` in the perception2d checkout (`make setup` / "
                    "`make test` install it; `make demo` does not)")


class MissingExtra(ImportError):
    """A feature needs an optional package that is not installed (the message says which
    feature, which package and how to install it)."""


def has_torch() -> bool:
    """Whether torch is installed, without importing it."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def require_torch(feature: str) -> None:
    """Raise :class:`MissingExtra` naming ``feature`` when torch is not installed."""
    if not has_torch():
        raise MissingExtra(f"{feature} needs PyTorch, which is not installed; {TORCH_EXTRA_HINT}")
