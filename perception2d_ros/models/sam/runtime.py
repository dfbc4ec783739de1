"""Segment Anything (SAM) runtime: preprocessing, batched prompting, postprocessing.

ROS-free and torch-free: the image encoder and the prompt decoder run as ONNX models through
:mod:`perception2d_ros.engines.engines` (ONNX Runtime or TensorRT). The ONNX files come from
:func:`perception2d_ros.models.sam.export.export_onnx` (official segment-anything ViT-B/L/H or
MobileSAM ``vit_t`` checkpoints, loaded weights-only). MobileSAM only swaps the image encoder
(TinyViT, same [1,256,64,64] embedding): prompts, decoder and postprocessing are SAM's.

Usage follows ``segment_anything.SamPredictor``: encode once, prompt many times::

    seg = SamSegmenter.from_exported(export_dir)
    seg.set_image(image_bgr, frame_id=42)        # one encoder run, embedding cached
    res = seg.predict(boxes=[[10, 20, 200, 300]])   # one decoder run for all prompts
    ids = instance_id_image(res)                  # uint16 HxW, 0 = background

Coordinates are pixels of the original image, x right, y down; boxes are ``xyxy`` in the
same pixel-edge convention as segment-anything (no +1). Every stage of the pipeline matches
segment-anything's: :class:`ResizeLongestSide` reproduces its PIL bilinear resize bit for bit,
normalisation and bottom-right zero padding are its ``Sam.preprocess``, prompts are embedded
exactly as its ``PromptEncoder`` does (boxes = two corner points with labels 2 and 3; a point
prompt without a box gets one padding point with label -1), masks are upscaled as its
``Sam.postprocess_masks`` and thresholded at ``mask_threshold`` (0.0 logits), stability is its
``calculate_stability_score``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from perception2d_ros.engines.base import Engine
from perception2d_ros.engines.factory import EngineConfig, create_engine

LOG = logging.getLogger("perception2d.sam")

IMAGE_SIZE = 1024                 # encoder input side (padded square)
EMBED_SIZE = 64                   # image embedding side (IMAGE_SIZE / patch 16)
EMBED_DIM = 256
LOW_RES = 256                     # decoder mask side (4 x EMBED_SIZE)
PIXEL_MEAN = (123.675, 116.28, 103.53)   # RGB, segment_anything.modeling.Sam defaults
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0
STABILITY_OFFSET = 1.0
ARCHS = ("vit_b", "vit_l", "vit_h", "vit_t")     # vit_t: MobileSAM (TinyViT encoder)
ARCH_ALIASES = {"mobile_sam": "vit_t"}

# point labels (segment-anything convention)
LABEL_PAD, LABEL_NEG, LABEL_POS, LABEL_BOX_TL, LABEL_BOX_BR = -1, 0, 1, 2, 3

META_FILE = "sam.json"
ENCODER_INPUT = "image"
ENCODER_OUTPUT = "image_embeddings"
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input",
                  "has_mask_input")
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")


class SamError(RuntimeError):
    """SAM could not run: no image set, bad prompts, missing or inconsistent exported files."""


# --------------------------------------------------------------------------- resize (PIL exact)
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


# --------------------------------------------------------------------------- metrics
def stability_score(logits: np.ndarray, mask_threshold: float = MASK_THRESHOLD,
                    offset: float = STABILITY_OFFSET) -> np.ndarray:
    """segment-anything's ``calculate_stability_score``: IoU of the masks thresholded at
    ``threshold + offset`` and ``threshold - offset``; over the last two axes, float32.
    An empty low-threshold mask (union 0) gives NaN, as in segment-anything."""
    inter = (logits > (mask_threshold + offset)).sum(axis=(-1, -2), dtype=np.int64)
    union = (logits > (mask_threshold - offset)).sum(axis=(-1, -2), dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (inter / union).astype(np.float32)


def mask_bboxes(masks: np.ndarray) -> np.ndarray:
    """[N,H,W] bool → [N,4] int32 ``xyxy`` boxes of the masks in pixel-edge coordinates
    (x2 = last column + 1, as COCO's x + w); an empty mask gives [0,0,0,0]."""
    masks = np.asarray(masks, bool)
    out = np.zeros((masks.shape[0], 4), np.int32)
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    for i in range(masks.shape[0]):
        ys = np.flatnonzero(rows[i])
        xs = np.flatnonzero(cols[i])
        if ys.size:
            out[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# --------------------------------------------------------------------------- results
@dataclass
class SamResult:
    """Masks for N prompts on one image; identical whatever backend ran the model.

    masks            (N, H, W) bool — the chosen mask per prompt at the original image size
                     (logit > ``mask_threshold``).
    scores           (N,) float32 — the model's predicted IoU of the chosen mask.
    stability        (N,) float32 — stability score of the chosen mask (segment-anything's
                     ``calculate_stability_score`` on the upscaled logits, offset 1.0).
    chosen           (N,) int64 — index of the chosen mask among the K candidates.
    low_res_logits   (N, K, 256, 256) float32 — decoder logits of all K candidates in the
                     padded 1024 encoder frame (K = 3 with multimask, else 1); pass
                     ``low_res_logits[i, chosen[i]]`` back as ``mask_input`` to refine.
    iou_predictions  (N, K) float32 — predicted IoU of every candidate.
    image_size       (H, W) of the original image; ``frame_id`` of the embedding used.
    """

    masks: np.ndarray
    scores: np.ndarray
    stability: np.ndarray
    chosen: np.ndarray
    low_res_logits: np.ndarray
    iou_predictions: np.ndarray
    image_size: tuple[int, int]
    frame_id: Any = None
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def areas(self) -> np.ndarray:
        """(N,) int64 mask areas in pixels."""
        return self.masks.reshape(len(self), -1).sum(axis=1, dtype=np.int64)

    @property
    def bboxes(self) -> np.ndarray:
        """(N, 4) int32 ``xyxy`` boxes of the masks (see :func:`mask_bboxes`)."""
        return mask_bboxes(self.masks)


def instance_id_image(result: SamResult, scores: np.ndarray | None = None) -> np.ndarray:
    """Instance-id image of a result: uint16 (H, W), 0 = background, prompt i → id i + 1.

    Overlaps: the mask with the larger score wins (``scores`` defaults to ``result.scores``,
    the predicted IoU); on equal scores the lower prompt index wins. NaN scores rank lowest.
    At most 65535 prompts."""
    n = len(result)
    if n > 65535:
        raise ValueError(f"{n} masks do not fit a uint16 instance image")
    h, w = result.image_size
    ids = np.zeros((h, w), np.uint16)
    s = np.asarray(result.scores if scores is None else scores, np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    # paint ascending: lowest score first, ties painted high index first → low index wins
    order = np.lexsort((-np.arange(n), s))
    for i in order:
        ids[result.masks[i]] = i + 1
    return ids


# --------------------------------------------------------------------------- prompts
def build_prompts(boxes: Any = None, points: Any = None, point_labels: Any = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Prompts in original-image pixels → decoder point arrays (unscaled) ``coords``
    [N,P,2] float64 and ``labels`` [N,P] float32, exactly as segment-anything's
    ``PromptEncoder`` orders them.

    boxes         [N,4] xyxy (or [4] for one box) → two corner points labelled 2, 3.
    points        [N,P,2] xy (N prompts of P points), or [P,2] = one prompt of P points.
    point_labels  [N,P] (or [P]): 1 foreground, 0 background, -1 ignored (ragged prompts).
    Points and boxes together must have the same N: prompt i = its points, then its box.
    Points without a box get one padding point (0,0) with label -1, as segment-anything adds.
    """
    box_arr = None
    if boxes is not None:
        box_arr = np.asarray(boxes, dtype=np.float64)
        if box_arr.ndim == 1:
            box_arr = box_arr[None]
        if box_arr.ndim != 2 or box_arr.shape[1] != 4:
            raise SamError(f"boxes must be [N,4] xyxy, got shape {box_arr.shape}")
        if box_arr.shape[0] == 0:
            box_arr = None if points is None else box_arr
    pts = None
    if points is not None:
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim == 2:
            pts = pts[None]
        if pts.ndim != 3 or pts.shape[2] != 2:
            raise SamError(f"points must be [N,P,2] or [P,2] xy, got shape {pts.shape}")
        if point_labels is None:
            raise SamError("point_labels are required with points (1 = fg, 0 = bg)")
        lab = np.asarray(point_labels, dtype=np.float32)
        if lab.ndim == 1:
            lab = lab[None]
        if lab.shape != pts.shape[:2]:
            raise SamError(f"point_labels shape {lab.shape} does not match points "
                           f"{pts.shape[:2]}")
        if not np.isin(lab, (LABEL_PAD, LABEL_NEG, LABEL_POS)).all():
            raise SamError("point_labels must be 1 (foreground), 0 (background) or -1 (ignore)")
    elif point_labels is not None:
        raise SamError("point_labels given without points")
    if pts is None and box_arr is None:
        return np.zeros((0, 0, 2)), np.zeros((0, 0), np.float32)
    if pts is not None and box_arr is not None:
        if pts.shape[0] != box_arr.shape[0]:
            raise SamError(f"{pts.shape[0]} point prompts but {box_arr.shape[0]} boxes; "
                           "with both, prompt i is points[i] + boxes[i]")
        corners = box_arr.reshape(-1, 2, 2)
        coords = np.concatenate([pts, corners], axis=1)
        labels = np.concatenate(
            [lab, np.tile(np.float32([LABEL_BOX_TL, LABEL_BOX_BR]), (len(corners), 1))], axis=1)
    elif box_arr is not None:
        coords = box_arr.reshape(-1, 2, 2)
        labels = np.tile(np.float32([LABEL_BOX_TL, LABEL_BOX_BR]), (len(coords), 1))
    else:
        assert pts is not None
        coords = np.concatenate([pts, np.zeros((pts.shape[0], 1, 2))], axis=1)
        labels = np.concatenate([lab, np.full((lab.shape[0], 1), LABEL_PAD, np.float32)], axis=1)
    return coords, labels.astype(np.float32)


# --------------------------------------------------------------------------- exported files
@dataclass(frozen=True)
class SamModelFiles:
    """An exported SAM: ONNX files and the sidecar metadata (``sam.json``)."""

    encoder: Path
    decoder: Path                  # multimask: K = 3
    decoder_single: Path | None    # single mask: K = 1
    meta: dict[str, Any]

    @classmethod
    def load(cls, where: str | Path | Mapping[str, Any]) -> "SamModelFiles":
        """From an export directory, its ``sam.json``, or the dict ``export_onnx`` returns."""
        if isinstance(where, Mapping):
            meta_path = Path(where["meta"])
        else:
            p = Path(where)
            meta_path = p / META_FILE if p.is_dir() else p
        if not meta_path.is_file():
            raise SamError(f"SAM export metadata not found: {meta_path} (export with "
                           "`perception2d models export` or sam_export.export_onnx)")
        meta = json.loads(meta_path.read_text())
        root = meta_path.parent
        files = meta.get("files", {})
        for key in ("encoder", "decoder"):
            if key not in files:
                raise SamError(f"{meta_path}: files.{key} missing")
        single = files.get("decoder_single")
        return cls(encoder=root / files["encoder"]["path"], decoder=root / files["decoder"]["path"],
                   decoder_single=root / single["path"] if single else None, meta=meta)


def _decoder_profiles(max_prompts: int, max_points: int) -> dict[str, list[list[int]]]:
    opt_n, opt_p = min(8, max_prompts), min(3, max_points)
    return {
        "point_coords": [[1, 1, 2], [opt_n, opt_p, 2], [max_prompts, max_points, 2]],
        "point_labels": [[1, 1], [opt_n, opt_p], [max_prompts, max_points]],
        "mask_input": [[1, 1, LOW_RES, LOW_RES], [opt_n, 1, LOW_RES, LOW_RES],
                       [max_prompts, 1, LOW_RES, LOW_RES]],
        "has_mask_input": [[1], [opt_n], [max_prompts]],
    }


class SamWeightsMissing(SamError):
    """No SAM weights / export available; the message says how to get them."""


def weights_help(name: str = "sam_vit_b") -> str:
    return (f"get the official weights with `perception2d models fetch {name}`, or pass "
            "--checkpoint PATH to an official segment-anything checkpoint (sam_vit_b_01ec64.pth, "
            "sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth from "
            "https://github.com/facebookresearch/segment-anything#model-checkpoints) or "
            "MobileSAM's mobile_sam.pt (https://github.com/ChaoningZhang/MobileSAM); it is "
            "exported to ONNX on first use and cached")


def default_export_cache() -> Path:
    """Where checkpoints are exported on first use: ``$PERCEPTION2D_CACHE_DIR/sam``."""
    from perception2d_ros.engines.base import default_cache_dir

    return default_cache_dir() / "sam"


def _export_checkpoint(checkpoint: Path, arch: str | None, out_dir: Path) -> SamModelFiles:
    try:
        from perception2d_ros.models.sam import export as sam_export
        result = sam_export.export_onnx(arch, checkpoint, out_dir)
    except ImportError as exc:
        raise SamError(
            f"exporting {checkpoint} to ONNX needs torch and segment-anything (MobileSAM: "
            f"mobilesam-mirror and timm) ({exc}); install requirements/test.txt, or export on "
            "another machine with `perception2d models export` and copy the export directory"
        ) from exc
    except (ValueError, OSError, RuntimeError) as exc:
        raise SamError(f"cannot export {checkpoint}: {exc}") from exc
    return SamModelFiles.load(result)


def resolve_model_files(model: str | Path | None = "sam_vit_b", *,
                        checkpoint: str | Path | None = None, arch: str | None = None,
                        models_dir: str | Path | None = None,
                        cache_dir: str | Path | None = None) -> SamModelFiles:
    """Find (or make) the ONNX export to run.

    ``checkpoint`` (an official ``.pth``) wins: exported once into ``cache_dir`` (default
    :func:`default_export_cache`) keyed by its sha256. Otherwise ``model`` is an export
    directory / ``sam.json``, or a manifest name (kind ``sam``) whose file is a checkpoint
    (export looked up in the models dir, then the cache; exported into the cache on first
    use) or a ``sam.json``. Raises :class:`SamWeightsMissing` with instructions when
    nothing is available."""
    from perception2d_ros.engines.model_store import ModelFileError, load_manifest, models_dir as _models_dir, resolve

    cache = Path(cache_dir) if cache_dir else default_export_cache()
    if checkpoint is not None:
        ck = Path(checkpoint).expanduser()
        if not ck.is_file():
            raise SamWeightsMissing(f"checkpoint not found: {ck}; {weights_help()}")
        return _export_checkpoint(ck, arch, cache)
    if model is None:
        raise SamWeightsMissing(f"no SAM model given; {weights_help()}")
    p = Path(str(model)).expanduser()
    if p.is_dir() or (p.suffix == ".json" and p.is_file()):
        return SamModelFiles.load(p)
    if p.suffix in (".pth", ".pt") and p.is_file():
        return _export_checkpoint(p, arch, cache)
    name = str(model)
    try:
        path, entry = resolve(name, models_dir)
    except (ModelFileError, ValueError, OSError) as exc:
        known = [n for n, e in _safe_manifest(load_manifest, models_dir).items()
                 if e.kind == "sam"]
        hint = f" (known SAM models: {', '.join(sorted(known))})" if known else ""
        msg = str(exc).rstrip(".")
        how = ("or pass --checkpoint PATH to an official segment-anything or MobileSAM .pth; "
               "it is exported to ONNX on first use and cached" if "models fetch" in msg
               else weights_help(name if name in known else "sam_vit_b"))
        raise SamWeightsMissing(f"SAM model '{name}' is not available{hint}: {msg}; {how}"
                                ) from exc
    if path.suffix == ".json" or path.is_dir():
        return SamModelFiles.load(path)
    recipe = entry.extra.get("export") if entry else None
    want_arch = arch or (entry.extra.get("arch") if entry else None) or (
        recipe.get("arch") if isinstance(recipe, dict) else None)
    from perception2d_ros.engines.model_store import sha256_file

    tag = sha256_file(path)[:12]
    for root in (_models_dir(models_dir), cache):
        for cand in sorted(Path(root).glob(f"sam_*_{tag}")):
            if (cand / META_FILE).is_file():
                files = SamModelFiles.load(cand)
                if files.meta.get("checkpoint", {}).get("sha256", "").startswith(tag):
                    return files
    return _export_checkpoint(path, want_arch, cache)


def _safe_manifest(loader: Any, directory: Any) -> dict:
    try:
        return loader(directory)
    except Exception:  # a broken manifest must not hide the real error
        return {}


# --------------------------------------------------------------------------- segmenter
class SamSegmenter:
    """SAM with a cached image embedding: :meth:`set_image` (one encoder run per frame)
    then :meth:`predict` (one decoder run per ``max_batch`` prompts).

    ``select`` picks the mask among the K = 3 multimask candidates: ``"iou"`` (highest
    predicted IoU, segment-anything's usual choice) or ``"stability"`` (highest stability
    score). ``encoder_calls`` / ``decoder_calls`` count engine runs.
    """

    def __init__(self, encoder: Engine, decoder: Engine, decoder_single: Engine | None = None,
                 *, image_size: int = IMAGE_SIZE, pixel_mean: Sequence[float] = PIXEL_MEAN,
                 pixel_std: Sequence[float] = PIXEL_STD, select: str = "iou",
                 mask_threshold: float = MASK_THRESHOLD,
                 stability_offset: float = STABILITY_OFFSET, max_batch: int = 32,
                 meta: Mapping[str, Any] | None = None,
                 device_tensors: bool | None = None) -> None:
        if select not in ("iou", "stability"):
            raise ValueError(f"select must be 'iou' or 'stability', got '{select}'")
        self.encoder = encoder
        self.decoder = decoder
        self.decoder_single = decoder_single
        self.transform = ResizeLongestSide(image_size, pixel_mean, pixel_std)
        self.select = select
        self.mask_threshold = float(mask_threshold)
        self.stability_offset = float(stability_offset)
        self.max_batch = int(max_batch)
        self.meta = dict(meta or {})
        self.encoder_calls = 0
        self.decoder_calls = 0
        self.last_timings: dict[str, float] = {}
        # torch engines on one device: the image, the embedding and the mask upscaling stay
        # on it (engines/device.py); auto = on for CUDA, where the host round trips cost most
        from perception2d_ros.engines.device import torch_device_of

        devs = {torch_device_of(e) for e in (encoder, decoder, decoder_single) if e is not None}
        dev = devs.pop() if len(devs) == 1 else None
        if device_tensors and dev is None:
            raise SamError("device_tensors needs the encoder and decoders on one torch device")
        self.device = dev if (device_tensors or (device_tensors is None and dev is not None
                                                 and dev.startswith("cuda"))) else None
        self.reset_image()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_exported(cls, where: str | Path | Mapping[str, Any] | SamModelFiles,
                      config: EngineConfig | None = None, *, max_points: int = 16,
                      **kwargs: Any) -> "SamSegmenter":
        """Engines for an export (directory, ``sam.json`` or ``export_onnx``'s dict).
        ``config`` applies to both engines; TensorRT gets decoder shape profiles up to
        ``max_batch`` prompts of ``max_points`` points."""
        files = where if isinstance(where, SamModelFiles) else SamModelFiles.load(where)
        cfg = config or EngineConfig()
        max_batch = int(kwargs.get("max_batch", 32))
        enc = create_engine(files.encoder, replace(cfg, profiles={}))
        dcfg = replace(cfg, profiles=_decoder_profiles(max_batch, max_points))
        dec = create_engine(files.decoder, dcfg)
        single = create_engine(files.decoder_single, dcfg) if files.decoder_single else None
        meta = files.meta
        return cls(enc, dec, single, image_size=int(meta.get("image_size", IMAGE_SIZE)),
                   pixel_mean=meta.get("pixel_mean", PIXEL_MEAN),
                   pixel_std=meta.get("pixel_std", PIXEL_STD), meta=meta, **kwargs)

    def close(self) -> None:
        for e in (self.encoder, self.decoder, self.decoder_single):
            if e is not None:
                e.close()

    # ----------------------------------------------------------------- image
    def reset_image(self) -> None:
        self.embedding: np.ndarray | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.frame_id: Any = None

    @property
    def is_image_set(self) -> bool:
        return self.embedding is not None

    def preprocess(self, image: np.ndarray, image_format: str = "BGR") -> np.ndarray:
        """HxWx3 uint8 image → encoder input float32 [1,3,1024,1024]."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SamError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")
        if image_format not in ("BGR", "RGB"):
            raise ValueError("image_format must be 'BGR' or 'RGB'")
        rgb = image[:, :, ::-1] if image_format == "BGR" else image
        return self.transform.preprocess(np.ascontiguousarray(rgb))

    def set_image(self, image: np.ndarray, frame_id: Any = None,
                  image_format: str = "BGR") -> bool:
        """Encode ``image`` (HxWx3 uint8, BGR by default) and cache the embedding.

        With a ``frame_id`` equal to the cached one (and the same image size) the cached
        embedding is reused and the encoder does not run. Returns True if it ran."""
        on_device = self.device is not None and not isinstance(image, np.ndarray)
        if not on_device:
            image = np.asarray(image)
        size = (int(image.shape[0]), int(image.shape[1]))
        if (frame_id is not None and self.is_image_set and frame_id == self.frame_id
                and size == self.original_size):
            return False
        t0 = time.perf_counter()
        if self.device is not None:
            from perception2d_ros.models.sam.device import sam_preprocess

            if not on_device:
                import torch

                if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                    raise SamError(f"expected an HxWx3 uint8 image, got {image.shape} "
                                   f"{image.dtype}")
                image = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
            tensor = sam_preprocess(image, self.transform, image_format)
            t1 = time.perf_counter()
            out = self.encoder.infer_tensors({ENCODER_INPUT: tensor})
        else:
            tensor = self.preprocess(image, image_format)
            t1 = time.perf_counter()
            out = self.encoder.infer({ENCODER_INPUT: tensor})
        self.encoder_calls += 1
        emb = out[ENCODER_OUTPUT] if ENCODER_OUTPUT in out else next(iter(out.values()))
        self.set_embedding(emb, size, frame_id)
        self.last_timings = {"preprocess_s": t1 - t0, "encoder_s": time.perf_counter() - t1}
        return True

    def set_embedding(self, embedding: np.ndarray, original_size: tuple[int, int],
                      frame_id: Any = None) -> None:
        """Use a precomputed embedding [1,256,64,64] float32 of an image of ``original_size``
        (H, W) — e.g. from another process or the reference model. On the device path the
        embedding is kept as a device tensor (a copy: engine outputs are reused buffers)."""
        if self.device is not None:
            import torch

            emb = (embedding.detach().clone() if isinstance(embedding, torch.Tensor)
                   else torch.from_numpy(np.array(embedding, np.float32))).to(self.device)
        else:
            emb = np.ascontiguousarray(embedding, dtype=np.float32)
        if tuple(emb.shape) != (1, EMBED_DIM, EMBED_SIZE, EMBED_SIZE):
            raise SamError(f"image embedding must be [1,{EMBED_DIM},{EMBED_SIZE},{EMBED_SIZE}], "
                           f"got {emb.shape}")
        self.embedding = emb
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = self.transform.input_size(self.original_size)
        self.frame_id = frame_id

    # ----------------------------------------------------------------- prompts
    def predict(self, boxes: Any = None, points: Any = None, point_labels: Any = None,
                multimask: bool = True, mask_input: np.ndarray | None = None,
                frame_id: Any = None) -> SamResult:
        """Masks for N prompts on the current image (see :func:`build_prompts` for the
        prompt layout). All prompts go through one decoder run (chunks of ``max_batch``).

        mask_input  optional [N,256,256] or [N,1,256,256] float32 low-res logits from a
                    previous result (per prompt; NaN-free); absent → no mask prompt.
        frame_id    if given, must equal the frame id of the cached embedding.
        Returns a :class:`SamResult` with K = 3 candidates when ``multimask`` else 1."""
        if not self.is_image_set:
            raise SamError("no image set: call set_image() before predict()")
        if frame_id is not None and frame_id != self.frame_id:
            raise SamError(f"prompts are for frame {frame_id!r} but the cached embedding is "
                           f"of frame {self.frame_id!r}")
        assert self.original_size is not None
        coords, labels = build_prompts(boxes, points, point_labels)
        n = coords.shape[0]
        h, w = self.original_size
        k = 3 if multimask else 1
        if n == 0:
            return SamResult(np.zeros((0, h, w), bool), np.zeros(0, np.float32),
                             np.zeros(0, np.float32), np.zeros(0, np.int64),
                             np.zeros((0, k, LOW_RES, LOW_RES), np.float32),
                             np.zeros((0, k), np.float32), (h, w), self.frame_id)
        coords = self.transform.apply_coords(coords, self.original_size).astype(np.float32)
        if mask_input is None:
            masks_in = np.zeros((n, 1, LOW_RES, LOW_RES), np.float32)
            has_mask = np.zeros((n,), np.float32)
        else:
            masks_in = np.asarray(mask_input, np.float32).reshape(n, 1, LOW_RES, LOW_RES)
            has_mask = np.ones((n,), np.float32)
        decoder = self.decoder if multimask else self.decoder_single
        if decoder is None:
            raise SamError("this export has no single-mask decoder; use multimask=True")
        t0 = time.perf_counter()
        if self.device is not None:
            return self._predict_device(decoder, coords, labels, masks_in, has_mask)
        lows, ious = [], []
        for s in range(0, n, self.max_batch):
            e = slice(s, s + self.max_batch)
            out = decoder.infer({
                "image_embeddings": self.embedding,
                "point_coords": np.ascontiguousarray(coords[e]),
                "point_labels": np.ascontiguousarray(labels[e]),
                "mask_input": np.ascontiguousarray(masks_in[e]),
                "has_mask_input": np.ascontiguousarray(has_mask[e]),
            })
            self.decoder_calls += 1
            lows.append(np.asarray(out["low_res_masks"], np.float32))
            ious.append(np.asarray(out["iou_predictions"], np.float32))
        low = np.concatenate(lows)
        iou = np.concatenate(ious)
        t1 = time.perf_counter()
        result = self.postprocess(low, iou)
        result.timings = {"decoder_s": t1 - t0, "postprocess_s": time.perf_counter() - t1}
        return result

    def _predict_device(self, decoder: Engine, coords: np.ndarray, labels: np.ndarray,
                        masks_in: np.ndarray, has_mask: np.ndarray) -> SamResult:
        """:meth:`predict` with the embedding, the decoder outputs and the mask upscaling on
        the device; only the final masks and the small arrays come back."""
        import torch

        from perception2d_ros.models.sam.device import sam_postprocess

        assert self.original_size is not None
        t0 = time.perf_counter()
        lows, ious = [], []
        for s in range(0, coords.shape[0], self.max_batch):
            e = slice(s, s + self.max_batch)
            feeds = _pad_prompts(coords[e], labels[e], masks_in[e], has_mask[e])
            m = min(coords.shape[0] - s, self.max_batch)
            out = decoder.infer_tensors({"image_embeddings": self.embedding, **feeds})
            self.decoder_calls += 1
            # copies (outputs are reused buffers), without the padding prompts
            lows.append(out["low_res_masks"][:m].float())
            ious.append(out["iou_predictions"][:m].float())
        low, iou = torch.cat(lows), torch.cat(ious)
        t1 = time.perf_counter()
        masks, scores, stab, chosen = sam_postprocess(
            low, iou, self.transform, self.original_size, self.select, self.mask_threshold,
            self.stability_offset)
        result = SamResult(masks=masks.cpu().numpy(), scores=scores.astype(np.float32),
                           stability=stab.astype(np.float32), chosen=chosen,
                           low_res_logits=low.cpu().numpy(), iou_predictions=iou.cpu().numpy(),
                           image_size=self.original_size, frame_id=self.frame_id)
        result.timings = {"decoder_s": t1 - t0, "postprocess_s": time.perf_counter() - t1}
        result.device_masks = masks   # the same masks on the device (engines.device.combine_masks)
        return result

    def postprocess(self, low_res: np.ndarray, iou_predictions: np.ndarray) -> SamResult:
        """Decoder outputs → :class:`SamResult` for the current image: pick one candidate
        per prompt (``select``), upscale it to the original size, threshold, stability."""
        assert self.original_size is not None
        n, k = low_res.shape[:2]
        idx = np.arange(n)
        if self.select == "stability" and k > 1:
            logits = self.transform.postprocess_masks(low_res, self.original_size)
            stab_all = stability_score(logits, self.mask_threshold, self.stability_offset)
            chosen = np.argmax(np.nan_to_num(stab_all, nan=-1.0), axis=1)
            logits = logits[idx, chosen]
            stab = stab_all[idx, chosen]
        else:
            chosen = np.argmax(iou_predictions, axis=1) if k > 1 else np.zeros(n, np.int64)
            logits = self.transform.postprocess_masks(low_res[idx, chosen][:, None],
                                                      self.original_size)[:, 0]
            stab = stability_score(logits, self.mask_threshold, self.stability_offset)
        return SamResult(
            masks=logits > self.mask_threshold,
            scores=iou_predictions[idx, chosen].astype(np.float32),
            stability=stab.astype(np.float32),
            chosen=chosen.astype(np.int64),
            low_res_logits=low_res,
            iou_predictions=iou_predictions,
            image_size=self.original_size,
            frame_id=self.frame_id,
        )


def _pad_prompts(coords: np.ndarray, labels: np.ndarray, masks_in: np.ndarray,
                 has_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Decoder feeds with the prompt count rounded up to a power of two by padding prompts
    (all points label -1, no mask): the device path captures one CUDA graph per count, so
    counts 1..32 need 6 graphs instead of 32. Prompts are independent in the decoder, so the
    padding changes nothing in the real prompts' outputs."""
    n = coords.shape[0]
    size = 1 << max(0, (n - 1).bit_length())
    if size == n:
        return {"point_coords": coords, "point_labels": labels, "mask_input": masks_in,
                "has_mask_input": has_mask}
    extra = size - n

    def pad(a: np.ndarray, value: float) -> np.ndarray:
        return np.concatenate([a, np.full((extra,) + a.shape[1:], value, a.dtype)])

    return {"point_coords": pad(coords, 0.0), "point_labels": pad(labels, -1.0),
            "mask_input": pad(masks_in, 0.0), "has_mask_input": pad(has_mask, 0.0)}


# --------------------------------------------------------------------------- evaluation
def evaluate_coco_masks(segmenter: SamSegmenter, images_dir: str | Path,
                        annotations: str | Path, *, max_images: int | None = None,
                        multimask: bool = False, progress: Any = None) -> dict[str, Any]:
    """Box-prompted mask quality on COCO: every non-crowd GT box of an image is a prompt
    (one encoder run per image, one decoder run for its boxes); each predicted mask is
    compared with its GT instance mask (polygons / RLE decoded with pycocotools).

    Returns ``{"miou", "instances", "images", "per_image": [{file_name, instances, miou}],
    "ious": [...]}`` — mIoU is the mean over instances. Images absent from ``images_dir`` are
    skipped (counted in ``missing_images``)."""
    import cv2

    try:
        from pycocotools.coco import COCO
    except ImportError as exc:  # pragma: no cover - pycocotools is in requirements/test.txt
        raise SamError("`eval masks` needs pycocotools (pip install pycocotools)") from exc
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotations))
    images_dir = Path(images_dir)
    ious: list[float] = []
    per_image = []
    missing = 0
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        path = images_dir / info["file_name"]
        if not path.is_file():
            missing += 1
            continue
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
                if a.get("area", 1) > 0 and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        if not anns:
            continue
        if max_images is not None and len(per_image) >= max_images:
            break
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SamError(f"cannot read image {path}")
        boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)])
        segmenter.set_image(image, frame_id=("coco", img_id))
        res = segmenter.predict(boxes=boxes, multimask=multimask)
        img_ious = [mask_iou(res.masks[i], coco.annToMask(a).astype(bool))
                    for i, a in enumerate(anns)]
        ious.extend(img_ious)
        per_image.append({"file_name": info["file_name"], "instances": len(anns),
                          "miou": float(np.mean(img_ious))})
        if progress is not None:
            progress(f"{info['file_name']}: {len(anns)} instances, mIoU {np.mean(img_ious):.3f}")
    return {"miou": float(np.mean(ious)) if ious else float("nan"), "instances": len(ious),
            "images": len(per_image), "missing_images": missing, "multimask": multimask,
            "per_image": per_image, "ious": ious}
