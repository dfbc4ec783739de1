"""LSeg ONNX export of the image side plus its sidecar JSON (the parity check against the
torch module is :mod:`perception2d_ros.models.lseg.parity`).

Export contract (what the runtime in :mod:`perception2d_ros.models.lseg.labeler` consumes)
---------------------------------------------------------------------------------
ONNX input ``image`` float32 [1, 3, H, W]: RGB, ``(x / 255 - 0.5) / 0.5`` (lang-seg's
normalisation), H and W multiples of 32, fixed at export (default 480x480). Output
``pixel_embeds`` float32 [1, 512, H/2, W/2]: the ``head1`` output L2-normalised per pixel, at
the head's native stride 2 (the official x2 upsample happens on the logits; bilinear
interpolation commutes with the per-pixel dot product, so the runtime computes logits at
stride 2 for the N phrases and resizes those instead of 512 embedding channels). The head
block (if any) acts on the logits, so its 3x3 kernel goes into the sidecar JSON and the runtime
applies it; the vocabulary never touches the engine.

Torch is needed here only for export and parity tests; the runtime uses ONNX Runtime/TensorRT.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from perception2d_ros.engines.model_store import sha256_file
from perception2d_ros.models.lseg.checkpoint import CheckpointError, load_checkpoint
from perception2d_ros.models.lseg.net import (LOGIT_SCALE, LSegArch, LSegNet, PixelEmbedder,
                                              build_model, get_arch)

NORM_MEAN = (0.5, 0.5, 0.5)
NORM_STD = (0.5, 0.5, 0.5)
INPUT_NAME = "image"
OUTPUT_NAME = "pixel_embeds"
EMBED_STRIDE = 2
SIDECAR_FORMAT = "perception2d.lseg/1"


# --------------------------------------------------------------------------- export
def _input_hw(arch: LSegArch, input_size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    m = arch.stride_multiple
    if h % m or w % m:
        raise ValueError(f"input_size {h}x{w} must be a multiple of {m} for {arch.name}")
    return int(h), int(w)


def onnx_file_name(arch: str | LSegArch, input_size: int | Sequence[int] = 480) -> str:
    a = get_arch(arch)
    h, w = _input_hw(a, input_size)
    return f"{a.name}_{h}x{w}.onnx"


def head_block_spec(net: LSegNet) -> dict[str, Any] | None:
    a = net.arch
    if not a.arch_option:
        return None
    conv = net.head_block.conv
    return {"kind": net.head_block.kind, "activation": a.activation,
            "block_depth": a.block_depth,
            "weight": conv.weight.detach().reshape(3, 3).cpu().double().tolist(),
            "bias": float(conv.bias.detach().cpu()[0])}


def export_onnx(arch: str | LSegArch, checkpoint: str | Path | None, out_dir: str | Path, *,
                seed: int | None = None, input_size: int | Sequence[int] = 480,
                name: str | None = None, opset: int = 17) -> dict[str, Path]:
    """Export the image side (``image`` -> ``pixel_embeds``) to ONNX plus a sidecar JSON.

    ``checkpoint``: official lang-seg checkpoint or our state dict; ``None`` needs ``seed``
    (random weights, for tests). Returns ``{"image": onnx path, "sidecar": json path}``
    (the sidecar is always ``onnx.with_suffix(".json")``)."""
    a = get_arch(arch)
    if checkpoint is None and seed is None:
        raise CheckpointError(
            f"no weights for {a.name}: pass the lang-seg checkpoint (demo_e200.ckpt, see "
            "github.com/isl-org/lang-seg 'Download demo model') or a seed for random weights")
    h, w = _input_hw(a, input_size)
    net = build_model(a, seed=seed if seed is not None else 0)
    report: dict[str, Any] = {}
    if checkpoint is not None:
        report = load_checkpoint(net, checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / (name or onnx_file_name(a, (h, w)))
    if onnx_path.suffix != ".onnx":
        onnx_path = onnx_path.with_suffix(".onnx")
    dummy = torch.zeros(1, 3, h, w)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are fixed on purpose
        warnings.simplefilter("ignore", DeprecationWarning)       # dynamo=False is the convention
        torch.onnx.export(PixelEmbedder(net).eval(), (dummy,), str(onnx_path),
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    sidecar = onnx_path.with_suffix(".json")
    meta = {
        "format": SIDECAR_FORMAT,
        "arch": a.to_dict(),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": [h, w],
        "color": "rgb",
        "mean": list(NORM_MEAN),
        "std": list(NORM_STD),
        "pad_value": 0,
        "embed_stride": EMBED_STRIDE,
        "embed_dim": a.out_dim,
        "embeds_normalized": True,
        "logit_scale": LOGIT_SCALE,
        "head_block": head_block_spec(net),
        "text_model": a.text_model,
        "text_templates": ["{}"],   # lang-seg tokenizes the bare label words
        "checkpoint": None if checkpoint is None or isinstance(checkpoint, Mapping)
        else {"file": Path(checkpoint).name, "sha256": sha256_file(Path(checkpoint))},
        "checkpoint_report": report,
        "seed": seed if checkpoint is None else None,
        "opset": opset,
        "torch": torch.__version__,
        "onnx_sha256": sha256_file(onnx_path),
    }
    sidecar.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return {"image": onnx_path, "sidecar": sidecar}
