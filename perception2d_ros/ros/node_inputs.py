"""A perception node's inputs: per-camera topics and state (:class:`CameraIO`), the image /
camera_info / detections / depth / TF subscriptions made on activate, their callbacks (sync,
exact-stamp pairing, newest-wins slot) and the runtime inputs (vocabulary, SAM prompts)."""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from perception2d_ros.pipeline.flow import ApproximateSync, LatestSlot
from perception2d_ros.ros import conversions as conv
from perception2d_ros.ros.qos import RESULTS


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
        self.depth: Any = None  # pipeline.flow.StampMatcher pairing frames with depth_topic

    def topic(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel


class NodeInputs:
    """PerceptionNode's subscriptions and input callbacks (a mixin of the node)."""

    def _subscribe_inputs(self) -> None:
        """Every camera's image (raw + camera_info, or rect), detections_in and depth
        subscriptions, and TF for extrinsics.source tf (on activate)."""
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
