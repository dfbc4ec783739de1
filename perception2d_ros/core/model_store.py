"""One place that resolves model files: the models directory and its manifest.

Models directory, first match wins: an explicit ``models_dir`` argument (``--models-dir``),
``$PERCEPTION2D_MODELS_DIR``, the installed package share (``share/perception2d/models``),
the source checkout's ``models/``. ``models/manifest.yaml`` lists every model the suite knows
with file name, sha256, licence, source and which stages use it. Files are verified against
their sha256 before use.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_VAR = "PERCEPTION2D_MODELS_DIR"
MANIFEST = "manifest.yaml"


class ModelFileError(RuntimeError):
    """A model file is missing, truncated or does not match its manifest sha256."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str                       # detector | clip | sam | lseg | vocab ...
    file: str                       # file name inside the models dir
    licence: str
    source: str
    sha256: str | None = None
    url: str | None = None
    format: str | None = None       # yolox | yolov5 | yolov8 | yolov10 | onnx | pt ...
    input_size: list[int] | None = None
    labels: str | None = None       # class-name file inside the models dir
    stages: list[str] = field(default_factory=list)
    size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _source_models_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "models"


def models_dir(override: str | Path | None = None) -> Path:
    if override:
        return Path(override).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    src = _source_models_dir()
    if (src / MANIFEST).is_file():
        return src
    try:
        from ament_index_python.packages import get_package_share_directory
        share = Path(get_package_share_directory("perception2d")) / "models"
        if (share / MANIFEST).is_file():
            return share
    except Exception:  # ament index absent or package not installed: fall through
        pass
    return src


def manifest_path(directory: str | Path | None = None) -> Path:
    """The manifest that belongs to ``directory``: its own, else the package's."""
    d = models_dir(directory)
    own = d / MANIFEST
    return own if own.is_file() else _source_models_dir() / MANIFEST


_KNOWN_KEYS = {f for f in ModelEntry.__dataclass_fields__ if f != "extra"}


def load_manifest(directory: str | Path | None = None) -> dict[str, ModelEntry]:
    path = manifest_path(directory)
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    models = raw.get("models")
    if not isinstance(models, dict):
        raise ValueError(f"{path}: top-level 'models' mapping missing")
    out = {}
    for name, spec in models.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: models.{name} must be a mapping")
        for key in ("kind", "file", "licence", "source"):
            if key not in spec:
                raise ValueError(f"{path}: models.{name}.{key} is required")
        known = {k: v for k, v in spec.items() if k in _KNOWN_KEYS}
        extra = {k: v for k, v in spec.items() if k not in _KNOWN_KEYS}
        out[name] = ModelEntry(name=name, extra=extra, **known)
    return out


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, cached by (path, size, mtime) so repeated loads are free."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def verify_file(path: str | Path, expected_sha256: str | None, name: str = "") -> None:
    p = Path(path)
    label = f"model '{name}'" if name else str(p)
    if not p.is_file():
        raise ModelFileError(
            f"{label}: file not found at {p}. Run `perception2d models fetch {name or '<name>'}`"
            " or put the file there.")
    if expected_sha256 and sha256_file(p) != expected_sha256.lower():
        raise ModelFileError(
            f"{label}: sha256 mismatch for {p} (expected {expected_sha256}, got "
            f"{sha256_file(p)}); the file is truncated or not the official one. "
            f"Re-fetch with `perception2d models fetch {name or '<name>'}`.")


def resolve(name_or_path: str | Path, directory: str | Path | None = None, *,
            verify: bool = True, allow_outside: bool = False) -> tuple[Path, ModelEntry | None]:
    """Resolve a manifest name (or a file path) to a verified file.

    A path is accepted only inside the models directory unless ``allow_outside`` (a user
    explicitly pointing at their own file, e.g. ``--checkpoint``)."""
    text = str(name_or_path)
    root = models_dir(directory)
    manifest = load_manifest(directory)
    if text in manifest:
        entry = manifest[text]
        path = root / entry.file
        if verify:
            verify_file(path, entry.sha256, entry.name)
        return path, entry
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (root / path) if (root / path).exists() else path.resolve()
    path = path.resolve()
    if not allow_outside and root not in path.parents:
        known = ", ".join(sorted(manifest))
        raise ModelFileError(
            f"'{text}' is neither a known model ({known}) nor a file inside the models "
            f"directory {root}")
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    entry = next((e for e in manifest.values() if (root / e.file).resolve() == path), None)
    if verify and entry is not None:
        verify_file(path, entry.sha256, entry.name)
    return path, entry
