"""COCO box evaluation of a detector with pycocotools (mAP@[.5:.95], mAP@.5, per-class AP).

The detector's contiguous class indices (0..79 for COCO models) are mapped to COCO category
ids (1..90 with gaps) by class *name* when every model name is a category name, otherwise by
the standard convention (index i ↔ the i-th category id in ascending order, as YOLOX and
Ultralytics train). Defaults follow the published YOLO evaluation convention: score
threshold 0.001, class-aware NMS IoU 0.65, at most 100 detections per image.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from perception2d_ros.models.detections import Detections

LOG = logging.getLogger("perception2d.coco_eval")

EVAL_CONF = 0.001
EVAL_IOU = 0.65
EVAL_MAX_DET = 100


@dataclass
class DetectionEvalResult:
    """COCO box metrics of one evaluation run.

    ``map``: AP@[.5:.95] (all areas, 100 dets); ``map50``: AP@.5; ``per_class``: class name →
    AP@[.5:.95] for classes that have ground truth in the evaluated images; ``images``: images
    evaluated; ``images_per_s``: detector throughput (preprocess + infer + postprocess, image
    decoding excluded); ``stats``: the 12 standard pycocotools numbers."""

    map: float
    map50: float
    per_class: dict[str, float]
    images: int
    images_per_s: float
    stats: list[float] = field(default_factory=list)
    detections: int = 0

    def to_json(self) -> dict[str, Any]:
        """``{"map", "map50", "per_class", "images", "images_per_s"}`` (+ stats, detections)."""
        return asdict(self)


def category_mapping(categories: Sequence[dict[str, Any]],
                     class_names: Sequence[str]) -> dict[int, int]:
    """Contiguous class index → COCO category id.

    By name when every class name is a category name; else by position in ascending
    category-id order when the counts agree (the training convention; label files often use
    VOC-style aliases such as 'motorbike' for 'motorcycle'); else ``ValueError``."""
    by_name = {c["name"]: int(c["id"]) for c in categories}
    if class_names and all(n in by_name for n in class_names):
        return {i: by_name[n] for i, n in enumerate(class_names)}
    cats = sorted(categories, key=lambda c: int(c["id"]))
    if len(cats) == len(class_names):
        differ = [f"{n}->{c['name']}" for n, c in zip(class_names, cats) if n != c["name"]]
        log = LOG.info if len(differ) <= len(cats) // 4 else LOG.warning
        log("mapping class index i to the i-th category id; %d names differ: %s",
            len(differ), ", ".join(differ[:10]))
        return {i: int(c["id"]) for i, c in enumerate(cats)}
    missing = [n for n in class_names if n not in by_name][:5]
    raise ValueError(f"cannot map {len(class_names)} model classes to {len(categories)} "
                     f"annotation categories (names not found: {missing})")


def detections_to_coco(dets: Detections, image_id: int,
                       cat_of: dict[int, int]) -> list[dict[str, Any]]:
    """COCO result records ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``;
    classes without a category are dropped."""
    out = []
    for (x1, y1, x2, y2), s, c in zip(dets.xyxy.tolist(), dets.scores.tolist(),
                                      dets.class_ids.tolist()):
        if c in cat_of:
            out.append({"image_id": int(image_id), "category_id": cat_of[c],
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})
    return out


def load_coco(annotations: str | Path) -> Any:
    """A pycocotools ``COCO`` object (its progress prints silenced)."""
    from pycocotools.coco import COCO

    path = Path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"annotations file not found: {path}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def coco_metrics(coco_gt: Any, results: list[dict[str, Any]], image_ids: Sequence[int]
                 ) -> tuple[list[float], dict[int, float]]:
    """Run COCOeval (bbox) over ``image_ids``; returns (12 stats, category id → AP@[.5:.95]
    for categories with ground truth)."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return [0.0] * 12, {cid: 0.0 for cid in _cats_with_gt(coco_gt, image_ids)}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(0.0, float(s)) for s in ev.stats]
    # precision: [T IoUs, R recall points, K categories, A areas, M maxDets]; area all, 100 dets
    prec = ev.eval["precision"][:, :, :, 0, -1]
    with_gt = _cats_with_gt(coco_gt, image_ids)
    per_cat = {}
    for k, cid in enumerate(ev.params.catIds):
        if cid in with_gt:
            p = prec[:, :, k]
            p = p[p > -1]
            per_cat[cid] = float(p.mean()) if p.size else 0.0
    return stats, per_cat


def _cats_with_gt(coco_gt: Any, image_ids: Sequence[int]) -> set[int]:
    ann_ids = coco_gt.getAnnIds(imgIds=list(image_ids), iscrowd=False)
    return {int(a["category_id"]) for a in coco_gt.loadAnns(ann_ids)}


def evaluate_detector(detector: Any, images_dir: str | Path, annotations: str | Path, *,
                      limit: int | None = None,
                      progress: Callable[[int, int], None] | None = None
                      ) -> DetectionEvalResult:
    """Run ``detector.detect`` over the annotated images found in ``images_dir`` and score it.

    ``detector``: anything with ``detect(HWC uint8 BGR) -> Detections`` and ``class_names``
    (configure its thresholds first; see :data:`EVAL_CONF` ...). Images listed in the
    annotations but missing from ``images_dir`` are skipped with a warning; at least one must
    be present.
    """
    import cv2

    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"images directory not found: {root}")
    coco = load_coco(annotations)
    cat_of = category_mapping(coco.loadCats(coco.getCatIds()), detector.class_names)
    name_of = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    entries = [coco.imgs[i] for i in sorted(coco.getImgIds())]
    present = [e for e in entries if (root / e["file_name"]).is_file()]
    if len(present) < len(entries):
        LOG.warning("%d of %d annotated images are not in %s; evaluating the %d present",
                    len(entries) - len(present), len(entries), root, len(present))
    if limit is not None:
        present = present[: max(0, int(limit))]
    if not present:
        raise FileNotFoundError(f"none of the {len(entries)} images of {annotations} "
                                f"are in {root}")
    results: list[dict[str, Any]] = []
    busy = 0.0
    for n, e in enumerate(present, 1):
        image = cv2.imread(str(root / e["file_name"]), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot decode image {root / e['file_name']}")
        if image.shape[:2] != (e["height"], e["width"]):
            raise ValueError(f"{e['file_name']}: image is {image.shape[1]}x{image.shape[0]} "
                             f"but the annotations say {e['width']}x{e['height']}")
        t0 = time.perf_counter()
        dets = detector.detect(image)
        busy += time.perf_counter() - t0
        results.extend(detections_to_coco(dets, e["id"], cat_of))
        if progress is not None:
            progress(n, len(present))
    ids = [e["id"] for e in present]
    stats, per_cat = coco_metrics(coco, results, ids)
    return DetectionEvalResult(
        map=stats[0], map50=stats[1],
        per_class={name_of[c]: ap for c, ap in sorted(per_cat.items())},
        images=len(present), images_per_s=len(present) / busy if busy > 0 else 0.0,
        stats=stats, detections=len(results))


def write_results(path: str | Path, result: DetectionEvalResult) -> None:
    """Write ``result.to_json()`` to ``path``."""
    Path(path).write_text(json.dumps(result.to_json(), indent=2))


__all__ = ["DetectionEvalResult", "EVAL_CONF", "EVAL_IOU", "EVAL_MAX_DET", "category_mapping",
           "coco_metrics", "detections_to_coco", "evaluate_detector", "load_coco"]
