"""Per-frame results of the SAM, CLIP and LSeg stages (ROS-free dataclasses)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class MaskFrameResult:
    """SAM on one frame. ``instance_ids``: uint16 HxW, 0 = background, id i + 1 = prompt i
    (prompts: the frame's detections in order, then any topic prompts). Per prompt:
    predicted IoU ``scores``, ``stability``, ``areas`` (pixels), mask ``bboxes`` (xyxy)."""

    instance_ids: np.ndarray
    scores: np.ndarray
    stability: np.ndarray
    areas: np.ndarray
    bboxes: np.ndarray
    n_detection_prompts: int


@dataclass
class ClipFrameResult:
    """CLIP on one frame. ``hypotheses[i]``: the (label, score) list of detection i as it
    is published (detector class first when extending); ``frame_labels``: whole-frame top-k;
    ``vocabulary``/``version``: the vocabulary these were computed with.
    ``track_hypotheses[i]``: when the detections are tracked, detection i's labels from its
    track's CLIP probabilities averaged over the track's frames (detector class first when
    extending); ``hypotheses`` then stay this frame's alone."""

    hypotheses: list[list[tuple[str, float]]]
    frame_labels: list[tuple[str, float]]
    vocabulary: tuple[str, ...]
    version: int
    track_hypotheses: list[list[tuple[str, float]]] | None = None


@dataclass
class LabelFrameResult:
    """LSeg on one frame: ``label_map`` uint16 HxW of vocabulary indices (``other_value``
    where no phrase is similar enough); the vocabulary and its version."""

    label_map: np.ndarray
    vocabulary: tuple[str, ...]
    version: int
    other_value: int = 255
    shares: dict[str, float] = field(default_factory=dict)
