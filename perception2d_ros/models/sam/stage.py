"""Pipeline stage: SAM masks for every detection box (one encoder run per frame, one
batched decoder run for all boxes) plus prompts matched to the frame by stamp."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from perception2d_ros.pipeline.results import MaskFrameResult

DEFAULTS = {"model": "sam_vit_b", "checkpoint": "", "backend": "auto", "device": "auto",
            "precision": "fp32", "multimask": True, "min_score": 0.0,
            "allow_outside_models_dir": False}


class PromptBuffer:
    """Prompts (points with labels, boxes) waiting for the frame with their stamp."""

    def __init__(self, depth: int = 32) -> None:
        self._items: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._depth = depth

    def add(self, stamp_ns: int, points: np.ndarray | None = None,
            labels: np.ndarray | None = None, boxes: np.ndarray | None = None) -> None:
        with self._lock:
            self._items[stamp_ns] = {"points": points, "labels": labels, "boxes": boxes}
            while len(self._items) > self._depth:
                self._items.popitem(last=False)

    def pop(self, stamp_ns: int) -> dict[str, Any] | None:
        with self._lock:
            return self._items.pop(stamp_ns, None)


class SamStage:
    name = "sam"

    def __init__(self, segmenter: Any, multimask: bool = True, min_score: float = 0.0) -> None:
        self.segmenter = segmenter
        self.multimask = multimask
        self.min_score = min_score
        self.prompts = PromptBuffer()

    def process(self, frame: Any) -> None:
        t0 = time.perf_counter()
        det = frame.detections
        boxes = np.asarray(det.xyxy, np.float64).reshape(-1, 4) if det is not None \
            else np.zeros((0, 4))
        extra = self.prompts.pop(frame.stamp_ns)
        h, w = frame.bgr().shape[:2]
        results = []
        if len(boxes) or extra:
            from perception2d_ros.engines.device import on_device

            keep = on_device(frame.device_bgr, getattr(self.segmenter, "device", None))
            self.segmenter.set_image(frame.device_bgr if keep else frame.bgr(),
                                     frame_id=frame.stamp_ns)
            if len(boxes):
                results.append(self.segmenter.predict(boxes=boxes, multimask=self.multimask,
                                                      frame_id=frame.stamp_ns))
            if extra and extra.get("boxes") is not None and len(extra["boxes"]):
                results.append(self.segmenter.predict(boxes=extra["boxes"],
                                                      multimask=self.multimask))
            if extra and extra.get("points") is not None and len(extra["points"]):
                results.append(self.segmenter.predict(points=extra["points"][None],
                                                       point_labels=extra["labels"][None],
                                                       multimask=self.multimask))
        frame.masks = combine(results, (h, w), len(boxes), self.min_score)
        frame.timings[self.name] = time.perf_counter() - t0


def combine(results: list[Any], hw: tuple[int, int], n_det: int, min_score: float
            ) -> MaskFrameResult:
    """One instance-id image for all prompts (higher predicted IoU wins overlaps)."""
    if not results:
        z = np.zeros(0, np.float32)
        return MaskFrameResult(np.zeros(hw, np.uint16), z, z, np.zeros(0, np.int64),
                               np.zeros((0, 4), np.int32), n_det)
    scores = np.concatenate([r.scores for r in results]).astype(np.float32)
    stability = np.concatenate([r.stability for r in results]).astype(np.float32)
    keep = scores >= min_score
    if all(getattr(r, "device_masks", None) is not None for r in results):
        # masks on the device (frames kept there): paint and measure there, copy the id image
        import torch

        from perception2d_ros.models.sam.device import combine_masks

        dm = torch.cat([r.device_masks for r in results])
        dm = dm & torch.from_numpy(keep).to(dm.device)[:, None, None]
        ids, areas, bboxes = combine_masks(dm, scores)
        return MaskFrameResult(ids, scores, stability, areas, bboxes, n_det)
    masks = np.concatenate([r.masks for r in results])
    masks = masks & keep[:, None, None]

    from perception2d_ros.models.sam.runtime import SamResult, instance_id_image

    n = len(masks)
    merged = SamResult(masks, scores, stability, np.zeros(n, np.int64),
                       np.zeros((n, 0, 0, 0), np.float32), np.zeros((n, 0), np.float32), hw)
    return MaskFrameResult(instance_id_image(merged), scores, stability, merged.areas,
                           merged.bboxes, n_det)


def build_stage(cfg: dict[str, Any]) -> SamStage:
    from perception2d_ros.engines.factory import EngineConfig
    from perception2d_ros.models.sam.runtime import SamSegmenter, resolve_model_files

    s = {**DEFAULTS, **(cfg.get("sam") or {})}
    files = resolve_model_files(s["model"], checkpoint=s["checkpoint"] or None,
                                models_dir=cfg.get("models_dir") or None)
    seg = SamSegmenter.from_exported(files, EngineConfig(backend=s["backend"],
                                                         device=s["device"],
                                                         precision=s["precision"]))
    return SamStage(seg, bool(s["multimask"]), float(s["min_score"]))
