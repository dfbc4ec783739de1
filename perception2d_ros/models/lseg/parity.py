"""LSeg parity: the torch module vs the exported ONNX (ONNX Runtime CPU) on real images,
against :data:`PARITY_TOLERANCES`. With :func:`export_onnx` this module is LSeg's
``perception2d models export`` recipe (manifest ``export.module``): the command calls
``module.export_onnx`` then ``module.parity_check``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from perception2d_ros.models.lseg.checkpoint import load_checkpoint
from perception2d_ros.models.lseg.export import export_onnx
from perception2d_ros.models.lseg.net import LSegArch, build_model, get_arch

# the `models export` recipe: export_onnx (export.py) and parity_check (here)
__all__ = ["PARITY_TOLERANCES", "export_onnx", "parity_check", "prototype_embeddings"]

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
