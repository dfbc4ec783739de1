"""SAM parity: our ONNX path vs the reference ``SamPredictor`` (torch, same weights) on one
image, against :data:`TOLERANCES`. With :func:`export_onnx` this module is SAM's
``perception2d models export`` recipe (manifest ``export.module``): the command calls
``module.export_onnx`` then ``module.parity_check``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from perception2d_ros.models.sam.checkpoint import (canonical_arch, infer_arch, load_sam,
                                                    random_sam, reference_package,
                                                    reference_version)
from perception2d_ros.models.sam.export import export_onnx
from perception2d_ros.models.sam.results import SamResult, mask_iou
from perception2d_ros.models.sam.runtime import SamSegmenter

# the `models export` recipe: export_onnx (export.py) and parity_check (here)
__all__ = ["TOLERANCES", "export_onnx", "parity_check"]

# Tolerances of the parity check (the acceptance numbers).
TOLERANCES = {
    "low_res_max_abs_diff": 1e-3,
    "iou_pred_max_abs_diff": 1e-4,
    "mask_iou_min": 0.99,
    "preprocess_max_abs_diff": 1e-5,
}


def _compare_set(ours: SamResult, refs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                 ) -> dict[str, Any]:
    """ours (batched) vs per-prompt reference (masks [K,H,W] bool, iou [K], low [K,256,256])."""
    low_diff, iou_diff, mask_ious, agree = [], [], [], []
    for i, (r_masks, r_iou, r_low) in enumerate(refs):
        low_diff.append(float(np.abs(ours.low_res_logits[i] - r_low).max()))
        iou_diff.append(float(np.abs(ours.iou_predictions[i] - r_iou).max()))
        r_best = int(np.argmax(r_iou))
        agree.append(int(ours.chosen[i]) == r_best)
        mask_ious.append(mask_iou(ours.masks[i], r_masks[r_best]))
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
    if isinstance(exported, SamSegmenter):
        seg = exported
    else:
        seg = SamSegmenter.from_exported(
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
