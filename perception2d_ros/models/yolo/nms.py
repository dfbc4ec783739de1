"""Non-maximum suppression in numpy: greedy, class-aware via the batched-offset trick.

Greedy NMS keeps the highest-scoring box, drops every remaining box whose IoU with it is
greater than ``iou_threshold`` and repeats. Each step is one vectorised IoU of the kept box
against all remaining boxes, so the Python loop runs once per *kept* box and stops as soon as
``max_det`` boxes are kept (the kept boxes come out in descending score order, so the first
``max_det`` kept are exactly the top ``max_det`` of full NMS).

Up to :data:`PYTHON_MAX` candidates (the live case: tens of boxes above a 0.25–0.3
confidence) the same greedy pass runs in plain Python on floats instead: right after an
inference has evicted numpy's code and data from the CPU caches, each distinct numpy call
costs 10–30 µs, and the ~20 calls of the vectorised pass cost more than the arithmetic of a
few hundred box pairs in Python (measured: 0.10 vs 0.26 ms at 9–62 candidates, still ahead
at 178). Python floats are IEEE doubles and the pass performs the same operations in the
same order as the float64 numpy pass, so both keep exactly the same boxes; inputs where
that cannot be promised (NaN, inf, huge coordinates, non-float boxes or scores) take the
numpy pass.

Class-aware NMS shifts every box by ``class_id × span`` (span larger than the extent of all
boxes) so boxes of different classes can never overlap, then runs one class-agnostic pass
(the "batched NMS" trick of torchvision). Coordinates are promoted to float64 first so the
shift does not cost precision.
"""
from __future__ import annotations

import math

import numpy as np

# Largest candidate count for the plain-Python pass (it is O(kept × candidates): past ~150
# candidates the numpy pass wins even right after an inference).
PYTHON_MAX = 128


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
    cls = None
    if class_ids is not None:
        cls = np.asarray(class_ids).reshape(-1)
        if cls.shape[0] != n:
            raise ValueError(f"nms: class_ids must have shape ({n},); got {cls.shape}")
    limit = n if max_det is None else int(max_det)
    if n <= PYTHON_MAX and boxes.dtype.kind == "f" and scores.dtype.kind == "f":
        kept = _greedy_python(boxes.tolist(), scores.tolist(),
                              None if cls is None else cls.tolist(), float(iou_threshold),
                              limit, float(box_offset))
        if kept is not None:
            return np.asarray(kept, np.int64)
    b = boxes.astype(np.float64)  # copy: shifted below
    if cls is not None:
        lo, hi = float(b.min()), float(b.max())
        span = hi - lo + 1.0 + abs(box_offset)
        b += (cls.astype(np.float64) * span)[:, None]
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    x1, y1, x2, y2 = (b[order, i] for i in range(4))
    areas = (x2 - x1 + box_offset) * (y2 - y1 + box_offset)
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


def _greedy_python(boxes: list[list[float]], scores: list[float], classes: list | None,
                   iou_threshold: float, limit: int, box_offset: float) -> list[int] | None:
    """The greedy pass of :func:`nms` on Python floats, operation for operation (class shift
    ``x + c × span``, stable descending sort, ``min(x2) - max(x1) + offset``, inter = 0
    unless both sides are > 0, ``a_i + a_j - inter``, IoU only where the union is > 0, keep
    while ``iou <= thr``). Returns the kept indices, or ``None`` when an input is not finite
    or so large that a product could overflow (the numpy pass defines those cases)."""
    lo = min(map(min, boxes))
    hi = max(map(max, boxes))
    if not (math.isfinite(sum(map(sum, boxes)) + sum(scores)) and -1e30 < lo and hi < 1e30):
        return None
    if classes is not None:
        span = hi - lo + 1.0 + abs(box_offset)
        boxes = [[v + c * span for v in box] for box, c in zip(boxes, classes)]
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)  # stable
    sb = [boxes[i] for i in order]
    areas = [(x2 - x1 + box_offset) * (y2 - y1 + box_offset) for x1, y1, x2, y2 in sb]
    keep: list[int] = []
    remaining = list(range(len(sb)))  # positions in score order
    while remaining:
        i = remaining[0]
        keep.append(order[i])
        if len(keep) >= limit:
            break
        ax1, ay1, ax2, ay2 = sb[i]
        area_i = areas[i]
        survivors = []
        for j in remaining[1:]:
            bx1, by1, bx2, by2 = sb[j]
            w = (ax2 if ax2 < bx2 else bx2) - (ax1 if ax1 > bx1 else bx1) + box_offset
            h = (ay2 if ay2 < by2 else by2) - (ay1 if ay1 > by1 else by1) + box_offset
            if w > 0.0 and h > 0.0:
                inter = w * h
                union = area_i + areas[j] - inter
                if union > 0.0 and inter / union > iou_threshold:
                    continue  # suppressed
            survivors.append(j)
        remaining = survivors
    return keep
