"""SAM results: :class:`SamResult` (masks, scores, stability per prompt), the metrics on
masks (:func:`stability_score`, :func:`mask_bboxes`, :func:`mask_iou`) and the instance-id
image of a result (:func:`instance_id_image`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from perception2d_ros.models.sam.spec import MASK_THRESHOLD, STABILITY_OFFSET


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

