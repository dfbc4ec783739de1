"""Pipeline stage ``track``: ByteTrack-style tracking of the frame's detections
(:mod:`perception2d_ros.models.tracking.bytetrack`), one tracker per camera stream.

After this stage ``frame.detections`` holds only the detections of confirmed tracks (in
detection order) and ``frame.track_ids`` their track ids as strings, which the messages carry
in ``Detection2D.id``; SAM and CLIP downstream work on these tracked detections. Class ids,
class names and scores are the detector's, unchanged.

Streams are keyed by ``frame.source`` (the camera namespace in multi-camera nodes). A stamp
that goes backwards or a ``frame_id`` change on a stream resets that stream's tracks (one log
line); ids are drawn from one counter per stage, so they are never reused, not even across
cameras or after a reset.
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable

import numpy as np

from perception2d_ros.models.tracking.bytetrack import DEFAULTS, ByteTracker, TrackerConfig

LOG = logging.getLogger("perception2d.track")

__all__ = ["DEFAULTS", "TrackStage", "build_stage"]


class TrackStage:
    name = "track"

    def __init__(self, config: TrackerConfig | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.config = config or TrackerConfig()
        self.log = log or LOG.warning
        self._ids = itertools.count(1)
        self.trackers: dict[str, ByteTracker] = {}
        self._last: dict[str, tuple[int, str]] = {}   # source → (stamp_ns, frame_id)
        self.resets = 0
        self._class_index: dict[str, int] = {}   # class name → stable int (class_aware)

    def tracker(self, source: str = "") -> ByteTracker:
        """The tracker of camera stream ``source`` (created on first use)."""
        t = self.trackers.get(source)
        if t is None:
            t = self.trackers[source] = ByteTracker(self.config, self._ids)
        return t

    def process(self, frame: Any) -> None:
        t0 = time.perf_counter()
        source = getattr(frame, "source", "") or ""
        tracker = self.tracker(source)
        last = self._last.get(source)
        if last is not None and len(tracker):
            why = None
            if frame.stamp_ns < last[0]:
                why = (f"header.stamp went back {(last[0] - frame.stamp_ns) / 1e9:.3f} s "
                       "(bag loop or replay?)")
            elif frame.frame_id != last[1]:
                why = f"header.frame_id changed '{last[1]}' -> '{frame.frame_id}'"
            if why is not None:
                self.resets += 1
                self.log(f"track: {why} on camera '{source or '/'}': {len(tracker)} tracks "
                         "reset")
                tracker.reset()
        self._last[source] = (frame.stamp_ns, frame.frame_id)
        det = frame.detections
        if det is None:
            raise ValueError("track: no detections on this frame; the track stage needs the "
                             "detect stage (or detections_in) before it")
        # class names, not ids: ids from a Detection2DArray are numbered per message
        classes = np.fromiter((self._class_index.setdefault(n, len(self._class_index))
                               for n in det.class_names), np.int64, len(det))
        res = tracker.update(det.xyxy, det.scores, classes)
        frame.detections = det.filter(res.indices)
        frame.track_ids = [str(int(i)) for i in res.track_ids]
        if frame.ground is not None and len(frame.ground) == len(det):
            frame.ground = np.asarray(frame.ground)[res.indices]
        frame.timings[self.name] = time.perf_counter() - t0


def build_stage(cfg: dict[str, Any]) -> TrackStage:
    from perception2d_ros.models.tracking.bytetrack import assign

    stage = TrackStage(TrackerConfig.from_dict(cfg.get("track") or {}))
    assign(np.zeros((1, 1)), 1.0)  # load the solver at configure: a missing one fails here
    return stage
