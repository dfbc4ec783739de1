"""What a perception node reports: /diagnostics (frame counts, drops, stage timings, error
counters, backends, tracks) and the core modules' warnings forwarded to the node's log."""
from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue


class CoreLogToNode(logging.Handler):
    """Warnings of the core modules raised by this thread (while the node configures: engine
    fallback, TensorRT builds, ignored options) go to the node's log and /rosout."""

    def __init__(self, logger: Any) -> None:
        super().__init__(logging.WARNING)
        self._logger = logger
        self._thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._thread:
            log = self._logger.error if record.levelno >= logging.ERROR else self._logger.warning
            log(record.getMessage())


class NodeDiagnostics:
    """PerceptionNode's /diagnostics (a mixin of the node)."""

    def diagnostics(self) -> dict[str, str]:
        values = {"frames_in": str(self.frames_in), "frames_out": str(self.frames_out),
                  "dropped_newest_wins": str(sum(c.slot.dropped for c in self.cams)),
                  "stages": ",".join(self.pipeline.names if self.pipeline else [])}
        if self.pipeline is not None:
            for stage in self.pipeline.stages:
                engine = getattr(getattr(stage, "detector", None), "engine", None)
                if engine is not None:
                    values[f"{stage.name}.backend"] = f"{engine.backend}({engine.device})"
        track = self._stage("track")
        if track is not None:
            values["track.active_tracks"] = str(sum(len(t) for t in track.trackers.values()))
            values["track.resets"] = str(track.resets)
        if self._latency:
            arr = np.asarray(self._latency) * 1e3
            values["receive_to_publish_ms_p50"] = f"{np.percentile(arr, 50):.2f}"
            values["receive_to_publish_ms_p95"] = f"{np.percentile(arr, 95):.2f}"
        if len(self.cams) > 1:
            for cam in self.cams:
                values[f"camera.{cam.prefix}.frames_out"] = str(cam.frames_out)
                values[f"camera.{cam.prefix}.dropped"] = str(cam.slot.dropped)
        unmatched = sum(c.sync.unmatched_images for c in self.cams if c.sync is not None)
        values["unmatched_images"] = str(unmatched)
        for k, v in sorted(self._timings.items()):
            arr = np.asarray(v) * 1e3
            values[f"{k}_ms_p50"] = f"{np.percentile(arr, 50):.2f}"
            values[f"{k}_ms_p95"] = f"{np.percentile(arr, 95):.2f}"
        for k, n in sorted(self.errors.counts.items()):
            values[f"errors.{k}"] = str(n)
        return values

    def _publish_diagnostics(self) -> None:
        if not self.context.ok():  # shutting down (Ctrl-C): nothing to publish to
            return
        values = self.diagnostics()
        errors = sum(self.errors.counts.values())
        status = DiagnosticStatus(
            level=DiagnosticStatus.OK if not errors else DiagnosticStatus.WARN,
            name=f"perception2d: {self.get_fully_qualified_name()}",
            message="ok" if not errors else f"{errors} bad inputs so far",
            hardware_id=self.get_namespace(),
            values=[KeyValue(key=k, value=v) for k, v in values.items()])
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        try:
            self._diag_pub.publish(msg)
        except Exception:  # the context went away between the check and the publish
            if self.context.ok():
                raise
