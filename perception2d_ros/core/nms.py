"""Non-maximum suppression in numpy: greedy, class-aware via the batched-offset trick.

Greedy NMS keeps the highest-scoring box, drops every remaining box whose IoU with it is
greater than ``iou_threshold`` and repeats. Each step is one vectorised IoU of the kept box
against all remaining boxes, so the Python loop runs once per *kept* box and stops as soon as
``max_det`` boxes are kept (the kept boxes come out in descending score order, so the first
``max_det`` kept are exactly the top ``max_det`` of full NMS).

Class-aware NMS shifts every box by ``class_id × span`` (span larger than the extent of all
boxes) so boxes of different classes can never overlap, then runs one class-agnostic pass
(the "batched NMS" trick of torchvision). Coordinates are promoted to float64 first so the
shift does not cost precision.
"""
from __future__ import annotations

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) x1, y1, x2, y2 boxes → (N, M) float64."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    iw = (np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]))
    ih = (np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]))
    inter = iw.clip(0) * ih.clip(0)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, *,
        class_ids: np.ndarray | None = None, max_det: int | None = None,
        box_offset: float = 0.0) -> np.ndarray:
    """Greedy (optionally class-aware) NMS.

    Args:
        boxes: (N, 4) float boxes x1, y1, x2, y2.
        scores: (N,) float scores; higher is kept first (ties: lower index first).
        iou_threshold: a box is suppressed when its IoU with a kept box is > this.
        class_ids: (N,) int classes; when given, only boxes of the same class suppress each
            other (class-aware). ``None``: class-agnostic.
        max_det: stop after keeping this many boxes (``None``: no limit).
        box_offset: added to widths/heights in the area computation. 0 (default) is the
            continuous convention of torchvision/Ultralytics/YOLOX eval; 1 reproduces the
            legacy "+1 pixel" numpy demo NMS of YOLOX/Detectron.
    Returns:
        (K,) int64 indices into ``boxes`` of the kept boxes, in descending score order.
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores).reshape(-1)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"nms: boxes must have shape (N, 4); got {boxes.shape}")
    n = boxes.shape[0]
    if scores.shape[0] != n:
        raise ValueError(f"nms: scores must have shape ({n},); got {scores.shape}")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"nms: iou_threshold must be in [0, 1]; got {iou_threshold}")
    if max_det is not None and max_det < 0:
        raise ValueError(f"nms: max_det must be >= 0; got {max_det}")
    if n == 0 or max_det == 0:
        return np.zeros(0, np.int64)
    b = boxes.astype(np.float64)  # copy: shifted below
    if class_ids is not None:
        cls = np.asarray(class_ids).reshape(-1)
        if cls.shape[0] != n:
            raise ValueError(f"nms: class_ids must have shape ({n},); got {cls.shape}")
        lo, hi = float(b.min()), float(b.max())
        span = hi - lo + 1.0 + abs(box_offset)
        b += (cls.astype(np.float64) * span)[:, None]
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    x1, y1, x2, y2 = (b[order, i] for i in range(4))
    areas = (x2 - x1 + box_offset) * (y2 - y1 + box_offset)
    limit = n if max_det is None else int(max_det)
    keep: list[int] = []
    remaining = np.arange(n)  # positions into the score-sorted arrays
    while remaining.size:
        i = remaining[0]
        keep.append(i)
        if len(keep) >= limit:
            break
        rest = remaining[1:]
        w = np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + box_offset
        h = np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + box_offset
        inter = np.maximum(w, 0.0) * np.maximum(h, 0.0)
        union = areas[i] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        remaining = rest[iou <= iou_threshold]
    return order[np.asarray(keep, np.int64)]
