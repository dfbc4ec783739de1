"""Pipeline stage ``detect``: YOLO on the frame's working image (on the host, or on the models'
device when frames stay there, ``detect.device_frames``), plus each detection's ground-plane
position when the camera pose is known. :func:`build_stage` makes it from the config."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np

from perception2d_ros.pipeline.frame import Frame

LOG = logging.getLogger("perception2d.pipeline")

DEFAULTS: dict[str, Any] = {
    "model": "yolox_nano",
    "backend": "auto",
    "device": "auto",
    "precision": "fp32",
    "threads": 0,
    "conf_threshold": 0.3,
    "iou_threshold": 0.45,
    "max_detections": 100,
    "classes": [],
    "allow_outside_models_dir": False,  # a detect.model path outside models_dir
    "fallback": True,  # engine build/load failure (GPU OOM …): next backend, warning
    # keep frames on the models' torch device from upload to postprocess (rectify,
    # letterbox, decode + NMS, SAM pre/post): auto = when the detector runs on torch CUDA
    "device_frames": "auto",
}


class DetectStage:
    """YOLO detection on the working image; optional ground-plane positions.

    ``device_frames`` (engines.device.DeviceFrames) and ``device_detector``
    (models.yolo.device.DeviceDetector of ``detector``): detect on the frame's device copy."""

    name = "detect"

    def __init__(self, detector: Any, extrinsics: Any = None, plane_height: float = 0.0,
                 device_frames: Any = None, device_detector: Any = None) -> None:
        self.detector = detector
        self.extrinsics = extrinsics
        self.plane_height = plane_height
        self.device_frames = device_frames
        self.device_detector = device_detector

    def process(self, frame: Frame) -> None:
        t0 = time.perf_counter()
        if self.device_detector is not None:
            if frame.device_bgr is None:
                frame.device_bgr = self.device_frames.upload(frame.bgr())
            frame.detections = self.device_detector.detect(frame.device_bgr)
        else:
            frame.detections = self.detector.detect(frame.bgr())
        extrinsics = frame.extrinsics if frame.extrinsics is not None else self.extrinsics
        if extrinsics is not None and frame.camera is not None:
            frame.ground = ground_positions(frame, extrinsics, self.plane_height)
        frame.timings[self.name] = time.perf_counter() - t0


def ground_positions(frame: Frame, extrinsics: Any, plane_height: float) -> np.ndarray:
    """Nx3 base-frame points where each detection's bottom-centre pixel meets the ground
    plane (NaN rows where the ray misses it). Pixels are in the working image: rectified
    when a rectify stage ran (then the rectified camera is used), raw otherwise."""
    det = frame.detections
    if det is None or len(det) == 0:
        return np.zeros((0, 3), np.float64)
    xyxy = np.asarray(det.xyxy, np.float64)
    pts = np.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2.0, xyxy[:, 3]], axis=1)
    return frame.camera.pixel_to_ground(pts, extrinsics, plane_height=plane_height,
                                        rectified=frame.rectified is not None)


def load_detector(cfg: dict[str, Any], log: Callable[[str], None] = LOG.info) -> Any:
    """The ``detect`` group's YoloDetector, loaded and warmed up (one inference: the first
    run of an engine allocates and tunes, hundreds of ms, which would otherwise stall the
    first live frames); logs what it runs on."""
    from perception2d_ros.engines.factory import EngineConfig
    from perception2d_ros.models.yolo.detector import YoloDetector

    d = {**DEFAULTS, **(cfg.get("detect") or {})}
    ecfg = EngineConfig(backend=d["backend"], device=d["device"], precision=d["precision"],
                        threads=int(d["threads"]) or None,
                        fallback=bool(d.get("fallback", True)))
    detector = YoloDetector.from_model(
        d["model"], engine_config=ecfg, conf=float(d["conf_threshold"]),
        iou=float(d["iou_threshold"]), max_det=int(d["max_detections"]),
        classes=list(d["classes"]) or None, models_dir=cfg.get("models_dir") or None,
        allow_outside=bool(d.get("allow_outside_models_dir", False)))
    h, w = detector.input_hw
    detector.detect(np.zeros((h, w, 3), np.uint8))
    log(f"detect: {detector.describe() if hasattr(detector, 'describe') else d['model']}")
    return detector


def configured_extrinsics(cfg: dict[str, Any]) -> Any:
    """The camera pose the ``extrinsics`` group gives (source: params), or None."""
    e = cfg["extrinsics"]
    if not (e["enabled"] and e.get("source", "params") == "params"):
        return None
    from perception2d_ros.geometry.extrinsics import Extrinsics

    q = [float(v) for v in e.get("rotation_quaternion") or []]
    if any(q):  # camera body orientation as a quaternion [x, y, z, w] (URDF style)
        from perception2d_ros.geometry.extrinsics import BODY_TO_OPTICAL

        body = Extrinsics.from_quaternion(e["translation"], q, parent_frame=e["parent_frame"])
        return Extrinsics(e["parent_frame"], body.translation, body.rotation @ BODY_TO_OPTICAL)
    return Extrinsics.from_body_pose(e["translation"], e["rotation_rpy"],
                                     parent_frame=e["parent_frame"])


def build_stage(cfg: dict[str, Any], detector: Any = None, device_frames: Any = None,
                log: Callable[[str], None] = LOG.info) -> DetectStage:
    """The detect stage of a merged config. ``detector``: one :func:`load_detector` already
    made (else it is loaded here); ``device_frames``: frames stay on that device, so the
    detector also runs there (its device runner warmed up here, at configure)."""
    if detector is None:
        detector = load_detector(cfg, log)
    device_detector = None
    if device_frames is not None:
        from perception2d_ros.models.yolo.device import DeviceDetector

        device_detector = DeviceDetector(detector)
        h, w = detector.input_hw   # warm-up (CUDA graph capture) at configure, not live
        device_detector.detect(device_frames.upload(np.zeros((h, w, 3), np.uint8)))
    return DetectStage(detector, configured_extrinsics(cfg),
                       float(cfg["extrinsics"]["plane_height"]), device_frames, device_detector)
