"""Frame results → (relative topic, message) pairs. Used by the live nodes and by the
offline ``perception2d process`` tool, so both emit identical messages."""
from __future__ import annotations

from typing import Any

from std_msgs.msg import Header

from perception2d_ros.pipeline.frame import Frame
from perception2d_ros.ros import conversions as conv

# relative topic → message type name (for bag writers and subscribers)
TOPIC_TYPES = {
    "image_rect": "sensor_msgs/msg/Image",
    "camera_info_rect": "sensor_msgs/msg/CameraInfo",
    "detections": "vision_msgs/msg/Detection2DArray",
    "detections/label_info": "vision_msgs/msg/LabelInfo",
    "detections/ground": "perception2d_interfaces/msg/GroundPositionArray",
    "detections/objects": "vision_msgs/msg/Detection3DArray",
    "masks": "sensor_msgs/msg/Image",
    "masks/detections": "vision_msgs/msg/Detection2DArray",
    "labels": "sensor_msgs/msg/Image",
    "labels/label_info": "vision_msgs/msg/LabelInfo",
    "clip/labels": "vision_msgs/msg/Classification",
    "clip/detections": "vision_msgs/msg/Detection2DArray",
    "clip/label_info": "vision_msgs/msg/LabelInfo",
    "debug_image": "sensor_msgs/msg/Image",
}


def frame_messages(frame: Frame, header: Header, *, base_frame: str = "base_link",
                   plane_height: float = 0.0, debug_image: bool = False) -> list[tuple[str, Any]]:
    """Messages for everything the frame's stages produced, headers equal to ``header``."""
    out: list[tuple[str, Any]] = []
    if frame.rectified is not None:
        out.append(("image_rect", conv.array_to_image_msg(frame.rectified,
                                                          frame.rectified_encoding, header)))
        out.append(("camera_info_rect",
                    conv.camera_info_msg(frame.camera.rectified_camera_info_dict(), header)))
    if frame.detections is not None:
        ids = frame.track_ids
        extra = getattr(frame.clip, "hypotheses", None) if frame.clip is not None else None
        per_track = getattr(frame.clip, "track_hypotheses", None) if frame.clip is not None \
            else None
        # tracked: `detections` carries the track's accumulated CLIP labels (stable) and
        # clip/detections this frame's own labels, same ids and boxes
        det_msg = conv.detections_msg(
            frame.detections, header, extra_hypotheses=per_track if per_track is not None
            else extra, ids=ids)
        out.append(("detections", det_msg))
        if per_track is not None:
            out.append(("clip/detections", conv.detections_msg(
                frame.detections, header, extra_hypotheses=extra, ids=ids)))
        if frame.ground is not None:
            out.append(("detections/ground", conv.ground_msg(
                frame.detections, frame.ground, header, base_frame, plane_height, ids=ids)))
        if frame.objects is not None:
            out.append(("detections/objects", conv.objects_msg(det_msg, frame.objects, header)))
    if frame.masks is not None:
        out.append(("masks", conv.array_to_image_msg(frame.masks.instance_ids, "mono16", header)))
        out.append(("masks/detections",
                    conv.mask_detections_msg(frame.detections, frame.masks, header)))
    if frame.clip is not None and frame.clip.frame_labels:
        out.append(("clip/labels", conv.classification_msg(frame.clip.frame_labels, header)))
    if frame.labels is not None:
        lm = frame.labels.label_map
        small = len(frame.labels.vocabulary) < 255 and frame.labels.other_value == 255
        out.append(("labels", conv.array_to_image_msg(
            lm.astype("uint8") if small else lm, "mono8" if small else "mono16", header)))
    if debug_image:
        from perception2d_ros.io.debug_draw import draw_frame

        out.append(("debug_image", conv.array_to_image_msg(draw_frame(frame), "bgr8", header)))
    return out


class FrameRunner:
    """Image (+ camera_info) message → pipeline → output messages. The live nodes and the
    offline ``process`` tool both use this, so they produce identical outputs."""

    def __init__(self, pipeline: Any, cfg: dict[str, Any], debug_image: bool = False,
                 tf_buffer: Any = None, report: Any = None) -> None:
        """``tf_buffer``: a geometry.tf_buffer.TransformBuffer fed with /tf_static and /tf (needed
        for ``extrinsics.source: tf``); ``report(key, message)``: throttled warnings about
        inputs that degrade a frame without rejecting it (TF chain incomplete, bad depth)."""
        self.pipeline = pipeline
        self.cfg = cfg
        self.debug_image = debug_image
        self.cameras = conv.CameraModelCache()
        self._vocab_published: dict[str, int] = {}
        e = cfg["extrinsics"]
        detect = next((st for st in pipeline.stages if st.name == "detect"), None)
        self._detect = detect
        # 3D objects: wherever ground positions are computed (the node running detect)
        self.objects_enabled = detect is not None and bool(e["enabled"])
        self.use_tf = self.objects_enabled and e.get("source", "params") == "tf"
        if self.use_tf and tf_buffer is None:
            from perception2d_ros.geometry.tf_buffer import TransformBuffer

            tf_buffer = TransformBuffer()
        self.tf_buffer = tf_buffer
        self.report = report or (lambda key, message: None)

    def _frame_extrinsics(self, frame: Frame) -> Any:
        """The camera pose for this frame (TF at its stamp, or the configured one); None
        (reported, throttled) while the TF chain is incomplete."""
        if not self.use_tf:
            return self._detect.extrinsics if self._detect is not None else None
        from perception2d_ros.geometry.tf_buffer import TransformError

        e = self.cfg["extrinsics"]
        try:
            return self.tf_buffer.wait_lookup(e["parent_frame"], frame.frame_id, frame.stamp_ns,
                                              float(e.get("tf_timeout_s", 0.1)))
        except TransformError as exc:
            self.report("tf", f"extrinsics.source tf: {exc}; ground positions and objects are "
                              "skipped until the chain is complete")
            return None

    def run(self, image_msg: Any, info_msg: Any, detections_msg: Any = None,
            depth_msg: Any = None, source: str = "") -> tuple[Frame, list[tuple[str, Any]]]:
        """Raises ValueError naming the field for bad input (nothing is published then).
        ``image_msg``: a sensor_msgs/Image or CompressedImage (decoded here, in the caller's
        worker thread); None: a detections-only node (track_node), whose outputs take the
        detections' header. ``detections_msg``: upstream detections (separate track/sam/clip
        nodes) for this frame; ``depth_msg``: the aligned depth image paired with it
        (``depth_topic``). ``source``: the camera stream (per-camera tracks)."""
        if image_msg is None:
            return self._run_detections(detections_msg, source)
        image, encoding = conv.decode_image_msg(image_msg)
        height, width = image.shape[:2]
        camera = None
        if info_msg is not None:
            camera = self.cameras.get(info_msg)
            if tuple(camera.image_size) != (width, height):
                raise ValueError(
                    f"camera_info.size {camera.image_size[0]}x{camera.image_size[1]} (after "
                    f"binning/ROI) does not match image {width}x{height}")
        frame = Frame(image=image, encoding=encoding,
                      stamp_ns=conv.stamp_to_ns(image_msg.header.stamp),
                      frame_id=image_msg.header.frame_id, camera=camera, source=source)
        if detections_msg is not None:
            frame.detections = conv.detections_from_msg(detections_msg)
            if self.cfg.get("detections_in_tracked") and "track" not in self.pipeline.names:
                frame.track_ids = conv.detection_ids_from_msg(detections_msg)
        if depth_msg is not None and self.objects_enabled:
            frame.depth = self._depth(depth_msg)
        self.pipeline.run(frame)
        if self.objects_enabled:
            # TF is looked up after the models ran: /tf has had that long to reach the stamp
            extrinsics = self._frame_extrinsics(frame)
            if self.use_tf and extrinsics is not None and frame.camera is not None:
                from perception2d_ros.models.yolo.stage import ground_positions

                frame.extrinsics = extrinsics
                frame.ground = ground_positions(frame, extrinsics,
                                                float(self.cfg["extrinsics"]["plane_height"]))
            if extrinsics is not None:
                frame.objects = self._objects(frame, extrinsics)
        e = self.cfg["extrinsics"]
        msgs = frame_messages(frame, image_msg.header, base_frame=e["parent_frame"],
                              plane_height=float(e["plane_height"]), debug_image=self.debug_image)
        # LabelInfo for an open vocabulary goes out (latched) before the first output computed
        # with it, stamped with that frame: consumers always know which vocabulary they see
        for topic, result in (("clip/label_info", frame.clip), ("labels/label_info", frame.labels)):
            if result is not None and self._vocab_published.get(topic) != result.version:
                self._vocab_published[topic] = result.version
                names, ids = list(result.vocabulary), list(range(len(result.vocabulary)))
                other = getattr(result, "other_value", None)
                if other is not None and other not in ids:
                    names, ids = names + ["other"], ids + [int(other)]
                msgs.insert(0, (topic, conv.label_info_msg(names, image_msg.header, ids=ids)))
        return frame, msgs

    def _depth(self, depth_msg: Any) -> Any:
        from perception2d_ros.geometry.objects3d import depth_to_metres

        try:
            return depth_to_metres(conv.image_msg_to_array(depth_msg), depth_msg.encoding)
        except ValueError as exc:
            self.report("depth", f"{exc}; objects use the ground plane")
            return None

    def _objects(self, frame: Frame, extrinsics: Any) -> Any:
        from perception2d_ros.geometry.objects3d import frame_objects

        plane = float(self.cfg["extrinsics"]["plane_height"])
        try:
            return frame_objects(frame, extrinsics, plane)
        except ValueError as exc:  # a depth image that does not fit the colour camera
            self.report("depth", f"{exc}; objects use the ground plane")
            frame.depth = None
            return frame_objects(frame, extrinsics, plane)

    def _run_detections(self, detections_msg: Any, source: str
                        ) -> tuple[Frame, list[tuple[str, Any]]]:
        import numpy as np

        header = detections_msg.header
        frame = Frame(image=np.zeros((0, 0), np.uint8), encoding="mono8",
                      stamp_ns=conv.stamp_to_ns(header.stamp), frame_id=header.frame_id,
                      source=source)
        frame.detections = conv.detections_from_msg(detections_msg)
        self.pipeline.run(frame)
        return frame, frame_messages(frame, header)

    def label_info(self) -> list[tuple[str, Any]]:
        """Latched LabelInfo messages for the stages that have a class list."""
        from std_msgs.msg import Header

        out = []
        for stage in self.pipeline.stages:
            if stage.name == "detect":
                out.append(("detections/label_info", conv.label_info_msg(
                    stage.detector.class_names, Header(frame_id=""),
                    threshold=float(self.cfg["detect"]["conf_threshold"]))))
        return out
