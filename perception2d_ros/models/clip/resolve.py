"""Which CLIP export to use: a manifest name, a sidecar or folder, or a user checkpoint.

``resolve_export`` finds the sidecar JSON of a usable export (exporting a checkpoint once,
cached, when needed); ``find_exported`` looks one up in a folder. Used by the labeler, the
text-embedding cache and the pipeline stage.
"""
from __future__ import annotations

from pathlib import Path

from perception2d_ros.models.clip.checkpoint import canonical_arch
from perception2d_ros.models.clip.export import ensure_exported, onnx_names


def find_exported(directory: str | Path, arch: str | None = None) -> Path | None:
    """Sidecar of an export in ``directory`` (of ``arch`` if given; else the only one)."""
    d = Path(directory)
    if arch is not None:
        p = d / onnx_names(arch)["meta"]
        return p if p.is_file() else None
    found = sorted(p for p in d.glob("clip_*.json") if p.is_file())
    return found[0] if len(found) == 1 else None


class ClipModelUnavailable(RuntimeError):
    """No exported CLIP model and no checkpoint to export one from."""


DEFAULT_MODEL = "clip_vit_b32"
_NAME_ARCH = {"clip_vit_b32": "ViT-B-32", "clip_vit_b16": "ViT-B-16"}


def arch_for_model(name: str | None, default: str = "ViT-B-32") -> str:
    """Architecture of a manifest CLIP model (its ``export.arch``), else ``default``."""
    if name:
        try:
            from perception2d_ros.engines.model_store import load_manifest

            entry = load_manifest().get(name)
        except Exception:  # noqa: BLE001 - manifest problems surface in resolve_export
            entry = None
        recipe = entry.extra.get("export") if entry is not None else None
        if isinstance(recipe, dict) and recipe.get("arch"):
            return canonical_arch(str(recipe["arch"]))
        if name in _NAME_ARCH:
            return _NAME_ARCH[name]
    return canonical_arch(default)


def resolve_export(model: str | Path | None = DEFAULT_MODEL, *,
                   checkpoint: str | Path | None = None, arch: str | None = None,
                   models_dir: str | Path | None = None,
                   cache_dir: str | Path | None = None) -> Path:
    """The sidecar JSON of a usable CLIP export; exports (once, cached) when needed.

    * ``checkpoint``: the user's own file → exported on first use into
      ``$PERCEPTION2D_CACHE_DIR/clip/<arch>-<sha16>/`` and reused afterwards.
    * ``model`` a sidecar ``.json`` or a folder holding one → that export.
    * ``model`` a manifest name (``clip_vit_b32``): the export in the models directory
      (``perception2d models export``), else the fetched checkpoint exported on first use.
    Raises :class:`ClipModelUnavailable` saying how to get a model otherwise.
    """
    from perception2d_ros.engines import model_store as ms

    name = str(model) if model is not None else DEFAULT_MODEL
    arch = canonical_arch(arch) if arch else arch_for_model(name)
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser().resolve()
        if not ckpt.is_file():
            raise ClipModelUnavailable(f"checkpoint not found: {ckpt}")
        return ensure_exported(arch, ckpt, cache_dir=cache_dir)["meta"]
    p = Path(name).expanduser()
    if p.suffix == ".json" and p.is_file():
        return p.resolve()
    if p.is_dir():
        found = find_exported(p, arch) or find_exported(p)
        if found is None:
            raise ClipModelUnavailable(f"no CLIP export (clip_*.json sidecar) in {p}")
        return found
    root = ms.models_dir(models_dir)
    manifest = ms.load_manifest(models_dir)
    entry = manifest.get(name)
    how = (f"get it with `perception2d models fetch {name if entry else DEFAULT_MODEL}` "
           f"(exported to ONNX on first use, or now with `perception2d models export "
           f"{name if entry else DEFAULT_MODEL}`), or pass --checkpoint PATH to your own CLIP "
           f"checkpoint (.pt/.bin/.safetensors) with --arch")
    if entry is None:
        clip = sorted(n for n, e in manifest.items() if e.kind == "clip")
        raise ClipModelUnavailable(
            f"unknown CLIP model '{name}' (known: {', '.join(clip) or 'none'}); {how}")
    if entry.kind != "clip":
        raise ClipModelUnavailable(f"'{name}' is a {entry.kind} model, not a CLIP model")
    file = ms.entry_path(entry, models_dir)
    if file.suffix == ".json" and file.is_file():
        return file
    exported = find_exported(root, arch)
    if exported is not None:
        return exported
    if file.suffix in (".onnx",):
        raise ClipModelUnavailable(f"'{name}' is a single ONNX file, not a CLIP export pair")
    if not file.is_file():
        raise ClipModelUnavailable(
            f"CLIP model '{name}' is not available: no exported ONNX "
            f"({onnx_names(arch)['meta']}) in {root} and no checkpoint {file}; {how}")
    ms.verify_file(file, entry.sha256, entry.name, entry)
    return ensure_exported(arch, file, cache_dir=cache_dir)["meta"]
