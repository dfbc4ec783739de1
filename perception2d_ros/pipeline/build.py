"""ROS-free perception pipeline: stages that run on one in-memory frame.

A :class:`Frame` carries the image (as received, converted once to a numpy array), its stamp
and frame id, the camera model, and every stage's results. Stages (rectify → detect → SAM →
CLIP → LSeg, with ``track`` after detect) mutate the frame in place and record their time in ``frame.timings``. The ROS
nodes, the offline ``perception2d process`` tool and the benchmarks all run these same stage
objects, so separate-node mode, pipeline mode and offline mode produce identical results.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from perception2d_ros.io.image_codec import message_buffer_array, message_buffer_of

LOG = logging.getLogger("perception2d.pipeline")

STAGE_ORDER = ("rectify", "detect", "track", "sam", "clip", "lseg")


@dataclass
class Frame:
    """One camera frame moving through the pipeline.

    ``image``: HxW or HxWxC array in ``encoding`` (as received). ``camera``: the raw camera's
    CameraModel, or None when the input is already rectified and no calibration is known.
    Stage outputs are attached as attributes; ``timings`` maps stage name → seconds.
    """

    image: np.ndarray
    encoding: str
    stamp_ns: int
    frame_id: str
    camera: Any = None
    rectified: np.ndarray | None = None
    rectified_encoding: str | None = None
    detections: Any = None
    ground: Any = None
    masks: Any = None
    clip: Any = None
    labels: Any = None
    vocabulary_version: int | None = None
    # camera pose in the base frame for this frame (extrinsics.source: tf looks it up at the
    # stamp; None = the detect stage's configured extrinsics); aligned depth (HxW metres,
    # NaN = none, registered to the raw image) or None; 3D objects (core.objects3d.Objects3D)
    extrinsics: Any = None
    depth: np.ndarray | None = None
    objects: Any = None
    # camera stream this frame belongs to (camera namespace; keys per-camera state: tracks)
    source: str = ""
    # track id of each detection (strings, Detection2D.id) once a track stage ran
    track_ids: list[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # the working image as an HxWx3 uint8 BGR tensor on the models' device, when the
    # pipeline keeps frames there (``detect.device_frames``); None otherwise
    device_bgr: Any = None
    _bgr_cache: np.ndarray | None = None

    @property
    def working_image(self) -> np.ndarray:
        """The image later stages see: rectified when a rectify stage ran, else the input."""
        return self.rectified if self.rectified is not None else self.image

    @property
    def working_encoding(self) -> str:
        return self.rectified_encoding if self.rectified is not None else self.encoding

    def bgr(self) -> np.ndarray:
        """The working image as HxWx3 uint8 BGR (converted once per frame, then cached)."""
        if self._bgr_cache is None:
            img, enc = self.working_image, self.working_encoding
            self._bgr_cache = img if enc == "bgr8" else convert_image(img, enc, "bgr8",
                                                                      "the models")
        return self._bgr_cache


YUV422 = ("yuv422", "yuv422_yuy2", "uyvy", "yuyv")


def convert_image(image: np.ndarray, encoding: str, dst: str, purpose: str) -> np.ndarray:
    """:func:`image_codec.convert` of a received image, with errors naming the message field
    (``image.width`` / ``image.encoding``) so the nodes count and log them under it."""
    from perception2d_ros.io.image_codec import convert

    if encoding in YUV422 and image.shape[1] % 2:
        raise ValueError(f"image.width {image.shape[1]} is odd; {encoding!r} packs pixel "
                         "pairs (4:2:2), so the width must be even")
    try:
        return convert(image, encoding, dst)
    except ValueError as exc:
        raise ValueError(f"image.encoding {encoding!r} cannot be converted to {dst} for "
                         f"{purpose}: {exc}") from None


class Stage(Protocol):
    name: str

    def process(self, frame: Frame) -> None: ...


class RectifyStage:
    """Rectify with cached maps; maps are rebuilt only when the calibration changes."""

    name = "rectify"

    def __init__(self, interpolation: int | None = None,
                 output_encoding: str = "passthrough") -> None:
        import cv2

        self.interpolation = cv2.INTER_LINEAR if interpolation is None else interpolation
        # last output, reused when no one else holds it; the refcount of a sole owner is
        # measured through the same call so it holds on any CPython version
        # its memory is an array.array that an Image message takes as ``data`` with no copy
        self._out: np.ndarray = message_buffer_array((1,), np.uint8)
        self._sole_refs = self._out_refs()
        self.output_encoding = output_encoding
        self.device_frames: Any = None   # engines.device.DeviceFrames: rectify on the device

    def _out_refs(self) -> tuple[int, int]:
        # the array and its buffer: a message that took the buffer holds only the latter
        return sys.getrefcount(self._out), sys.getrefcount(message_buffer_of(self._out))

    def process(self, frame: Frame) -> None:
        if frame.camera is None:
            raise ValueError("camera_info.k: no calibration for this frame; rectify needs one")
        t0 = time.perf_counter()
        image, encoding = frame.image, frame.encoding
        if encoding.startswith("bayer_") or encoding in YUV422:  # demosaic / unpack first
            image, encoding = convert_image(image, encoding, "bgr8", "rectification"), "bgr8"
        cam = frame.camera
        if (image.shape[1], image.shape[0]) != tuple(cam.image_size):
            raise ValueError(
                f"camera_info.size {cam.image_size[0]}x{cam.image_size[1]} does not match image "
                f"{image.shape[1]}x{image.shape[0]}")
        dev = self.device_frames
        if dev is not None and encoding in ("bgr8", "rgb8", "mono8") and \
                self.interpolation in (0, 1):
            # upload once; rectify on the device; the host copy is what gets published
            from perception2d_ros.engines.device import to_bgr

            rect = dev.rectify(dev.upload(image), cam, self.interpolation)
            frame.device_bgr = to_bgr(rect, encoding)
            frame.rectified = image if cam.is_identity else dev.download(rect)
        elif cam.is_identity:
            frame.rectified = image
        else:
            # Reuse the previous output only when nothing else holds it any more (a frame,
            # message or view still holding it gets a fresh array): a fresh 2.7 MB array per
            # 720p frame costs ~1 ms of page faults, a quarter of the remap itself.
            if (self._out.shape != image.shape or self._out.dtype != image.dtype
                    or self._out_refs() != self._sole_refs):
                self._out = message_buffer_array(image.shape, image.dtype)
            frame.rectified = cam.rectify(image, interpolation=self.interpolation, out=self._out)
        if self.output_encoding not in ("passthrough", encoding):
            frame.rectified = convert_image(frame.rectified, encoding, self.output_encoding,
                                            f"output_encoding {self.output_encoding}")
            encoding = self.output_encoding
        frame.rectified_encoding = encoding
        frame.timings[self.name] = time.perf_counter() - t0


class DetectStage:
    """YOLO detection on the working image; optional ground-plane positions."""

    name = "detect"

    def __init__(self, detector: Any, extrinsics: Any = None, plane_height: float = 0.0) -> None:
        self.detector = detector
        self.extrinsics = extrinsics
        self.plane_height = plane_height
        self.device_frames: Any = None     # engines.device.DeviceFrames
        self.device_detector: Any = None   # engines.device.DeviceDetector of ``detector``

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


class Pipeline:
    """An ordered list of stages run on each frame. A stage that raises leaves the frame's
    later results unset; the error propagates to the caller (nodes log it, throttled)."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        names = [s.name for s in stages]
        order = [n for n in STAGE_ORDER if n in names]
        if names != order:
            raise ValueError(f"stages must run in the order {STAGE_ORDER}; got {names}")
        self.stages = list(stages)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def run(self, frame: Frame, on_stage: Callable[[str, Frame], None] | None = None) -> Frame:
        t0 = time.perf_counter()
        for stage in self.stages:
            stage.process(frame)
            if on_stage is not None:
                on_stage(stage.name, frame)
        frame.timings["total"] = time.perf_counter() - t0
        return frame


# --------------------------------------------------------------------------- configuration
DEFAULTS: dict[str, Any] = {
    "stages": ["rectify", "detect"],
    "interpolation": "linear",
    "output_encoding": "passthrough",
    "models_dir": "",
    # separate sam/clip nodes: detections_in carries track ids (a track_node upstream)
    "detections_in_tracked": False,
    "detect": {
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
    },
    "extrinsics": {
        "enabled": False,
        "parent_frame": "base_link",
        "translation": [0.0, 0.0, 0.0],
        "rotation_rpy": [0.0, 0.0, 0.0],
        "rotation_quaternion": [0.0, 0.0, 0.0, 0.0],
        "plane_height": 0.0,
        # params: translation/rotation above; tf: look up parent_frame <- image
        # header.frame_id on /tf_static + /tf at the image stamp
        "source": "params",
        "tf_timeout_s": 0.1,   # tf: how long a frame waits for /tf to reach its stamp
    },
    # aligned depth image (relative to the camera namespace, e.g. depth/image_raw; '' = none):
    # sensor_msgs/Image 16UC1 mm or 32FC1 m registered to the colour camera, paired by stamp
    "depth_topic": "",
}

INTERPOLATIONS = {"nearest": 0, "linear": 1, "cubic": 2, "area": 3, "lanczos": 4}


STAGE_GROUPS = ("detect", "extrinsics", "track", "sam", "clip", "lseg")


def _all_defaults() -> dict[str, Any]:
    from perception2d_ros.models.clip import stage as clip_stage
    from perception2d_ros.models.lseg import stage as lseg_stage
    from perception2d_ros.models.sam import stage as sam_stage
    from perception2d_ros.models.tracking import bytetrack as tracking

    d = dict(DEFAULTS)
    d["vocabulary"] = [""]  # shared by CLIP and LSeg; [""] = the stage's default vocabulary
    d["sam"], d["clip"], d["lseg"] = (dict(sam_stage.DEFAULTS), dict(clip_stage.DEFAULTS),
                                      dict(lseg_stage.DEFAULTS))
    d["track"] = dict(tracking.DEFAULTS)
    return d


def merge_config(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults (core + every stage) deep-merged with ``overrides``."""
    import copy

    out = copy.deepcopy(_all_defaults())

    def merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(out, overrides or {})
    return out


def validate_config(cfg: dict[str, Any]) -> None:
    """Raise ValueError naming the parameter for out-of-range or unknown values."""
    bad = [s for s in cfg["stages"] if s not in STAGE_ORDER]
    if bad:
        raise ValueError(f"stages: unknown stage(s) {bad}; known: {list(STAGE_ORDER)}")
    if cfg["output_encoding"] not in ("passthrough", "bgr8", "rgb8", "mono8"):
        raise ValueError(f"output_encoding: '{cfg['output_encoding']}' is not one of "
                         "passthrough, bgr8, rgb8, mono8")
    if cfg["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"interpolation: '{cfg['interpolation']}' is not one of "
                         f"{list(INTERPOLATIONS)}")
    d = cfg["detect"]
    for key in ("conf_threshold", "iou_threshold"):
        if not 0.0 <= float(d[key]) <= 1.0:
            raise ValueError(f"detect.{key}: {d[key]} is outside [0, 1]")
    if str(d.get("device_frames", "auto")) not in ("auto", "on", "off"):
        raise ValueError(f"detect.device_frames: '{d['device_frames']}' is not one of auto, "
                         "on, off")
    if int(d["max_detections"]) < 1:
        raise ValueError(f"detect.max_detections: {d['max_detections']} must be >= 1")
    e = cfg["extrinsics"]
    if len(e["translation"]) != 3 or len(e["rotation_rpy"]) != 3:
        raise ValueError("extrinsics.translation and extrinsics.rotation_rpy need 3 values each")
    if len(e.get("rotation_quaternion") or [0] * 4) != 4:
        raise ValueError("extrinsics.rotation_quaternion needs 4 values [x, y, z, w] "
                         "(all 0 = use rotation_rpy)")
    if e.get("source", "params") not in ("params", "tf"):
        raise ValueError(f"extrinsics.source: '{e['source']}' is not one of params, tf")
    if not float(e.get("tf_timeout_s", 0.1)) >= 0.0:
        raise ValueError(f"extrinsics.tf_timeout_s: {e['tf_timeout_s']} must be >= 0")
    if not isinstance(cfg.get("depth_topic", ""), str):
        raise ValueError(f"depth_topic: {cfg['depth_topic']!r} must be a topic name string")
    if "lseg" in cfg:
        from perception2d_ros.models.lseg.resample import parse_scales

        try:
            parse_scales(cfg["lseg"].get("scales", [1.0]))
        except ValueError as exc:
            raise ValueError(f"lseg.{exc}") from None
    if "track" in cfg:
        from perception2d_ros.models.tracking.bytetrack import TrackerConfig

        TrackerConfig.from_dict(cfg["track"])  # ValueError naming track.<key>


def build_pipeline(cfg: dict[str, Any], log: Callable[[str], None] = LOG.info) -> Pipeline:
    """Create the stage objects (loading models) for a merged, validated config."""
    from perception2d_ros.engines.model_params import check_engine_params, confine_model_params

    validate_config(cfg)
    check_engine_params(cfg)
    confine_model_params(cfg)  # every model parameter: inside models_dir unless allowed
    stages: list[Any] = []
    if "rectify" in cfg["stages"]:
        stages.append(RectifyStage(INTERPOLATIONS[cfg["interpolation"]],
                                   cfg["output_encoding"]))
    if "detect" in cfg["stages"]:
        from perception2d_ros.engines.factory import EngineConfig
        from perception2d_ros.models.yolo.detector import YoloDetector

        d = cfg["detect"]
        ecfg = EngineConfig(backend=d["backend"], device=d["device"], precision=d["precision"],
                            threads=int(d["threads"]) or None,
                            fallback=bool(d.get("fallback", True)))
        detector = YoloDetector.from_model(
            d["model"], engine_config=ecfg, conf=float(d["conf_threshold"]),
            iou=float(d["iou_threshold"]), max_det=int(d["max_detections"]),
            classes=list(d["classes"]) or None, models_dir=cfg.get("models_dir") or None,
            allow_outside=bool(d.get("allow_outside_models_dir", False)))
        extr = None
        e = cfg["extrinsics"]
        if e["enabled"] and e.get("source", "params") == "params":
            from perception2d_ros.geometry.extrinsics import Extrinsics

            q = [float(v) for v in e.get("rotation_quaternion") or []]
            if any(q):  # camera body orientation as a quaternion [x, y, z, w] (URDF style)
                from perception2d_ros.geometry.extrinsics import BODY_TO_OPTICAL

                body = Extrinsics.from_quaternion(e["translation"], q,
                                                  parent_frame=e["parent_frame"])
                extr = Extrinsics(e["parent_frame"], body.translation,
                                  body.rotation @ BODY_TO_OPTICAL)
            else:
                extr = Extrinsics.from_body_pose(e["translation"], e["rotation_rpy"],
                                                 parent_frame=e["parent_frame"])
        # one warm-up inference at configure: the first run of an engine allocates and
        # tunes (hundreds of ms), which would otherwise stall the first live frames
        h, w = detector.input_hw
        detector.detect(np.zeros((h, w, 3), np.uint8))
        stages.append(DetectStage(detector, extr, float(e["plane_height"])))
        log(f"detect: {detector.describe() if hasattr(detector, 'describe') else d['model']}")
    for name in ("track", "sam", "clip", "lseg"):
        if name in cfg["stages"]:
            stages.append(_build_optional_stage(name, cfg))
    _keep_frames_on_device(stages, str(cfg["detect"].get("device_frames", "auto")), log)
    return Pipeline(stages)


def _keep_frames_on_device(stages: list[Any], mode: str, log: Callable[[str], None]) -> None:
    """``detect.device_frames``: where the detector runs on a torch device (auto: a CUDA
    one), rectify and detect work on a device copy of the frame (``frame.device_bgr``) and a
    SAM stage on the same device encodes it without a host round trip."""
    from perception2d_ros.engines.device import torch_device_of

    det = next((s for s in stages if isinstance(s, DetectStage)), None)
    device = torch_device_of(det.detector.engine) if det is not None else None
    if mode == "auto" and device is None and det is not None and \
            str(getattr(det.detector.engine, "device", "")).startswith("cuda"):
        # a GPU detector that is not torch (TensorRT, ONNX Runtime CUDA): say why frames
        # stay on the host instead of switching device_frames off silently
        log(f"detect.device_frames auto: off, the detector runs on "
            f"{getattr(det.detector.engine, 'backend', '?')} (frames stay on the device only "
            "with detect.backend: torch)")
        return
    if mode == "off" or (mode == "auto" and not (device or "").startswith("cuda")):
        return
    if device is None:
        raise ValueError("detect.device_frames: on needs the detector on the torch backend "
                         "(detect.backend: torch)")
    from perception2d_ros.models.yolo.device import DeviceDetector
    from perception2d_ros.engines.device import DeviceFrames

    frames = DeviceFrames(device)
    for stage in stages:
        if isinstance(stage, RectifyStage):
            stage.device_frames = frames
    det.device_frames = frames
    det.device_detector = DeviceDetector(det.detector)
    h, w = det.detector.input_hw   # warm-up (CUDA graph capture) at configure, not live
    det.device_detector.detect(frames.upload(np.zeros((h, w, 3), np.uint8)))
    sam = next((s for s in stages if s.name == "sam"), None)
    if sam is not None and getattr(sam.segmenter, "device", None) != device:
        sam = None
    log(f"frames stay on {device}: rectify, letterbox, decode + NMS"
        + (", SAM pre/postprocessing" if sam is not None else ""))


class StageUnavailable(RuntimeError):
    """A stage was enabled but its model weights are not present."""


def _build_optional_stage(name: str, cfg: dict[str, Any]) -> Any:
    import importlib

    module = importlib.import_module({"track": "perception2d_ros.models.tracking.stage",
                                      "sam": "perception2d_ros.models.sam.stage",
                                      "clip": "perception2d_ros.models.clip.stage",
                                      "lseg": "perception2d_ros.models.lseg.stage"}[name])
    return module.build_stage(cfg)
