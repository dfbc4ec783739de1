"""Zero-shot CLIP labels for whole images and detection boxes (ROS-free).

Runs the exported ONNX pair (:func:`.export.export_onnx`) through
:func:`perception2d_ros.engines.engines.create_engine` — ONNX Runtime / TensorRT; torch is not
used. Scores are ``softmax(logit_scale · cos(image, text))`` over the current vocabulary, the
zero-shot classifier of the CLIP paper; text embeddings are prompt-ensembled
(:class:`.vocabulary.TextEmbeddingCache`) and cached.

Wrapper shape as elsewhere in the suite: ``preprocess(image_bgr, boxes) -> (tensor, meta)``,
``engine.infer`` and ``postprocess(outputs, meta) -> list[LabelResult]``; all crops of a frame
are one engine call (chunked at ``max_batch``, the TensorRT profile's maximum).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from perception2d_ros.models.clip.preprocess import (
    preprocess_bgr, preprocess_crops_bgr, square_box)
from perception2d_ros.models.clip.vocabulary import (
    TextEmbeddingCache, Vocabulary, normalize_templates)

LOG = logging.getLogger("perception2d.clip")


@dataclass(frozen=True)
class Label:
    index: int          # index in the vocabulary (LabelInfo id)
    name: str           # the phrase
    score: float        # softmax probability over the whole vocabulary
    logit: float        # logit_scale · cosine


@dataclass
class LabelResult:
    """Labels of one image or one box. ``labels`` are the top-k, highest score first;
    ``probs``/``logits`` cover the whole vocabulary (index order)."""

    labels: list[Label]
    probs: np.ndarray
    logits: np.ndarray
    vocabulary_version: int
    box: tuple[float, float, float, float] | None = None
    crop_box: tuple[int, int, int, int] | None = None   # the square actually fed to CLIP
    embedding: np.ndarray | None = field(default=None, repr=False)

    @property
    def top(self) -> Label:
        return self.labels[0]

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"labels": [{"label": lab.name, "score": lab.score}
                                        for lab in self.labels],
                             "vocabulary_version": self.vocabulary_version}
        if self.box is not None:
            d["box"] = [float(v) for v in self.box]
        return d


def softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _sidecar_path(model: str | Path | Mapping[str, Any]) -> Path:
    if isinstance(model, Mapping):
        return Path(model["meta"])
    p = Path(model)
    if p.is_dir():
        from perception2d_ros.models.clip.resolve import find_exported

        found = find_exported(p)
        if found is None:
            raise FileNotFoundError(f"no single CLIP export sidecar (clip_*.json) in {p}")
        return found
    return p


class ClipLabeler:
    """CLIP zero-shot labeler over an exported ONNX pair.

    ``model``: the sidecar JSON, its folder, or the dict :func:`.export.export_onnx` returns.
    ``text_cache_dir``: ``True`` → ``$PERCEPTION2D_CACHE_DIR/clip_text``; a path; ``None`` →
    memory only. ``padding``: default box context padding (fraction of the box size per side).
    """

    def __init__(self, model: str | Path | Mapping[str, Any], engine_config: Any = None, *,
                 text_cache_dir: str | Path | bool | None = True, padding: float = 0.1,
                 max_batch: int = 32, text_engine_config: Any = None) -> None:
        from perception2d_ros.models.clip.export import read_sidecar
        from perception2d_ros.engines.factory import EngineConfig, create_engine
        from perception2d_ros.engines.base import default_cache_dir

        self.meta_path = _sidecar_path(model)
        self.meta = read_sidecar(self.meta_path)
        root = self.meta_path.parent
        self.image_onnx = root / self.meta["image_onnx"]["file"]
        self.text_onnx = root / self.meta["text_onnx"]["file"]
        self.image_size = int(self.meta["image_size"])
        self.mean = tuple(self.meta["mean"])
        self.std = tuple(self.meta["std"])
        self.logit_scale = float(self.meta["logit_scale"])
        self.padding = float(padding)
        self.max_batch = max(1, int(max_batch))
        s = self.image_size
        img_cfg = _with_profiles(engine_config or EngineConfig(),
                                 {"image": [[1, 3, s, s], [8, 3, s, s],
                                            [self.max_batch, 3, s, s]]})
        txt_cfg = _with_profiles(text_engine_config or engine_config or EngineConfig(),
                                 {"input_ids": [[1, 1], [16, 16], [64, 77]]})
        self.image_engine = create_engine(self.image_onnx, img_cfg)
        self.text_engine = create_engine(self.text_onnx, txt_cfg)
        if text_cache_dir is True:
            text_cache_dir = Path(default_cache_dir()) / "clip_text"
        from perception2d_ros.engines.model_store import sha256_file

        text_sha = sha256_file(self.text_onnx)  # the cache key: never trust a stale sidecar
        if text_sha != self.meta["text_onnx"].get("sha256"):
            LOG.warning("%s does not match the sha256 in %s", self.text_onnx, self.meta_path)
        self.text_cache = TextEmbeddingCache(self.text_engine, text_sha,
                                             cache_dir=text_cache_dir or None)
        self.vocabulary: Vocabulary | None = None
        self._lock = threading.Lock()
        self._text: tuple[int, tuple[str, ...], np.ndarray] | None = None

    # ------------------------------------------------------------------ vocabulary
    def set_vocabulary(self, phrases: Sequence[str] | str,
                       templates: Sequence[str] | str | None = None) -> Vocabulary:
        """Set (or change) the label phrases; ``templates=None`` → default ensemble,
        ``["{}"]`` → verbatim. Text embeddings are computed (or read from the cache) now; the
        vocabulary version is bumped on every change."""
        temps = normalize_templates(templates)
        with self._lock:
            if self.vocabulary is None:
                self.vocabulary = Vocabulary(phrases, temps)
            else:
                self.vocabulary.set(phrases, temps)
            vocab = self.vocabulary
        self._text_matrix(vocab)
        return vocab

    def _text_matrix(self, vocab: Vocabulary) -> tuple[int, tuple[str, ...], np.ndarray]:
        phrases, templates, version = vocab.snapshot()
        cur = self._text
        if cur is not None and cur[0] == version and cur[1] == phrases:
            return cur
        emb = self.text_cache.encode(list(phrases), list(templates))
        entry = (version, phrases, emb)
        with self._lock:
            self._text = entry
        return entry

    # ------------------------------------------------------------------ wrapper stages
    @property
    def device(self) -> str | None:
        """The torch device the image tower runs on (None: ORT / TensorRT, host arrays)."""
        from perception2d_ros.engines.device import torch_device_of

        return torch_device_of(self.image_engine)

    def preprocess(self, image_bgr: Any,
                   boxes_xyxy: np.ndarray | Sequence | None = None,
                   padding: float | None = None) -> tuple[Any, dict[str, Any]]:
        """``(float32 [N,3,S,S], meta)``: the whole image (N=1) or one square crop per box.
        A torch tensor image (HxWx3 uint8 BGR on :attr:`device`) is cropped and resized on
        its device (``engines.device.clip_preprocess``) and gives a device tensor."""
        if self.vocabulary is None:
            raise RuntimeError("no vocabulary: call set_vocabulary() first")
        pad = self.padding if padding is None else float(padding)
        version, phrases, text = self._text_matrix(self.vocabulary)
        meta: dict[str, Any] = {"version": version, "phrases": phrases, "text": text,
                                "boxes": None, "crop_boxes": None}
        on_device = not isinstance(image_bgr, np.ndarray) and hasattr(image_bgr, "device")
        if on_device:
            from perception2d_ros.models.clip.preprocess import MEAN_RGB_U8
            from perception2d_ros.models.clip.device import clip_preprocess

            if boxes_xyxy is not None:
                boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
                h, w = int(image_bgr.shape[0]), int(image_bgr.shape[1])
                meta["boxes"] = [tuple(float(v) for v in b) for b in boxes]
                meta["crop_boxes"] = [square_box(b, pad, (h, w)) for b in boxes]
            x = clip_preprocess(image_bgr, None if boxes_xyxy is None else boxes_xyxy,
                                self.image_size, pad, self.mean, self.std, MEAN_RGB_U8)
        elif boxes_xyxy is None:
            x = preprocess_bgr(image_bgr, self.image_size, self.mean, self.std)[None]
        else:
            boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
            h, w = image_bgr.shape[:2]
            meta["boxes"] = [tuple(float(v) for v in b) for b in boxes]
            meta["crop_boxes"] = [square_box(b, pad, (h, w)) for b in boxes]
            x = preprocess_crops_bgr(image_bgr, boxes, self.image_size, pad, self.mean,
                                     self.std)
        return x, meta

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Image tower over a batch, chunked at ``max_batch``: ``{"image_embeds": [N,D]}``."""
        if len(x) == 0:
            return {"image_embeds": np.zeros((0, int(self.meta["embed_dim"])), np.float32)}
        if not isinstance(x, np.ndarray) and hasattr(x, "device"):  # a device tensor
            outs = [self.image_engine.infer_tensors({"image": x[i:i + self.max_batch]})
                    ["image_embeds"].float().cpu().numpy()
                    for i in range(0, len(x), self.max_batch)]
            return {"image_embeds": np.concatenate(outs)}
        outs = [self.image_engine.infer({"image": np.ascontiguousarray(x[i:i + self.max_batch])})
                ["image_embeds"] for i in range(0, len(x), self.max_batch)]
        return {"image_embeds": np.concatenate(outs).astype(np.float32)}

    def postprocess(self, outputs: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                    top_k: int = 5) -> list[LabelResult]:
        emb = np.asarray(outputs["image_embeds"], np.float32)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        text, phrases = meta["text"], meta["phrases"]
        logits = (self.logit_scale * (emb @ text.T)).astype(np.float32)
        probs = softmax(logits)
        k = max(1, min(int(top_k), len(phrases)))
        results = []
        for i in range(len(emb)):
            top = np.argsort(-probs[i], kind="stable")[:k]
            labels = [Label(int(j), phrases[j], float(probs[i, j]), float(logits[i, j]))
                      for j in top]
            results.append(LabelResult(
                labels=labels, probs=probs[i], logits=logits[i],
                vocabulary_version=int(meta["version"]),
                box=meta["boxes"][i] if meta["boxes"] is not None else None,
                crop_box=meta["crop_boxes"][i] if meta["crop_boxes"] is not None else None,
                embedding=emb[i]))
        return results

    # ------------------------------------------------------------------ one-call API
    def label_image(self, image_bgr: np.ndarray, top_k: int = 5) -> LabelResult:
        x, meta = self.preprocess(image_bgr)
        return self.postprocess(self.infer(x), meta, top_k)[0]

    def label_boxes(self, image_bgr: np.ndarray, boxes_xyxy: np.ndarray | Sequence,
                    top_k: int = 5, padding: float | None = None) -> list[LabelResult]:
        """One result per box (same order); all crops in one engine batch."""
        x, meta = self.preprocess(image_bgr, boxes_xyxy, padding)
        if len(x) == 0:
            return []
        return self.postprocess(self.infer(x), meta, top_k)

    def embed_preprocessed(self, x: np.ndarray) -> np.ndarray:
        return self.infer(np.asarray(x, np.float32))["image_embeds"]

    def describe(self) -> str:
        return (f"CLIP {self.meta['arch']} (logit_scale {self.logit_scale:.1f}) image: "
                f"{self.image_engine.describe()} text: {self.text_engine.describe()}")

    def close(self) -> None:
        self.image_engine.close()
        self.text_engine.close()


def _with_profiles(cfg: Any, profiles: dict[str, list[list[int]]]) -> Any:
    import copy

    out = copy.copy(cfg)
    merged = dict(profiles)
    merged.update({k: v for k, v in (cfg.profiles or {}).items() if k in profiles})
    out.profiles = merged
    return out
