"""The debug image a person looks at in RViz/Foxglove: boxes with class and open-vocabulary
labels, SAM masks as translucent overlays, the LSeg label map as a legend-coloured overlay.
Text is sized from the image height (legible at 720p); colours are stable per class name."""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import cv2
import numpy as np


def class_color(name: str) -> tuple[int, int, int]:
    """A stable, saturated BGR colour for a class name (same name → same colour, always)."""
    h = int(hashlib.md5(name.encode()).hexdigest()[:4], 16) % 180
    hsv = np.uint8([[[h, 200, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def palette(n: int) -> np.ndarray:
    """n stable BGR colours (index i always gets the same colour)."""
    out = np.zeros((max(n, 1), 3), np.uint8)
    for i in range(n):
        out[i] = class_color(f"#{i}")
    return out


def _text_scale(height: int) -> tuple[float, int]:
    scale = max(0.45, height / 720 * 0.7)
    return scale, max(1, int(round(scale * 2)))


def draw_label(img: np.ndarray, text: str, org: tuple[int, int], color: tuple[int, int, int]
               ) -> None:
    scale, thick = _text_scale(img.shape[0])
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x, y = org
    x = max(0, min(x, img.shape[1] - tw - 4))
    y = max(y, th + base + 2)
    cv2.rectangle(img, (x, y - th - base - 2), (x + tw + 4, y), color, -1)
    lum = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
    fg = (0, 0, 0) if lum > 140 else (255, 255, 255)
    cv2.putText(img, text, (x + 2, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, fg, thick,
                cv2.LINE_AA)


def draw_detections(img: np.ndarray, xyxy: np.ndarray, names: Sequence[str],
                    scores: Sequence[float], extra: Sequence[str] | None = None) -> np.ndarray:
    """Draw boxes and 'name score' labels (plus an extra label line, e.g. CLIP) in place."""
    _, thick = _text_scale(img.shape[0])
    for i, box in enumerate(np.asarray(xyxy, np.float64).reshape(-1, 4)):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        color = class_color(str(names[i]))
        cv2.rectangle(img, (x1, y1), (x2, y2), color, thick + 1)
        text = f"{names[i]} {float(scores[i]):.2f}"
        if extra is not None and extra[i]:
            text += f" | {extra[i]}"
        draw_label(img, text, (x1, y1), color)
    return img


def overlay_masks(img: np.ndarray, instance_ids: np.ndarray, names: Sequence[str],
                  alpha: float = 0.45) -> np.ndarray:
    """Blend an instance-id image (0 = background, id = detection index + 1) in place."""
    ids = np.asarray(instance_ids)
    for k in np.unique(ids):
        if k == 0:
            continue
        m = ids == k
        name = str(names[k - 1]) if 0 < k <= len(names) else f"#{k}"
        color = np.array(class_color(name), np.float32)
        img[m] = (img[m] * (1 - alpha) + color * alpha).astype(np.uint8)
    return img


def overlay_label_map(img: np.ndarray, label_map: np.ndarray, vocabulary: Sequence[str],
                      alpha: float = 0.5, other_value: int = 255) -> np.ndarray:
    """Blend a label map (vocabulary index per pixel) with a legend of the labels present."""
    pal = palette(len(vocabulary))
    lm = np.asarray(label_map)
    valid = (lm != other_value) & (lm < len(vocabulary))
    colored = np.zeros_like(img)
    colored[valid] = pal[lm[valid]]
    img[valid] = (img[valid] * (1 - alpha) + colored[valid] * alpha).astype(np.uint8)
    present = [int(v) for v in np.unique(lm[valid])]
    scale, _ = _text_scale(img.shape[0])
    y = int(30 * scale / 0.7)
    for idx in present:
        draw_label(img, vocabulary[idx], (img.shape[1] - int(220 * scale / 0.7), y),
                   tuple(int(c) for c in pal[idx]))
        y += int(28 * scale / 0.7)
    return img


def draw_frame(frame: Any) -> np.ndarray:
    """The full debug image of a pipeline frame (a new BGR array; the frame is untouched)."""
    img = frame.bgr().copy()
    labels = getattr(frame, "labels", None)
    if labels is not None and getattr(labels, "label_map", None) is not None:
        overlay_label_map(img, labels.label_map, labels.vocabulary,
                          other_value=getattr(labels, "other_value", 255))
    det = frame.detections
    masks = getattr(frame, "masks", None)
    if masks is not None and det is not None and getattr(masks, "instance_ids", None) is not None:
        overlay_masks(img, masks.instance_ids, det.class_names)
    if det is not None:
        extra = None
        clip = getattr(frame, "clip", None)
        if clip is not None and getattr(clip, "hypotheses", None) is not None:
            extra = [f"{h[0][0]} {h[0][1]:.2f}" if h else "" for h in clip.hypotheses]
        extra = _with_distance(extra, getattr(frame, "objects", None), len(det.class_names))
        draw_detections(img, det.xyxy, det.class_names, det.scores, extra)
    return img


def _with_distance(extra: Sequence[str] | None, objects: Any, n: int) -> list[str] | None:
    """Hook: the 3D object's distance from the camera ('12.3 m') joined to each label's extra
    text (detections without a 3D position get none)."""
    if objects is None or len(objects) != n:
        return None if extra is None else list(extra)
    out = []
    for i in range(n):
        text = extra[i] if extra is not None else ""
        if objects.valid[i]:
            dist = f"{objects.distance[i]:.1f} m"
            text = f"{text} | {dist}" if text else dist
        out.append(text)
    return out
