"""One lifecycle node class for every stage combination.

``rectify_node``, ``detector_node`` and ``pipeline_node`` are this class with different
default stages and inputs, so separate-node and one-process modes run the same code and
publish the same messages. configure → builds the pipeline (loads models); activate →
subscribes and starts the worker; deactivate → stops; cleanup → frees the models.

Threading: subscription callbacks only convert/sync and drop the newest pair into a
depth-1 slot (newest frame wins, drops counted); one worker thread runs the pipeline and
publishes; the callbacks are spun by a single-threaded executor (:func:`make_executor`).
Bad input never escapes a callback: one throttled error naming the field, a counter in
/diagnostics, and the next good frame is processed.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections import deque
from typing import Any, Sequence

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from perception2d_ros.pipeline.flow import ApproximateSync, ErrorReporter, LatestSlot, error_key
from perception2d_ros.pipeline.build import Pipeline, build_pipeline
from perception2d_ros.pipeline.config import STAGE_GROUPS, STAGE_ORDER, merge_config
from perception2d_ros.pipeline.rectify import INTERPOLATIONS
from perception2d_ros.ros import conversions as conv
from perception2d_ros.ros.publishing import FrameRunner

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL,
                     history=HistoryPolicy.KEEP_LAST)
RESULTS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                     history=HistoryPolicy.KEEP_LAST)
# Images we publish are offered reliable (keep last 5): compatible with best-effort
# subscribers (RViz, sensor-data QoS) and reliable ones (recorders, reliable chains).
IMAGES_OUT = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE,
                        history=HistoryPolicy.KEEP_LAST)

NODE_KINDS: dict[str, dict[str, Any]] = {
    # stages, input: raw = image_raw + camera_info (synced); rect = image_rect (+ camera_info_rect)
    "rectify_node": {"stages": ["rectify"], "input": "raw"},
    "detector_node": {"stages": ["detect"], "input": "rect"},
    "pipeline_node": {"stages": ["rectify", "detect"], "input": "raw"},
    # downstream stages as separate nodes: image_rect + detections_in (exact stamp match)
    "sam_node": {"stages": ["sam"], "input": "rect"},
    "clip_node": {"stages": ["clip"], "input": "rect"},
    "lseg_node": {"stages": ["lseg"], "input": "rect"},
    # detections_in → tracked `detections` (no image: the tracker needs boxes only)
    "track_node": {"stages": ["track"], "input": "rect"},
}


def _choice(*allowed: str) -> Any:
    return lambda v: None if v in allowed else f"'{v}' must be one of {', '.join(allowed)}"


def _number(lo: float, hi: float = float("inf"), lo_open: bool = False) -> Any:
    def check(v: Any) -> str | None:
        ok = (isinstance(v, (int, float)) and math.isfinite(v)
              and (lo < v if lo_open else lo <= v) and v <= hi)
        return None if ok else (f"{v} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}"
                                f"{']' if math.isfinite(hi) else ')'}")
    return check


#: parameter → check(value) returning the reason it is invalid (None = valid). Used by the
#: set-parameters callback (runtime changes) and at configure (values given at start).
PARAMETER_CHECKS: dict[str, Any] = {
    "input": _choice("raw", "rect"),
    "image_transport": _choice("raw", "compressed"),
    "stages": lambda v: None if all(s in STAGE_ORDER for s in v) else
    f"{list(v)}: stages must be among {list(STAGE_ORDER)}",
    "interpolation": _choice(*INTERPOLATIONS),
    "output_encoding": _choice("passthrough", "bgr8", "rgb8", "mono8"),
    "image_reliability": _choice("best_effort", "reliable"),
    "sync_slop_ms": _number(0.0),
    "diagnostics_period_s": _number(0.0, lo_open=True),
    "detect.backend": _choice("auto", "tensorrt", "onnxruntime", "torch"),
    "detect.device": _choice("auto", "cpu", "cuda"),
    "detect.precision": _choice("fp32", "fp16", "int8"),
    "detect.threads": _number(0),
    "detect.conf_threshold": _number(0.0, 1.0),
    "detect.iou_threshold": _number(0.0, 1.0),
    "detect.max_detections": _number(1),
    "extrinsics.source": _choice("params", "tf"),
    "extrinsics.tf_timeout_s": _number(0.0),
    **{f"track.{k}": _number(0.0, 1.0) for k in ("high_threshold", "low_threshold",
                                                 "new_track_threshold", "match_iou",
                                                 "low_match_iou")},
    "track.min_hits": _number(1),
    "track.max_age": _number(0),
}


def check_parameter(name: str, value: Any) -> str | None:
    """Why ``value`` is invalid for parameter ``name`` ("name: reason"), or None."""
    check = PARAMETER_CHECKS.get(name)
    reason = check(value) if check is not None else None
    return f"{name}: {reason}" if reason else None


class _CoreLogToNode(logging.Handler):
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


class CameraIO:
    """Per-camera inputs and outputs of a node: topics under ``prefix`` (relative to the node
    namespace), the camera's newest-wins slot, sync and publishers."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.slot: LatestSlot[tuple[Image, CameraInfo | None, float]] = LatestSlot()
        self.sync: ApproximateSync | None = None
        self.rect_info: CameraInfo | None = None
        self.pubs: dict[str, Any] = {}
        self.last_stamp: dict[str, int] = {}
        self.frames_in = 0
        self.frames_out = 0
        self.input_topic = prefix  # the resolved image topic, set when subscribed
        self.pending: dict[int, dict[str, Any]] = {}  # stamp → image/detections awaiting pair
        self.depth: Any = None  # core.flow.StampMatcher pairing frames with depth_topic

    def topic(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel


def _desc(text: str, read_only: bool = False) -> ParameterDescriptor:
    return ParameterDescriptor(description=text, read_only=read_only)


class PerceptionNode(LifecycleNode):
    def __init__(self, kind: str = "pipeline_node", node_name: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(node_name or kind, **kwargs)
        self.kind = kind
        spec = NODE_KINDS[kind]
        d = merge_config({"stages": spec["stages"]})
        self._declare(d, spec)
        self.errors = ErrorReporter(lambda m: self.get_logger().error(m))
        self.pipeline: Pipeline | None = None
        self.cams: list[CameraIO] = [CameraIO("")]
        self._wake = threading.Event()
        self._subs: list[Any] = []
        self._worker: threading.Thread | None = None
        self._running = False
        self._timings: dict[str, deque[float]] = {}
        self._latency: deque[float] = deque(maxlen=200)
        self.frames_in = 0
        self.frames_out = 0
        self._diag_timer = None
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._on_parameters_applied)
        if self.get_parameter("autostart").value:
            self.trigger_configure()
            if self._state_machine.current_state[1] == "inactive":
                self.trigger_activate()

    # ----------------------------------------------------------------- parameters
    def _declare(self, d: dict[str, Any], spec: dict[str, Any]) -> None:
        p = self.declare_parameter
        p("stages", d["stages"], _desc("stages to run, in order: rectify, detect, track, sam, "
                                       "clip, lseg"))
        p("input", spec["input"], _desc("raw: image_raw + camera_info (synced); rect: image_rect"
                                        " (+ camera_info_rect for ground positions)"))
        p("image_transport", "raw", _desc(
            "image input transport (image_transport's convention, applied on activate): raw "
            "(sensor_msgs/Image on image_raw / image_rect) | compressed (sensor_msgs/"
            "CompressedImage on <image topic>/compressed, jpeg or png, decoded to bgr8/mono8)"))
        p("cameras", [""], _desc("camera namespaces served by this one process and one model per "
                                 "kind, relative to the node namespace ([''] = the node's own); "
                                 "e.g. [left, right] → left/image_raw, right/image_raw …"))
        p("autostart", True, _desc("configure and activate on start (no lifecycle manager)"))
        p("interpolation", d["interpolation"], _desc("rectification: nearest|linear|cubic|area|lanczos"))
        p("output_encoding", d["output_encoding"],
          _desc("image_rect encoding: passthrough (bayer/yuv become bgr8) | bgr8 | rgb8 | mono8"))
        p("queue_policy", "newest_wins", ParameterDescriptor(
            description="input queue: newest_wins (depth-1 slot, drops counted) — the only "
                        "policy; a growing queue is never used", read_only=True))
        p("models_dir", d["models_dir"], _desc("models directory ('' = default)"))
        p("image_reliability", "best_effort",
          _desc("image subscription reliability: best_effort (sensor data) or reliable"))
        p("sync_slop_ms", 20.0, _desc("max image/camera_info stamp difference"))
        p("publish_debug_image", False, _desc("publish the annotated debug_image"))
        p("depth_topic", d["depth_topic"], _desc(
            "aligned depth image for detections/objects, relative to the camera namespace "
            "(e.g. depth/image_raw; '' = none): sensor_msgs/Image 16UC1 mm or 32FC1 m, "
            "registered to the colour camera, paired by stamp (sync_slop_ms)"))
        p("diagnostics_period_s", 1.0, _desc("period of /diagnostics"))
        p("vocabulary", d["vocabulary"], _desc(
            "open-vocabulary phrases shared by CLIP and LSeg; changeable at runtime (also via "
            "the `vocabulary` topic, comma-separated); [''] = the stage's default"))
        p("detections_in_tracked", d["detections_in_tracked"], _desc(
            "separate sam/clip nodes: detections_in comes from a track_node, so its "
            "Detection2D.id are track ids (kept; CLIP accumulates labels per track)"))
        from perception2d_ros.models.tracking.bytetrack import DESCRIPTIONS as TRACK

        what = {"detect": "detector", "extrinsics": "camera pose in the base frame",
                "track": "tracker", "sam": "SAM masks", "clip": "CLIP labels",
                "lseg": "LSeg label map"}
        for group in STAGE_GROUPS:
            for key, value in d[group].items():
                text = TRACK.get(key) if group == "track" else None
                p(f"{group}.{key}", value if value != [] else [""],
                  _desc(text or f"{what[group]}: {key}"))

    def _config_from_params(self) -> dict[str, Any]:
        g = lambda n: self.get_parameter(n).value  # noqa: E731
        defaults = merge_config(None)
        cfg = merge_config({
            "stages": list(g("stages")),
            "interpolation": g("interpolation"),
            "output_encoding": g("output_encoding"),
            "models_dir": g("models_dir"),
            "depth_topic": g("depth_topic"),
            "detections_in_tracked": bool(g("detections_in_tracked")),
            "vocabulary": [v for v in g("vocabulary") if v],
            **{grp: {k: g(f"{grp}.{k}") for k in defaults[grp]} for grp in STAGE_GROUPS},
        })
        cfg["detect"]["classes"] = [c for c in cfg["detect"]["classes"] if c]
        cfg["extrinsics"]["translation"] = list(cfg["extrinsics"]["translation"])
        cfg["extrinsics"]["rotation_rpy"] = list(cfg["extrinsics"]["rotation_rpy"])
        return cfg

    def _on_set_parameters(self, params: Sequence[Any]) -> SetParametersResult:
        for prm in params:
            reason = check_parameter(prm.name, prm.value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    # ----------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        core_log = logging.getLogger("perception2d")  # engine fallback, TensorRT builds …
        to_node = _CoreLogToNode(self.get_logger())
        core_log.addHandler(to_node)
        try:
            return self._configure()
        finally:
            core_log.removeHandler(to_node)

    def _configure(self) -> TransitionCallbackReturn:
        try:
            for name in PARAMETER_CHECKS:  # values given at start bypass the set callback
                reason = check_parameter(name, self.get_parameter(name).value)
                if reason:
                    raise ValueError(reason)
            self.cfg = self._config_from_params()
            self.pipeline = build_pipeline(self.cfg, log=self.get_logger().info)
        except Exception as exc:  # a model/parameter problem: stay unconfigured, say why
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        names = self.pipeline.names
        if "track" in names:  # track resets (stamp back, frame_id change): the node's log
            self._stage("track").log = self.get_logger().warning
        prefixes = [c.strip("/") for c in self.get_parameter("cameras").value] or [""]
        if len(set(prefixes)) != len(prefixes):
            self.get_logger().error(f"configure failed: cameras: duplicates in {prefixes}")
            return TransitionCallbackReturn.FAILURE
        self.cams = [CameraIO(p) for p in prefixes]
        # a detections-only node (track_node) has no image to draw on
        debug = bool(self.get_parameter("publish_debug_image").value) and \
            not self._detections_only()
        for cam in self.cams:
            pub = lambda t, rel, q: cam.pubs.__setitem__(  # noqa: E731
                rel, self.create_publisher(t, cam.topic(rel), q))
            if "rectify" in names:
                pub(Image, "image_rect", IMAGES_OUT)
                pub(CameraInfo, "camera_info_rect", IMAGES_OUT)
            if "detect" in names:
                from vision_msgs.msg import Detection2DArray, LabelInfo
                from perception2d_interfaces.msg import GroundPositionArray

                pub(Detection2DArray, "detections", RESULTS)
                pub(LabelInfo, "detections/label_info", LATCHED)
                if self.cfg["extrinsics"]["enabled"]:
                    from vision_msgs.msg import Detection3DArray

                    pub(GroundPositionArray, "detections/ground", RESULTS)
                    pub(Detection3DArray, "detections/objects", RESULTS)
            if "track" in names and "detect" not in names and "clip" not in names:
                from vision_msgs.msg import Detection2DArray

                pub(Detection2DArray, "detections", RESULTS)  # track_node: tracked detections
            if "sam" in names:
                from vision_msgs.msg import Detection2DArray

                pub(Image, "masks", RESULTS)
                pub(Detection2DArray, "masks/detections", RESULTS)
            if "clip" in names:
                from vision_msgs.msg import Classification, Detection2DArray, LabelInfo

                if "detect" not in names:  # clip_node: the labelled detections are its output
                    pub(Detection2DArray, "detections", RESULTS)
                pub(Classification, "clip/labels", RESULTS)
                pub(Detection2DArray, "clip/detections", RESULTS)  # frame labels (tracked)
                pub(LabelInfo, "clip/label_info", LATCHED)
            if "lseg" in names:
                from vision_msgs.msg import LabelInfo

                pub(Image, "labels", RESULTS)
                pub(LabelInfo, "labels/label_info", LATCHED)
            if debug:
                pub(Image, "debug_image", IMAGES_OUT)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.runner = FrameRunner(self.pipeline, self.cfg, debug_image=debug,
                                  report=self.errors.report)
        self.get_logger().info(f"configured stages {names}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        input_mode = self.get_parameter("input").value
        rel = self.get_parameter("image_reliability").value
        qos = QoSProfile(depth=2, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE if rel == "reliable"
                         else ReliabilityPolicy.BEST_EFFORT)
        events = SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible_qos)
        override = QoSOverridingOptions.with_default_policies()
        slop = int(self.get_parameter("sync_slop_ms").value * 1e6)
        compressed = self.get_parameter("image_transport").value == "compressed"
        image_type = CompressedImage if compressed else Image

        def image_topic(cam: CameraIO, rel: str) -> str:
            # image_transport's rule: the base topic (remappings applied) + "/compressed"
            base = self.resolve_topic_name(cam.topic(rel))
            cam.input_topic = f"{base}/compressed" if compressed else base
            return cam.input_topic

        self._subscribe_tf()
        depth_topic = str(self.get_parameter("depth_topic").value).strip()
        for cam in self.cams:
            cam.slot = LatestSlot(self._wake)
            cam.depth = None
            if depth_topic and self.runner.objects_enabled:
                from perception2d_ros.pipeline.flow import StampMatcher

                # a frame waits for its depth at most 2 slops (min 50 ms) of wall time
                cam.depth = StampMatcher(lambda item, depth, cam=cam: self._on_depth_pair(
                    cam, item, depth), slop_ns=slop, max_pending=2,
                    max_wait_s=max(0.05, 2 * slop / 1e9))
                self._subs.append(self.create_subscription(
                    Image, cam.topic(depth_topic), cam.depth.add_secondary, qos,
                    event_callbacks=events))
            if input_mode == "raw":
                cam.sync = ApproximateSync(lambda i, c, cam=cam: self._on_pair(cam, i, c),
                                           slop_ns=slop)
                self._subs.append(self.create_subscription(
                    image_type, image_topic(cam, "image_raw"),
                    lambda m, cam=cam: self._on_image(cam, m),
                    qos, event_callbacks=events, qos_overriding_options=override))
                self._subs.append(self.create_subscription(
                    CameraInfo, cam.topic("camera_info"), cam.sync.add_info, qos,
                    event_callbacks=events))
            elif self._detections_only():  # track_node: boxes in, tracked boxes out
                from vision_msgs.msg import Detection2DArray

                cam.sync = None
                cam.input_topic = self.resolve_topic_name(cam.topic("detections_in"))
                self._subs.append(self.create_subscription(
                    Detection2DArray, cam.input_topic,
                    lambda m, cam=cam: self._on_detections_only(cam, m), RESULTS))
            else:
                cam.sync = None
                self._subs.append(self.create_subscription(
                    image_type, image_topic(cam, "image_rect"),
                    lambda m, cam=cam: self._on_rect_image(cam, m),
                    qos, event_callbacks=events, qos_overriding_options=override))
                if self._needs_detections_input():
                    from vision_msgs.msg import Detection2DArray

                    self._subs.append(self.create_subscription(
                        Detection2DArray, cam.topic("detections_in"),
                        lambda m, cam=cam: self._on_detections(cam, m), RESULTS))
                self._subs.append(self.create_subscription(
                    CameraInfo, cam.topic("camera_info_rect"),
                    lambda m, cam=cam: setattr(cam, "rect_info", m), qos,
                    event_callbacks=events))
        self._subscribe_runtime_inputs()
        self._publish_label_info()
        self._running = True
        self._worker = threading.Thread(target=self._work, name=f"{self.get_name()}-worker",
                                        daemon=True)
        self._worker.start()
        period = float(self.get_parameter("diagnostics_period_s").value)
        self._diag_timer = self.create_timer(period, self._publish_diagnostics)
        self._warn_publisher_qos()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs.clear()
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = None
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        for cam in self.cams:
            for pub in cam.pubs.values():
                self.destroy_publisher(pub)
            cam.pubs.clear()
        self._release_pipeline()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._release_pipeline()
        return TransitionCallbackReturn.SUCCESS

    def _release_pipeline(self) -> None:
        """Free every stage's engines (GPU memory) — cleanup must leave nothing loaded."""
        if self.pipeline is not None:
            for stage in self.pipeline.stages:
                for attr in ("detector", "segmenter", "labeler"):
                    obj = getattr(stage, attr, None)
                    closer = getattr(obj, "close", None) or getattr(
                        getattr(obj, "engine", None), "close", None)
                    if closer is not None:
                        closer()
        self.pipeline = None

    def _stop_worker(self) -> None:
        self._running = False
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout=5.0)
            self._worker = None

    # ----------------------------------------------------------------- inputs
    # ----------------------------------------------------------------- runtime inputs
    def _stage(self, name: str) -> Any:
        if self.pipeline is None:
            return None
        return next((s for s in self.pipeline.stages if s.name == name), None)

    def _subscribe_runtime_inputs(self) -> None:
        """``vocabulary`` (std_msgs/String, comma-separated) for CLIP/LSeg; ``sam/prompts``
        (perception2d_interfaces/SegmentPrompt) for SAM, matched to frames by stamp."""
        if self._stage("clip") is not None or self._stage("lseg") is not None:
            from std_msgs.msg import String

            self._subs.append(self.create_subscription(
                String, "vocabulary", lambda m: self._set_vocabulary(
                    [p.strip() for p in m.data.split(",") if p.strip()], "topic"), RESULTS))
        sam = self._stage("sam")
        if sam is not None:
            from perception2d_interfaces.msg import SegmentPrompt

            def on_prompt(m: Any) -> None:
                pts = np.array([[p.x, p.y] for p in m.points], np.float64).reshape(-1, 2)
                labels = np.asarray(m.point_labels, np.float32)
                boxes = np.asarray(m.boxes, np.float64)
                if len(labels) != len(pts) or boxes.size % 4:
                    self.errors.report("prompt", f"prompt: {len(pts)} points with "
                                       f"{len(labels)} point_labels and {boxes.size} box values"
                                       " (need one label per point, 4 values per box); ignored")
                    return
                sam.prompts.add(conv.stamp_to_ns(m.header.stamp), pts if len(pts) else None,
                                labels if len(pts) else None,
                                boxes.reshape(-1, 4) if boxes.size else None)

            for cam in self.cams:
                self._subs.append(self.create_subscription(
                    SegmentPrompt, cam.topic("sam/prompts"), on_prompt, RESULTS))

    def _set_vocabulary(self, phrases: list[str], source: str) -> str | None:
        """Apply a new vocabulary to CLIP and LSeg (LSeg keeps its own if lseg.vocabulary
        is set). Frames already in flight finish with the vocabulary they started with."""
        if not phrases:
            return "vocabulary: empty"
        try:
            for name in ("clip", "lseg"):
                stage = self._stage(name)
                if stage is None:
                    continue
                if name == "lseg" and [v for v in self.get_parameter("lseg.vocabulary").value
                                       if v]:
                    continue
                stage.set_vocabulary(phrases, [t for t in self.get_parameter(
                    f"{name}.templates").value if t] or None)
        except Exception as exc:  # text encoder failure: keep the old vocabulary
            self.get_logger().error(f"vocabulary change from {source} failed: {exc}")
            return f"vocabulary: {exc}"
        self.get_logger().info(f"vocabulary ({source}): {len(phrases)} phrases")
        return None

    def _on_parameters_applied(self, params: Sequence[Any]) -> None:
        for prm in params:
            if prm.name == "vocabulary" and self.pipeline is not None:
                self._set_vocabulary([v for v in prm.value if v], "parameter")

    def _on_incompatible_qos(self, event: Any) -> None:
        self.errors.report("qos", f"incompatible QoS with a publisher (policy "
                                  f"{event.last_policy_kind}): no messages will arrive; set "
                                  "image_reliability or the publisher's QoS to match")

    def _warn_publisher_qos(self) -> None:
        if self.get_parameter("image_reliability").value != "reliable":
            return  # best effort accepts both
        for sub in self._subs:
            for info in self.get_publishers_info_by_topic(sub.topic_name):
                if info.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT:
                    self.get_logger().warning(
                        f"{sub.topic_name}: publisher {info.node_name} is best-effort but this "
                        "subscription is reliable; no messages will arrive")

    def _on_image(self, cam: "CameraIO", msg: Image) -> None:
        self.frames_in += 1
        cam.frames_in += 1
        cam.sync.add_image(msg)
        last = cam.sync.last_info_time
        # missing = several images in a row with no camera_info, none for 2 s (one image
        # just ahead of its camera_info after a pause is not)
        if cam.sync.images_since_info >= 3 and (last is None or time.monotonic() - last > 2.0):
            self.errors.report("camera_info", "camera_info: none received on "
                               f"{self.resolve_topic_name(cam.topic('camera_info'))}"
                               + ("" if last is None else
                                  f" for {time.monotonic() - last:.1f} s")
                               + "; images wait for their calibration (rectification needs it)")

    def _on_pair(self, cam: "CameraIO", image: Image, info: CameraInfo | None) -> None:
        if cam.depth is not None:  # wait (briefly) for the depth image of the same stamp
            cam.depth.add_primary((image, info, time.monotonic()),
                                  conv.stamp_to_ns(image.header.stamp))
        else:
            cam.slot.put((image, info, time.monotonic()))

    def _on_depth_pair(self, cam: "CameraIO", item: tuple, depth: Image | None) -> None:
        if depth is None:
            self.errors.report("depth", "depth_topic: no depth image on "
                               f"{self.resolve_topic_name(cam.topic(self.cfg['depth_topic']))}"
                               " within sync_slop_ms of the frame; its objects use the ground "
                               "plane")
        cam.slot.put((*item, None, depth))

    def _subscribe_tf(self) -> None:
        """extrinsics.source tf: /tf_static (transient local: the latched tree of
        robot_state_publisher) and /tf into the runner's TF buffer, as tf2_ros listens."""
        if not self.runner.use_tf:
            return
        from tf2_msgs.msg import TFMessage

        buffer = self.runner.tf_buffer

        def on_tf(msg: Any, static: bool) -> None:
            try:
                buffer.set_transforms(msg.transforms, static=static)
            except ValueError as exc:
                self.errors.report("tf", f"{'/tf_static' if static else '/tf'}: {exc}; "
                                         "that transform is ignored")

        static_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL,
                                history=HistoryPolicy.KEEP_LAST)
        # best effort accepts both reliable broadcasters and best-effort replays (bag play)
        dynamic_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT,
                                 history=HistoryPolicy.KEEP_LAST)
        self._subs.append(self.create_subscription(
            TFMessage, "/tf_static", lambda m: on_tf(m, True), static_qos))
        self._subs.append(self.create_subscription(
            TFMessage, "/tf", lambda m: on_tf(m, False), dynamic_qos))

    def _needs_detections_input(self) -> bool:
        names = self.pipeline.names if self.pipeline is not None else []
        return "detect" not in names and any(n in names for n in ("track", "sam", "clip"))

    def _detections_only(self) -> bool:
        """Every stage works on boxes alone (track_node): no image subscription."""
        names = self.pipeline.names if self.pipeline is not None else []
        return bool(names) and set(names) <= {"track"}

    def _on_detections_only(self, cam: "CameraIO", msg: Any) -> None:
        self.frames_in += 1
        cam.frames_in += 1
        cam.slot.put((None, None, time.monotonic(), msg))

    def _on_rect_image(self, cam: "CameraIO", msg: Image) -> None:
        self.frames_in += 1
        cam.frames_in += 1
        if self._needs_detections_input():
            self._pair_exact(cam, conv.stamp_to_ns(msg.header.stamp), image=msg)
        else:
            self._on_pair(cam, msg, cam.rect_info)

    def _on_detections(self, cam: "CameraIO", msg: Any) -> None:
        self._pair_exact(cam, conv.stamp_to_ns(msg.header.stamp), detections=msg)

    def _pair_exact(self, cam: "CameraIO", stamp: int, **part: Any) -> None:
        """Images and upstream detections meet by identical stamps (the detector copies the
        image header); the newest complete pair goes to the slot, stale halves age out."""
        entry = cam.pending.setdefault(stamp, {})
        entry.update(part)
        if "image" in entry and "detections" in entry:
            del cam.pending[stamp]
            cam.slot.put((entry["image"], cam.rect_info, time.monotonic(),
                          entry["detections"]))
            for old in [t for t in cam.pending if t < stamp]:
                del cam.pending[old]  # older than a complete pair: can never be newest
        while len(cam.pending) > 10:
            cam.pending.pop(min(cam.pending))

    @property
    def slot(self) -> LatestSlot:
        """The first camera's input slot (single-camera nodes have one)."""
        return self.cams[0].slot

    # ----------------------------------------------------------------- work
    def _work(self) -> None:
        """One worker for every camera: round-robin over the newest frame of each, so one
        model per kind serves N cameras and no camera starves another."""
        while self._running and self.context.ok():
            self._wake.clear()  # a put() after this wakes the wait below
            served = False
            for cam in list(self.cams):
                item = cam.slot.take(timeout=0)
                if item is None:
                    continue
                served = True
                image_msg, info_msg, t_recv = item[:3]
                head = (image_msg if image_msg is not None else item[3]).header
                try:
                    self._process(cam, image_msg, info_msg, *item[3:])
                    self._latency.append(time.monotonic() - t_recv)
                except Exception as exc:  # bad input or a stage failure: log, count, go on
                    self.errors.report(error_key(exc), f"frame {head.stamp.sec}."
                                       f"{head.stamp.nanosec:09d} on "
                                       f"{cam.input_topic} dropped: {exc}")
            if not served:
                waiting = [c.depth for c in self.cams if c.depth is not None]
                for matcher in waiting:  # frames whose depth did not come in time
                    matcher.poll()
                self._wake.wait(0.02 if waiting else 0.2)

    def _process(self, cam: "CameraIO", image_msg: Image, info_msg: CameraInfo | None,
                 detections_msg: Any = None, depth_msg: Image | None = None) -> None:
        header = (image_msg if image_msg is not None else detections_msg).header
        stamp = conv.stamp_to_ns(header.stamp)
        fid = header.frame_id
        last = cam.last_stamp.get(fid)
        if last is not None and stamp <= last:
            self.errors.report("header.stamp", f"header.stamp: {stamp} ns is not newer than the "
                               f"previous frame ({last} ns) on frame_id '{fid}'; processed anyway")
        if cam.last_stamp and fid not in cam.last_stamp:
            self.errors.report("header.frame_id", f"header.frame_id: '{fid}' differs from the "
                               f"stream's {sorted(cam.last_stamp)}; processed anyway")
        cam.last_stamp[fid] = stamp
        frame, msgs = self.runner.run(image_msg, info_msg, detections_msg, depth_msg,
                                      source=cam.prefix)
        for topic, msg in msgs:
            pub = cam.pubs.get(topic)
            if pub is not None:
                pub.publish(msg)
        self.frames_out += 1
        cam.frames_out += 1
        for k, v in frame.timings.items():
            self._timings.setdefault(k, deque(maxlen=200)).append(v)

    # ----------------------------------------------------------------- outputs
    def _publish_label_info(self) -> None:
        for topic, msg in self.runner.label_info():
            for cam in self.cams:
                pub = cam.pubs.get(topic)
                if pub is not None:
                    pub.publish(msg)

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


def make_executor(context: Any = None) -> Any:
    """The executor that spins perception nodes (``run_nodes``, the bench, the replay).

    Single-threaded on purpose. rclpy's ``MultiThreadedExecutor`` (9.1, Kilted) re-yields a
    callback task that it has handed to its thread pool but that no pool thread has started
    yet, and submits it again, every ~0.1 ms, until a pool thread gets the GIL: measured
    1 500–10 600 submissions for 70 callbacks in 35 lockstep frames, and in bad runs
    (bimodal, load-dependent) the real callbacks wait behind that queue of no-ops:
    70–260 ms p50, up to 1 s, per 720p hop instead of 3–7 ms (docs/BENCHMARKS.md).
    Nothing here needs callback parallelism: the callbacks only convert, sync and hand the
    frame to the node's worker thread (which does not use the executor), and all of a
    node's callbacks are in its default mutually exclusive group anyway. The single-threaded
    executor runs each callback in the spinning thread as soon as the wait set reports it.
    """
    from rclpy.executors import SingleThreadedExecutor

    return SingleThreadedExecutor(context=context)


def run_nodes(nodes: Sequence[Any]) -> None:
    """Spin nodes in the executor of :func:`make_executor` until shutdown; clean exit on
    Ctrl-C."""
    from rclpy.executors import ExternalShutdownException

    executor = make_executor(nodes[0].context if nodes else None)
    for n in nodes:
        executor.add_node(n)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # Ctrl-C in a terminal signals the whole process group, and ros2 launch then sends
        # its own SIGINT: a second one must not break the cleanup with a KeyboardInterrupt
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        for n in nodes:
            n.destroy_node()
        rclpy.try_shutdown()


def main_for(kind: str, args: Sequence[str] | None = None) -> None:
    rclpy.init(args=args)
    run_nodes([PerceptionNode(kind)])
