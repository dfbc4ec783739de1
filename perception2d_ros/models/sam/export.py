"""SAM checkpoint → ONNX: the encoder and the batched prompt decoders, the ``sam.json``
sidecar, the export cache keyed by the checkpoint's sha256, and :func:`verify_export`.

Architectures: ``vit_b`` / ``vit_l`` / ``vit_h`` (``segment_anything``) and ``vit_t`` (alias
``mobile_sam``: MobileSAM's TinyViT encoder + the SAM prompt encoder / mask decoder, from the
official ``mobile_sam`` package, PyPI ``mobilesam-mirror``); checkpoints are built and loaded
by :mod:`perception2d_ros.models.sam.checkpoint`, and :mod:`perception2d_ros.models.sam.parity`
checks an export against its own reference package. Only export and parity use torch and
those packages; the runtime (:mod:`perception2d_ros.models.sam.runtime`) runs the ONNX files.

``export_onnx(arch, checkpoint, out_dir, *, seed=None) -> dict[str, Path]``
    Export ``encoder.onnx`` (``image`` [1,3,1024,1024] normalised → ``image_embeddings``
    [1,256,64,64]), ``decoder.onnx`` (multimask, K = 3) and ``decoder_single.onnx`` (K = 1)
    plus the ``sam.json`` sidecar into ``out_dir/sam_<arch>_<sha256[:12]>/``. A second call
    for a checkpoint with the same sha256 returns the cached files.

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
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from perception2d_ros.engines.model_store import sha256_file
from perception2d_ros.models.sam.checkpoint import (_with_weights, build_sam, canonical_arch,
                                                    infer_arch, load_sam, load_state_dict,
                                                    random_sam, reference_package,
                                                    reference_version)
from perception2d_ros.models.sam.spec import (DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUT,
                                              ENCODER_OUTPUT, META_FILE, SamModelFiles)

LOG = logging.getLogger("perception2d.sam_export")

OPSET = 17
# ONNX files are protobufs (2 GB limit): bigger models (the ViT-H encoder, ~2.5 GB) keep their
# weights in one external-data file next to the .onnx
EXTERNAL_DATA_THRESHOLD = 1_900_000_000
EXPORT_FORMAT = "perception2d-sam-onnx"
EXPORT_VERSION = 1


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
            if _cached(cand / META_FILE, source_key):
                LOG.info("SAM export cached in %s", cand)
                return _result(cand)
    if arch is not None:
        target = export_dir_for(arch, checkpoint, out_dir, seed=seed)
        if not force and _cached(target / META_FILE, source_key):
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
                    [ENCODER_INPUT], [ENCODER_OUTPUT], None,
                    {ENCODER_OUTPUT: [1, dim, *emb]})
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
                        DECODER_INPUTS, DECODER_OUTPUTS, axes,
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
                "encoder": _file_entry(tmp, "encoder.onnx", inputs=[ENCODER_INPUT],
                                       outputs=[ENCODER_OUTPUT]),
                "decoder": _file_entry(tmp, "decoder.onnx", multimask=True, num_masks=3,
                                       inputs=list(DECODER_INPUTS),
                                       outputs=list(DECODER_OUTPUTS)),
                "decoder_single": _file_entry(tmp, "decoder_single.onnx", multimask=False,
                                              num_masks=1, inputs=list(DECODER_INPUTS),
                                              outputs=list(DECODER_OUTPUTS)),
            },
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    LOG.warning("SAM %s exported to %s in %.0f s", arch, target, time.monotonic() - t0)
    return _result(target)


def _result(target: Path) -> dict[str, Path]:
    meta = json.loads((target / META_FILE).read_text())
    out = {k: target / v["path"] for k, v in meta["files"].items()}
    out["meta"] = target / META_FILE
    return out


def verify_export(exported: Mapping[str, Any] | str | Path) -> list[str]:
    """Recompute every file's sha256 against ``sam.json``; returns the problems (empty = ok)."""
    files = SamModelFiles.load(exported if isinstance(exported, Mapping)
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

