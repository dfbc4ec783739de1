"""LSeg label head on the host (numpy): pixel x text similarity logits, the lang-seg head
block, and the exact-argmax label map at the image size (:func:`label_map_from_logits`,
:func:`label_map_from_embeddings`) as a :class:`LabelMapResult`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np

from perception2d_ros.models.lseg.meta import HeadBlock, LSegMeta
from perception2d_ros.models.lseg.resample import Letterbox, official_taps

DEFAULT_OTHER = 255


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
    return finish_label_map(label, similarity, conf, n, other_threshold, other_value,
                            other_classes, labels)


def finish_label_map(label: np.ndarray, similarity: np.ndarray, conf: np.ndarray | None,
                     n: int, other_threshold: float | None, other_value: int,
                     other_classes: Sequence[int], labels: Sequence[str] | None
                     ) -> LabelMapResult:
    """The :class:`LabelMapResult` of an argmax ``label`` map, with ``other_value`` where the
    similarity is below ``other_threshold`` and where a catch-all class won."""
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
