"""The debug image a person looks at in RViz/Foxglove: boxes with class and open-vocabulary
labels, SAM masks as translucent overlays, the LSeg label map as a legend-coloured overlay.
Text is sized from the image height (legible from 640×480 to 1080p); labels are placed so they
never cover one another (:func:`place_labels`); colours are stable per class name."""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

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


FONT = cv2.FONT_HERSHEY_SIMPLEX
_PAD = 2   # px between the text and its label's edge


def _text_scale(height: int) -> tuple[float, int]:
    """Font scale and stroke for an image ``height`` px tall: cap height ≈ 1.2 % of the image
    (≈11 px at 480, 13 at 720, 19 at 1080), never below 0.5 (~11 px), stroke 1 below ~900 px."""
    scale = max(0.5, height / 720 * 0.6)
    return scale, 1 if scale < 0.75 else 2


def label_size(text: str, height: int) -> tuple[int, int]:
    """(width, height) in px of the filled label ``draw_label`` draws for ``text`` on an image
    ``height`` px tall."""
    scale, thick = _text_scale(height)
    (tw, th), base = cv2.getTextSize(text, FONT, scale, thick)
    return tw + 2 * _PAD, th + base + 2 * _PAD


def draw_label(img: np.ndarray, text: str, org: tuple[int, int], color: tuple[int, int, int]
               ) -> tuple[int, int, int, int]:
    """A filled label with ``text`` whose bottom-left corner is ``org`` (clamped into the
    image); returns its rectangle (x1, y1, x2, y2), end-exclusive."""
    w, h = label_size(text, img.shape[0])
    x = max(0, min(int(org[0]), img.shape[1] - w))
    y = max(h, min(int(org[1]), img.shape[0]))
    _paint_label(img, text, (x, y - h, x + w, y), color)
    return x, y - h, x + w, y


def _paint_label(img: np.ndarray, text: str, rect: tuple[int, int, int, int],
                 color: tuple[int, int, int]) -> None:
    scale, thick = _text_scale(img.shape[0])
    x1, y1, x2, y2 = rect
    cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), color, -1)
    lum = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
    fg = (0, 0, 0) if lum > 140 else (255, 255, 255)
    base = cv2.getTextSize(text, FONT, scale, thick)[1]
    cv2.putText(img, text, (x1 + _PAD, y2 - _PAD - base), FONT, scale, fg, thick, cv2.LINE_AA)


def _fit_text(text: str, width: int, height: int) -> str:
    """``text`` shortened with '…' until its label fits ``width`` px (a label wider than the
    image would be clipped anyway)."""
    if label_size(text, height)[0] <= width:
        return text
    while len(text) > 1 and label_size(text + "..", height)[0] > width:
        text = text[:-1]
    return text + ".."


def place_labels(image_hw: tuple[int, int], xyxy: np.ndarray,
                 sizes: Sequence[tuple[int, int]], order: Sequence[int] | None = None,
                 occupied: Sequence[tuple[int, int, int, int]] = ()
                 ) -> list[tuple[int, int, int, int] | None]:
    """Label rectangles (x1, y1, x2, y2; end-exclusive) for boxes ``xyxy`` (N, 4) and label
    ``sizes`` (w, h): inside the image and never overlapping one another.

    Each label goes, in this order of preference, above its box's top-left corner, inside the
    box at the top (where there is no room above), below the box, then the same right-aligned;
    when all of those collide with labels already placed, it shifts to the free position
    nearest its preferred one. Boxes are placed in ``order`` (default: as given — pass the
    score order so the most confident keep their spots); ``occupied``: rectangles already taken
    (a legend). ``None``: no free place at all (the image is full of labels); that label is
    left out rather than drawn over another."""
    img_h, img_w = int(image_hw[0]), int(image_hw[1])
    boxes = np.asarray(xyxy, np.float64).reshape(-1, 4)
    placed = np.asarray(list(occupied), np.int64).reshape(-1, 4)
    out: list[tuple[int, int, int, int] | None] = [None] * len(boxes)
    for i in (range(len(boxes)) if order is None else order):
        w, h = int(sizes[i][0]), int(sizes[i][1])
        if w > img_w or h > img_h:
            continue
        bx1, by1, bx2, by2 = (int(round(v)) for v in boxes[i])
        pref = np.array([[bx1, by1 - h], [bx1, by1], [bx1, by2], [bx2 - w, by1 - h],
                         [bx2 - w, by1], [bx2 - w, by2]], np.int64)
        cand = _free(_clamp(pref, w, h, img_w, img_h), w, h, placed)
        if not len(cand):   # crowded: every free position, nearest to the preferred one
            xs = np.unique(np.r_[np.arange(0, img_w - w + 1, max(4, h)), img_w - w,
                                 np.clip([bx1, bx2 - w], 0, img_w - w)])
            ys = np.unique(np.r_[np.arange(0, img_h - h + 1, max(2, h // 3)), img_h - h,
                                 np.clip([by1 - h, by1, by2], 0, img_h - h)])
            grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
            cand = _free(grid, w, h, placed)
            if not len(cand):
                continue
            anchor = _clamp(pref[:1], w, h, img_w, img_h)[0]
            cost = np.abs(cand[:, 0] - anchor[0]) + 2 * np.abs(cand[:, 1] - anchor[1])
            cand = cand[np.argsort(cost, kind="stable")]
        x, y = (int(v) for v in cand[0])
        rect = (x, y, x + w, y + h)
        out[i] = rect
        placed = np.vstack([placed, np.array([rect], np.int64)])
    return out


def _clamp(xy: np.ndarray, w: int, h: int, img_w: int, img_h: int) -> np.ndarray:
    return np.stack([np.clip(xy[:, 0], 0, img_w - w), np.clip(xy[:, 1], 0, img_h - h)], -1)


def _free(xy: np.ndarray, w: int, h: int, placed: np.ndarray) -> np.ndarray:
    """The top-left corners among ``xy`` whose w×h label overlaps no placed label."""
    if not len(placed):
        return xy
    x1, y1 = xy[:, :1], xy[:, 1:]
    hit = ((x1 < placed[:, 2]) & (placed[:, 0] < x1 + w) &
           (y1 < placed[:, 3]) & (placed[:, 1] < y1 + h)).any(1)
    return xy[~hit]


def detection_label(name: str, score: float, *parts: str) -> str:
    """The text of one detection's label: ``'name 0.83'`` then any non-empty ``parts``
    (CLIP label, track id, distance, ...) joined with ``' | '``."""
    return " | ".join([f"{name} {float(score):.2f}", *(p for p in parts if p)])


def layout_labels(image_hw: tuple[int, int], xyxy: np.ndarray, texts: Sequence[str],
                  scores: Sequence[float], occupied: Sequence[tuple[int, int, int, int]] = ()
                  ) -> tuple[list[str], list[tuple[int, int, int, int] | None]]:
    """The label texts (shortened to the image width) and rectangles ``draw_detections``
    uses: sized for the image height, placed in descending score order."""
    img_h, img_w = int(image_hw[0]), int(image_hw[1])
    texts = [_fit_text(t, img_w, img_h) for t in texts]
    sizes = [label_size(t, img_h) for t in texts]
    order = np.argsort(-np.asarray(scores, np.float64).reshape(-1), kind="stable")
    return texts, place_labels((img_h, img_w), xyxy, sizes, order, occupied)


def draw_detections(img: np.ndarray, xyxy: np.ndarray, names: Sequence[str],
                    scores: Sequence[float], extra: Sequence[str] | None = None, *,
                    text: Callable[[int], str] | None = None,
                    occupied: Sequence[tuple[int, int, int, int]] = ()) -> np.ndarray:
    """Draw boxes and their labels in place; labels never cover one another (see
    :func:`place_labels`, nor ``occupied`` rectangles). ``text(i)`` gives detection i's label
    text (default :func:`detection_label` of name, score and ``extra[i]``, e.g. a CLIP label)."""
    if text is None:
        def text(i: int) -> str:
            return detection_label(str(names[i]), float(scores[i]),
                                   extra[i] if extra is not None else "")
    _, thick = _text_scale(img.shape[0])
    boxes = np.asarray(xyxy, np.float64).reshape(-1, 4)
    colors = [class_color(str(names[i])) for i in range(len(boxes))]
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(img, (x1, y1), (x2, y2), colors[i], thick + 1)
    texts, rects = layout_labels(img.shape[:2], boxes, [text(i) for i in range(len(boxes))],
                                 scores, occupied)
    for i, rect in enumerate(rects):   # leader lines first: no line crosses a label
        if rect is not None:
            _leader(img, rect, boxes[i], colors[i])
    for i, rect in enumerate(rects):
        if rect is not None:
            _paint_label(img, texts[i], rect, colors[i])
    return img


def _leader(img: np.ndarray, rect: tuple[int, int, int, int], box: np.ndarray,
            color: tuple[int, int, int]) -> None:
    """A thin line from a label that had to move away from its box to the box's nearest
    point, so a shifted label still says whose it is."""
    x1, y1, x2, y2 = rect
    bx1, by1, bx2, by2 = (int(round(v)) for v in box)
    if x1 <= bx2 + 2 and bx1 - 2 <= x2 and y1 <= by2 + 2 and by1 - 2 <= y2:
        return   # touches its box
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    px, py = min(max(cx, bx1), bx2), min(max(cy, by1), by2)
    lx, ly = min(max(px, x1), x2 - 1), min(max(py, y1), y2 - 1)
    cv2.line(img, (lx, ly), (px, py), color, 1, cv2.LINE_AA)


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
    _overlay_label_map(img, label_map, vocabulary, alpha, other_value)
    return img


def _overlay_label_map(img: np.ndarray, label_map: np.ndarray, vocabulary: Sequence[str],
                       alpha: float = 0.5, other_value: int = 255
                       ) -> list[tuple[int, int, int, int]]:
    pal = palette(len(vocabulary))
    lm = np.asarray(label_map)
    valid = (lm != other_value) & (lm < len(vocabulary))
    colored = np.zeros_like(img)
    colored[valid] = pal[lm[valid]]
    img[valid] = (img[valid] * (1 - alpha) + colored[valid] * alpha).astype(np.uint8)
    present = [int(v) for v in np.unique(lm[valid])]
    return legend_rects(img, [vocabulary[i] for i in present],
                        [tuple(int(c) for c in pal[i]) for i in present])


def legend_rects(img: np.ndarray, texts: Sequence[str], colors: Sequence[tuple[int, int, int]]
                 ) -> list[tuple[int, int, int, int]]:
    """Draw a right-aligned column of labels (a legend) at the top right; their rectangles."""
    rects = []
    y = 4
    for text, color in zip(texts, colors):
        text = _fit_text(text, img.shape[1], img.shape[0])
        w, h = label_size(text, img.shape[0])
        if y + h > img.shape[0]:
            break
        rects.append(draw_label(img, text, (img.shape[1] - w - 4, y + h), color))
        y = rects[-1][3] + 2
    return rects


def label_parts(frame: Any) -> list[list[str]]:
    """Per detection of ``frame``, the texts its debug label shows after 'name score': the
    track id (``#7``), the CLIP label, the 3D distance."""
    det = frame.detections
    parts: list[list[str]] = [[] for _ in range(len(det.scores))]
    track_ids = getattr(frame, "track_ids", None)
    if track_ids is not None and len(track_ids) == len(parts):
        for i, tid in enumerate(track_ids):
            parts[i].append(f"#{tid}")
    clip = getattr(frame, "clip", None)
    if clip is not None and getattr(clip, "hypotheses", None) is not None:
        for i, h in enumerate(clip.hypotheses[:len(parts)]):
            if h:
                parts[i].append(f"{h[0][0]} {h[0][1]:.2f}")
    distances = _with_distance(None, getattr(frame, "objects", None), len(parts)) or []
    for i, dist in enumerate(distances):
        if dist:
            parts[i].append(dist)
    return parts


def draw_frame(frame: Any) -> np.ndarray:
    """The full debug image of a pipeline frame (a new BGR array; the frame is untouched)."""
    img = frame.bgr().copy()
    legend: list[tuple[int, int, int, int]] = []
    labels = getattr(frame, "labels", None)
    if labels is not None and getattr(labels, "label_map", None) is not None:
        legend = _overlay_label_map(img, labels.label_map, labels.vocabulary,
                                    other_value=getattr(labels, "other_value", 255))
    det = frame.detections
    masks = getattr(frame, "masks", None)
    if masks is not None and det is not None and getattr(masks, "instance_ids", None) is not None:
        overlay_masks(img, masks.instance_ids, det.class_names)
    if det is not None:
        parts = label_parts(frame)
        draw_detections(img, det.xyxy, det.class_names, det.scores, occupied=legend,
                        text=lambda i: detection_label(str(det.class_names[i]),
                                                       float(det.scores[i]), *parts[i]))
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
