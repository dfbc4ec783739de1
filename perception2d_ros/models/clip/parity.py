"""Parity of the exported CLIP ONNX path with open_clip's torch forward on the same weights.

Also the ``perception2d models export`` recipe module of the CLIP entries in
models/manifest.yaml: cli/models.py takes ``export_onnx`` (from :mod:`.export`) and
``parity_check`` from here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from perception2d_ros.models.clip.checkpoint import canonical_arch, load_clip
from perception2d_ros.models.clip.export import export_onnx  # noqa: F401 - the recipe's export


def parity_check(arch: str, checkpoint: str | Path | None, exported: Mapping[str, Path],
                 image_bgr: np.ndarray, *, seed: int | None = None,
                 phrases: list[str] | None = None,
                 boxes_xyxy: np.ndarray | None = None) -> dict[str, Any]:
    """Compare the exported ONNX path (our tokenizer + preprocessing + ONNX Runtime, CPU fp32)
    with open_clip's torch forward (its PIL preprocess + tokenizer) on the same weights.

    Returns ``image_cosine_min``, ``text_cosine_min``, ``max_logit_diff``, ``max_prob_diff``,
    ``top1_agree``, ``preprocess_max_abs_diff``, the sizes compared and ``ok`` (all within
    :data:`PARITY_TOLERANCES`). ``boxes_xyxy`` adds
    square crops of those boxes (as the labeler makes them) to the full image.
    """
    import open_clip
    import torch
    from PIL import Image

    from perception2d_ros.models.clip.labeler import ClipLabeler
    from perception2d_ros.models.clip.preprocess import (
        preprocess_bgr, preprocess_crops_bgr, square_crop, to_rgb)
    from perception2d_ros.engines.factory import EngineConfig

    phrases = phrases or DEFAULT_PARITY_PHRASES
    labeler = ClipLabeler(exported["meta"], EngineConfig(backend="onnxruntime", device="cpu"),
                          text_cache_dir=None)
    model = load_clip(arch, checkpoint, seed=seed,
                      quick_gelu=labeler.meta.get("quick_gelu"))
    preprocess = open_clip.image_transform(labeler.image_size, is_train=False,
                                           mean=labeler.meta["mean"], std=labeler.meta["std"])
    rgb = to_rgb(image_bgr)
    boxes = np.asarray(boxes_xyxy if boxes_xyxy is not None else [], np.float64).reshape(-1, 4)
    size, mean, std, pad = labeler.image_size, labeler.mean, labeler.std, labeler.padding
    ours_x = np.concatenate([preprocess_bgr(image_bgr, size, mean, std)[None],
                             preprocess_crops_bgr(image_bgr, boxes, size, pad, mean, std)])
    crops = [rgb] + [square_crop(rgb, b, pad) for b in boxes]
    ref_x = torch.stack([preprocess(Image.fromarray(c)) for c in crops])
    ours_img = labeler.embed_preprocessed(ours_x)
    ours_txt = labeler.text_cache.encode(phrases, ["{}"])
    with torch.no_grad():
        ref_img = model.encode_image(ref_x, normalize=True).numpy()
        ref_txt = model.encode_text(open_clip.tokenize(phrases), normalize=True).numpy()
    scale = labeler.logit_scale
    ours_logits, ref_logits = scale * ours_img @ ours_txt.T, scale * ref_img @ ref_txt.T
    ours_p, ref_p = _softmax(ours_logits), _softmax(ref_logits)
    report = {
        "arch": canonical_arch(arch),
        "n_images": len(ours_x), "n_phrases": len(phrases),
        "preprocess_max_abs_diff": float(np.abs(ours_x - ref_x.numpy()).max()),
        "image_cosine_min": float(_rowcos(ours_img, ref_img).min()),
        "text_cosine_min": float(_rowcos(ours_txt, ref_txt).min()),
        "max_logit_diff": float(np.abs(ours_logits - ref_logits).max()),
        "max_prob_diff": float(np.abs(ours_p - ref_p).max()),
        "top1_agree": bool((ours_p.argmax(1) == ref_p.argmax(1)).all()),
        "logit_scale": scale,
        "tolerances": dict(PARITY_TOLERANCES),
    }
    tol = PARITY_TOLERANCES
    report["ok"] = bool(report["image_cosine_min"] >= tol["cosine_min"]
                        and report["text_cosine_min"] >= tol["cosine_min"]
                        and report["max_prob_diff"] <= tol["max_prob_diff"]
                        and report["preprocess_max_abs_diff"] <= tol["preprocess_max_abs_diff"])
    return report


#: fp32 CPU parity bounds (see test/models/test_clip_parity.py for the measured values)
PARITY_TOLERANCES = {"cosine_min": 0.9999, "max_prob_diff": 1e-4,
                     "preprocess_max_abs_diff": 1e-6}


DEFAULT_PARITY_PHRASES = [
    "a person", "a bicycle", "a car", "a motorcycle", "an airplane", "a bus", "a train",
    "a truck", "a boat", "a traffic light", "a fire hydrant", "a stop sign", "a bench",
    "a bird", "a cat", "a dog", "a horse", "a sheep", "a cow", "an elephant", "a bear",
    "a zebra", "a giraffe", "an umbrella",
]


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _rowcos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)

