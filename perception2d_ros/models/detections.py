"""The result type of every detector: boxes, scores, class ids and names of one image."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np


@dataclass
class Detections:
    """Detections of one image, in the pixel coordinates of the image the caller gave.

    Attributes:
        xyxy: (N, 4) float32 boxes x1, y1, x2, y2 (x right, y down, x2 >= x1, y2 >= y1).
        scores: (N,) float32 confidences in [0, 1].
        class_ids: (N,) int64 class indices (contiguous, 0-based, into the model's labels).
        class_names: N strings, the name of each detection's class.

    Arrays are converted to these dtypes in ``__post_init__``; shapes, lengths and values are
    validated there (``ValueError`` naming the field).
    """

    xyxy: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float32)
        if xyxy.size == 0:
            xyxy = xyxy.reshape(0, 4)
        if xyxy.ndim != 2 or xyxy.shape[1] != 4:
            raise ValueError(f"Detections.xyxy must have shape (N, 4); got {xyxy.shape}")
        n = xyxy.shape[0]
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if scores.shape != (n,):
            raise ValueError(f"Detections.scores must have shape ({n},) to match xyxy; "
                             f"got {np.shape(self.scores)}")
        raw_ids = np.asarray(self.class_ids)
        if raw_ids.size and raw_ids.dtype.kind not in "iu":
            if not np.all(np.mod(raw_ids, 1) == 0):
                raise ValueError("Detections.class_ids must be integers; got "
                                 f"{raw_ids.dtype} values {raw_ids[:5]}")
        class_ids = raw_ids.astype(np.int64, copy=False).reshape(-1)
        if class_ids.shape != (n,):
            raise ValueError(f"Detections.class_ids must have shape ({n},) to match xyxy; "
                             f"got {raw_ids.shape}")
        names = list(self.class_names)
        if len(names) != n:
            raise ValueError(f"Detections.class_names must have {n} entries (one per box); "
                             f"got {len(names)}")
        if not all(isinstance(s, str) for s in names):
            raise ValueError("Detections.class_names must be strings")
        # one cheap pass for valid input (the common case); the checks below name the field
        if n and not (np.isfinite(xyxy).all() and np.isfinite(scores).all()
                      and (xyxy[:, 2:] >= xyxy[:, :2]).all() and class_ids.min() >= 0):
            if not np.isfinite(xyxy).all():
                raise ValueError("Detections.xyxy contains NaN or inf")
            bad = np.flatnonzero((xyxy[:, 2] < xyxy[:, 0]) | (xyxy[:, 3] < xyxy[:, 1]))
            if bad.size:
                raise ValueError(f"Detections.xyxy rows must have x2 >= x1 and y2 >= y1; "
                                 f"row {bad[0]} is {xyxy[bad[0]].tolist()}")
            if not np.isfinite(scores).all():
                raise ValueError("Detections.scores contains NaN or inf")
            if (class_ids < 0).any():
                raise ValueError("Detections.class_ids must be >= 0")
        self.xyxy, self.scores, self.class_ids, self.class_names = xyxy, scores, class_ids, names

    # ------------------------------------------------------------------ constructors
    @classmethod
    def empty(cls) -> "Detections":
        """No detections."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                   np.zeros(0, np.int64), [])

    @classmethod
    def from_arrays(cls, xyxy: np.ndarray, scores: np.ndarray, class_ids: np.ndarray,
                    labels: Sequence[str]) -> "Detections":
        """Build from arrays, naming each detection from ``labels`` (index → name).

        Class ids without a label are named ``"class_<id>"``."""
        ids = np.asarray(class_ids).astype(np.int64, copy=False).reshape(-1)
        nl = len(labels)
        names = [labels[i] if 0 <= i < nl else f"class_{i}" for i in ids.tolist()]
        return cls(xyxy, scores, ids, names)

    # ------------------------------------------------------------------ helpers
    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    def filter(self, keep: np.ndarray | Sequence[int] | Sequence[bool]) -> "Detections":
        """The detections selected by ``keep``: an (N,) bool mask or an index array
        (order kept as given)."""
        k = np.asarray(keep)
        if k.dtype == np.bool_:
            if k.shape != (len(self),):
                raise ValueError(f"filter mask must have shape ({len(self)},); got {k.shape}")
            idx = np.flatnonzero(k)
        else:
            idx = k.astype(np.int64).reshape(-1)
            if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
                raise IndexError(f"filter index out of range for {len(self)} detections")
        return Detections(self.xyxy[idx], self.scores[idx], self.class_ids[idx],
                          [self.class_names[i] for i in idx.tolist()])

    def above(self, min_score: float) -> "Detections":
        """Detections with ``score >= min_score``."""
        return self.filter(self.scores >= min_score)

    def of_classes(self, classes: Iterable[int | str]) -> "Detections":
        """Detections whose class id or class name is in ``classes``."""
        wanted = set(classes)
        ids = {c for c in wanted if isinstance(c, (int, np.integer))}
        names = {c for c in wanted if isinstance(c, str)}
        mask = np.array([(int(i) in ids) or (n in names)
                         for i, n in zip(self.class_ids, self.class_names)], dtype=bool)
        return self.filter(mask.reshape(len(self)))

    def to_json(self, ndigits: int | None = 2) -> list[dict[str, Any]]:
        """``[{"class_name": str, "score": float, "xyxy": [x1, y1, x2, y2]}, ...]``
        (plain python types; coordinates rounded to ``ndigits`` unless None)."""
        out = []
        for box, score, name in zip(self.xyxy.tolist(), self.scores.tolist(), self.class_names):
            if ndigits is not None:
                box = [round(v, ndigits) for v in box]
            out.append({"class_name": name, "score": round(score, 4), "xyxy": box})
        return out
