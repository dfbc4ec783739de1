"""Semantic-segmentation evaluation: ground-truth readers (PASCAL VOC label PNGs, ADE20K
``*_seg.png`` + JSON, names matched to class lists), the confusion matrix, and mIoU / pixel
accuracy (``perception2d eval seg``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "dining table", "dog", "horse", "motorbike", "person",
               "potted plant", "sheep", "sofa", "train", "tv monitor")
IGNORE = 255


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette (n, 3) RGB."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def read_voc_label(path: str | Path) -> np.ndarray:
    """A VOC label PNG -> (H, W) uint8 class indices (255 = ignore). Accepts palettised /
    grey index PNGs and colour-coded RGB PNGs (VOC colormap; unknown colours -> ignore)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "L", "I", "I;16"):
            return np.asarray(im).astype(np.uint8)
        rgb = np.asarray(im.convert("RGB"))
    cmap = voc_colormap()
    codes = (cmap[:, 0].astype(np.int32) << 16) | (cmap[:, 1].astype(np.int32) << 8) | cmap[:, 2]
    lut = {int(c): i for i, c in enumerate(codes[:21])}
    px = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    out = np.full(px.shape, IGNORE, np.uint8)
    for code, idx in lut.items():
        out[px == code] = idx
    return out


def read_ade20k_label(seg_png: str | Path, json_path: str | Path | None = None
                      ) -> tuple[np.ndarray, dict[int, str]]:
    """ADE20K (full, 2021 release) ``*_seg.png`` -> (H, W) int32 object-class index
    (R / 10 * 256 + G; 0 = unlabelled) and {index: name} from the image's JSON (whole objects,
    names as "first synonym, second, ...")."""
    bgr = cv2.imread(str(seg_png), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(seg_png)
    cls = (bgr[..., 2].astype(np.int32) // 10) * 256 + bgr[..., 1].astype(np.int32)
    names: dict[int, str] = {}
    jp = Path(json_path) if json_path else Path(str(seg_png).replace("_seg.png", ".json"))
    if jp.is_file():
        ann = json.loads(jp.read_text(encoding="utf-8"))["annotation"]
        for obj in ann.get("object", []):
            if obj.get("parts", {}).get("part_level", 0) == 0:
                names[int(obj["name_ndx"])] = str(obj["name"])
    return cls, names


def map_names_to_classes(index_map: np.ndarray, names: Mapping[int, str],
                         classes: Sequence[str]) -> np.ndarray:
    """Dataset class indices with names -> our class indices: a dataset class matches the
    first of ``classes`` equal to any of its comma-separated synonyms (case-insensitive);
    unmatched and unlabelled pixels -> 255 (ignored)."""
    want = {c.strip().lower(): i for i, c in reversed(list(enumerate(classes)))}
    out = np.full(index_map.shape, IGNORE, np.uint8)
    for idx, name in names.items():
        syn = [s.strip().lower() for s in name.split(",")]
        hit = next((want[s] for s in syn if s in want), None)
        if hit is not None:
            out[index_map == idx] = hit
    return out


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE) -> np.ndarray:
    """(C, C+1) counts, rows = ground truth, columns = prediction (last column: predictions
    outside 0..C-1, e.g. "other"). Ground-truth ``ignore_index`` pixels are skipped."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    g = gt.ravel().astype(np.int64)
    p = pred.ravel().astype(np.int64)
    keep = (g != ignore_index) & (g >= 0) & (g < num_classes)
    g, p = g[keep], p[keep]
    p = np.where((p >= 0) & (p < num_classes), p, num_classes)
    return np.bincount(g * (num_classes + 1) + p,
                       minlength=num_classes * (num_classes + 1)).reshape(num_classes,
                                                                          num_classes + 1)


def segmentation_metrics(conf: np.ndarray, classes: Sequence[str] | None = None
                         ) -> dict[str, Any]:
    """mIoU (over classes present in ground truth or prediction), pixel accuracy and per-class
    IoU from a :func:`confusion_matrix`."""
    c = conf.shape[0]
    tp = np.diag(conf[:, :c]).astype(np.float64)
    gt_total = conf.sum(axis=1).astype(np.float64)
    pred_total = conf[:, :c].sum(axis=0).astype(np.float64)
    union = gt_total + pred_total - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    names = list(classes) if classes is not None else [str(i) for i in range(c)]
    return {
        "miou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / max(1.0, gt_total.sum())),
        "pixels": int(gt_total.sum()),
        "per_class_iou": {names[i]: float(iou[i]) for i in range(c) if present[i]},
    }
