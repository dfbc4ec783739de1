"""Pipeline stage: CLIP open-vocabulary labels for every detection crop and the whole frame,
all in one image-tower call per frame. The vocabulary can change at runtime
(:meth:`ClipStage.set_vocabulary`); each frame's result records the vocabulary it used.

When the detections are tracked (``frame.track_ids``, a ``track`` stage upstream), each
track's CLIP probabilities are averaged over its frames (running mean of the softmax over the
vocabulary, :class:`TrackLabels`), so a track's open-vocabulary label does not flicker with
one bad crop; both the frame's labels and the track's are kept in the result."""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from perception2d_ros.pipeline.results import ClipFrameResult

DEFAULTS = {"model": "clip_vit_b32", "checkpoint": "", "backend": "auto", "device": "auto",
            "precision": "fp32", "templates": [""], "top_k": 3, "padding": 0.1,
            "mode": "extend", "frame_labels": True,
            "allow_outside_models_dir": False}
DEFAULT_VOCABULARY = ["person", "chair", "table", "door", "bag", "bottle", "cup", "laptop",
                      "dog", "cat", "car", "bicycle", "plant", "box", "robot"]


class TrackLabels:
    """Running mean of each track's CLIP probabilities, keyed by (camera, track id).

    Reset when the vocabulary changes (the probabilities are over its phrases); a track not
    seen for ``max_idle`` frames of its camera is forgotten (bounded memory)."""

    def __init__(self, max_idle: int = 300) -> None:
        self.max_idle = int(max_idle)
        self.version: int | None = None
        self._sum: dict[tuple[str, str], np.ndarray] = {}
        self._count: dict[tuple[str, str], int] = {}
        self._seen: dict[tuple[str, str], int] = {}
        self._frames: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._sum)

    def update(self, source: str, track_ids: Sequence[str], probs: np.ndarray,
               version: int) -> np.ndarray:
        """Add this frame's (N, V) probabilities of tracks ``track_ids``; return the (N, V)
        mean probabilities of those tracks over all their frames so far."""
        if version != self.version:
            self._sum.clear(), self._count.clear(), self._seen.clear()
            self.version = version
        n = self._frames[source] = self._frames.get(source, 0) + 1
        out = np.empty_like(probs)
        for i, tid in enumerate(track_ids):
            key = (source, tid)
            acc = self._sum.get(key)
            self._sum[key] = probs[i].astype(np.float64) if acc is None else acc + probs[i]
            self._count[key] = self._count.get(key, 0) + 1
            self._seen[key] = n
            out[i] = self._sum[key] / self._count[key]
        if n % 50 == 0:
            for key in [k for k, t in self._seen.items()
                        if k[0] == source and n - t > self.max_idle]:
                del self._sum[key], self._count[key], self._seen[key]
        return out

    def frames_of(self, source: str, track_id: str) -> int:
        """How many frames track ``track_id`` of ``source`` has been labelled in."""
        return self._count.get((source, track_id), 0)


class ClipStage:
    name = "clip"

    def __init__(self, labeler: Any, phrases: Sequence[str], templates: Sequence[str] | None,
                 top_k: int = 3, padding: float = 0.1, mode: str = "extend",
                 frame_labels: bool = True) -> None:
        if mode not in ("extend", "replace"):
            raise ValueError(f"clip.mode: '{mode}' must be extend or replace")
        self.labeler = labeler
        self.top_k = int(top_k)
        self.padding = float(padding)
        self.mode = mode
        self.frame_labels = frame_labels
        self.track_labels = TrackLabels()
        self.set_vocabulary(phrases, templates)

    def set_vocabulary(self, phrases: Sequence[str], templates: Sequence[str] | None = None
                       ) -> Any:
        """Change the vocabulary (text embeddings from the cache, computed once per phrase)."""
        phrases = [p for p in phrases if p]
        if not phrases:
            raise ValueError("vocabulary: at least one phrase is needed")
        temps = [t for t in (templates or []) if t] or None
        return self.labeler.set_vocabulary(phrases, temps)

    @property
    def vocabulary(self) -> tuple[str, ...]:
        return tuple(self.labeler.vocabulary.phrases)

    def process(self, frame: Any) -> None:
        t0 = time.perf_counter()
        from perception2d_ros.engines.device import on_device

        # frames kept on the models' device: crop and resize there (no host round trip)
        image = frame.device_bgr if on_device(frame.device_bgr, self.labeler.device) \
            else frame.bgr()
        det = frame.detections
        boxes = np.asarray(det.xyxy, np.float64).reshape(-1, 4) if det is not None \
            else np.zeros((0, 4))
        parts, metas = [], []
        if len(boxes):
            x, meta = self.labeler.preprocess(image, boxes, self.padding)
            parts.append(x)
            metas.append(meta)
        if self.frame_labels:
            x, meta = self.labeler.preprocess(image)
            parts.append(x)
            metas.append(meta)
        hyps: list[list[tuple[str, float]]] = []
        track_hyps: list[list[tuple[str, float]]] | None = None
        track_ids = getattr(frame, "track_ids", None)
        frame_top: list[tuple[str, float]] = []
        version, phrases = None, ()
        if parts:
            if isinstance(parts[0], np.ndarray):
                batch = np.concatenate(parts)
            else:
                import torch

                batch = torch.cat(parts)
            emb = self.labeler.infer(batch)["image_embeds"]  # one call
            start = 0
            for meta, x in zip(metas, parts):
                res = self.labeler.postprocess({"image_embeds": emb[start:start + len(x)]},
                                               meta, self.top_k)
                start += len(x)
                version, phrases = meta["version"], tuple(meta["phrases"])
                if meta["boxes"] is not None:
                    for i, r in enumerate(res):
                        clip = [(lab.name, lab.score) for lab in r.labels]
                        own = [(str(det.class_names[i]), float(det.scores[i]))]
                        hyps.append(own + clip if self.mode == "extend" else clip)
                    if track_ids is not None and len(track_ids) == len(res):
                        track_hyps = self._track_hypotheses(
                            frame, det, track_ids, np.stack([r.probs for r in res]),
                            int(meta["version"]), tuple(meta["phrases"]))
                else:
                    frame_top = [(lab.name, lab.score) for lab in res[0].labels]
        else:
            version = self.labeler.vocabulary.version
            phrases = self.vocabulary
        frame.clip = ClipFrameResult(hyps if len(boxes) else None, frame_top, phrases,
                                     int(version), track_hyps)
        frame.vocabulary_version = int(version)
        frame.timings[self.name] = time.perf_counter() - t0


    def _track_hypotheses(self, frame: Any, det: Any, track_ids: Sequence[str],
                          probs: np.ndarray, version: int, phrases: Sequence[str]
                          ) -> list[list[tuple[str, float]]]:
        mean = self.track_labels.update(getattr(frame, "source", "") or "", track_ids,
                                        probs, version)
        k = max(1, min(self.top_k, len(phrases)))
        out = []
        for i in range(len(track_ids)):
            top = np.argsort(-mean[i], kind="stable")[:k]
            clip = [(phrases[j], float(mean[i, j])) for j in top]
            own = [(str(det.class_names[i]), float(det.scores[i]))]
            out.append(own + clip if self.mode == "extend" else clip)
        return out


def build_stage(cfg: dict[str, Any]) -> ClipStage:
    from perception2d_ros.models.clip.labeler import ClipLabeler
    from perception2d_ros.models.clip.resolve import resolve_export
    from perception2d_ros.engines.factory import EngineConfig

    c = {**DEFAULTS, **(cfg.get("clip") or {})}
    sidecar = resolve_export(c["model"], checkpoint=c["checkpoint"] or None,
                             models_dir=cfg.get("models_dir") or None)
    labeler = ClipLabeler(sidecar, EngineConfig(backend=c["backend"], device=c["device"],
                                                precision=c["precision"]),
                          padding=float(c["padding"]))
    phrases = [p for p in cfg.get("vocabulary") or [] if p] or DEFAULT_VOCABULARY
    return ClipStage(labeler, phrases, c["templates"], c["top_k"], c["padding"], c["mode"],
                     bool(c["frame_labels"]))
