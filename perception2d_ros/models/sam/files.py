"""Which exported SAM to run: :func:`resolve_model_files` finds an export (directory,
``sam.json``, manifest name) or exports an official checkpoint on first use into the cache
(:func:`default_export_cache`); :class:`SamWeightsMissing` says how to get weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from perception2d_ros.models.sam.spec import META_FILE, SamError, SamModelFiles


class SamWeightsMissing(SamError):
    """No SAM weights / export available; the message says how to get them."""


def weights_help(name: str = "sam_vit_b") -> str:
    return (f"get the official weights with `perception2d models fetch {name}`, or pass "
            "--checkpoint PATH to an official segment-anything checkpoint (sam_vit_b_01ec64.pth, "
            "sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth from "
            "https://github.com/facebookresearch/segment-anything#model-checkpoints) or "
            "MobileSAM's mobile_sam.pt (https://github.com/ChaoningZhang/MobileSAM); it is "
            "exported to ONNX on first use and cached")


def default_export_cache() -> Path:
    """Where checkpoints are exported on first use: ``$PERCEPTION2D_CACHE_DIR/sam``."""
    from perception2d_ros.engines.base import default_cache_dir

    return default_cache_dir() / "sam"


def _export_checkpoint(checkpoint: Path, arch: str | None, out_dir: Path) -> SamModelFiles:
    try:
        from perception2d_ros.models.sam.export import export_onnx

        result = export_onnx(arch, checkpoint, out_dir)
    except ImportError as exc:
        raise SamError(
            f"exporting {checkpoint} to ONNX needs torch and segment-anything (MobileSAM: "
            f"mobilesam-mirror and timm) ({exc}); install requirements/test.txt, or export on "
            "another machine with `perception2d models export` and copy the export directory"
        ) from exc
    except (ValueError, OSError, RuntimeError) as exc:
        raise SamError(f"cannot export {checkpoint}: {exc}") from exc
    return SamModelFiles.load(result)


def resolve_model_files(model: str | Path | None = "sam_vit_b", *,
                        checkpoint: str | Path | None = None, arch: str | None = None,
                        models_dir: str | Path | None = None,
                        cache_dir: str | Path | None = None) -> SamModelFiles:
    """Find (or make) the ONNX export to run.

    ``checkpoint`` (an official ``.pth``) wins: exported once into ``cache_dir`` (default
    :func:`default_export_cache`) keyed by its sha256. Otherwise ``model`` is an export
    directory / ``sam.json``, or a manifest name (kind ``sam``) whose file is a checkpoint
    (export looked up in the models dir, then the cache; exported into the cache on first
    use) or a ``sam.json``. Raises :class:`SamWeightsMissing` with instructions when
    nothing is available."""
    from perception2d_ros.engines.model_store import ModelFileError, load_manifest, models_dir as _models_dir, resolve

    cache = Path(cache_dir) if cache_dir else default_export_cache()
    if checkpoint is not None:
        ck = Path(checkpoint).expanduser()
        if not ck.is_file():
            raise SamWeightsMissing(f"checkpoint not found: {ck}; {weights_help()}")
        return _export_checkpoint(ck, arch, cache)
    if model is None:
        raise SamWeightsMissing(f"no SAM model given; {weights_help()}")
    p = Path(str(model)).expanduser()
    if p.is_dir() or (p.suffix == ".json" and p.is_file()):
        return SamModelFiles.load(p)
    if p.suffix in (".pth", ".pt") and p.is_file():
        return _export_checkpoint(p, arch, cache)
    name = str(model)
    try:
        path, entry = resolve(name, models_dir)
    except (ModelFileError, ValueError, OSError) as exc:
        known = [n for n, e in _safe_manifest(load_manifest, models_dir).items()
                 if e.kind == "sam"]
        hint = f" (known SAM models: {', '.join(sorted(known))})" if known else ""
        msg = str(exc).rstrip(".")
        how = ("or pass --checkpoint PATH to an official segment-anything or MobileSAM .pth; "
               "it is exported to ONNX on first use and cached" if "models fetch" in msg
               else weights_help(name if name in known else "sam_vit_b"))
        raise SamWeightsMissing(f"SAM model '{name}' is not available{hint}: {msg}; {how}"
                                ) from exc
    if path.suffix == ".json" or path.is_dir():
        return SamModelFiles.load(path)
    recipe = entry.extra.get("export") if entry else None
    want_arch = arch or (entry.extra.get("arch") if entry else None) or (
        recipe.get("arch") if isinstance(recipe, dict) else None)
    from perception2d_ros.engines.model_store import sha256_file

    tag = sha256_file(path)[:12]
    for root in (_models_dir(models_dir), cache):
        for cand in sorted(Path(root).glob(f"sam_*_{tag}")):
            if (cand / META_FILE).is_file():
                files = SamModelFiles.load(cand)
                if files.meta.get("checkpoint", {}).get("sha256", "").startswith(tag):
                    return files
    return _export_checkpoint(path, want_arch, cache)


def _safe_manifest(loader: Any, directory: Any) -> dict:
    try:
        return loader(directory)
    except Exception:  # a broken manifest must not hide the real error
        return {}

