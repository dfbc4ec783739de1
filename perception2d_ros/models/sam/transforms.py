"""SAM's image and mask geometry without torch: Pillow-exact bilinear resize
(:func:`pil_bilinear_resize`), :class:`ResizeLongestSide` (image, prompt coordinates, boxes
into the encoder frame) and the per-axis matrices that upscale low-res masks as
``Sam.postprocess_masks`` does."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from perception2d_ros.models.sam.spec import IMAGE_SIZE, LOW_RES, PIXEL_MEAN, PIXEL_STD

_PRECISION_BITS = 32 - 8 - 2      # Pillow's Resample.c fixed-point precision for 8-bit images


def _pil_bilinear_coeffs(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for the bilinear filter.

    Returns (index [out, k] int64 clipped to the input, coefficient [out, k] int32 fixed point);
    taps beyond a row's support have coefficient 0."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale                     # bilinear support is 1
    ksize = int(np.ceil(support)) * 2 + 1
    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)   # C (int) truncation
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize, dtype=np.float64)
    x = (taps[None, :] + xmin[:, None] - centers[:, None] + 0.5) * (1.0 / filterscale)
    w = np.clip(1.0 - np.abs(x), 0.0, None)
    w[taps[None, :] >= xmax[:, None]] = 0.0
    ww = w.sum(axis=1, keepdims=True)
    w = np.where(ww != 0.0, w / np.where(ww != 0.0, ww, 1.0), w)
    # bilinear weights are >= 0: (int)(0.5 + w * 2^22), C truncation toward zero
    k = np.trunc(0.5 + w * float(1 << _PRECISION_BITS)).astype(np.int32)
    index = np.minimum(xmin[:, None] + np.arange(ksize)[None, :], in_size - 1)
    return index, k


def _pil_resample_axis(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One Pillow 8-bit resampling pass along ``axis`` (0 = rows, 1 = columns) of HxWxC uint8."""
    index, k = _pil_bilinear_coeffs(img.shape[axis], out_size)
    shape = list(img.shape)
    shape[axis] = out_size
    acc = np.full(shape, 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    for t in range(index.shape[1]):
        coeff = k[:, t]
        if not coeff.any():
            continue
        src = np.take(img, index[:, t], axis=axis).astype(np.int32)
        coeff = coeff[:, None, None] if axis == 0 else coeff[None, :, None]
        acc += src * coeff
    # clip8: values are never negative for bilinear; >> then saturate at 255
    return np.minimum(acc >> _PRECISION_BITS, 255).astype(np.uint8)


def pil_bilinear_resize(image: np.ndarray, size_hw: tuple[int, int], *,
                        pillow_legacy_order: bool = False) -> np.ndarray:
    """Resize an HxWxC (or HxW) uint8 image to ``size_hw`` exactly as Pillow's
    ``Image.resize(..., BILINEAR)`` does: antialiased when shrinking, 22-bit fixed-point
    coefficients, two separable passes with a uint8 intermediate. This is what
    ``torchvision.transforms.functional.resize`` does to the PIL image inside
    segment-anything's ``ResizeLongestSide.apply_image``; outputs are bit-identical.

    Pass order: horizontal first, except that Pillow >= 13 resizes vertically first when
    the height shrinks by more than twice as many pixels as the width
    (``out_h < in_h and in_h - out_h > 2 * (in_w - out_w)``). For an aspect-preserving
    resize that only happens when shrinking an image taller than 2:1. Older Pillow always
    goes horizontal first: ``pillow_legacy_order=True``."""
    if image.dtype != np.uint8:
        raise ValueError(f"pil_bilinear_resize expects uint8, got {image.dtype}")
    squeeze = image.ndim == 2
    img = image[:, :, None] if squeeze else image
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    in_h, in_w = img.shape[:2]
    vertical_first = (not pillow_legacy_order and out_h < in_h
                      and in_h - out_h > 2 * (in_w - out_w))
    if vertical_first and out_h != in_h:
        img = _pil_resample_axis(img, out_h, axis=0)
    if out_w != in_w:
        img = _pil_resample_axis(img, out_w, axis=1)
    if not vertical_first and out_h != in_h:
        img = _pil_resample_axis(img, out_h, axis=0)
    img = np.ascontiguousarray(img)
    return img[:, :, 0] if squeeze else img


class ResizeLongestSide:
    """segment-anything's ``ResizeLongestSide`` without torch: one object maps the image, the
    prompt coordinates and boxes into the encoder frame, and masks back.

    Image: resize so the longest side is ``target_length`` (Pillow bilinear, bit-identical
    to segment-anything), normalise with ``pixel_mean``/``pixel_std`` (RGB, 0..255), zero-pad
    bottom-right to a square. Coordinates scale by ``new/old`` per axis (float64)."""

    def __init__(self, target_length: int = IMAGE_SIZE,
                 pixel_mean: Sequence[float] = PIXEL_MEAN,
                 pixel_std: Sequence[float] = PIXEL_STD) -> None:
        self.target_length = int(target_length)
        self.pixel_mean = np.asarray(pixel_mean, np.float32).reshape(3, 1, 1)
        self.pixel_std = np.asarray(pixel_std, np.float32).reshape(3, 1, 1)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(new_h, new_w) with the longest side = ``long_side_length``, rounded half up."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return int(oldh * scale + 0.5), int(oldw * scale + 0.5)

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return self.get_preprocess_shape(original_size[0], original_size[1], self.target_length)

    def apply_image(self, image_rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB → resized uint8 RGB (longest side ``target_length``)."""
        return pil_bilinear_resize(image_rgb, self.input_size(image_rgb.shape[:2]))

    def preprocess(self, image_rgb: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB → float32 [1,3,S,S]: resized, normalised, zero-padded
        bottom-right (the padding is 0 *after* normalisation, as ``Sam.preprocess``)."""
        resized = self.apply_image(image_rgb)
        h, w = resized.shape[:2]
        out = np.zeros((1, 3, self.target_length, self.target_length), np.float32)
        chw = resized.transpose(2, 0, 1).astype(np.float32)
        out[0, :, :h, :w] = (chw - self.pixel_mean) / self.pixel_std
        return out

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """[..., 2] xy pixels of the original image → float64 pixels of the resized image."""
        old_h, old_w = original_size
        new_h, new_w = self.input_size(original_size)
        out = np.array(coords, dtype=np.float64, copy=True)
        out[..., 0] *= new_w / old_w
        out[..., 1] *= new_h / old_h
        return out

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """[N,4] xyxy → [N,4] xyxy in the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def postprocess_matrices(self, original_size: tuple[int, int],
                             low_res: int = LOW_RES) -> tuple[np.ndarray, np.ndarray]:
        """(Ay [H,256], Ax [W,256]) float32 with ``logits_HxW = Ay @ low @ Ax.T`` equal to
        segment-anything's ``Sam.postprocess_masks``: bilinear (align_corners=False, no
        antialias) 256 → S, crop to the resized image, bilinear to the original size. Both
        steps are linear per axis, so they compose into one matrix per axis (cached)."""
        key = (int(original_size[0]), int(original_size[1]), int(low_res))
        cache = self.__dict__.setdefault("_pp_cache", {})
        if key not in cache:
            ih, iw = self.input_size(original_size)
            up = _bilinear_matrix(low_res, self.target_length)
            ay = _bilinear_matrix(ih, key[0]) @ up[:ih]
            ax = _bilinear_matrix(iw, key[1]) @ up[:iw]
            if len(cache) > 8:
                cache.clear()
            cache[key] = (ay.astype(np.float32), ax.astype(np.float32))
        return cache[key]

    def postprocess_masks(self, low_res: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """[N,K,256,256] logits → [N,K,H,W] float32 logits at the original size, as
        segment-anything's ``Sam.postprocess_masks`` (see :meth:`postprocess_matrices`)."""
        low_res = np.asarray(low_res, np.float32)
        ay, ax = self.postprocess_matrices(original_size, low_res.shape[-1])
        return np.matmul(np.matmul(ay, low_res), ax.T)


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float64 interpolation matrix of ``F.interpolate(mode='bilinear',
    align_corners=False)`` along one axis. Source positions and weights are computed in
    float32 as torch's CPU kernel does (``scale = in / out`` in float32), so the matrix
    reproduces torch's sampling positions, not just the exact-arithmetic ones."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
    src = np.maximum(src, f32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    l1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
    l0 = f32(1.0) - l1
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), l0.astype(np.float64))
    np.add.at(m, (rows, i1), l1.astype(np.float64))
    return m

