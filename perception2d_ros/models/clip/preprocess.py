"""CLIP image preprocessing in numpy: open_clip's eval transform, bit-exact.

open_clip (``image_transform(..., is_train=False)``, resize_mode ``shortest``) does, on a PIL
image: ``Resize(224, BICUBIC)`` → ``CenterCrop(224)`` → RGB → ``ToTensor`` (/255) →
``Normalize(OPENAI_MEAN, OPENAI_STD)``. torchvision's ``Resize`` on a PIL image calls
Pillow's ``Image.resize(..., BICUBIC)``, an antialiased (filter support scaled by the
down-scale factor) separable bicubic (a=-0.5) in 22-bit fixed point with a uint8 intermediate
between the two 1-D passes. :func:`resize_bicubic_aa` therefore calls Pillow itself when it is
importable (it always is where open_clip/torchvision are): our uint8 pixels then equal
open_clip's bit for bit and the float tensor differs only by float32 rounding of the
normalisation (≤ 1e-6, tested). Without Pillow, a numpy re-implementation of the same
fixed-point arithmetic is used (horizontal pass first, as Pillow ≤ 12 always does; Pillow 13
picks the pass order per size, so for some sizes pixels differ by a few LSB — embedding cosine
still ≥ 0.9999, tested). OpenCV's ``INTER_CUBIC`` has no antialiasing (aliasing on
down-scales; measured in the parity test) and is not used.

Crops for detections (:func:`square_crop`): the box, grown by ``padding`` × its size on each
side, squared by expanding the short side about the centre, then shifted into the frame
along any axis where it fits (more real context than padding); where the square is larger
than the frame, the parts outside are filled with the CLIP mean colour (≈ 0 after
normalisation). The square crop then goes through
the same transform (for a square, resize to 224×224 and an identity centre crop).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: the OpenAI mean as uint8 RGB: out-of-frame fill for crops (normalises to ≈ 0)
MEAN_RGB_U8 = tuple(int(round(m * 255)) for m in OPENAI_MEAN)

_PRECISION_BITS = 32 - 8 - 2


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    out = np.zeros_like(x)
    m1 = x < 1.0
    m2 = (x >= 1.0) & (x < 2.0)
    out[m1] = ((a + 2.0) * x[m1] - (a + 3.0)) * x[m1] * x[m1] + 1
    out[m2] = (((x[m2] - 5) * x[m2] + 8) * x[m2] - 4) * a
    return out


@lru_cache(maxsize=256)
def _coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow ``precompute_coeffs`` + ``normalize_coeffs_8bpc``: (index [out, k] int64,
    fixed-point weights [out, k] int64). Indices past a window's end carry weight 0."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C (int) truncation
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize, dtype=np.int64)[None, :]
    valid = taps < xmax[:, None]
    w = _bicubic((taps + xmin[:, None] - centers[:, None] + 0.5) / filterscale)
    w = np.where(valid, w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    scaled = w * (1 << _PRECISION_BITS)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    index = np.minimum(xmin[:, None] + taps, in_size - 1)
    return index, np.where(valid, fixed, 0)


def _resample_axis(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    index, weights = _coeffs(img.shape[axis], out_size)
    # gather [.., out, k, ..] along ``axis`` then fixed-point dot with the weights
    if axis == 0:
        g = img[index]                                   # (out, k, W, C)
        acc = np.einsum("okwc,ok->owc", g.astype(np.int64), weights)
    else:
        g = img[:, index]                                # (H, out, k, C)
        acc = np.einsum("hokc,ok->hoc", g.astype(np.int64), weights)
    acc += 1 << (_PRECISION_BITS - 1)
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


#: "auto" (Pillow if importable, else numpy), "pillow" or "numpy"
RESIZE_BACKEND = "auto"


def resize_bicubic_aa(img: np.ndarray, width: int, height: int,
                      backend: str | None = None) -> np.ndarray:
    """``Image.resize((width, height), BICUBIC)`` of an HxWx3 uint8 image (torchvision
    ``Resize`` on PIL input). ``backend``: auto | pillow | numpy (default
    :data:`RESIZE_BACKEND`)."""
    if img.dtype != np.uint8 or img.ndim != 3:
        raise ValueError(f"expected HxWxC uint8, got {img.dtype} {img.shape}")
    backend = backend or RESIZE_BACKEND
    if backend not in ("auto", "pillow", "numpy"):
        raise ValueError(f"resize backend must be auto, pillow or numpy; got {backend!r}")
    if backend != "numpy":
        Image = _pillow()
        if Image is not None and img.shape[2] == 3:
            pil = Image.fromarray(np.ascontiguousarray(img), "RGB")
            return np.asarray(pil.resize((int(width), int(height)), Image.BICUBIC))
        if backend == "pillow":
            raise ImportError("Pillow is not installed (resize backend 'pillow')")
    return resize_bicubic_numpy(img, width, height)


def resize_bicubic_numpy(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow's antialiased bicubic in numpy (fixed point, horizontal pass first)."""
    out = img
    if width != img.shape[1]:
        out = _resample_axis(out, width, axis=1)
    if height != img.shape[0]:
        out = _resample_axis(out, height, axis=0)
    return np.ascontiguousarray(out)


def shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)`` output (h, w) for an int size (shortest side)."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize_center_crop(rgb: np.ndarray, size: int, backend: str | None = None) -> np.ndarray:
    """Resize shortest side to ``size`` (Pillow bicubic) and centre-crop size×size, uint8."""
    h, w = rgb.shape[:2]
    nh, nw = shortest_side_size(h, w, size)
    resized = rgb if (nh, nw) == (h, w) else resize_bicubic_aa(rgb, nw, nh, backend)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    return resized[top:top + size, left:left + size]


def normalize(rgb_u8: np.ndarray, mean: Sequence[float] = OPENAI_MEAN,
              std: Sequence[float] = OPENAI_STD) -> np.ndarray:
    """HWC uint8 RGB → CHW float32 ``(x/255 - mean) / std``."""
    x = rgb_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_bgr(image_bgr: np.ndarray, size: int = 224,
                   mean: Sequence[float] = OPENAI_MEAN,
                   std: Sequence[float] = OPENAI_STD,
                   backend: str | None = None) -> np.ndarray:
    """HWC uint8 BGR (or gray) → CHW float32, equal to open_clip's eval ``preprocess``."""
    rgb = to_rgb(image_bgr)
    return normalize(resize_center_crop(rgb, size, backend), mean, std)


def to_rgb(image_bgr: np.ndarray) -> np.ndarray:
    img = np.asarray(image_bgr)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 3:
        return np.ascontiguousarray(img[:, :, ::-1])
    if img.ndim == 3 and img.shape[2] == 4:
        return np.ascontiguousarray(img[:, :, 2::-1])
    raise ValueError(f"expected HxW, HxWx3 or HxWx4 image, got shape {img.shape}")


def square_box(box_xyxy: Sequence[float], padding: float = 0.1,
               frame_hw: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """Integer square (x0, y0, x1, y1) around a box: grown by ``padding`` × (w, h) on each
    side, short side expanded about the centre. With ``frame_hw`` the square is shifted
    (clamped) into the frame along each axis where it fits; where it does not fit it stays
    centred and extends past the frame (the caller pads)."""
    x1, y1, x2, y2 = (float(v) for v in box_xyxy)
    if not (math.isfinite(x1) and math.isfinite(y1) and math.isfinite(x2) and math.isfinite(y2)):
        raise ValueError(f"box has non-finite coordinates: {box_xyxy}")
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    w, h = w * (1.0 + 2.0 * padding), h * (1.0 + 2.0 * padding)
    side = max(w, h, 1.0)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    x0 = int(math.floor(cx - side / 2.0 + 0.5))
    y0 = int(math.floor(cy - side / 2.0 + 0.5))
    s = max(int(round(side)), 1)
    if frame_hw is not None:
        H, W = frame_hw
        if s <= W:
            x0 = min(max(x0, 0), W - s)
        if s <= H:
            y0 = min(max(y0, 0), H - s)
    return x0, y0, x0 + s, y0 + s


def square_crop(image_rgb: np.ndarray, box_xyxy: Sequence[float], padding: float = 0.1,
                fill: Sequence[int] = MEAN_RGB_U8) -> np.ndarray:
    """Square crop (uint8, HxWx3) of :func:`square_box` (clamped into the frame where it
    fits); remaining out-of-frame pixels = ``fill``."""
    H, W = image_rgb.shape[:2]
    x0, y0, x1, y1 = square_box(box_xyxy, padding, (H, W))
    s = x1 - x0
    out = np.empty((s, s, image_rgb.shape[2]), np.uint8)
    out[:] = np.asarray(fill, np.uint8)[: image_rgb.shape[2]]
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image_rgb[sy0:sy1, sx0:sx1]
    return out


def preprocess_crops_bgr(image_bgr: np.ndarray, boxes_xyxy: np.ndarray | Sequence,
                         size: int = 224, padding: float = 0.1,
                         mean: Sequence[float] = OPENAI_MEAN,
                         std: Sequence[float] = OPENAI_STD,
                         backend: str | None = None) -> np.ndarray:
    """[N, 3, size, size] float32 for ``N`` boxes of one frame (one engine batch)."""
    rgb = to_rgb(image_bgr)
    boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    out = np.empty((len(boxes), 3, size, size), np.float32)
    for i, box in enumerate(boxes):
        out[i] = normalize(resize_center_crop(square_crop(rgb, box, padding), size, backend),
                           mean, std)
    return out
