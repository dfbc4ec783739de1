"""LSeg input and output geometry, resampled exactly as lang-seg's evaluator: letterbox
sizes, align_corners=True bilinear taps and resizes, the normalised / padded network input,
the multi-size evaluation plan (:func:`parse_scales`, :func:`scale_plans`) and the two
resampling steps of the output (:func:`official_taps`)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np

from perception2d_ros.models.lseg.meta import LSegMeta

# lang-seg's evaluator (additional_utils/models.py, after PyTorch-Encoding's
# encoding/models/sseg/base.py): the normalised float image is resized with bilinear
# interpolation, align_corners=True, so that its long side is ceil(base_size * scale) and the
# short side int(x + 0.5); padded bottom/right to the crop size with the value of a black
# pixel; the network's stride-2 logits go through the head's x2 bilinear upsample
# (align_corners=True, modules/models/lseg_net.py), the padding is cropped off and the result
# is resized to the image (align_corners=True). Scales > 1 slide crop-size windows with stride
# 2/3 crop over the padded image and average the overlaps; ``flip`` adds the mirrored pass.
OFFICIAL_SCALES = (0.75, 1.0, 1.25, 1.5, 1.75, 2.25)
STRIDE_RATE = 2.0 / 3.0


@dataclass(frozen=True)
class Letterbox:
    """Where the image sits in the network input: top-left, scaled to ``resized`` (h, w)."""

    image_size: tuple[int, int]     # original H, W
    resized: tuple[int, int]        # h, w inside the input
    input_size: tuple[int, int]     # network H, W


def letterbox_size(image_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the image resized to fit ``input_hw`` with its aspect kept, rounded as
    lang-seg does: the limiting side takes the input side, the other ``int(x + 0.5)`` (half
    up, not Python's half-to-even ``round``: 960x541 in 480 -> 271 rows)."""
    h, w = int(image_hw[0]), int(image_hw[1])
    ih, iw = int(input_hw[0]), int(input_hw[1])
    if h * iw > w * ih:                 # height-limited (for a square input: h > w)
        rh, rw = ih, int(1.0 * w * ih / h + 0.5)
    else:
        rh, rw = int(1.0 * h * iw / w + 0.5), iw
    return max(1, min(ih, rh)), max(1, min(iw, rw))


@functools.lru_cache(maxsize=128)
def align_corners_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                      np.ndarray]:
    """Bilinear taps of ``torch.nn.functional.interpolate(..., align_corners=True)`` along one
    axis: output i samples source ``i * (n_in - 1) / (n_out - 1)`` (float32, as torch computes
    it). Returns (i0, i1, w0, w1) with out[i] = w0[i] * src[i0[i]] + w1[i] * src[i1[i]]."""
    if n_out < 1 or n_in < 1:
        raise ValueError(f"sizes must be >= 1, got {n_out} from {n_in}")
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0.0)
    src = np.arange(n_out, dtype=np.float32) * scale
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    for a in (i0, i1, w0, w1):
        a.flags.writeable = False
    return i0, i1, w0, w1


def resize_align_corners(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) float -> (C, H, W) float32, bilinear with align_corners=True (precomputed
    separable taps; equals torch's ``F.interpolate`` up to float rounding)."""
    y0, y1, wy0, wy1 = align_corners_taps(int(size[0]), x.shape[-2])
    x0, x1, wx0, wx1 = align_corners_taps(int(size[1]), x.shape[-1])
    rows = x[..., y0, :] * wy0[:, None] + x[..., y1, :] * wy1[:, None]
    return rows[..., x0] * wx0 + rows[..., x1] * wx1


def pad_values(meta: "LSegMeta") -> np.ndarray:
    """The normalised value of a ``pad_value`` pixel per RGB channel (lang-seg: -mean/std)."""
    return ((np.float32(meta.pad_value) / np.float32(255.0) - np.asarray(meta.mean, np.float32))
            / np.asarray(meta.std, np.float32)).astype(np.float32)


def normalized_resize(image_bgr: np.ndarray, size: tuple[int, int],
                      meta: "LSegMeta") -> np.ndarray:
    """BGR uint8 (H, W, 3) -> normalised RGB float32 (3, h, w) resized to ``size`` with
    bilinear align_corners=True interpolation. Normalisation is affine per channel and the
    bilinear weights sum to one, so resizing the pixel values first and normalising the small
    result equals lang-seg's normalise-then-resize (up to float rounding) at a fraction of
    the cost; only the four source pixels of each output pixel are converted to float."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected a BGR image (H, W, 3), got shape {image_bgr.shape}")
    h, w = int(size[0]), int(size[1])
    y0, y1, wy0, wy1 = align_corners_taps(h, image_bgr.shape[0])
    x0, x1, wx0, wx1 = align_corners_taps(w, image_bgr.shape[1])
    a, b = wx0[None, :, None], wx1[None, :, None]

    def row(ys: np.ndarray, wy: np.ndarray) -> np.ndarray:
        r = image_bgr[ys]                                # uint8 gathers: only the 4 taps of
        out = np.take(r, x0, axis=1).astype(np.float32)  # each output pixel become float
        out *= a
        tmp = np.take(r, x1, axis=1).astype(np.float32)
        tmp *= b
        out += tmp
        out *= wy[:, None, None]
        return out

    px = row(y0, wy0)
    px += row(y1, wy1)
    scale = np.float32(1.0 / 255.0) / np.asarray(meta.std, np.float32)
    shift = np.asarray(meta.mean, np.float32) / np.asarray(meta.std, np.float32)
    out = np.empty((3, h, w), np.float32)
    for c, plane in enumerate(cv2.split(px)[::-1]):          # BGR planes -> RGB
        np.multiply(plane, scale[c], out=out[c])
        out[c] -= shift[c]
    return out


def pad_to(x: np.ndarray, size: tuple[int, int], values: np.ndarray) -> np.ndarray:
    """(3, h, w) -> (3, H, W) float32, placed top-left, the rest filled with ``values``."""
    out = np.empty((x.shape[0], int(size[0]), int(size[1])), np.float32)
    out[:] = values[:, None, None]
    out[:, : x.shape[1], : x.shape[2]] = x
    return out


def preprocess(image_bgr: np.ndarray, meta: LSegMeta) -> tuple[np.ndarray, Letterbox]:
    """BGR uint8 (H, W, 3) -> normalised RGB float32 [1, 3, H_in, W_in], aspect kept, as
    lang-seg's evaluator at scale 1: resized (bilinear, align_corners=True) to fit, placed
    top-left, the rest filled with ``pad_value`` (normalised)."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected a BGR image (H, W, 3), got shape {image_bgr.shape}")
    ih, iw = meta.input_size
    rh, rw = letterbox_size(image_bgr.shape[:2], (ih, iw))
    x = pad_to(normalized_resize(image_bgr, (rh, rw), meta), (ih, iw), pad_values(meta))
    return x[None], Letterbox(tuple(image_bgr.shape[:2]), (rh, rw), (ih, iw))


@dataclass(frozen=True)
class ScalePlan:
    """One scale of lang-seg's evaluator: the image resized to ``resized`` (h, w), padded to
    ``padded`` (at least the network input), evaluated in network-input ``windows``
    (y0, y1, x0, x1) on the padded image (one window when the image fits the input)."""

    scale: float
    resized: tuple[int, int]
    padded: tuple[int, int]
    windows: tuple[tuple[int, int, int, int], ...]


def parse_scales(value: Any) -> tuple[float, ...]:
    """``lseg.scales`` / ``--scales``: a list of positive numbers, a comma-separated string,
    or ``official`` (lang-seg's demo set :data:`OFFICIAL_SCALES`)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "official":
            return OFFICIAL_SCALES
        items: Sequence[Any] = [v for v in text.split(",") if v.strip()]
    else:
        items = list(value or [])
    try:
        scales = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"scales: {value!r} is not a list of numbers (e.g. 1.0 or "
                         "0.75,1.0,1.25 or 'official')") from None
    if not scales:
        raise ValueError("scales: at least one scale is needed (default [1.0])")
    bad = [s for s in scales if not (0.05 <= s <= 8.0)]
    if bad:
        raise ValueError(f"scales: {bad} outside [0.05, 8] (1.0 = the network input size)")
    return scales


def scale_plans(image_hw: tuple[int, int], input_hw: tuple[int, int],
                scales: Sequence[float] = (1.0,)) -> list[ScalePlan]:
    """lang-seg's multi-size evaluation geometry for an image, per scale: long side
    ``ceil(input * scale)`` (base size = crop size = the network input), short side
    ``int(x + 0.5)``; images larger than the input are covered by input-size windows at
    stride ``int(input * 2 / 3)``, the last window padded where it runs past the image."""
    ih, iw = int(input_hw[0]), int(input_hw[1])
    sh, sw = int(ih * STRIDE_RATE), int(iw * STRIDE_RATE)
    plans = []
    for s in scales:
        target = (int(math.ceil(ih * s)), int(math.ceil(iw * s)))
        rh, rw = letterbox_size(image_hw, target)
        ph, pw = max(rh, ih), max(rw, iw)
        ny = int(math.ceil((ph - ih) / sh)) + 1 if ph > ih else 1
        nx = int(math.ceil((pw - iw) / sw)) + 1 if pw > iw else 1
        windows = tuple((a * sh, min(a * sh + ih, ph), b * sw, min(b * sw + iw, pw))
                        for a in range(ny) for b in range(nx))
        plans.append(ScalePlan(float(s), (rh, rw), (ph, pw), windows))
    return plans


def official_taps(n_out: int, n_low: int, content: int, stride: int = 2
                  ) -> tuple[tuple, tuple]:
    """The two align_corners=True resampling steps of lang-seg's output along one axis:
    (x``stride`` upsample n_low -> stride * n_low, restricted to the first ``content``
    pixels) and (``content`` -> ``n_out``), each as (i0, i1, w0, w1)."""
    if not 1 <= content <= stride * n_low:
        raise ValueError(f"content {content} outside 1..{stride * n_low}")
    up = tuple(a[:content] for a in align_corners_taps(stride * n_low, n_low))
    return up, align_corners_taps(n_out, content)
