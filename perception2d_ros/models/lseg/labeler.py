"""LSeg runtime (ROS-free): image -> per-pixel CLIP embeddings (engine) -> label map (numpy).

The exported engine maps a letterboxed, normalised image to L2-normalised pixel embeddings at
stride 2 (see :mod:`perception2d_ros.models.lseg.model` for the export contract). The label map is
computed here from those and the vocabulary's CLIP text embeddings (N, 512), resampled exactly
as the official lang-seg evaluator does (``additional_utils/models.py``, ``lseg_net.py``):

    input:  normalised image resized bilinear, align_corners=True, long side = input side,
            short side int(x + 0.5); padded bottom/right with the value of a black pixel
    logits = logit_scale * <pixel, text>                     (N, h, w) at stride 2
    [optional lang-seg head blocks on the logits, 3x3 kernel from the sidecar]
    x2 bilinear upsample (align_corners=True), crop the padding, bilinear resize to the image
    (align_corners=True)
    label = argmax over N;  label = ``other_value`` where max(logits)/logit_scale < threshold

so changing the vocabulary (reordering, adding phrases) is an array change, never an engine
rebuild. Without head blocks max(logits)/logit_scale is the cosine similarity of the pixel to
its best phrase; the "other" threshold is on that value. ``scales`` / ``flip`` give lang-seg's
multi-size and mirrored evaluation (:func:`evaluate_multiscale`); the default is one scale.
"""
from __future__ import annotations

import colorsys
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

DEFAULT_OTHER = 255


# --------------------------------------------------------------------------- metadata
@dataclass(frozen=True)
class HeadBlock:
    """lang-seg spatial regularisation block on the logits (arch_option 1 / 2)."""

    kind: str                 # bottleneck | depthwise
    activation: str           # relu | lrelu | tanh
    block_depth: int
    weight: np.ndarray        # (3, 3) correlation kernel (torch conv2d semantics)
    bias: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "HeadBlock | None":
        if not d:
            return None
        return cls(kind=str(d["kind"]), activation=str(d["activation"]),
                   block_depth=int(d["block_depth"]),
                   weight=np.asarray(d["weight"], np.float32).reshape(3, 3),
                   bias=float(d["bias"]))


@dataclass(frozen=True)
class LSegMeta:
    """What the runtime needs to know about an exported LSeg image encoder (its sidecar)."""

    input_size: tuple[int, int] = (480, 480)          # H, W
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pad_value: int = 0                                  # letterbox fill (pixel value)
    embed_stride: int = 2
    embed_dim: int = 512
    logit_scale: float = 1.0 / 0.07
    head_block: HeadBlock | None = None
    input_name: str = "image"
    output_name: str = "pixel_embeds"
    text_model: str = "ViT-B-32"
    text_templates: tuple[str, ...] = ("{}",)
    arch: str = "lseg_vitl16_384"
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LSegMeta":
        arch = d.get("arch", {})
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),
            mean=tuple(float(v) for v in d.get("mean", (0.5, 0.5, 0.5))),
            std=tuple(float(v) for v in d.get("std", (0.5, 0.5, 0.5))),
            pad_value=int(d.get("pad_value", 0)),
            embed_stride=int(d.get("embed_stride", 2)),
            embed_dim=int(d.get("embed_dim", 512)),
            logit_scale=float(d.get("logit_scale", 1.0 / 0.07)),
            head_block=HeadBlock.from_dict(d.get("head_block")),
            input_name=str(d.get("input_name", "image")),
            output_name=str(d.get("output_name", "pixel_embeds")),
            text_model=str(d.get("text_model", "ViT-B-32")),
            text_templates=tuple(d.get("text_templates", ("{}",))),
            arch=str(arch.get("name", "?") if isinstance(arch, Mapping) else arch),
            raw=dict(d),
        )

    @classmethod
    def from_sidecar(cls, path: str | Path) -> "LSegMeta":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"LSeg sidecar {p} not found: it is written next to the ONNX by "
                "perception2d_ros.models.lseg.model.export_onnx")
        return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- preprocessing
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


def _pad_values(meta: "LSegMeta") -> np.ndarray:
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
    x = pad_to(normalized_resize(image_bgr, (rh, rw), meta), (ih, iw), _pad_values(meta))
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



# --------------------------------------------------------------------------- label maps
def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"text embeddings must be (N, D), got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def similarity_logits(pixel_embeds: np.ndarray, text_embeds: np.ndarray,
                      logit_scale: float) -> np.ndarray:
    """(D, h, w) normalised pixel embeddings x (N, D) text embeddings -> (N, h, w) logits
    (text embeddings are L2-normalised here)."""
    d, h, w = pixel_embeds.shape
    text = normalize_rows(text_embeds)
    if text.shape[1] != d:
        raise ValueError(f"text embeddings have dim {text.shape[1]}, pixel embeddings {d} "
                         "(LSeg needs CLIP ViT-B/32 text embeddings, 512-d)")
    logits = (text * np.float32(logit_scale)) @ pixel_embeds.reshape(d, h * w)
    return logits.reshape(len(text), h, w)


def _act(x: np.ndarray, name: str) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, 0)
    if name == "lrelu":
        return np.where(x >= 0, x, np.float32(0.01) * x)
    return np.tanh(x)


def apply_head_block(logits: np.ndarray, block: HeadBlock | None) -> np.ndarray:
    """lang-seg's head blocks on (N, h, w) logits: ``block_depth - 1`` activated blocks then
    one without activation; a 3x3 zero-padded correlation shared across classes (bottleneck:
    plus the per-pixel max over classes)."""
    if block is None:
        return logits
    kernel = block.weight.astype(np.float32)

    def one(x: np.ndarray, act: bool) -> np.ndarray:
        out = np.stack([cv2.filter2D(c, cv2.CV_32F, kernel, borderType=cv2.BORDER_CONSTANT)
                        for c in x]) + np.float32(block.bias)
        if block.kind == "bottleneck":
            out = out + x.max(axis=0, keepdims=True)
        return _act(out, block.activation) if act else out

    out = logits.astype(np.float32)
    for _ in range(block.block_depth - 1):
        out = one(out, True)
    return one(out, False)


@dataclass
class LabelMapResult:
    """``label_map`` (H, W) uint16 aligned to the input image: vocabulary index per pixel,
    ``other_value`` where no phrase passed the threshold."""

    label_map: np.ndarray
    other_value: int
    labels: tuple[str, ...] | None = None
    similarity: np.ndarray | None = None   # (H, W) float32: max(logits) / logit_scale
    confidence: np.ndarray | None = None   # (H, W) float32: softmax probability of the label
    num_classes: int = 0

    def counts(self) -> np.ndarray:
        """Pixels per class index (N,) followed by the "other" count (N + 1,)."""
        lm = self.label_map.ravel()
        valid = lm[lm != self.other_value]
        counts = np.bincount(valid, minlength=self.num_classes)[: self.num_classes]
        return np.append(counts, lm.size - valid.size)

    def shares(self) -> dict[str, float]:
        """Pixel share per label (by phrase if known, else index) plus ``"other"``."""
        c = self.counts().astype(np.float64) / max(1, self.label_map.size)
        names = self.labels or tuple(str(i) for i in range(self.num_classes))
        out = {n: float(v) for n, v in zip(names, c[:-1])}
        out["other"] = float(c[-1])
        return out

    def class_confidence(self) -> np.ndarray:
        """Mean confidence per class over its pixels (N,), NaN for absent classes."""
        if self.confidence is None:
            raise ValueError("segment(..., return_confidence=True) computes the confidence")
        lm = self.label_map.ravel()
        valid = lm != self.other_value
        sums = np.bincount(lm[valid], weights=self.confidence.ravel()[valid],
                           minlength=self.num_classes)[: self.num_classes]
        counts = self.counts()[:-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)


def _uniform2(label: np.ndarray) -> np.ndarray:
    """(h, w) bool: the 2x2 block of ``label`` starting at (y, x) (clamped at the border)
    holds one value."""
    right = np.concatenate([label[:, 1:], label[:, -1:]], axis=1)
    down = np.concatenate([label[1:], label[-1:]], axis=0)
    diag = np.concatenate([right[1:], right[-1:]], axis=0)
    return (label == right) & (label == down) & (label == diag)


def _bilinear(img: np.ndarray, ys: tuple, xs: tuple) -> np.ndarray:
    """(h, w) -> (H, W) with precomputed separable taps (i0, i1, w0, w1) per axis."""
    y0, y1, wy0, wy1 = ys
    x0, x1, wx0, wx1 = xs
    rows = img[y0] * wy0[:, None] + img[y1] * wy1[:, None]
    return rows[:, x0] * wx0[None] + rows[:, x1] * wx1[None]


def _gather(hwn: np.ndarray, ys: tuple, xs: tuple, r: np.ndarray, c: np.ndarray
            ) -> np.ndarray:
    """(k, N) bilinear samples of an (h, w, N) array at output pixels (r, c), in torch's
    order of operations (columns within a row first)."""
    y0, y1, wy0, wy1 = ys
    x0, x1, wx0, wx1 = xs
    a, b = wx0[c, None], wx1[c, None]
    return ((hwn[y0[r], x0[c]] * a + hwn[y0[r], x1[c]] * b) * wy0[r, None]
            + (hwn[y1[r], x0[c]] * a + hwn[y1[r], x1[c]] * b) * wy1[r, None])


def _chunks(r: np.ndarray, c: np.ndarray, n: int) -> Any:
    step = max(1, (1 << 21) // max(1, n))
    for s in range(0, r.size, step):
        yield r[s:s + step], c[s:s + step]


def official_taps(n_out: int, n_low: int, content: int, stride: int = 2
                  ) -> tuple[tuple, tuple]:
    """The two align_corners=True resampling steps of lang-seg's output along one axis:
    (x``stride`` upsample n_low -> stride * n_low, restricted to the first ``content``
    pixels) and (``content`` -> ``n_out``), each as (i0, i1, w0, w1)."""
    if not 1 <= content <= stride * n_low:
        raise ValueError(f"content {content} outside 1..{stride * n_low}")
    up = tuple(a[:content] for a in align_corners_taps(stride * n_low, n_low))
    return up, align_corners_taps(n_out, content)


def label_map_from_logits(logits: np.ndarray, out_size: tuple[int, int], *,
                          content: tuple[int, int] | None = None, stride: int = 2,
                          logit_scale: float = 1.0, other_threshold: float | None = None,
                          other_value: int = DEFAULT_OTHER, return_confidence: bool = False,
                          labels: Sequence[str] | None = None,
                          other_classes: Sequence[int] = ()) -> LabelMapResult:
    """(N, h, w) logits at ``stride`` -> :class:`LabelMapResult` of size ``out_size`` (H, W).

    The official resampling: x``stride`` bilinear upsample (align_corners=True), crop to
    ``content`` (h, w) (the letterbox content in network-input pixels; default: all), bilinear
    resize to ``out_size`` (align_corners=True), with precomputed taps
    (:func:`official_taps`). The label is exactly the argmax of the resampled logits,
    computed without resampling all N channels: where the 2x2 source pixels of a sample share
    one argmax, the interpolated argmax is that class (non-negative weights keep the order),
    so only samples on label boundaries interpolate all N logits -- at the network-input
    resolution, then at the image resolution (where the N logits of the network-input
    samples it draws on are computed on demand). ``similarity`` is max(resampled logits) /
    logit_scale. ``confidence`` (optional) is the softmax probability of the best phrase at
    the logit resolution, resampled the same way. Pixels won by one of ``other_classes``
    (catch-all phrases such as "other") and pixels below ``other_threshold`` get
    ``other_value``."""
    n, h, w = logits.shape
    if n == 0:
        raise ValueError("empty vocabulary")
    if n > other_value:
        raise ValueError(f"{n} phrases do not fit label values below other_value={other_value}")
    oh, ow = int(out_size[0]), int(out_size[1])
    ch, cw = (int(content[0]), int(content[1])) if content is not None else (stride * h,
                                                                            stride * w)
    up_y, out_y = official_taps(oh, h, ch, stride)
    up_x, out_x = official_taps(ow, w, cw, stride)
    logits = np.asarray(logits, np.float32)
    hwn = np.ascontiguousarray(logits.transpose(1, 2, 0))
    low_arg = logits.argmax(axis=0)
    low_max = logits.max(axis=0)
    # network-input resolution (the head's x2 upsample, padding cropped)
    mid_arg = low_arg[up_y[0]][:, up_x[0]]
    mid_max = _bilinear(low_max, up_y, up_x)
    mid_vec = np.empty((ch, cw, n), np.float32)          # filled only where needed
    have = ~_uniform2(low_arg)[up_y[0]][:, up_x[0]]
    for r, c in _chunks(*np.nonzero(have), n):
        vals = _gather(hwn, up_y, up_x, r, c)
        mid_vec[r, c] = vals
        mid_arg[r, c] = vals.argmax(axis=1)
        mid_max[r, c] = vals.max(axis=1)
    # image resolution
    y0, x0 = out_y[0], out_x[0]
    label = mid_arg.astype(np.uint16)[y0][:, x0]
    similarity = _bilinear(mid_max, out_y, out_x)
    edge_r, edge_c = np.nonzero(~_uniform2(mid_arg)[y0][:, x0])
    if edge_r.size:
        need = np.zeros((ch, cw), bool)
        for ty in (out_y[0], out_y[1]):
            for tx in (out_x[0], out_x[1]):
                need[ty[edge_r], tx[edge_c]] = True
        for r, c in _chunks(*np.nonzero(need & ~have), n):
            mid_vec[r, c] = _gather(hwn, up_y, up_x, r, c)
        for r, c in _chunks(edge_r, edge_c, n):
            vals = _gather(mid_vec, out_y, out_x, r, c)
            label[r, c] = vals.argmax(axis=1)
            similarity[r, c] = vals.max(axis=1)
    similarity *= np.float32(1.0 / logit_scale)
    conf = None
    if return_confidence:
        low_conf = (1.0 / np.exp(logits - low_max[None]).sum(axis=0)).astype(np.float32)
        conf = _bilinear(_bilinear(low_conf, up_y, up_x), out_y, out_x)
    return _finish(label, similarity, conf, n, other_threshold, other_value, other_classes,
                   labels)


def _finish(label: np.ndarray, similarity: np.ndarray, conf: np.ndarray | None, n: int,
            other_threshold: float | None, other_value: int, other_classes: Sequence[int],
            labels: Sequence[str] | None) -> LabelMapResult:
    if other_threshold is not None:
        label[similarity < other_threshold] = other_value
    for idx in other_classes:
        label[label == idx] = other_value
    return LabelMapResult(label_map=label, other_value=other_value,
                          labels=tuple(labels) if labels is not None else None,
                          similarity=similarity, confidence=conf, num_classes=n)


def label_map_from_embeddings(pixel_embeds: np.ndarray, text_embeds: np.ndarray,
                              meta: LSegMeta, letterbox: Letterbox | None = None, *,
                              other_threshold: float | None = None,
                              other_value: int = DEFAULT_OTHER,
                              return_confidence: bool = False,
                              labels: Sequence[str] | None = None,
                              other_classes: Sequence[int] = ()) -> LabelMapResult:
    """Pixel embeddings (D, h, w) [or (1, D, h, w)] + text embeddings (N, D) -> label map at
    the original image size (``letterbox``) or at the network input size."""
    emb = pixel_embeds[0] if pixel_embeds.ndim == 4 else pixel_embeds
    logits = apply_head_block(similarity_logits(emb, text_embeds, meta.logit_scale),
                              meta.head_block)
    if letterbox is None:
        out_size = (emb.shape[1] * meta.embed_stride, emb.shape[2] * meta.embed_stride)
        content = None
    else:
        out_size, content = letterbox.image_size, letterbox.resized
    return label_map_from_logits(logits, out_size, content=content, stride=meta.embed_stride,
                                 logit_scale=meta.logit_scale,
                                 other_threshold=other_threshold, other_value=other_value,
                                 return_confidence=return_confidence, labels=labels,
                                 other_classes=other_classes)


# --------------------------------------------------------------------------- multi-scale
class _NumpyOps:
    """Array operations of :func:`evaluate_multiscale` on the host (numpy, engine.infer)."""

    chunk = 8

    def __init__(self, engine: Any, meta: LSegMeta) -> None:
        self.engine, self.meta = engine, meta
        self.pad = _pad_values(meta)

    def prepare(self, image_bgr: np.ndarray) -> np.ndarray:
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
            raise ValueError(f"expected a BGR image (H, W, 3), got shape {image_bgr.shape}")
        return image_bgr

    def text(self, text_embeds: np.ndarray) -> np.ndarray:
        return normalize_rows(text_embeds)

    def image(self, image_bgr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return normalized_resize(image_bgr, size, self.meta)

    def pad_to(self, x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return pad_to(x, size, self.pad)

    def logits(self, x: np.ndarray, text: np.ndarray) -> np.ndarray:
        out = self.engine.infer({self.meta.input_name: np.ascontiguousarray(x[None])})
        emb = np.asarray(out[self.meta.output_name], np.float32)[0]
        return apply_head_block(similarity_logits(emb, text, self.meta.logit_scale),
                                self.meta.head_block)

    @staticmethod
    def flip(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[..., ::-1])

    @staticmethod
    def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return resize_align_corners(x, size)

    @staticmethod
    def zeros(shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32)

    @staticmethod
    def divide(x: np.ndarray, count: np.ndarray) -> np.ndarray:
        return x / count

    @staticmethod
    def reduce(scores: np.ndarray, offset: int, state: dict[str, Any], lse: bool) -> None:
        best = scores.max(axis=0)
        arg = scores.argmax(axis=0).astype(np.int64) + offset
        if "max" in state:
            better = best > state["max"]
            arg = np.where(better, arg, state["arg"])
            best = np.maximum(best, state["max"])
        if lse:
            part = scores.max(axis=0)
            part = part + np.log(np.exp(scores - part[None]).sum(axis=0))
            state["lse"] = part if "lse" not in state else np.logaddexp(state["lse"], part)
        state["max"], state["arg"] = best, arg

    @staticmethod
    def exp(x: np.ndarray) -> np.ndarray:
        return np.exp(x)

    @staticmethod
    def host(x: np.ndarray) -> np.ndarray:
        return np.asarray(x)


class _TorchOps:
    """The same operations with torch on the engine's device (``backend: torch``): the image,
    the logits and the full-resolution scores stay there, ``F.interpolate(...,
    align_corners=True)`` does every resize (as lang-seg), only the label map, the best score
    (and confidence) come back. Also runs on torch's CPU device."""

    chunk = 64

    def __init__(self, engine: Any, meta: LSegMeta, device: str) -> None:
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self.engine, self.meta, self.device = engine, meta, device
        self.pad = torch.from_numpy(_pad_values(meta)).to(device)
        self.mean = torch.tensor(meta.mean, dtype=torch.float32, device=device)[:, None, None]
        self.std = torch.tensor(meta.std, dtype=torch.float32, device=device)[:, None, None]
        hb = meta.head_block
        self.kernel = None if hb is None else \
            torch.from_numpy(hb.weight.astype(np.float32)).to(device).view(1, 1, 3, 3)
        self.bias = None if hb is None else \
            torch.tensor([hb.bias], dtype=torch.float32, device=device)

    def prepare(self, image: Any) -> Any:
        """uint8 BGR (H, W, 3) array or device tensor -> normalised RGB (1, 3, H, W) float."""
        torch = self.torch
        t = image if isinstance(image, torch.Tensor) else \
            torch.from_numpy(np.ascontiguousarray(image))
        if t.ndim != 3 or t.shape[2] != 3:
            raise ValueError(f"expected a BGR image (H, W, 3), got shape {tuple(t.shape)}")
        t = t.to(self.device, non_blocking=True).permute(2, 0, 1).flip(0).float()
        return ((t / 255.0 - self.mean) / self.std)[None]

    def text(self, text_embeds: np.ndarray) -> Any:
        t = self.torch.from_numpy(normalize_rows(text_embeds)).to(self.device)
        return t * float(self.meta.logit_scale)

    def image(self, prepared: Any, size: tuple[int, int]) -> Any:
        return self.F.interpolate(prepared, size=tuple(int(v) for v in size), mode="bilinear",
                                  align_corners=True)[0]

    def pad_to(self, x: Any, size: tuple[int, int]) -> Any:
        out = self.pad[:, None, None].expand(x.shape[0], int(size[0]), int(size[1])).clone()
        out[:, : x.shape[1], : x.shape[2]] = x
        return out

    def logits(self, x: Any, text: Any) -> Any:
        torch = self.torch
        with torch.inference_mode():
            emb = self.engine.infer_tensors({self.meta.input_name: x[None].contiguous()})
            emb = emb[self.meta.output_name][0].float()
            out = torch.einsum("dhw,nd->nhw", emb, text)
            hb = self.meta.head_block
            if hb is not None:
                depth = max(1, hb.block_depth)
                for i in range(depth):
                    out = self._block(out, hb, act=i < depth - 1)
        return out

    def _block(self, x: Any, hb: HeadBlock, act: bool) -> Any:
        F = self.F
        out = F.conv2d(x[:, None], self.kernel, self.bias, padding=1)[:, 0]
        if hb.kind == "bottleneck":
            out = out + x.max(dim=0, keepdim=True)[0]
        if not act:
            return out
        if hb.activation == "relu":
            return F.relu(out)
        if hb.activation == "lrelu":
            return F.leaky_relu(out, 0.01)
        return self.torch.tanh(out)

    @staticmethod
    def flip(x: Any) -> Any:
        return x.flip(-1)

    def resize(self, x: Any, size: tuple[int, int]) -> Any:
        return self.F.interpolate(x[None], size=tuple(int(v) for v in size), mode="bilinear",
                                  align_corners=True)[0]

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.torch.zeros(shape, dtype=self.torch.float32, device=self.device)

    def divide(self, x: Any, count: np.ndarray) -> Any:
        return x / self.torch.from_numpy(count).to(self.device)

    def reduce(self, scores: Any, offset: int, state: dict[str, Any], lse: bool) -> None:
        torch = self.torch
        best, arg = scores.max(dim=0)
        arg = arg + offset
        if "max" in state:
            better = best > state["max"]
            arg = torch.where(better, arg, state["arg"])
            best = torch.maximum(best, state["max"])
        if lse:
            part = torch.logsumexp(scores, dim=0)
            state["lse"] = part if "lse" not in state else torch.logaddexp(state["lse"], part)
        state["max"], state["arg"] = best, arg

    def exp(self, x: Any) -> Any:
        return self.torch.exp(x)

    @staticmethod
    def host(x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()


def window_logits(ops: Any, prepared: Any, text: Any, plan: ScalePlan,
                  input_hw: tuple[int, int], flip: bool) -> list[Any]:
    """The (N, h/2, w/2) logits of every window of one scale (with ``flip``: plus the
    mirrored window's, mirrored back; lang-seg sums the two passes)."""
    canvas = ops.pad_to(ops.image(prepared, plan.resized), plan.padded)
    out = []
    for (y0, y1, x0, x1) in plan.windows:
        x = ops.pad_to(canvas[:, y0:y1, x0:x1], input_hw)
        lg = ops.logits(x, text)
        if flip:
            lg = lg + ops.flip(ops.logits(ops.flip(x), text))
        out.append(lg)
    return out


def evaluate_multiscale(ops: Any, image: Any, text_embeds: np.ndarray,
                        input_hw: tuple[int, int], scales: Sequence[float] = (1.0,),
                        flip: bool = False, return_confidence: bool = False
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """lang-seg's multi-size evaluator (``LSeg_MultiEvalModule.forward``) with base size =
    crop size = the network input: per scale the image is resized (align_corners=True),
    padded and cut into input-size windows (:func:`scale_plans`); each window's stride-2
    logits (with ``flip`` plus the mirrored pass) are upsampled x2 (align_corners=True),
    stitched with overlaps averaged, cropped to the resized image and resized to the image
    (align_corners=True); the scores of all scales are summed (here: averaged over scales and
    passes, which keeps the argmax and makes the best score a mean logit). Returns (argmax
    int64, best averaged score, softmax probability of the argmax or None), at the image size,
    as host arrays. The network runs once per window and pass; the full-resolution scores
    are built ``ops.chunk`` classes at a time, so memory does not grow with the vocabulary."""
    prepared = ops.prepare(image)
    h, w = int(image.shape[0]), int(image.shape[1])
    ih, iw = int(input_hw[0]), int(input_hw[1])
    text = ops.text(text_embeds)
    plans = scale_plans((h, w), (ih, iw), scales)
    low = [window_logits(ops, prepared, text, plan, (ih, iw), flip) for plan in plans]
    inv = np.float32(1.0 / (len(plans) * (2 if flip else 1)))
    n = int(low[0][0].shape[0])
    state: dict[str, Any] = {}
    for c0 in range(0, n, ops.chunk):
        c1 = min(n, c0 + ops.chunk)
        scores = ops.zeros((c1 - c0, h, w))
        for plan, per in zip(plans, low):
            ph, pw = plan.padded
            acc = ops.zeros((c1 - c0, ph, pw))
            count = np.zeros((ph, pw), np.float32)
            for (y0, y1, x0, x1), lg in zip(plan.windows, per):
                up = ops.resize(lg[c0:c1], (ih, iw))
                acc[:, y0:y1, x0:x1] += up[:, : y1 - y0, : x1 - x0]
                count[y0:y1, x0:x1] += 1
            if len(plan.windows) > 1:
                acc = ops.divide(acc, count)
            rh, rw = plan.resized
            scores += ops.resize(acc[:, :rh, :rw], (h, w))
        ops.reduce(scores * inv, c0, state, return_confidence)
    conf = ops.host(ops.exp(state["max"] - state["lse"])) if return_confidence else None
    return ops.host(state["arg"]), ops.host(state["max"]), conf


# --------------------------------------------------------------------------- segmenter
class LSegSegmenter:
    """Image encoder engine + label head.

    ``LSegSegmenter.from_onnx(path, EngineConfig(...))`` reads the sidecar next to the ONNX;
    ``LSegSegmenter(engine, meta)`` takes any object with ``infer(dict) -> dict``.
    ``scales`` (default ``(1.0,)``; lang-seg's demo set is :data:`OFFICIAL_SCALES`) and
    ``flip`` select lang-seg's multi-size / mirrored evaluation (one network run per window,
    scale and pass: for offline use). On a torch engine (``backend: torch``) the whole label
    head runs on its device (:class:`_TorchOps`); else on the host, where one scale that fits
    the input takes the boundary-only fast path (:func:`label_map_from_logits`)."""

    def __init__(self, engine: Any, meta: LSegMeta, *, other_value: int = DEFAULT_OTHER,
                 scales: Any = (1.0,), flip: bool = False) -> None:
        from perception2d_ros.engines.device import torch_device_of

        self.engine = engine
        self.meta = meta
        self.other_value = int(other_value)
        self.scales = parse_scales(scales)
        self.flip = bool(flip)
        self.device = torch_device_of(engine)
        self._ops: Any = None

    @classmethod
    def from_onnx(cls, onnx_path: str | Path, config: Any = None, *,
                  other_value: int = DEFAULT_OTHER, scales: Any = (1.0,),
                  flip: bool = False) -> "LSegSegmenter":
        from perception2d_ros.engines.factory import create_engine

        path = Path(onnx_path)
        meta = LSegMeta.from_sidecar(path.with_suffix(".json"))
        return cls(create_engine(path, config), meta, other_value=other_value, scales=scales,
                   flip=flip)

    def embed(self, image_bgr: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """Pixel embeddings (D, H_in/2, W_in/2) float32 for one BGR image + its letterbox."""
        tensor, box = preprocess(image_bgr, self.meta)
        out = self.engine.infer({self.meta.input_name: tensor})[self.meta.output_name]
        return np.asarray(out, np.float32)[0], box

    def _host_ops(self) -> _NumpyOps:
        return _NumpyOps(self.engine, self.meta)

    def segment(self, image_bgr: Any, text_embeds: np.ndarray,
                other_threshold: float | None = None, *, labels: Sequence[str] | None = None,
                return_confidence: bool = False, other_classes: Sequence[int] = (),
                scales: Any = None, flip: bool | None = None) -> LabelMapResult:
        """Label map (H, W) uint16 for ``image_bgr`` (uint8 BGR; on a torch engine also a
        device tensor) and the vocabulary's text embeddings (N, 512), vocabulary index per
        pixel, ``other_value`` below ``other_threshold`` (and where a catch-all phrase in
        ``other_classes`` wins). ``scales`` / ``flip`` override the segmenter's."""
        scales = self.scales if scales is None else parse_scales(scales)
        flip = self.flip if flip is None else bool(flip)
        text = normalize_rows(text_embeds)
        n = len(text)
        if n == 0:
            raise ValueError("empty vocabulary")
        if n > self.other_value:
            raise ValueError(f"{n} phrases do not fit label values below "
                             f"other_value={self.other_value}")
        hw = (int(image_bgr.shape[0]), int(image_bgr.shape[1]))
        kw = dict(other_threshold=other_threshold, other_value=self.other_value,
                  other_classes=other_classes, labels=labels)
        if self.device is not None:
            if self._ops is None:
                self._ops = _TorchOps(self.engine, self.meta, self.device)
            arg, best, conf = evaluate_multiscale(self._ops, image_bgr, text,
                                                  self.meta.input_size, scales, flip,
                                                  return_confidence)
            sim = (best * np.float32(1.0 / self.meta.logit_scale)).astype(np.float32)
            return _finish(arg.astype(np.uint16), sim, conf, n, **kw)
        ops = self._host_ops()
        plans = scale_plans(hw, self.meta.input_size, scales)
        if len(plans) == 1 and len(plans[0].windows) == 1:
            # one scale that fits the input: the boundary-only head (exact argmax)
            (logits,) = window_logits(ops, ops.prepare(image_bgr), ops.text(text), plans[0],
                                      self.meta.input_size, flip)
            if flip:
                logits *= np.float32(0.5)
            return label_map_from_logits(logits, hw, content=plans[0].resized,
                                         stride=self.meta.embed_stride,
                                         logit_scale=self.meta.logit_scale,
                                         return_confidence=return_confidence, **kw)
        arg, best, conf = evaluate_multiscale(ops, image_bgr, text, self.meta.input_size,
                                              scales, flip, return_confidence)
        sim = best * np.float32(1.0 / self.meta.logit_scale)
        return _finish(arg.astype(np.uint16), sim, conf, n, **kw)

    def close(self) -> None:
        self._ops = None
        close = getattr(self.engine, "close", None)
        if close:
            close()


# --------------------------------------------------------------------------- vocabulary
DEFAULT_VOCABULARY = Path(__file__).resolve().parents[3] / "config" / "lseg_indoor_vocabulary.yaml"


@dataclass(frozen=True)
class LSegVocabulary:
    """Phrases to segment + how to treat "other" (see config/lseg_indoor_vocabulary.yaml).

    ``text_phrases`` is what gets encoded: ``phrases`` plus the catch-all ``other_phrase``
    (last) when set; :attr:`other_classes` is the catch-all's index for
    :func:`label_map_from_logits`."""

    phrases: tuple[str, ...]
    templates: tuple[str, ...] = ("{}",)
    version: int = 1
    name: str = ""
    other_threshold: float | None = None
    other_phrase: str | None = None

    @property
    def text_phrases(self) -> tuple[str, ...]:
        if self.other_phrase and self.other_phrase not in self.phrases:
            return self.phrases + (self.other_phrase,)
        return self.phrases

    @property
    def other_classes(self) -> tuple[int, ...]:
        if not self.other_phrase:
            return ()
        return (self.text_phrases.index(self.other_phrase),)

    @classmethod
    def from_phrases(cls, phrases: str | Sequence[str], **kw: Any) -> "LSegVocabulary":
        if isinstance(phrases, str):
            phrases = phrases.split(",")
        clean = tuple(p.strip() for p in phrases if p.strip())
        if not clean:
            raise ValueError("empty vocabulary")
        if len(set(clean)) != len(clean):
            raise ValueError(f"duplicate phrases in vocabulary: {clean}")
        return cls(phrases=clean, **kw)

    @classmethod
    def from_yaml(cls, path: str | Path = DEFAULT_VOCABULARY) -> "LSegVocabulary":
        import yaml

        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw.get("phrases"), list):
            raise ValueError(f"{path}: 'phrases' list missing")
        other = raw.get("other") or {}
        thr = other.get("threshold")
        return cls.from_phrases(
            [str(p) for p in raw["phrases"]], templates=tuple(raw.get("templates") or ("{}",)),
            version=int(raw.get("version", 1)), name=str(raw.get("name", Path(path).stem)),
            other_threshold=None if thr is None else float(thr),
            other_phrase=(str(other["phrase"]).strip() or None) if other.get("phrase") else None)


# --------------------------------------------------------------------------- visualisation
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


# --------------------------------------------------------------------------- evaluation
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
