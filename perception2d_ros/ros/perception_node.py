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

The node's parameters live in :mod:`~perception2d_ros.ros.node_params`, its subscriptions and
input callbacks in :mod:`~perception2d_ros.ros.node_inputs`, its /diagnostics in
:mod:`~perception2d_ros.ros.node_diagnostics` (mixins of :class:`PerceptionNode`).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from typing import Any, Sequence

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import CameraInfo, Image

from perception2d_ros.pipeline.build import Pipeline, build_pipeline
from perception2d_ros.pipeline.config import merge_config
from perception2d_ros.pipeline.flow import ErrorReporter, error_key
from perception2d_ros.ros import conversions as conv
from perception2d_ros.ros.node_diagnostics import CoreLogToNode, NodeDiagnostics
from perception2d_ros.ros.node_inputs import CameraIO, NodeInputs
from perception2d_ros.ros.node_params import (NODE_KINDS, PARAMETER_CHECKS, NodeParameters,
                                              check_parameter)
from perception2d_ros.ros.publishing import FrameRunner
from perception2d_ros.ros.qos import IMAGES_OUT, LATCHED, RESULTS


class PerceptionNode(NodeParameters, NodeInputs, NodeDiagnostics, LifecycleNode):
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

    # ----------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        core_log = logging.getLogger("perception2d")  # engine fallback, TensorRT builds …
        to_node = CoreLogToNode(self.get_logger())
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
        self._subscribe_inputs()
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

    # ----------------------------------------------------------------- stages
    def _stage(self, name: str) -> Any:
        if self.pipeline is None:
            return None
        return next((s for s in self.pipeline.stages if s.name == name), None)

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
