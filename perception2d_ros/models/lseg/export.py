"""LSeg ONNX export of the image side plus its sidecar JSON, and the torch-vs-ONNX parity
check (the module `perception2d models export` runs for LSeg).

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
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
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


# --------------------------------------------------------------------------- parity
PARITY_TOLERANCES = {"max_abs": 2e-3, "min_cos": 0.999, "label_agreement": 0.995}


def _onnx_from_outputs(outputs: str | Path | Mapping[str, Any]) -> Path:
    if isinstance(outputs, Mapping):
        if "image" not in outputs:
            raise KeyError(f"export outputs {sorted(outputs)} have no 'image' ONNX")
        return Path(outputs["image"])
    return Path(outputs)


def prototype_embeddings(embeds: np.ndarray, num: int = 8) -> np.ndarray:
    """``num`` pixel embeddings of a (D, h, w) map taken on a regular interior grid: stand-in
    "text" embeddings that give a real, image-dependent nearest-prototype labelling."""
    _, hh, ww = embeds.shape
    k = int(math.ceil(math.sqrt(num)))
    ys = np.linspace(0, hh - 1, k + 2)[1:-1].astype(int)
    xs = np.linspace(0, ww - 1, k + 2)[1:-1].astype(int)
    return np.stack([embeds[:, y, x] for y in ys for x in xs])[:num].astype(np.float32)


def parity_check(arch: str | LSegArch, checkpoint: str | Path | None,
                 outputs: str | Path | Mapping[str, Any],
                 images_bgr: np.ndarray | Sequence[np.ndarray], *, seed: int | None = None,
                 text_embeds: np.ndarray | None = None, num_prototypes: int = 8,
                 threads: int | None = None,
                 tolerances: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Torch module vs the exported ONNX (ONNX Runtime CPU) on real images.

    ``outputs``: :func:`export_onnx`'s dict (or the ONNX path); ``images_bgr``: one BGR image
    or a list. Both sides get the same preprocessed tensor. Per image: max/mean abs difference
    of the pixel embeddings, min/mean per-pixel cosine, and agreement of the stride-2 label
    maps for ``text_embeds`` (default: :func:`prototype_embeddings` of the torch output).
    ``passed`` checks :data:`PARITY_TOLERANCES`."""
    from perception2d_ros.engines.factory import EngineConfig, create_engine
    from perception2d_ros.models.lseg.meta import LSegMeta
    from perception2d_ros.models.lseg.resample import preprocess

    tol = dict(PARITY_TOLERANCES, **(tolerances or {}))
    images = [images_bgr] if isinstance(images_bgr, np.ndarray) else list(images_bgr)
    onnx_path = _onnx_from_outputs(outputs)
    a = get_arch(arch)
    net = build_model(a, seed=seed if seed is not None else 0)
    if checkpoint is not None:
        load_checkpoint(net, checkpoint)
    meta = LSegMeta.from_sidecar(onnx_path.with_suffix(".json"))
    engine = create_engine(onnx_path, EngineConfig(backend="onnxruntime", device="cpu",
                                                   threads=threads))
    rows = []
    try:
        for img in images:
            tensor, _ = preprocess(img, meta)
            with torch.no_grad():
                ref = net.pixel_embeddings(torch.from_numpy(tensor))[0].numpy()
            got = np.asarray(engine.infer({meta.input_name: tensor})[meta.output_name][0])
            d = ref.shape[0]
            protos = (prototype_embeddings(ref, num_prototypes) if text_embeds is None
                      else np.asarray(text_embeds, np.float32))
            protos = protos / np.linalg.norm(protos, axis=1, keepdims=True)
            lab_ref = np.argmax(protos @ ref.reshape(d, -1), axis=0)
            lab_got = np.argmax(protos @ got.reshape(d, -1), axis=0)
            cos = np.sum(ref * got, axis=0) / (np.linalg.norm(ref, axis=0)
                                               * np.linalg.norm(got, axis=0) + 1e-12)
            diff = np.abs(ref - got)
            rows.append({"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                         "min_cos": float(cos.min()), "mean_cos": float(cos.mean()),
                         "label_agreement": float(np.mean(lab_ref == lab_got)),
                         "num_labels": int(len(np.unique(lab_ref)))})
    finally:
        engine.close()
    summary: dict[str, Any] = {
        "images": len(rows),
        "max_abs": max(r["max_abs"] for r in rows),
        "min_cos": min(r["min_cos"] for r in rows),
        "min_label_agreement": min(r["label_agreement"] for r in rows),
        "tolerances": tol,
        "per_image": rows,
    }
    summary["passed"] = bool(summary["max_abs"] <= tol["max_abs"]
                             and summary["min_cos"] >= tol["min_cos"]
                             and summary["min_label_agreement"] >= tol["label_agreement"])
    return summary
