"""The engine interface, whatever backend runs below: backend names, errors, the signature
(:class:`TensorSpec`), the :class:`Engine` base class (``infer`` validates feeds against it),
and the small helpers every backend shares (cache directory, ONNX sha256, the CUDA probe).
Backends live in ``*_backend.py`` and import their heavy module (onnxruntime, tensorrt, torch)
only when an engine is made; ``factory.create_engine`` chooses one.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

BACKENDS = ("tensorrt", "onnxruntime", "torch")
#: what every command's ``--backend`` and every stage's ``*.backend`` accept
BACKEND_CHOICES = ("auto",) + BACKENDS


class EngineError(RuntimeError):
    """An engine could not be created or run."""


class BackendUnavailable(EngineError):
    """The requested backend cannot run on this machine (module or device missing)."""


class SignatureError(ValueError):
    """Inputs do not match the model's declared signature."""


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor of a model signature. ``shape`` entries are ints (fixed) or
    ``None``/str (dynamic)."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    def check(self, array: np.ndarray, role: str = "input") -> None:
        if array.ndim != len(self.shape):
            raise SignatureError(
                f"{role} '{self.name}': expected rank {len(self.shape)} {self.shape_str}, "
                f"got shape {tuple(array.shape)}"
            )
        for axis, (want, got) in enumerate(zip(self.shape, array.shape)):
            if isinstance(want, int) and want >= 0 and want != got:
                raise SignatureError(
                    f"{role} '{self.name}': dim {axis} must be {want} {self.shape_str}, "
                    f"got shape {tuple(array.shape)}"
                )
        if np.dtype(array.dtype) != np.dtype(self.dtype):
            raise SignatureError(
                f"{role} '{self.name}': expected dtype {np.dtype(self.dtype).name}, "
                f"got {np.dtype(array.dtype).name}"
            )

    @property
    def shape_str(self) -> str:
        return "[" + ",".join("?" if not isinstance(d, int) or d < 0 else str(d)
                              for d in self.shape) + "]"


class Engine:
    """Base class. Subclasses set ``backend``, ``device``, ``inputs``, ``outputs`` and implement
    ``_run``."""

    backend: str = "?"
    device: str = "cpu"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def validate(self, feeds: Mapping[str, np.ndarray]) -> None:
        names = {s.name for s in self.inputs}
        missing = names - set(feeds)
        extra = set(feeds) - names
        if missing or extra:
            raise SignatureError(
                f"model inputs are {sorted(names)}; missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}"
            )
        for spec in self.inputs:
            spec.check(np.asarray(feeds[spec.name]))

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model. ``feeds`` maps input names to arrays; returns output name → array."""
        self.validate(feeds)
        return self._run(feeds)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> str:
        ins = ", ".join(f"{s.name}{s.shape_str}:{np.dtype(s.dtype).name}" for s in self.inputs)
        outs = ", ".join(f"{s.name}{s.shape_str}" for s in self.outputs)
        return f"{self.backend}({self.device}) in: {ins} out: {outs}"

    def close(self) -> None:
        """Free backend resources (GPU memory). Safe to call twice."""


def cuda_available() -> tuple[bool, str]:
    """Whether a CUDA device can be used from python (via torch), with the reason."""
    try:
        import torch
    except ImportError:
        return False, "no CUDA runtime for python (torch not installed)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible"
    return True, f"CUDA GPU {torch.cuda.get_device_name(0)}"


def onnx_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("PERCEPTION2D_CACHE_DIR",
                               Path.home() / ".cache" / "perception2d"))
