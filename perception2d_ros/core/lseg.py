"""LSeg runtime (ROS-free): image -> per-pixel CLIP embeddings (engine) -> label map (numpy).

The exported engine maps a letterboxed, normalised image to L2-normalised pixel embeddings at
stride 2 (see :mod:`perception2d_ros.core.lseg_model` for the export contract). The label map is
computed here from those and the vocabulary's CLIP text embeddings (N, 512):

    logits = logit_scale * <pixel, text>                     (N, h, w) at stride 2
    [optional lang-seg head blocks on the logits, 3x3 kernel from the sidecar]
    bilinear resize of the logits to the input image (half-pixel centres, letterbox removed)
    label = argmax over N;  label = ``other_value`` where max(logits)/logit_scale < threshold

so changing the vocabulary (reordering, adding phrases) is an array change, never an engine
rebuild. Without head blocks max(logits)/logit_scale is the cosine similarity of the pixel to
its best phrase; the "other" threshold is on that value.
"""
from __future__ import annotations

import colorsys
import hashlib
import json
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
                "perception2d_ros.core.lseg_model.export_onnx")
        return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Letterbox:
    """Where the image sits in the network input: top-left, scaled to ``resized`` (h, w)."""

    image_size: tuple[int, int]     # original H, W
    resized: tuple[int, int]        # h, w inside the input
    input_size: tuple[int, int]     # network H, W


def letterbox_size(image_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[int, int]:
    h, w = image_hw
    scale = min(input_hw[0] / h, input_hw[1] / w)
    return (max(1, min(input_hw[0], int(round(h * scale)))),
            max(1, min(input_hw[1], int(round(w * scale)))))


def preprocess(image_bgr: np.ndarray, meta: LSegMeta) -> tuple[np.ndarray, Letterbox]:
    """BGR uint8 (H, W, 3) -> normalised RGB float32 [1, 3, H_in, W_in], aspect kept: the image
    is resized to fit and placed top-left, the rest filled with ``pad_value``."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected a BGR image (H, W, 3), got shape {image_bgr.shape}")
    ih, iw = meta.input_size
    rh, rw = letterbox_size(image_bgr.shape[:2], (ih, iw))
    interp = cv2.INTER_AREA if rh < image_bgr.shape[0] else cv2.INTER_LINEAR
    resized = cv2.resize(image_bgr, (rw, rh), interpolation=interp)
    canvas = np.full((ih, iw, 3), meta.pad_value, np.uint8)
    canvas[:rh, :rw] = resized
    x = canvas[:, :, ::-1].astype(np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(meta.mean, np.float32)) / np.asarray(meta.std, np.float32)
    tensor = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
    return tensor, Letterbox(tuple(image_bgr.shape[:2]), (rh, rw), (ih, iw))


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


def _axis_weights(n_out: int, n_src: int, span: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps along one axis: output pixel i samples source coordinate
    (i + 0.5) * span / n_out - 0.5 (half-pixel centres), clamped to the source (replicate)."""
    last = max(1, min(n_src, int(np.ceil(span - 1e-6)))) - 1   # last source pixel in the span
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (span / n_out) - 0.5
    src = np.clip(src, 0.0, last)
    i0 = np.minimum(np.floor(src).astype(np.intp), last)
    i1 = np.minimum(i0 + 1, last)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, np.float32(1.0) - w1, w1


def _bilinear(img: np.ndarray, ys: tuple, xs: tuple) -> np.ndarray:
    """(h, w) -> (H, W) with precomputed separable taps."""
    y0, y1, wy0, wy1 = ys
    x0, x1, wx0, wx1 = xs
    rows = img[y0] * wy0[:, None] + img[y1] * wy1[:, None]
    return rows[:, x0] * wx0[None] + rows[:, x1] * wx1[None]


def label_map_from_logits(logits: np.ndarray, out_size: tuple[int, int], *,
                          crop: tuple[float, float] | None = None, logit_scale: float = 1.0,
                          other_threshold: float | None = None,
                          other_value: int = DEFAULT_OTHER, return_confidence: bool = False,
                          labels: Sequence[str] | None = None,
                          other_classes: Sequence[int] = ()) -> LabelMapResult:
    """(N, h, w) logits -> :class:`LabelMapResult` of size ``out_size`` (H, W).

    ``crop`` (h, w), in logit pixels (may be fractional), is the part of the logit map that
    covers the image (the letterbox content); it is stretched onto ``out_size`` with bilinear
    interpolation at half-pixel centres. The result is exactly the argmax of the bilinearly
    resized logits, computed without resizing all N channels: where the four source pixels of
    an output pixel share one argmax, the interpolated argmax is that class (a convex
    combination keeps the order), so only pixels on label boundaries interpolate all N logits.
    ``similarity`` is max(interpolated logits) / logit_scale. ``confidence`` (optional) is the
    softmax probability of the best phrase at the logit resolution, bilinearly resized.
    Pixels won by one of ``other_classes`` (catch-all phrases such as "other") and pixels
    below ``other_threshold`` get ``other_value``."""
    n, h, w = logits.shape
    if n == 0:
        raise ValueError("empty vocabulary")
    if n > other_value:
        raise ValueError(f"{n} phrases do not fit label values below other_value={other_value}")
    oh, ow = int(out_size[0]), int(out_size[1])
    ch, cw = crop if crop is not None else (float(h), float(w))
    ys, xs = _axis_weights(oh, h, ch), _axis_weights(ow, w, cw)
    logits = np.asarray(logits, np.float32)
    low_arg = logits.argmax(axis=0)
    low_max = logits.max(axis=0)
    # uniform[y, x]: the source cell (y..y+1, x..x+1) (clamped) has a single argmax
    right = np.concatenate([low_arg[:, 1:], low_arg[:, -1:]], axis=1)
    down = np.concatenate([low_arg[1:], low_arg[-1:]], axis=0)
    diag = np.concatenate([right[1:], right[-1:]], axis=0)
    uniform = (low_arg == right) & (low_arg == down) & (low_arg == diag)
    y0, y1, wy0, wy1 = ys
    x0, x1, wx0, wx1 = xs
    label = low_arg.astype(np.uint16)[y0][:, x0]
    similarity = _bilinear(low_max, ys, xs)
    edge_r, edge_c = np.nonzero(~uniform[y0][:, x0])
    if edge_r.size:
        hwn = np.ascontiguousarray(logits.transpose(1, 2, 0))
        step = max(1, (1 << 22) // n)
        for s in range(0, edge_r.size, step):
            r, c = edge_r[s:s + step], edge_c[s:s + step]
            vals = ((hwn[y0[r], x0[c]] * wx0[c, None] + hwn[y0[r], x1[c]] * wx1[c, None])
                    * wy0[r, None]
                    + (hwn[y1[r], x0[c]] * wx0[c, None] + hwn[y1[r], x1[c]] * wx1[c, None])
                    * wy1[r, None])
            label[r, c] = vals.argmax(axis=1)
            similarity[r, c] = vals.max(axis=1)
    similarity *= np.float32(1.0 / logit_scale)
    conf = None
    if return_confidence:
        low_conf = 1.0 / np.exp(logits - low_max[None]).sum(axis=0)
        conf = _bilinear(low_conf.astype(np.float32), ys, xs)
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
        crop = None
    else:
        out_size = letterbox.image_size
        crop = (letterbox.resized[0] / meta.embed_stride, letterbox.resized[1] / meta.embed_stride)
    return label_map_from_logits(logits, out_size, crop=crop, logit_scale=meta.logit_scale,
                                 other_threshold=other_threshold, other_value=other_value,
                                 return_confidence=return_confidence, labels=labels,
                                 other_classes=other_classes)


# --------------------------------------------------------------------------- segmenter
class LSegSegmenter:
    """Image encoder engine + numpy label head.

    ``LSegSegmenter.from_onnx(path, EngineConfig(...))`` reads the sidecar next to the ONNX;
    ``LSegSegmenter(engine, meta)`` takes any object with ``infer(dict) -> dict``."""

    def __init__(self, engine: Any, meta: LSegMeta, *, other_value: int = DEFAULT_OTHER) -> None:
        self.engine = engine
        self.meta = meta
        self.other_value = int(other_value)

    @classmethod
    def from_onnx(cls, onnx_path: str | Path, config: Any = None, *,
                  other_value: int = DEFAULT_OTHER) -> "LSegSegmenter":
        from perception2d_ros.core.engines import create_engine

        path = Path(onnx_path)
        meta = LSegMeta.from_sidecar(path.with_suffix(".json"))
        return cls(create_engine(path, config), meta, other_value=other_value)

    def embed(self, image_bgr: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """Pixel embeddings (D, H_in/2, W_in/2) float32 for one BGR image + its letterbox."""
        tensor, box = preprocess(image_bgr, self.meta)
        out = self.engine.infer({self.meta.input_name: tensor})[self.meta.output_name]
        return np.asarray(out, np.float32)[0], box

    def segment(self, image_bgr: np.ndarray, text_embeds: np.ndarray,
                other_threshold: float | None = None, *, labels: Sequence[str] | None = None,
                return_confidence: bool = False,
                other_classes: Sequence[int] = ()) -> LabelMapResult:
        """Label map (H, W) uint16 for ``image_bgr`` and the vocabulary's text embeddings
        (N, 512), vocabulary index per pixel, ``other_value`` below ``other_threshold`` (and
        where a catch-all phrase in ``other_classes`` wins)."""
        emb, box = self.embed(image_bgr)
        return label_map_from_embeddings(emb, text_embeds, self.meta, box,
                                         other_threshold=other_threshold,
                                         other_value=self.other_value,
                                         return_confidence=return_confidence, labels=labels,
                                         other_classes=other_classes)

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close:
            close()


# --------------------------------------------------------------------------- vocabulary
DEFAULT_VOCABULARY = Path(__file__).resolve().parents[2] / "config" / "lseg_indoor_vocabulary.yaml"


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
