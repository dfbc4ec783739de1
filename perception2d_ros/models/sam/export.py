"""SAM torch side: build / load official checkpoints, export ONNX, check parity.

Architectures: ``vit_b`` / ``vit_l`` / ``vit_h`` (``segment_anything``) and ``vit_t`` (alias
``mobile_sam``: MobileSAM's TinyViT encoder + the SAM prompt encoder / mask decoder, from the
official ``mobile_sam`` package, PyPI ``mobilesam-mirror``). Each arch is built, exported and
checked against its own reference package. Only export and parity tests use torch and those
packages; the runtime (:mod:`perception2d_ros.models.sam.runtime`) runs the ONNX files. Public API:

``export_onnx(arch, checkpoint, out_dir, *, seed=None) -> dict[str, Path]``
    Export ``encoder.onnx`` (``image`` [1,3,1024,1024] normalised → ``image_embeddings``
    [1,256,64,64]), ``decoder.onnx`` (multimask, K = 3) and ``decoder_single.onnx`` (K = 1)
    plus the ``sam.json`` sidecar into ``out_dir/sam_<arch>_<sha256[:12]>/``. A second call
    for a checkpoint with the same sha256 returns the cached files.
``parity_check(arch, checkpoint, exported, image_bgr, boxes, ...) -> dict``
    The ONNX path vs the reference ``SamPredictor`` (``segment_anything``'s, or
    ``mobile_sam``'s for vit_t) with the same weights.

Decoder signature (batched prompts; ``N`` prompts of ``P`` points, both dynamic)::

    image_embeddings [1,256,64,64] float32
    point_coords     [N,P,2] float32  xy in the resized 1024 frame (ResizeLongestSide)
    point_labels     [N,P]   float32  1 fg, 0 bg, 2/3 box corners, -1 padding
    mask_input       [N,1,256,256] float32 previous low-res logits (zeros when unused)
    has_mask_input   [N]     float32  1 where mask_input is used, else 0
    → low_res_masks  [N,K,256,256] float32 logits, iou_predictions [N,K] float32
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from perception2d_ros.models.sam import runtime as samrt
from perception2d_ros.engines.model_store import sha256_file

LOG = logging.getLogger("perception2d.sam_export")

ARCHS = samrt.ARCHS
# the package that defines each arch (import name, distribution name for the sidecar)
_REFERENCE = {"vit_b": ("segment_anything", "segment-anything"),
              "vit_l": ("segment_anything", "segment-anything"),
              "vit_h": ("segment_anything", "segment-anything"),
              "vit_t": ("mobile_sam", "mobilesam-mirror")}
OPSET = 17
# ONNX files are protobufs (2 GB limit): bigger models (the ViT-H encoder, ~2.5 GB) keep their
# weights in one external-data file next to the .onnx
EXTERNAL_DATA_THRESHOLD = 1_900_000_000
EXPORT_FORMAT = "perception2d-sam-onnx"
EXPORT_VERSION = 1

# ImageEncoderViT embed dim → arch (official checkpoints are plain state dicts)
_EMBED_DIM_TO_ARCH = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
# MobileSAM's TinyViT: first conv of the patch embedding (embed_dims[0] // 2 = 32 channels)
_TINYVIT_STEM = "image_encoder.patch_embed.seq.0.c.weight"
_TINYVIT_STEM_CHANNELS = 32

# Tolerances of the parity check (the acceptance numbers).
TOLERANCES = {
    "low_res_max_abs_diff": 1e-3,
    "iou_pred_max_abs_diff": 1e-4,
    "mask_iou_min": 0.99,
    "preprocess_max_abs_diff": 1e-5,
}


# --------------------------------------------------------------------------- build / load
def canonical_arch(arch: str) -> str:
    """``arch`` by its canonical name (``mobile_sam`` → ``vit_t``); unknown ones raise."""
    name = samrt.ARCH_ALIASES.get(arch, arch)
    if name not in ARCHS:
        known = ", ".join([*ARCHS, *samrt.ARCH_ALIASES])
        raise ValueError(f"unknown SAM arch '{arch}'; known: {known}")
    return name


def reference_package(arch: str) -> Any:
    """The official package that defines ``arch``: ``segment_anything``, or ``mobile_sam``
    for vit_t (its ``sam_model_registry``, ``SamPredictor`` and ``utils.onnx``)."""
    name = _REFERENCE[canonical_arch(arch)][0]
    with warnings.catch_warnings():
        # mobile_sam imports timm's deprecated module paths and re-registers timm's tiny_vit
        # models under the same names: import-time notices about its own code, not ours
        warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Overwriting tiny_vit_", category=UserWarning)
        module = importlib.import_module(name)
        importlib.import_module(f"{name}.utils.onnx")
    return module


def reference_version(arch: str) -> dict[str, str]:
    """Distribution name and version of the reference package (for the sidecar)."""
    from importlib.metadata import PackageNotFoundError, version

    dist = _REFERENCE[canonical_arch(arch)][1]
    try:
        return {"package": dist, "version": version(dist)}
    except PackageNotFoundError:  # imported from a source tree
        return {"package": dist, "version": "unknown"}


def build_sam(arch: str) -> Any:
    """The official architecture (``sam_model_registry[arch]`` of its reference package),
    no weights, eval mode."""
    arch = canonical_arch(arch)
    return reference_package(arch).sam_model_registry[arch](checkpoint=None).eval()


def _with_weights(model: Any, state_dict: Mapping[str, Any]) -> Any:
    """Strict load, then eval mode. The order matters for TinyViT: its attention caches the
    bias table (``ab``) when switched to eval, so weights loaded after ``eval()`` need another
    ``eval()`` to reach the forward pass."""
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def load_state_dict(checkpoint: str | Path) -> dict[str, Any]:
    """An official SAM checkpoint (a plain state dict ``.pth``) loaded weights-only on CPU.
    Also accepts the ``{"model": state_dict}`` / ``{"state_dict": ...}`` wrappers."""
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling error: not a weights-only state dict
        raise ValueError(f"{path} is not a weights-only torch state dict: {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def infer_arch(state_dict: Mapping[str, Any]) -> str:
    """vit_b / vit_l / vit_h from the ViT encoder's embedding width; vit_t from MobileSAM's
    TinyViT layout (``image_encoder.patch_embed.seq.*``, ``image_encoder.layers.*``)."""
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        stem = state_dict.get(_TINYVIT_STEM)
        if stem is not None:
            if int(stem.shape[0]) != _TINYVIT_STEM_CHANNELS:
                raise ValueError(f"TinyViT encoder of width {int(stem.shape[0])} is not "
                                 f"MobileSAM's vit_t ({_TINYVIT_STEM_CHANNELS})")
            return "vit_t"
        raise ValueError("not a SAM checkpoint: neither image_encoder.patch_embed.proj.weight "
                         f"(ViT) nor {_TINYVIT_STEM} (MobileSAM TinyViT)")
    arch = _EMBED_DIM_TO_ARCH.get(int(w.shape[0]))
    if arch is None:
        raise ValueError(f"unknown SAM encoder width {int(w.shape[0])}")
    return arch


def load_sam(checkpoint: str | Path, arch: str | None = None) -> Any:
    """Official SAM with the checkpoint's weights (weights-only load, strict key match).
    ``arch`` defaults to the one the checkpoint implies; a mismatch raises."""
    sd = load_state_dict(checkpoint)
    found = infer_arch(sd)
    if arch is not None and canonical_arch(arch) != found:
        raise ValueError(f"checkpoint {checkpoint} is {found}, not {arch}")
    return _with_weights(build_sam(found), sd)


def random_state_dict(arch: str, seed: int, scale: float = 0.5,
                      logit_gain: float = 20.0) -> dict[str, Any]:
    """Official-format state dict of a seeded random SAM (for tests and benchmarks where no
    weights exist). segment-anything's init leaves many tensors degenerate (zero positional
    embeddings and relative positions, LayerNorms at 1/0, ...); every floating tensor gets
    seeded normal noise of ``scale`` x its own std (at least 0.02) so masks are non-trivial,
    and the hypernetwork output layers are scaled by ``logit_gain`` so mask logits reach the
    magnitude of trained SAM (|logit| ~ 10; stability scores are then informative).
    MobileSAM's BatchNorm statistics stay valid: ``running_var`` gets log-normal noise
    (positive), ``num_batches_tracked`` (integer) is kept."""
    import torch

    torch.manual_seed(seed)
    model = build_sam(arch)
    gen = torch.Generator().manual_seed(seed + 1)
    sd = model.state_dict()
    out = {}
    for name, t in sd.items():
        if t.is_floating_point():
            std = float(t.float().std()) if t.numel() > 1 else 0.0
            sigma = max(scale * std, 0.02)
            noise = sigma * torch.randn(t.shape, generator=gen, dtype=t.dtype)
            t = t * torch.exp(noise) if name.endswith(".running_var") else t + noise
            if name.startswith("mask_decoder.output_hypernetworks_mlps.") and \
                    ".layers.2." in name:
                t = t * logit_gain
        out[name] = t.clone()
    return out


def random_sam(arch: str, seed: int) -> Any:
    """The official architecture with :func:`random_state_dict` weights, eval mode."""
    return _with_weights(build_sam(arch), random_state_dict(arch, seed))


def save_checkpoint(state_dict: Mapping[str, Any], path: str | Path) -> Path:
    """Save a state dict the way the official ``sam_vit_*.pth`` files are stored."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state_dict), path)
    return path


# --------------------------------------------------------------------------- ONNX modules
def _onnx_modules(arch: str) -> tuple[type, type]:
    import torch

    SamOnnxModel = reference_package(arch).utils.onnx.SamOnnxModel  # noqa: N806

    class SamEncoderOnnx(torch.nn.Module):
        """``image`` [1,3,S,S] (normalised, padded) → ``image_embeddings`` [1,256,64,64]."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.image_encoder = model.image_encoder

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.image_encoder(image)

    class SamDecoderOnnx(SamOnnxModel):
        """The reference package's ``SamOnnxModel`` prompt embedding, batched over N prompts,
        returning the raw low-res logits and IoU predictions (no upscaling, no selection).
        ``MaskDecoder.predict_masks`` is reproduced with ``expand`` in place of
        ``repeat_interleave`` (same values; keeps N dynamic in the traced graph)."""

        def __init__(self, model: Any, multimask: bool) -> None:
            super().__init__(model, return_single_mask=False)
            self.multimask = multimask

        def _embed_masks(self, input_mask: torch.Tensor,
                         has_mask_input: torch.Tensor) -> torch.Tensor:
            has = has_mask_input.reshape(-1, 1, 1, 1)
            mask_embedding = has * self.model.prompt_encoder.mask_downscaling(input_mask)
            return mask_embedding + (1 - has) * \
                self.model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)

        @torch.no_grad()
        def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor,
                    point_labels: torch.Tensor, mask_input: torch.Tensor,
                    has_mask_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            sparse = self._embed_points(point_coords, point_labels)
            dense = self._embed_masks(mask_input, has_mask_input)
            md = self.model.mask_decoder
            n = sparse.shape[0]
            output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
            tokens = torch.cat((output_tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)
            src = image_embeddings.expand(n, -1, -1, -1) + dense
            image_pe = self.model.prompt_encoder.get_dense_pe()
            pos_src = image_pe.expand(n, -1, -1, -1)
            b, c, h, w = src.shape
            hs, src = md.transformer(src, pos_src, tokens)
            iou_token_out = hs[:, 0, :]
            mask_tokens_out = hs[:, 1:(1 + md.num_mask_tokens), :]
            src = src.transpose(1, 2).reshape(b, c, h, w)
            upscaled = md.output_upscaling(src)
            hyper_in = torch.stack([md.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                                    for i in range(md.num_mask_tokens)], dim=1)
            b, c, h, w = upscaled.shape
            masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
            iou_pred = md.iou_prediction_head(iou_token_out)
            if self.multimask:
                return masks[:, 1:, :, :], iou_pred[:, 1:]
            return masks[:, 0:1, :, :], iou_pred[:, 0:1]

    return SamEncoderOnnx, SamDecoderOnnx


def _export_one(module: Any, args: tuple, path: Path, input_names: Sequence[str],
                output_names: Sequence[str], dynamic_axes: dict | None,
                output_shapes: Mapping[str, Sequence[int | str]] | None = None) -> None:
    """torch.onnx.export (TorchScript exporter, opset 17) into ``path``; declared output
    shapes are written into the graph (the tracer leaves them symbolic); a model over 2 GB
    (ViT-H encoder) is stored as ``path`` + one ``path.data`` external-data file."""
    import onnx
    import torch

    scratch = path.parent / f".{path.stem}.scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / path.name
    with torch.no_grad(), warnings.catch_warnings():
        # SAM's shape arithmetic is constant for the fixed 1024 input: tracer warnings are moot
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the TorchScript exporter is chosen on purpose (dynamo=False): the torch.export-based
        # one fails on SAM's 4-D windowed attention; its deprecation notice is expected
        warnings.simplefilter("ignore", DeprecationWarning)
        # strided slices (TinyViT) are left to the runtime instead of folded: nothing to act on
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1",
                                category=UserWarning)
        torch.onnx.export(module, args, str(raw), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic_axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    model = onnx.load(str(raw), load_external_data=True)
    opset = {o.domain: o.version for o in model.opset_import}
    if opset.get("", opset.get("ai.onnx")) != OPSET:
        raise RuntimeError(f"{path}: exported opset {opset}, expected {OPSET}")
    for out in model.graph.output:
        shape = (output_shapes or {}).get(out.name)
        if shape is None:
            continue
        dims = out.type.tensor_type.shape.dim
        del dims[:]
        for d in shape:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = int(d)
    try:
        big = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    except Exception:  # protobuf cannot even size a > 2 GB message
        big = True
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=path.name + ".data",
                        size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    del model
    shutil.rmtree(scratch, ignore_errors=True)


def _file_entry(root: Path, rel: str, **extra: Any) -> dict[str, Any]:
    p = root / rel
    entry = {"path": rel, "sha256": sha256_file(p), "size": p.stat().st_size}
    data = p.with_name(p.name + ".data")
    if data.is_file():
        entry["external_data"] = {"path": data.name, "sha256": sha256_file(data),
                                  "size": data.stat().st_size}
    entry.update(extra)
    return entry


def _cached(meta_path: Path, source_key: str) -> bool:
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("source_key") != source_key or meta.get("version") != EXPORT_VERSION:
        return False
    for entry in meta.get("files", {}).values():
        p = meta_path.parent / entry["path"]
        if not p.is_file() or p.stat().st_size != entry["size"]:
            return False
        ext = entry.get("external_data")
        if ext and not (p.parent / ext["path"]).is_file():
            return False
    return True


def export_dir_for(arch: str, checkpoint: str | Path | None, out_dir: str | Path, *,
                   seed: int | None = None) -> Path:
    """Where :func:`export_onnx` puts (or finds) the export of this checkpoint."""
    if checkpoint is not None:
        tag = sha256_file(checkpoint)[:12]
    else:
        tag = f"random-seed{seed}"
    return Path(out_dir) / f"sam_{arch}_{tag}"


def export_onnx(arch: str | None, checkpoint: str | Path | None, out_dir: str | Path, *,
                seed: int | None = None, force: bool = False) -> dict[str, Path]:
    """Export a SAM checkpoint to ONNX (cached per checkpoint sha256).

    arch        vit_b | vit_l | vit_h | vit_t (alias mobile_sam), or None to infer it from
                the checkpoint.
    checkpoint  an official segment-anything or MobileSAM ``.pth`` (loaded weights-only);
                None builds a seeded random model (``seed`` required; tests / benchmarks
                only).
    out_dir     files go to ``out_dir/sam_<arch>_<sha256[:12]>/`` (``..._random-seed<N>``).
    Returns ``{"encoder", "decoder", "decoder_single", "meta"}`` file paths. The
    ``sam.json`` sidecar records arch, the reference package and its version, image size,
    pixel mean/std, the checkpoint sha256, opset and every file's sha256 and size.
    """
    if checkpoint is None and (seed is None or arch is None):
        raise ValueError("export_onnx needs a checkpoint, or an arch and a seed for random "
                         "weights")
    if arch is not None:
        arch = canonical_arch(arch)
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"SAM checkpoint not found: {checkpoint}")
        ckpt_sha = sha256_file(checkpoint)
        source_key = f"sha256:{ckpt_sha}"
    else:
        ckpt_sha = None
        source_key = f"random:{arch}:{seed}"
    if arch is None and checkpoint is not None and not force:
        # a cached export of this checkpoint under any arch name: no torch needed
        for cand in sorted(Path(out_dir).glob(f"sam_*_{ckpt_sha[:12]}")):
            if _cached(cand / samrt.META_FILE, source_key):
                LOG.info("SAM export cached in %s", cand)
                return _result(cand)
    if arch is not None:
        target = export_dir_for(arch, checkpoint, out_dir, seed=seed)
        if not force and _cached(target / samrt.META_FILE, source_key):
            LOG.info("SAM %s export cached in %s", arch, target)
            return _result(target)

    import torch

    model = None
    if arch is None:
        assert checkpoint is not None
        sd = load_state_dict(checkpoint)
        arch = infer_arch(sd)
        model = _with_weights(build_sam(arch), sd)
        del sd
        target = export_dir_for(arch, checkpoint, out_dir, seed=seed)
    if model is None:
        if checkpoint is not None:
            model = load_sam(checkpoint, arch)
        else:
            assert seed is not None
            model = random_sam(arch, seed)
    model = model.eval().float()

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=out_dir))
    t0 = time.monotonic()
    try:
        enc_cls, dec_cls = _onnx_modules(arch)
        size = model.image_encoder.img_size
        LOG.warning("exporting SAM %s encoder to ONNX (about a minute for vit_b on CPU, "
                    "seconds for vit_t)", arch)
        emb = model.prompt_encoder.image_embedding_size
        dim = model.prompt_encoder.embed_dim
        low = 4 * emb[0]
        _export_one(enc_cls(model), (torch.zeros(1, 3, size, size),), tmp / "encoder.onnx",
                    [samrt.ENCODER_INPUT], [samrt.ENCODER_OUTPUT], None,
                    {samrt.ENCODER_OUTPUT: [1, dim, *emb]})
        dummy = (
            torch.randn(1, dim, *emb),
            torch.randint(0, size, (2, 3, 2), dtype=torch.float32),
            torch.tensor([[1, 0, -1], [2, 3, -1]], dtype=torch.float32),
            torch.zeros(2, 1, low, low),
            torch.zeros(2),
        )
        axes = {"point_coords": {0: "num_prompts", 1: "num_points"},
                "point_labels": {0: "num_prompts", 1: "num_points"},
                "mask_input": {0: "num_prompts"}, "has_mask_input": {0: "num_prompts"},
                "low_res_masks": {0: "num_prompts"}, "iou_predictions": {0: "num_prompts"}}
        for name, multimask in (("decoder.onnx", True), ("decoder_single.onnx", False)):
            k = 3 if multimask else 1
            _export_one(dec_cls(model, multimask), dummy, tmp / name,
                        samrt.DECODER_INPUTS, samrt.DECODER_OUTPUTS, axes,
                        {"low_res_masks": ["num_prompts", k, low, low],
                         "iou_predictions": ["num_prompts", k]})
        meta = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "arch": arch,
            "reference": reference_version(arch),
            "source_key": source_key,
            "checkpoint": ({"file": checkpoint.name, "sha256": ckpt_sha} if checkpoint
                           else {"random_seed": seed}),
            "image_size": int(size),
            "embedding_shape": [1, int(dim), *map(int, emb)],
            "low_res_size": int(low),
            # float32 buffers of the official constants: round back to their decimal values
            "pixel_mean": [round(float(v), 4) for v in model.pixel_mean.flatten()],
            "pixel_std": [round(float(v), 4) for v in model.pixel_std.flatten()],
            "image_format": model.image_format,
            "mask_threshold": float(model.mask_threshold),
            "opset": OPSET,
            "torch": torch.__version__,
            "exported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": {
                "encoder": _file_entry(tmp, "encoder.onnx", inputs=[samrt.ENCODER_INPUT],
                                       outputs=[samrt.ENCODER_OUTPUT]),
                "decoder": _file_entry(tmp, "decoder.onnx", multimask=True, num_masks=3,
                                       inputs=list(samrt.DECODER_INPUTS),
                                       outputs=list(samrt.DECODER_OUTPUTS)),
                "decoder_single": _file_entry(tmp, "decoder_single.onnx", multimask=False,
                                              num_masks=1, inputs=list(samrt.DECODER_INPUTS),
                                              outputs=list(samrt.DECODER_OUTPUTS)),
            },
        }
        (tmp / samrt.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    LOG.warning("SAM %s exported to %s in %.0f s", arch, target, time.monotonic() - t0)
    return _result(target)


def _result(target: Path) -> dict[str, Path]:
    meta = json.loads((target / samrt.META_FILE).read_text())
    out = {k: target / v["path"] for k, v in meta["files"].items()}
    out["meta"] = target / samrt.META_FILE
    return out


def verify_export(exported: Mapping[str, Any] | str | Path) -> list[str]:
    """Recompute every file's sha256 against ``sam.json``; returns the problems (empty = ok)."""
    files = samrt.SamModelFiles.load(exported if isinstance(exported, Mapping)
                                     else Path(exported))
    root = Path(files.encoder).parent
    problems = []
    for key, entry in files.meta["files"].items():
        for e in (entry, entry.get("external_data")):
            if not e:
                continue
            p = root / e["path"]
            if not p.is_file():
                problems.append(f"{key}: {p} missing")
            elif sha256_file(p) != e["sha256"]:
                problems.append(f"{key}: {p} sha256 mismatch")
    return problems


# --------------------------------------------------------------------------- parity
def _compare_set(ours: samrt.SamResult, refs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                 ) -> dict[str, Any]:
    """ours (batched) vs per-prompt reference (masks [K,H,W] bool, iou [K], low [K,256,256])."""
    low_diff, iou_diff, mask_ious, agree = [], [], [], []
    for i, (r_masks, r_iou, r_low) in enumerate(refs):
        low_diff.append(float(np.abs(ours.low_res_logits[i] - r_low).max()))
        iou_diff.append(float(np.abs(ours.iou_predictions[i] - r_iou).max()))
        r_best = int(np.argmax(r_iou))
        agree.append(int(ours.chosen[i]) == r_best)
        mask_ious.append(samrt.mask_iou(ours.masks[i], r_masks[r_best]))
    return {
        "n": len(refs),
        "low_res_max_abs_diff": max(low_diff) if low_diff else 0.0,
        "iou_pred_max_abs_diff": max(iou_diff) if iou_diff else 0.0,
        "mask_iou_min": min(mask_ious) if mask_ious else 1.0,
        "mask_iou_mean": float(np.mean(mask_ious)) if mask_ious else 1.0,
        "mask_iou": mask_ious,
        "chosen_agree": float(np.mean(agree)) if agree else 1.0,
        "mask_fraction": [float(m.mean()) for m in ours.masks],
        "low_res_abs_max": float(np.abs(ours.low_res_logits).max()) if len(ours) else 0.0,
    }


def _set_ok(d: Mapping[str, Any]) -> bool:
    return (d["low_res_max_abs_diff"] <= TOLERANCES["low_res_max_abs_diff"]
            and d["iou_pred_max_abs_diff"] <= TOLERANCES["iou_pred_max_abs_diff"]
            and d["mask_iou_min"] >= TOLERANCES["mask_iou_min"])


def parity_check(arch: str | None, checkpoint: str | Path | Any,
                 exported: Mapping[str, Any] | str | Path | Any, image_bgr: np.ndarray,
                 boxes: Any, *, points: Any = None, point_labels: Any = None,
                 multimask_modes: Sequence[bool] = (True, False), decoder_only: bool = False,
                 engine_config: Any = None, seed: int | None = None) -> dict[str, Any]:
    """Our ONNX path vs the reference ``SamPredictor`` (torch, same weights) on one image:
    ``segment_anything``'s for ViT-B/L/H, ``mobile_sam``'s for vit_t.

    checkpoint  a ``.pth`` path, an already loaded ``Sam`` module (saves a reload), or None
                with ``seed``: the seeded random weights ``export_onnx(..., seed=)`` used.
    exported    ``export_onnx``'s dict / an export dir, or a :class:`SamSegmenter` (reused).
                Built on ONNX Runtime CPU unless ``engine_config`` says otherwise (the
                reference-grade path; GPU backends have their own tolerances).
    boxes       [N,4] xyxy prompts (e.g. COCO GT boxes); ``points`` [M,P,2] with
                ``point_labels`` [M,P] add point prompts (positive and negative points).
    Each prompt is run through ``SamPredictor.predict`` one at a time (the official
    single-prompt API) and through our batched decoder; for every ``multimask_modes`` entry
    it reports the max abs diff of the low-res logits (all K candidates), of the IoU
    predictions, the binary-mask IoU of the chosen mask at the original size, and whether
    the chosen candidate agrees. Point prompts also run a refinement round (the best
    multimask low-res logits fed back as ``mask_input``). With ``decoder_only`` the
    ``*_decoder_only`` sets feed the torch embedding to our decoder (isolates the decoder
    export). Also: preprocessing diff (our [1,3,1024,1024] tensor vs
    ``model.preprocess(transform.apply_image(...))``), resized-uint8 equality, embedding
    diff, timings, the reference package and version, ``passed`` against :data:`TOLERANCES`.
    """
    import torch

    from perception2d_ros.engines.factory import EngineConfig

    if isinstance(checkpoint, torch.nn.Module):
        model = checkpoint
    elif checkpoint is None:
        if seed is None or arch is None:
            raise ValueError("parity_check needs a checkpoint, or arch and seed for random "
                             "weights")
        model = random_sam(arch, seed)
    else:
        model = load_sam(checkpoint, arch)
    model = model.eval()
    found = infer_arch(model.state_dict())
    if arch is not None and canonical_arch(arch) != found:
        raise ValueError(f"the SAM module is {found}, not {arch}")
    arch = found
    SamPredictor = reference_package(arch).SamPredictor  # noqa: N806
    if isinstance(exported, samrt.SamSegmenter):
        seg = exported
    else:
        seg = samrt.SamSegmenter.from_exported(
            exported, engine_config or EngineConfig(backend="onnxruntime", device="cpu"))
    rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])
    report: dict[str, Any] = {"arch": arch, "reference": reference_version(arch),
                              "image_size": list(image_bgr.shape[:2]),
                              "tolerances": dict(TOLERANCES)}
    # preprocessing
    ref_resized = SamPredictor(model).transform.apply_image(rgb)
    ours_resized = seg.transform.apply_image(rgb)
    report["resized_uint8_equal"] = bool(ours_resized.shape == ref_resized.shape
                                         and np.array_equal(ours_resized, ref_resized))
    with torch.no_grad():
        ref_in = model.preprocess(torch.as_tensor(ref_resized).permute(2, 0, 1)[None]
                                  .contiguous()).numpy()
    ours_in = seg.preprocess(image_bgr)
    report["preprocess_max_abs_diff"] = float(np.abs(ours_in - ref_in).max())
    # encoders
    predictor = SamPredictor(model)
    t0 = time.perf_counter()
    predictor.set_image(rgb, image_format="RGB")
    t1 = time.perf_counter()
    seg.set_image(image_bgr)
    t2 = time.perf_counter()
    ref_emb = predictor.features.numpy()
    report["embedding_max_abs_diff"] = float(np.abs(seg.embedding - ref_emb).max())
    report["embedding_abs_max"] = float(np.abs(ref_emb).max())
    report["timings"] = {"torch_encoder_s": t1 - t0, "onnx_encoder_s": t2 - t1}

    box_arr = None if boxes is None else np.asarray(boxes, np.float64).reshape(-1, 4)
    sets: list[tuple[str, dict[str, Any]]] = []
    if box_arr is not None and len(box_arr):
        sets.append(("boxes", {"boxes": box_arr}))
    if points is not None:
        pts = np.asarray(points, np.float64)
        labs = np.asarray(point_labels, np.float32)
        if pts.ndim == 2:
            pts, labs = pts[None], labs[None]
        sets.append(("points", {"points": pts, "point_labels": labs}))

    def reference(kind: str, args: dict[str, Any], i: int, mm: bool) -> tuple:
        if kind == "boxes":
            m, q, low = predictor.predict(box=args["boxes"][i], multimask_output=mm)
        else:
            m, q, low = predictor.predict(point_coords=args["points"][i],
                                          point_labels=args["point_labels"][i],
                                          multimask_output=mm)
        return m, q, low

    ok = report["preprocess_max_abs_diff"] <= TOLERANCES["preprocess_max_abs_diff"]
    ok = ok and report["resized_uint8_equal"]
    ref_cache: dict[str, list] = {}
    for kind, args in sets:
        n = len(args.get("boxes", args.get("points")))
        for mm in multimask_modes:
            tag = f"{kind}_{'multi' if mm else 'single'}"
            t0 = time.perf_counter()
            refs = [reference(kind, args, i, mm) for i in range(n)]
            t1 = time.perf_counter()
            ours = seg.predict(multimask=mm, **args)
            t2 = time.perf_counter()
            d = _compare_set(ours, refs)
            d["torch_decoder_s"] = t1 - t0
            d["onnx_decoder_s"] = t2 - t1
            report[tag] = d
            ref_cache[tag] = refs
            ok = ok and _set_ok(d)
    if "points_multi" in ref_cache:
        # refinement: the best low-res logits of the click prompts fed back as mask_input
        args = dict(sets)["points"]
        mask_in = np.stack([low[int(np.argmax(q))] for _, q, low in ref_cache["points_multi"]])
        refs = [predictor.predict(point_coords=args["points"][i],
                                  point_labels=args["point_labels"][i],
                                  mask_input=mask_in[i][None], multimask_output=False)
                for i in range(len(mask_in))]
        d = _compare_set(seg.predict(multimask=False, mask_input=mask_in, **args), refs)
        report["points_refined_single"] = d
        ok = ok and _set_ok(d)
    # decoder alone on the torch embedding
    our_emb = seg.embedding
    seg.set_embedding(ref_emb, image_bgr.shape[:2])
    for kind, args in (sets if decoder_only else []):
        n = len(args.get("boxes", args.get("points")))
        mm = True
        refs = [reference(kind, args, i, mm) for i in range(n)]
        report[f"{kind}_multi_decoder_only"] = _compare_set(seg.predict(multimask=mm, **args),
                                                            refs)
    seg.set_embedding(our_emb, image_bgr.shape[:2])
    report["passed"] = bool(ok)
    return report
