"""Pipeline stage: LSeg per-pixel label map over the current vocabulary. Text embeddings
come from the CLIP text tower through the shared TextEmbeddingCache, so changing the
vocabulary costs one text encode per new phrase and never an engine rebuild."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from perception2d_ros.pipeline.results import LabelFrameResult

DEFAULTS = {"model": "lseg_demo_e200", "checkpoint": "", "backend": "auto", "device": "auto",
            "precision": "fp32", "input_size": 480, "text_model": "clip_vit_b32",
            "templates": [""], "other_threshold": 0.0, "vocabulary": [""],
            # lang-seg's multi-size / mirrored evaluation (official demo set: [0.75, 1.0, 1.25,
            # 1.5, 1.75, 2.25] + flip); one network run per window, scale and pass: offline use
            "scales": [1.0], "flip": False, "allow_outside_models_dir": False}


class LSegStage:
    name = "lseg"

    def __init__(self, segmenter: Any, encode: Any, phrases: Sequence[str],
                 templates: Sequence[str] | None = None, other_threshold: float = 0.0) -> None:
        self.segmenter = segmenter
        self._encode = encode           # (phrases, templates) -> (N, D) normalised
        self.other_threshold = float(other_threshold)
        self._lock = threading.Lock()
        self.version = 0
        self.set_vocabulary(phrases, templates)

    def set_vocabulary(self, phrases: Sequence[str], templates: Sequence[str] | None = None
                       ) -> int:
        phrases = tuple(p for p in phrases if p)
        if not phrases:
            raise ValueError("vocabulary: at least one phrase is needed")
        temps = [t for t in (templates or []) if t] or ["a photo of a {}."]
        emb = np.asarray(self._encode(list(phrases), temps), np.float32)
        with self._lock:
            self.version += 1
            self._vocab = (phrases, emb, self.version)
        return self.version

    @property
    def vocabulary(self) -> tuple[str, ...]:
        return self._vocab[0]

    def process(self, frame: Any) -> None:
        t0 = time.perf_counter()
        phrases, emb, version = self._vocab  # one consistent snapshot per frame
        from perception2d_ros.engines.device import on_device

        device_bgr = getattr(frame, "device_bgr", None)
        keep = on_device(device_bgr, getattr(self.segmenter, "device", None))
        res = self.segmenter.segment(device_bgr if keep else frame.bgr(), emb,
                                     other_threshold=self.other_threshold or None,
                                     labels=phrases)
        frame.labels = LabelFrameResult(res.label_map, phrases, version,
                                        int(res.other_value), res.shares())
        frame.timings[self.name] = time.perf_counter() - t0


def build_stage(cfg: dict[str, Any]) -> LSegStage:
    # model resolution and the CLIP text side are shared with `perception2d seglabels`
    from perception2d_ros.models.lseg import resolve as rs
    from perception2d_ros.models.lseg.resample import parse_scales

    lcfg = {**DEFAULTS, **(cfg.get("lseg") or {})}
    try:
        scales = parse_scales(lcfg["scales"])
    except ValueError as exc:
        raise ValueError(f"lseg.{exc}") from None
    args = SimpleNamespace(scales=scales, flip=bool(lcfg["flip"]), model=lcfg["model"],
                           checkpoint=lcfg["checkpoint"] or None,
                           models_dir=cfg.get("models_dir") or None, cache_dir=None,
                           input_size=int(lcfg["input_size"]), backend=lcfg["backend"],
                           device=lcfg["device"], precision=lcfg["precision"], threads=None,
                           text_model=lcfg["text_model"], text_embeds=None)
    try:
        onnx = rs.resolve_model(args)
        segmenter = rs.open_segmenter(onnx, args)
        cache = rs.text_cache(segmenter.meta, args)
    except rs.SegLabelsError as exc:
        raise RuntimeError(f"lseg: {exc}") from exc
    phrases = [p for p in lcfg["vocabulary"] if p] or [p for p in cfg.get("vocabulary") or []
                                                        if p]
    if not phrases:
        from perception2d_ros.models.lseg.vocabulary import LSegVocabulary

        phrases = list(LSegVocabulary.from_yaml().phrases)  # config/lseg_indoor_vocabulary.yaml
    return LSegStage(segmenter, lambda p, t: cache.encode(p, t), phrases, lcfg["templates"],
                     float(lcfg["other_threshold"]))
