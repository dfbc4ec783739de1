"""ByteTrack-style multi-object tracking by detection (ROS-free).

Association follows ByteTrack (Zhang et al., ECCV 2022): every track's box is predicted by a
constant-velocity Kalman filter on (cx, cy, aspect, height); detections scoring at least
``high_threshold`` are matched first to the confirmed and lost tracks, then the remaining
*tracked* tracks get a second chance with the low-score detections (``low_threshold`` ≤ score <
``high_threshold``: the occluded, blurred objects that a plain score cut would lose), and the
tentative tracks are matched to the high detections left. A detection nobody claims starts a
tentative track when it scores ``new_track_threshold`` or more; a tentative track is confirmed
after ``min_hits`` consecutive matched frames; a track unmatched for more than ``max_age``
frames is deleted, so IDs survive occlusions up to that many frames.

Why this module and not a tracking package: ``supervision`` (its ``ByteTrack``) pulls
matplotlib, SciPy, PyAV and requests into the runtime (~120 MB), ``trackers`` additionally
pulls ``opencv-python`` 5 (clashes with the headless OpenCV 4 the nodes use), ``boxmot`` needs
torch, and ``norfair`` has no two-threshold (ByteTrack) association. The parts that are a
solved problem come from a library: the assignment is ``lap.lapjv`` (the LAPJV solver the
official ByteTrack uses; one 1.7 MB wheel, numpy only), with SciPy's
``linear_sum_assignment`` as a fallback when lap is absent. The Kalman filter is the standard
SORT/ByteTrack model, vectorised over all tracks in numpy (one batched predict and update per
frame), which is what keeps 50 boxes well under a millisecond (``perception2d bench track``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

#: ``track.*`` defaults (ByteTrack's published settings, min_hits/max_age in frames)
DEFAULTS: dict[str, Any] = {
    "high_threshold": 0.5,       # first association + new tracks use detections >= this
    "low_threshold": 0.1,        # second association uses low_threshold <= score < high
    "new_track_threshold": 0.5,  # an unmatched detection starts a track only from this score
    "match_iou": 0.2,            # min IoU (score-weighted) of the first association
    "low_match_iou": 0.5,        # min IoU of the second (low-score) association
    "min_hits": 2,               # matched frames before a new track is published
    "max_age": 30,               # frames a lost track is kept (predicted) before deletion
    "class_aware": False,        # True: a track only matches detections of its class
}

#: parameter descriptions (the nodes declare ``track.<key>`` with these)
DESCRIPTIONS: dict[str, str] = {
    "high_threshold": "tracker: detections scoring at least this are matched first (ByteTrack "
                      "track_thresh); lower the detector's conf_threshold to low_threshold so "
                      "the second association gets the low-score boxes",
    "low_threshold": "tracker: detections in [low_threshold, high_threshold) only continue "
                     "existing tracks (second association); below it they are ignored",
    "new_track_threshold": "tracker: an unmatched detection starts a new track only from this "
                           "score",
    "match_iou": "tracker: min IoU between a track's predicted box and a high-score detection "
                 "(first association; IoU weighted by the score)",
    "low_match_iou": "tracker: min IoU for the second (low-score) association",
    "min_hits": "tracker: consecutive matched frames before a new track is published and gets "
                "its id (1 = at once)",
    "max_age": "tracker: frames a lost track is kept and predicted; a detection matching it "
               "within that many frames keeps the old id (survives short occlusions)",
    "class_aware": "tracker: true = a track only matches detections of its own class; false "
                   "(ByteTrack) = class-agnostic, robust to class flicker (car/truck)",
}

# Kalman filter noise, relative to the box height (the SORT/DeepSORT/ByteTrack values)
_STD_POS = 1.0 / 20.0
_STD_VEL = 1.0 / 160.0
_F = np.eye(8)
_F[:4, 4:] = np.eye(4)
_H = np.eye(4, 8)

TENTATIVE, TRACKED, LOST = 0, 1, 2


@dataclass(frozen=True)
class TrackerConfig:
    """Validated tracker settings (see :data:`DEFAULTS`)."""

    high_threshold: float = 0.5
    low_threshold: float = 0.1
    new_track_threshold: float = 0.5
    match_iou: float = 0.2
    low_match_iou: float = 0.5
    min_hits: int = 2
    max_age: int = 30
    class_aware: bool = False

    def __post_init__(self) -> None:
        for key in ("high_threshold", "low_threshold", "new_track_threshold", "match_iou",
                    "low_match_iou"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0):
                raise ValueError(f"track.{key}: {v} is outside [0, 1]")
        if self.low_threshold > self.high_threshold:
            raise ValueError(f"track.low_threshold: {self.low_threshold} is above "
                             f"track.high_threshold {self.high_threshold}")
        if int(self.min_hits) < 1:
            raise ValueError(f"track.min_hits: {self.min_hits} must be >= 1")
        if int(self.max_age) < 0:
            raise ValueError(f"track.max_age: {self.max_age} must be >= 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrackerConfig":
        t = {**DEFAULTS, **(d or {})}
        unknown = sorted(set(t) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"track: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
        return cls(float(t["high_threshold"]), float(t["low_threshold"]),
                   float(t["new_track_threshold"]), float(t["match_iou"]),
                   float(t["low_match_iou"]), int(t["min_hits"]), int(t["max_age"]),
                   bool(t["class_aware"]))


@dataclass
class TrackResult:
    """The tracker's answer for one frame.

    ``indices``: (M,) int64 indices into the frame's detections that belong to a confirmed
    track, in detection order; ``track_ids``: (M,) int64 their track ids (stable for the
    object's life, never reused by this tracker's id source)."""

    indices: np.ndarray
    track_ids: np.ndarray


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of xyxy boxes ``a`` (N, 4) and ``b`` (M, 4); 0 for empty boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _solver() -> Any:
    try:
        import lap

        def solve(cost: np.ndarray, limit: float) -> list[tuple[int, int]]:
            _, x, _ = lap.lapjv(cost, extend_cost=True, cost_limit=limit)
            return [(i, int(j)) for i, j in enumerate(x) if j >= 0]
    except ImportError:  # lap is a runtime requirement; SciPy (apt: python3-scipy) also works
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:
            raise ImportError("track: the tracker needs the `lap` package (pip install lap) "
                              "or SciPy for its assignment; neither is installed") from None

        def solve(cost: np.ndarray, limit: float) -> list[tuple[int, int]]:
            rows, cols = linear_sum_assignment(cost)
            return [(int(i), int(j)) for i, j in zip(rows, cols) if cost[i, j] <= limit]
    return solve


_SOLVE = None


def assign(cost: np.ndarray, max_cost: float) -> list[tuple[int, int]]:
    """Minimum-cost one-to-one assignment of rows to columns, pairs costing at most
    ``max_cost`` only (lap.lapjv; SciPy fallback)."""
    global _SOLVE
    if cost.size == 0:
        return []
    if _SOLVE is None:
        _SOLVE = _solver()
    return _SOLVE(np.ascontiguousarray(cost, np.float64), float(max_cost))


def _xyxy_to_xyah(b: np.ndarray) -> np.ndarray:
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    h_safe = np.maximum(h, 1e-6)
    return np.stack([b[:, 0] + w / 2, b[:, 1] + h / 2, w / h_safe, h_safe], axis=1)


def _xyah_to_xyxy(m: np.ndarray) -> np.ndarray:
    w = m[:, 2] * m[:, 3]
    return np.stack([m[:, 0] - w / 2, m[:, 1] - m[:, 3] / 2, m[:, 0] + w / 2,
                     m[:, 1] + m[:, 3] / 2], axis=1)


class ByteTracker:
    """Tracks of one camera stream. ``update`` once per frame, in stamp order.

    State lives in arrays over the tracks (Kalman means (T, 8) and covariances (T, 8, 8),
    ids, class ids, state, hits, frames since update), so one frame costs a handful of
    vectorised numpy calls plus up to three LAPJV solves."""

    def __init__(self, config: TrackerConfig | None = None,
                 id_source: Iterator[int] | None = None) -> None:
        self.config = config or TrackerConfig()
        self._ids = id_source if id_source is not None else itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Forget every track (ids already handed out are not reused)."""
        self.mean = np.zeros((0, 8))
        self.cov = np.zeros((0, 8, 8))
        self.track_ids = np.zeros(0, np.int64)
        self.class_ids = np.zeros(0, np.int64)
        self.state = np.zeros(0, np.int8)
        self.hits = np.zeros(0, np.int64)
        self.since_update = np.zeros(0, np.int64)
        self.frames = 0

    def __len__(self) -> int:
        return int(len(self.track_ids))

    @property
    def boxes(self) -> np.ndarray:
        """(T, 4) xyxy boxes of every kept track (Kalman estimate)."""
        return _xyah_to_xyxy(self.mean[:, :4])

    # ------------------------------------------------------------------ Kalman filter
    def _predict(self) -> None:
        if not len(self):
            return
        h = self.mean[:, 3]
        std = np.concatenate([
            np.stack([_STD_POS * h, _STD_POS * h, np.full_like(h, 1e-2), _STD_POS * h], 1),
            np.stack([_STD_VEL * h, _STD_VEL * h, np.full_like(h, 1e-5), _STD_VEL * h], 1)],
            axis=1)
        # a lost track's height velocity is frozen (ByteTrack): it must not shrink to nothing
        self.mean[self.state != TRACKED, 7] = 0.0
        self.mean = self.mean @ _F.T
        self.cov = _F @ self.cov @ _F.T
        self.cov[:, range(8), range(8)] += std ** 2

    def _update(self, rows: np.ndarray, xyah: np.ndarray) -> None:
        mean, cov = self.mean[rows], self.cov[rows]
        h = mean[:, 3]
        r = np.stack([_STD_POS * h, _STD_POS * h, np.full_like(h, 1e-1), _STD_POS * h], 1) ** 2
        s = cov[:, :4, :4].copy()                 # H P H^T
        s[:, range(4), range(4)] += r
        pht = cov[:, :, :4]                       # P H^T  (T, 8, 4)
        gain = np.linalg.solve(s, pht.transpose(0, 2, 1)).transpose(0, 2, 1)
        innov = xyah - mean[:, :4]
        self.mean[rows] = mean + np.einsum("tij,tj->ti", gain, innov)
        self.cov[rows] = cov - gain @ cov[:, :4, :]

    # ------------------------------------------------------------------ one frame
    def update(self, xyxy: np.ndarray, scores: np.ndarray,
               class_ids: np.ndarray | None = None) -> TrackResult:
        """Associate this frame's detections (xyxy (N, 4), scores (N,), class ids (N,))
        and return which of them belong to confirmed tracks, with their ids."""
        cfg = self.config
        boxes = np.asarray(xyxy, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        classes = (np.zeros(len(boxes), np.int64) if class_ids is None
                   else np.asarray(class_ids, np.int64).reshape(-1))
        if len(scores) != len(boxes) or len(classes) != len(boxes):
            raise ValueError(f"track: {len(boxes)} boxes, {len(scores)} scores and "
                             f"{len(classes)} class ids (need one each per detection)")
        self.frames += 1
        self._predict()
        pred = self.boxes
        det_track = np.full(len(boxes), -1, np.int64)  # detection → track row
        matched = np.zeros(len(self), bool)

        high = np.flatnonzero(scores >= cfg.high_threshold)
        low = np.flatnonzero((scores >= cfg.low_threshold) & (scores < cfg.high_threshold))

        def match(tracks: np.ndarray, dets: np.ndarray, min_iou: float,
                  fuse_score: bool) -> np.ndarray:
            """Assign ``dets`` to ``tracks``; returns the detections left unmatched."""
            if not len(tracks) or not len(dets):
                return dets
            sim = iou_matrix(pred[tracks], boxes[dets])
            gate = sim >= min_iou
            if fuse_score:  # ByteTrack's score fusion: confident boxes win ties
                sim = sim * scores[dets][None, :]
            if cfg.class_aware:
                gate &= self.class_ids[tracks][:, None] == classes[dets][None, :]
            cost = np.where(gate, 1.0 - sim, 2.0)
            pairs = assign(cost, 1.0)
            used = np.zeros(len(dets), bool)
            for ti, di in pairs:
                if cost[ti, di] > 1.0:
                    continue
                det_track[dets[di]] = tracks[ti]
                matched[tracks[ti]] = True
                used[di] = True
            return dets[~used]

        confirmed = np.flatnonzero(self.state != TENTATIVE)
        high_left = match(confirmed, high, cfg.match_iou, True)
        still_tracked = np.flatnonzero((self.state == TRACKED) & ~matched)
        match(still_tracked, low, cfg.low_match_iou, False)
        tentative = np.flatnonzero(self.state == TENTATIVE)
        high_left = match(tentative, high_left, max(cfg.match_iou, 0.3), True)

        # update the matched tracks
        m_dets = np.flatnonzero(det_track >= 0)
        rows = det_track[m_dets]
        if len(rows):
            self._update(rows, _xyxy_to_xyah(boxes[m_dets]))
            self.class_ids[rows] = classes[m_dets]
            self.hits[rows] += 1
            self.since_update[rows] = 0
            promote = rows[(self.state[rows] == TENTATIVE) & (self.hits[rows] >= cfg.min_hits)]
            self.state[rows[self.state[rows] == LOST]] = TRACKED
            self.state[promote] = TRACKED
            for r in promote:  # ids are handed out on confirmation: no gaps from tentatives
                self.track_ids[r] = next(self._ids)
        self.since_update[~matched] += 1
        lost = ~matched & (self.state == TRACKED)
        self.state[lost] = LOST
        keep = matched | ((self.state == LOST) & (self.since_update <= cfg.max_age))
        # rows of kept tracks move: remap det_track through the new row numbers
        if len(keep):
            new_row = np.cumsum(keep) - 1
            det_track = np.where(det_track >= 0, new_row[np.maximum(det_track, 0)], -1)
        self._select(keep)

        # new tracks from unclaimed confident detections
        born = high_left[scores[high_left] >= cfg.new_track_threshold]
        if len(born):
            xyah = _xyxy_to_xyah(boxes[born])
            n = len(born)
            mean = np.zeros((n, 8))
            mean[:, :4] = xyah
            h = xyah[:, 3]
            std = np.stack([2 * _STD_POS * h, 2 * _STD_POS * h, np.full_like(h, 1e-2),
                            2 * _STD_POS * h, 10 * _STD_VEL * h, 10 * _STD_VEL * h,
                            np.full_like(h, 1e-5), 10 * _STD_VEL * h], 1)
            cov = np.zeros((n, 8, 8))
            cov[:, range(8), range(8)] = std ** 2
            first = cfg.min_hits <= 1  # else confirmed (and given an id) after min_hits
            start = len(self)
            self.mean = np.concatenate([self.mean, mean])
            self.cov = np.concatenate([self.cov, cov])
            new_ids = (np.fromiter((next(self._ids) for _ in range(n)), np.int64, n) if first
                       else np.zeros(n, np.int64))
            self.track_ids = np.concatenate([self.track_ids, new_ids])
            self.class_ids = np.concatenate([self.class_ids, classes[born]])
            self.state = np.concatenate(
                [self.state, np.full(n, TRACKED if first else TENTATIVE, np.int8)])
            self.hits = np.concatenate([self.hits, np.ones(n, np.int64)])
            self.since_update = np.concatenate([self.since_update, np.zeros(n, np.int64)])
            det_track[born] = np.arange(start, start + n)

        out = np.flatnonzero(det_track >= 0)
        out = out[self.state[det_track[out]] == TRACKED]
        return TrackResult(out.astype(np.int64), self.track_ids[det_track[out]].copy())

    def _select(self, keep: np.ndarray) -> None:
        self.mean, self.cov = self.mean[keep], self.cov[keep]
        self.track_ids, self.class_ids = self.track_ids[keep], self.class_ids[keep]
        self.state, self.hits = self.state[keep], self.hits[keep]
        self.since_update = self.since_update[keep]
