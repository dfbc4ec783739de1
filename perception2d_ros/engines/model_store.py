"""One place that resolves model files: the models directory and its manifest.

Models directory, first match wins: an explicit ``models_dir`` argument (``--models-dir``),
``$PERCEPTION2D_MODELS_DIR``, the source checkout's ``models/``, the installed package share
(``share/perception2d/models``). ``models/manifest.yaml`` lists every model the suite knows
with file name, sha256, licence, source and which stages use it. Files are verified against
their sha256 before use.

Files produced on this machine by ``perception2d models export`` are recorded (with their
sha256) in a local overlay, ``exported.yaml`` in the models directory; :func:`load_manifest`
merges it so exported files are verified like shipped ones. The overlay never replaces a
shipped entry. Download leftovers (``*.part``) are never resolved.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import yaml

LOG = logging.getLogger("perception2d.models")

ENV_VAR = "PERCEPTION2D_MODELS_DIR"
MANIFEST = "manifest.yaml"
OVERLAY = "exported.yaml"           # local, machine-written: files exported here
PARTIAL_SUFFIXES = (".part", ".rejected")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# How a model gets into the models directory.
PROVISIONS = ("bundled", "fetch", "manual", "user-export", "export")


class ModelFileError(RuntimeError):
    """A model file is missing, truncated or does not match its manifest sha256."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str                       # detector | clip | sam | lseg | vocab | labels | sample ...
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

    @property
    def provision(self) -> str:
        """bundled | fetch | manual | user-export | export (see manifest header)."""
        p = self.extra.get("provision")
        if p:
            return str(p)
        return "fetch" if self.url else "bundled"

    @property
    def note(self) -> str:
        return str(self.extra.get("note") or "").strip()

    @property
    def exported(self) -> bool:
        return bool(self.extra.get("exported"))


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


def overlay_path(directory: str | Path | None = None) -> Path:
    """The local overlay of exported files of ``directory`` (may not exist)."""
    return models_dir(directory) / OVERLAY


_KNOWN_KEYS = {f for f in ModelEntry.__dataclass_fields__ if f != "extra"}


def check_relative_file(text: str, where: str = "file") -> str:
    """A manifest ``file`` must stay inside the models directory: relative, no ``..``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: must be a non-empty relative path")
    if "\\" in text or "\x00" in text:
        raise ValueError(f"{where}: '{text}' must use '/' and no NUL")
    p = PurePosixPath(text)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or text.startswith("~"):
        raise ValueError(f"{where}: '{text}' must be a relative path inside the models "
                         "directory (no absolute path, no '..')")
    if text.endswith(PARTIAL_SUFFIXES):
        raise ValueError(f"{where}: '{text}' uses a reserved suffix {PARTIAL_SUFFIXES}")
    return text


def _parse_entries(raw: Mapping[str, Any] | None, path: Path) -> dict[str, ModelEntry]:
    models = (raw or {}).get("models")
    if not isinstance(models, dict):
        raise ValueError(f"{path}: top-level 'models' mapping missing")
    out = {}
    for name, spec in models.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: models.{name} must be a mapping")
        for key in ("kind", "file", "licence", "source"):
            if key not in spec:
                raise ValueError(f"{path}: models.{name}.{key} is required")
        check_relative_file(spec["file"], f"{path}: models.{name}.file")
        sha = spec.get("sha256")
        if sha is not None and not (isinstance(sha, str) and SHA256_RE.match(sha)):
            raise ValueError(f"{path}: models.{name}.sha256 must be 64 lowercase hex digits "
                             f"or null, got {sha!r}")
        known = {k: v for k, v in spec.items() if k in _KNOWN_KEYS}
        extra = {k: v for k, v in spec.items() if k not in _KNOWN_KEYS}
        out[name] = ModelEntry(name=name, extra=extra, **known)
    return out


def load_manifest(directory: str | Path | None = None, *,
                  include_exported: bool = True) -> dict[str, ModelEntry]:
    """Every model the suite knows: the shipped manifest, then (``include_exported``) the
    local overlay of files exported on this machine. Overlay entries never shadow shipped
    ones (they are skipped with a warning)."""
    path = manifest_path(directory)
    with open(path, encoding="utf-8") as f:
        out = _parse_entries(yaml.safe_load(f), path)
    if include_exported:
        ov = overlay_path(directory)
        if ov.is_file():
            try:
                with open(ov, encoding="utf-8") as f:
                    raw = yaml.safe_load(f) or {"models": {}}
                local = _parse_entries(raw, ov)
            except (OSError, ValueError, yaml.YAMLError) as exc:
                LOG.warning("ignoring unreadable overlay %s: %s", ov, exc)
                local = {}
            for name, entry in local.items():
                if name in out:
                    LOG.warning("%s: entry '%s' would shadow a shipped model; ignored", ov, name)
                    continue
                extra = dict(entry.extra, exported=True)
                out[name] = ModelEntry(**{**entry.__dict__, "extra": extra})
    return out


def load_overlay(directory: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The raw overlay mapping name → spec (empty when there is none)."""
    ov = overlay_path(directory)
    if not ov.is_file():
        return {}
    with open(ov, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    models = raw.get("models") or {}
    return dict(models) if isinstance(models, dict) else {}


class _NoAliasDumper(yaml.SafeDumper):
    """Plain YAML for people: no ``&id001`` anchors for repeated lists."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write_overlay_entries(directory: str | Path | None, entries: Mapping[str, Mapping[str, Any]]
                          ) -> Path:
    """Add/replace ``entries`` in the local overlay (atomic write). Shipped names refused."""
    root = models_dir(directory)
    shipped = load_manifest(directory, include_exported=False)
    clash = sorted(set(entries) & set(shipped))
    if clash:
        raise ValueError(f"overlay entries {clash} would shadow shipped models")
    current = load_overlay(directory)
    for name, spec in entries.items():
        _parse_entries({"models": {name: dict(spec)}}, overlay_path(directory))  # validate
        current[name] = dict(spec)
    text = ("# Written by `perception2d models export` on this machine: files exported here and\n"
            "# their sha256. Local to this models directory; the shipped manifest is unchanged.\n"
            + yaml.dump({"models": current}, Dumper=_NoAliasDumper, sort_keys=False))
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".exported-", suffix=".yaml.tmp", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, root / OVERLAY)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return root / OVERLAY


def entry_path(entry: ModelEntry, directory: str | Path | None = None) -> Path:
    """Where ``entry``'s file lives (or would live) in the models directory."""
    check_relative_file(entry.file, f"models.{entry.name}.file")  # relative, no '..'
    # lexical join: a symlink the user placed in the models dir (a checkpoint kept on
    # another disk) is their explicit choice and is followed when the file is opened
    return models_dir(directory) / entry.file


def is_partial(path: str | Path) -> bool:
    """A download leftover (``.part``) or a rejected download: never a usable model."""
    return str(path).endswith(PARTIAL_SUFFIXES)


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


def how_to_get(entry: ModelEntry | None, path: str | Path, name: str = "") -> str:
    """What to do to get a model file in place: a command that works for how this model is
    provided (fetch / export), or the manifest's own instructions (user export, manual)."""
    if entry is None:
        return f"put the file at {path}"
    if entry.url or entry.provision == "fetch":  # `models fetch` downloads it
        return f"run `perception2d models fetch {entry.name}`"
    if entry.provision == "export":
        return f"run `perception2d models export {entry.name}`"
    if entry.provision == "bundled":
        return (f"it ships with perception2d: restore {path} (e.g. `git checkout -- "
                f"models/{entry.file}`) or reinstall")
    how = entry.note or f"this model is not downloadable ({entry.provision})"
    return f"{how.rstrip('.')}; the path is {path}"


def verify_file(path: str | Path, expected_sha256: str | None, name: str = "",
                entry: ModelEntry | None = None) -> None:
    p = Path(path)
    label = f"model '{name}'" if name else str(p)
    if is_partial(p):
        raise ModelFileError(f"{label}: {p} is an incomplete download and is never used")
    if not p.is_file():
        raise ModelFileError(
            f"{label}: file not found at {p}; {how_to_get(entry, p, name)}")
    if expected_sha256 and sha256_file(p) != expected_sha256.lower():
        raise ModelFileError(
            f"{label}: sha256 mismatch for {p} (expected {expected_sha256}, got "
            f"{sha256_file(p)}); the file is truncated or not the official one: "
            f"{how_to_get(entry, p, name)}")


def check_entry(entry: ModelEntry, directory: str | Path | None = None
                ) -> tuple[bool, bool | None]:
    """(present, sha256_ok). ``sha256_ok`` is None when absent or no sha256 is known."""
    path = entry_path(entry, directory)
    if not path.is_file():
        return False, None
    if not entry.sha256:
        return True, None
    return True, sha256_file(path) == entry.sha256.lower()


def resolve(name_or_path: str | Path, directory: str | Path | None = None, *,
            verify: bool = True, allow_outside: bool = False) -> tuple[Path, ModelEntry | None]:
    """Resolve a manifest name (or a file path) to a verified file.

    A path is accepted only inside the models directory unless ``allow_outside`` (a user
    explicitly pointing at their own file, e.g. ``--checkpoint``). Partial downloads
    (``*.part``) are never resolved."""
    text = str(name_or_path)
    root = models_dir(directory)
    manifest = load_manifest(directory)
    if text in manifest:
        entry = manifest[text]
        path = entry_path(entry, directory)
        if verify:
            verify_file(path, entry.sha256, entry.name, entry)
        return path, entry
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (root / path) if (root / path).exists() else path.resolve()
    path = path.resolve()
    if is_partial(path):
        raise ModelFileError(f"{path} is an incomplete download and is never used; finish it "
                             "with `perception2d models fetch <name>`")
    if not allow_outside and root not in path.parents:
        known = ", ".join(sorted(manifest))
        raise ModelFileError(
            f"'{text}' is neither a known model ({known}) nor a file inside the models "
            f"directory {root}; `perception2d models list` shows the models")
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    entry = next((e for e in manifest.values() if (root / e.file).resolve() == path), None)
    if verify and entry is not None:
        verify_file(path, entry.sha256, entry.name, entry)
    return path, entry
