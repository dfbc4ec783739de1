"""Showing LSeg label maps: colour palettes (per index, or keyed by phrase text), colourised
label maps, a legend, and the overlay debug image."""
from __future__ import annotations

import colorsys
import hashlib
from typing import Sequence

import cv2
import numpy as np

from perception2d_ros.models.lseg.labelmap import DEFAULT_OTHER, LabelMapResult

OTHER_COLOR = (0, 0, 0)


def make_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 BGR colours, well separated (golden-ratio hue steps), stable per index."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        sat = 0.65 + 0.35 * ((i // 7) % 2)
        val = 0.95 - 0.25 * ((i // 3) % 2)
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        out[i] = (int(b * 255), int(g * 255), int(r * 255))
    return out


def phrase_palette(phrases: Sequence[str]) -> np.ndarray:
    """(N, 3) uint8 BGR colours keyed by the phrase text, so a label keeps its colour when the
    vocabulary is reordered or extended."""
    out = np.zeros((len(phrases), 3), np.uint8)
    for i, p in enumerate(phrases):
        digest = hashlib.sha1(p.strip().lower().encode("utf-8")).digest()
        hue = int.from_bytes(digest[:2], "big") / 65536.0
        sat = 0.55 + 0.45 * digest[2] / 255.0
        val = 0.70 + 0.30 * digest[3] / 255.0
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        out[i] = (int(b * 255), int(g * 255), int(r * 255))
    return out


def colorize(label_map: np.ndarray, palette: np.ndarray, *,
             other_value: int = DEFAULT_OTHER,
             other_color: tuple[int, int, int] = OTHER_COLOR) -> np.ndarray:
    """(H, W) label map -> (H, W, 3) uint8 BGR; "other" and out-of-palette values get
    ``other_color``."""
    pal = np.asarray(palette, np.uint8).reshape(-1, 3)
    lut = np.tile(np.asarray(other_color, np.uint8), (max(int(label_map.max(initial=0)),
                                                          len(pal) - 1) + 1, 1))
    lut[: len(pal)] = pal
    if other_value < len(lut):
        lut[other_value] = other_color
    return lut[label_map.astype(np.intp)]


def draw_legend(image_bgr: np.ndarray, labels: Sequence[str], palette: np.ndarray,
                shares: Sequence[float] | None = None, *, max_items: int = 16,
                min_share: float = 0.0, origin: tuple[int, int] = (8, 8)) -> np.ndarray:
    """Draw a colour legend (swatch + label [+ share]) on a copy of ``image_bgr``. With
    ``shares``, only labels with share > ``min_share`` are listed, largest first."""
    img = image_bgr.copy()
    items = list(range(len(labels)))
    if shares is not None:
        items = [i for i in sorted(items, key=lambda i: -shares[i]) if shares[i] > min_share]
    items = items[:max_items]
    if not items:
        return img
    scale = max(0.4, min(1.0, img.shape[0] / 900))
    thick = 1 if scale < 0.8 else 2
    line_h = int(22 * scale) + 6
    texts = [labels[i] + (f" {100 * shares[i]:.1f}%" if shares is not None else "")
             for i in items]
    width = max(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0]
                for t in texts) + line_h + 16
    x0, y0 = origin
    x1 = min(img.shape[1], x0 + width)
    y1 = min(img.shape[0], y0 + line_h * len(items) + 8)
    roi = img[y0:y1, x0:x1]
    roi[:] = (roi.astype(np.float32) * 0.35).astype(np.uint8)
    for row, (i, text) in enumerate(zip(items, texts)):
        y = y0 + 4 + row * line_h
        color = tuple(int(c) for c in np.asarray(palette[i]).ravel()[:3])
        cv2.rectangle(img, (x0 + 4, y + 2), (x0 + line_h - 2, y + line_h - 4), color, -1)
        cv2.putText(img, text, (x0 + line_h + 4, y + line_h - 8), cv2.FONT_HERSHEY_SIMPLEX,
                    scale, (255, 255, 255), thick, cv2.LINE_AA)
    return img


def overlay(image_bgr: np.ndarray, result: LabelMapResult, palette: np.ndarray, *,
            alpha: float = 0.5, legend: bool = True,
            labels: Sequence[str] | None = None) -> np.ndarray:
    """The debug image: colour label map blended over the image (``other`` left unblended)
    plus a legend of the labels present, by pixel share."""
    colors = colorize(result.label_map, palette, other_value=result.other_value)
    blend = cv2.addWeighted(image_bgr, 1.0 - alpha, colors, alpha, 0.0)
    other = result.label_map == result.other_value
    blend[other] = image_bgr[other]
    names = labels or result.labels or tuple(str(i) for i in range(result.num_classes))
    if legend:
        shares = result.counts()[:-1] / max(1, result.label_map.size)
        blend = draw_legend(blend, names, palette, shares)
    return blend
