"""Which LSeg image encoder and text encoder to run, shared by ``perception2d seglabels`` and
the pipeline stage: a manifest name, an exported .onnx or a lang-seg ``--checkpoint`` (exported
once into the cache) -> the encoder ONNX and its :class:`LSegSegmenter`; the vocabulary's
CLIP text embeddings (``--text-embeds``, the checkpoint's own CLIP, or ``--text-model``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence


class SegLabelsError(RuntimeError):
    """A user-facing error (printed without a traceback)."""


def _cache_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "cache_dir", None):
        return Path(args.cache_dir).expanduser()
    from perception2d_ros.engines.base import default_cache_dir

    return Path(default_cache_dir()) / "lseg"


def _no_weights_message(name: str, ckpt_path: Path | None) -> str:
    where = f" to {ckpt_path}" if ckpt_path else " into the models directory"
    return (f"LSeg weights for '{name}' are not available. Download the lang-seg demo "
            "checkpoint demo_e200.ckpt (Google Drive link in the README of "
            f"https://github.com/isl-org/lang-seg, 'Download demo model'){where}, then run "
            "`perception2d models export lseg_demo_e200` (writes the ONNX image encoder), or "
            "pass --checkpoint /path/to/demo_e200.ckpt here.")


def resolve_model(args: argparse.Namespace) -> Path:
    """The LSeg image-encoder ONNX for ``--model`` / ``--checkpoint`` (exporting a
    ``--checkpoint`` once into the cache)."""
    from perception2d_ros.engines import model_store as ms

    name = str(args.model)
    if name.endswith(".onnx") or Path(name).expanduser().suffix == ".onnx":
        path = Path(name).expanduser()
        if not path.is_file():
            raise SegLabelsError(f"ONNX model not found: {path}")
        return path.resolve()
    manifest = ms.load_manifest(args.models_dir)
    entry = manifest.get(name)
    arch = name
    if entry is not None:
        if entry.file.endswith(".onnx"):
            try:
                return ms.resolve(name, args.models_dir)[0]
            except ms.ModelFileError as exc:
                raise SegLabelsError(str(exc)) from exc
        recipe = entry.extra.get("export") or {}
        arch = recipe.get("arch", "lseg_vitl16_384")
        exported = manifest.get(f"{name}_image")
        if exported is not None and not args.checkpoint:
            try:
                return ms.resolve(exported.name, args.models_dir)[0]
            except ms.ModelFileError as exc:
                raise SegLabelsError(f"{exc} (re-run `perception2d models export {name}`)") \
                    from exc
    if args.checkpoint:
        return _export_cached(arch, Path(args.checkpoint).expanduser(), args)
    if entry is None:
        from perception2d_ros.models.lseg.net import ARCH_ALIASES, ARCHS

        if name not in ARCHS and name not in ARCH_ALIASES:
            known = [n for n, e in manifest.items() if e.kind == "lseg"]
            raise SegLabelsError(f"unknown LSeg model '{name}' (known: {', '.join(known)}; or "
                                 "pass an exported .onnx)")
        raise SegLabelsError(_no_weights_message(name, None))
    ckpt = ms.entry_path(entry, args.models_dir)
    if ckpt.is_file():
        raise SegLabelsError(
            f"{ckpt} is present but not exported yet: run `perception2d models export {name}` "
            f"(once; writes the ONNX image encoder), or pass --checkpoint {ckpt}")
    raise SegLabelsError(_no_weights_message(name, ckpt))


def _export_cached(arch: str, checkpoint: Path, args: argparse.Namespace) -> Path:
    from perception2d_ros.engines import model_store as ms
    from perception2d_ros.models.lseg.export import export_onnx, onnx_file_name

    if not checkpoint.is_file():
        raise SegLabelsError(f"checkpoint not found: {checkpoint}")
    sha = ms.sha256_file(checkpoint)
    out_dir = _cache_dir(args) / sha[:16]
    onnx = out_dir / onnx_file_name(arch, args.input_size)
    if onnx.is_file() and onnx.with_suffix(".json").is_file():
        return onnx
    print(f"exporting {checkpoint} ({arch}, {args.input_size}x{args.input_size}) -> {out_dir} "
          "(once; later runs reuse it)", file=sys.stderr)
    try:
        return export_onnx(arch, checkpoint, out_dir, input_size=args.input_size)["image"]
    except Exception as exc:  # noqa: BLE001 - surface any export failure as a CLI error
        raise SegLabelsError(f"export of {checkpoint} failed: {type(exc).__name__}: {exc}") \
            from exc


def text_embeddings(phrases: Sequence[str], templates: Sequence[str], meta: Any,
                    args: argparse.Namespace) -> Any:
    """(N, D) L2-normalised float32 text embeddings for ``phrases``: ``--text-embeds``, else
    the CLIP stored in ``--checkpoint`` (the one LSeg was trained with), else
    ``--text-model`` (must be a CLIP of LSeg's text architecture, ViT-B/32)."""
    import numpy as np

    if args.text_embeds:
        emb = np.load(args.text_embeds).astype(np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(phrases):
            raise SegLabelsError(f"--text-embeds {args.text_embeds}: shape {emb.shape}, "
                                 f"expected ({len(phrases)}, {meta.embed_dim}) for {len(phrases)}"
                                 " phrases")
    else:
        cache = text_cache(meta, args)
        emb = np.asarray(cache.encode(list(phrases), list(templates)), np.float32)
    if emb.shape[1] != meta.embed_dim:
        raise SegLabelsError(f"text embeddings are {emb.shape[1]}-d, the LSeg model needs "
                             f"{meta.embed_dim}-d ({meta.text_model} text tower)")
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def text_cache(meta: Any, args: argparse.Namespace) -> Any:
    """The CLIP :class:`TextEmbeddingCache` for this LSeg model."""
    from perception2d_ros.engines.factory import EngineConfig

    try:
        from perception2d_ros.models.clip.export import read_sidecar
        from perception2d_ros.models.clip.resolve import resolve_export
        from perception2d_ros.models.clip.vocabulary import TextEmbeddingCache
    except ImportError as exc:
        raise SegLabelsError(
            f"the CLIP text encoder is not available ({exc}); pass --text-embeds") from exc
    ecfg = EngineConfig(backend=args.backend, device=args.device, precision=args.precision,
                        threads=args.threads)
    want = str(meta.text_model).replace("-quickgelu", "")
    try:
        if args.checkpoint:
            clip_ckpt = _clip_from_checkpoint(Path(args.checkpoint).expanduser(), args)
            if clip_ckpt is not None:
                from perception2d_ros.models.lseg.checkpoint import CLIP_ARCH_OF_CHECKPOINT

                return TextEmbeddingCache.from_model(
                    None, checkpoint=clip_ckpt, arch=CLIP_ARCH_OF_CHECKPOINT,
                    engine_config=ecfg)
        sidecar = resolve_export(args.text_model, models_dir=args.models_dir)
        arch = str(read_sidecar(sidecar)["arch"]).replace("-quickgelu", "")
        if arch != want:
            raise SegLabelsError(
                f"--text-model {args.text_model} is CLIP {arch}; this LSeg model was trained "
                f"against CLIP {want}'s text tower (use clip_vit_b32)")
        return TextEmbeddingCache.from_model(sidecar, models_dir=args.models_dir,
                                             engine_config=ecfg)
    except SegLabelsError:
        raise
    except Exception as exc:  # noqa: BLE001 - ClipModelUnavailable, bad files, ...
        raise SegLabelsError(f"cannot encode the vocabulary with CLIP: {exc} (or pass "
                             "--text-embeds)") from exc


def _clip_from_checkpoint(checkpoint: Path, args: argparse.Namespace) -> Path | None:
    """The CLIP state dict inside an LSeg checkpoint, extracted once into the cache."""
    from perception2d_ros.engines import model_store as ms
    from perception2d_ros.models.lseg.checkpoint import extract_clip_checkpoint

    out = _cache_dir(args) / ms.sha256_file(checkpoint)[:16] / "clip_from_lseg.pt"
    if out.is_file():
        return out
    return extract_clip_checkpoint(checkpoint, out)


def open_segmenter(onnx: Path, args: argparse.Namespace) -> Any:
    """The :class:`LSegSegmenter` over ``onnx`` with ``args``' engine settings, scales and
    flip."""
    from perception2d_ros.engines.factory import EngineConfig
    from perception2d_ros.models.lseg.labeler import LSegSegmenter
    from perception2d_ros.models.lseg.resample import parse_scales

    ecfg = EngineConfig(backend=args.backend, device=args.device, precision=args.precision,
                        threads=args.threads)
    try:
        scales = parse_scales(getattr(args, "scales", None) or (1.0,))
    except ValueError as exc:
        raise SegLabelsError(f"--{exc}") from None
    return LSegSegmenter.from_onnx(onnx, ecfg, scales=scales, flip=bool(getattr(args, "flip",
                                                                                 False)))
