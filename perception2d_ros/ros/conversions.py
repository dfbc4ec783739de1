"""Message ↔ core conversions (the only place that knows both worlds)."""
from __future__ import annotations

import array as _pyarray
import math
from typing import Any, Sequence

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo, Image, RegionOfInterest
from std_msgs.msg import Header

from perception2d_ros.geometry.camera import CameraModel
from perception2d_ros.io.image_codec import (array_to_image_fields, decode_compressed,
                                               image_to_array, message_buffer_of)


def copy_header(header: Header, frame_id: str | None = None) -> Header:
    return Header(stamp=Time(sec=header.stamp.sec, nanosec=header.stamp.nanosec),
                  frame_id=header.frame_id if frame_id is None else frame_id)


def stamp_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def image_msg_to_array(msg: Image) -> np.ndarray:
    """Zero-copy where the layout allows; ValueError naming the field on bad messages."""
    return image_to_array(msg)


def is_compressed(msg: Any) -> bool:
    """True for a ``sensor_msgs/CompressedImage`` (``format`` + ``data``, no ``encoding``)."""
    return hasattr(msg, "format") and not hasattr(msg, "encoding")


def decode_image_msg(msg: Any) -> tuple[np.ndarray, str]:
    """``(pixels, encoding)`` of an Image (zero-copy view) or a CompressedImage (decoded
    with ``cv2.imdecode`` to bgr8/mono8); ValueError naming the field on bad messages."""
    if is_compressed(msg):
        return decode_compressed(msg.format, msg.data)
    return image_to_array(msg), msg.encoding


def array_to_image_msg(array: np.ndarray, encoding: str, header: Header) -> Image:
    fields = array_to_image_fields(array, encoding)
    # check_fields=True: only then does the generated ``data`` setter store an array.array
    # as is; without it the setter copies it again (array.array('B', value): +0.2 ms at 720p)
    msg = Image(header=copy_header(header), height=fields["height"], width=fields["width"],
                encoding=fields["encoding"], is_bigendian=int(fields["is_bigendian"]),
                step=fields["step"], check_fields=True)
    buf = message_buffer_of(array)
    if buf is None:  # the one copy; assigning bytes would be copied again
        buf = _pyarray.array("B")  # (the parameter `array` shadows the module name)
        buf.frombytes(fields["data"])
    msg.data = buf  # a message buffer (rectify's output) is taken as is: no copy
    return msg


def _raw(values: Any) -> bytes | tuple:
    # d is an array.array, k/r/p numpy arrays: their bytes hash and compare much faster than
    # tuples of numpy scalars (and a NaN in a calibration still compares equal to itself)
    tobytes = getattr(values, "tobytes", None)
    return tobytes() if tobytes is not None else tuple(values)


def camera_info_key(msg: CameraInfo) -> tuple:
    """Hashable identity of a calibration (everything but the header)."""
    roi = msg.roi
    return (msg.width, msg.height, msg.distortion_model, _raw(msg.d), _raw(msg.k),
            _raw(msg.r), _raw(msg.p), msg.binning_x, msg.binning_y,
            (roi.x_offset, roi.y_offset, roi.width, roi.height, roi.do_rectify))


class CameraModelCache:
    """One CameraModel per distinct calibration, so rectification maps are built once and
    reused while the calibration stays the same (never per frame)."""

    def __init__(self, size: int = 4) -> None:
        self._size = size
        self._models: dict[tuple, CameraModel] = {}

    def get(self, msg: CameraInfo) -> CameraModel:
        key = camera_info_key(msg)
        model = self._models.get(key)
        if model is None:
            model = CameraModel.from_camera_info(msg)  # ValueError naming the field
            if len(self._models) >= self._size:
                self._models.pop(next(iter(self._models)))
            self._models[key] = model
        return model


def camera_info_msg(fields: dict[str, Any], header: Header) -> CameraInfo:
    roi = fields.get("roi") or {}
    return CameraInfo(
        header=copy_header(header), width=int(fields["width"]), height=int(fields["height"]),
        distortion_model=str(fields["distortion_model"]),
        d=[float(v) for v in fields["d"]], k=[float(v) for v in fields["k"]],
        r=[float(v) for v in fields["r"]], p=[float(v) for v in fields["p"]],
        binning_x=int(fields.get("binning_x", 0)), binning_y=int(fields.get("binning_y", 0)),
        roi=RegionOfInterest(x_offset=int(roi.get("x_offset", 0)),
                             y_offset=int(roi.get("y_offset", 0)),
                             height=int(roi.get("height", 0)), width=int(roi.get("width", 0)),
                             do_rectify=bool(roi.get("do_rectify", False))))


def detections_msg(det: Any, header: Header, extra_hypotheses: Sequence[Sequence[tuple[str, float]]]
                   | None = None, ids: Sequence[str] | None = None) -> Any:
    """Detection2DArray: class_id = class name, score, axis-aligned bbox in image pixels,
    id = detection index (or ``ids``); ``extra_hypotheses[i]`` are appended (CLIP labels)."""
    from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose

    # Every generated message constructor builds all its default sub-messages even when one is
    # passed in, so the defaults are filled in place instead of replaced (half the objects;
    # same message). Values go through Python floats: the same doubles as before.
    out = Detection2DArray()
    _fill_header(out.header, header)
    xyxy = np.asarray(det.xyxy).reshape(-1, 4).tolist()  # float32 → the same doubles
    scores = np.asarray(det.scores).reshape(-1).tolist()
    names = det.class_names
    detections = out.detections
    for i, (x1, y1, x2, y2) in enumerate(xyxy):
        d = Detection2D()
        _fill_header(d.header, header)
        d.id = str(ids[i]) if ids is not None else str(i)
        bbox = d.bbox
        bbox.size_x = x2 - x1
        bbox.size_y = y2 - y1
        center = bbox.center.position
        center.x = (x1 + x2) / 2.0
        center.y = (y1 + y2) / 2.0
        extra = extra_hypotheses[i] if extra_hypotheses is not None else None
        hyps = [(names[i], scores[i])] if extra is None else extra
        for name, score in hyps:
            h = ObjectHypothesisWithPose()
            h.hypothesis.class_id = str(name)
            h.hypothesis.score = float(score)
            d.results.append(h)
        detections.append(d)
    return out


def _fill_header(dst: Header, src: Header) -> None:
    """Copy ``src``'s stamp and frame_id into the (fresh) header ``dst``."""
    dst.stamp.sec = src.stamp.sec
    dst.stamp.nanosec = src.stamp.nanosec
    dst.frame_id = src.frame_id


def label_info_msg(names: Sequence[str], header: Header, threshold: float = 0.0,
                   ids: Sequence[int] | None = None) -> Any:
    from vision_msgs.msg import LabelInfo, VisionClass

    msg = LabelInfo(header=copy_header(header), threshold=float(threshold))
    for i, name in enumerate(names):
        msg.class_map.append(VisionClass(class_id=int(ids[i]) if ids is not None else i,
                                         class_name=str(name)))
    return msg


def ground_msg(det: Any, points: np.ndarray, header: Header, base_frame: str,
               plane_height: float, ids: Sequence[str] | None = None) -> Any:
    from geometry_msgs.msg import Point
    from perception2d_interfaces.msg import GroundPosition, GroundPositionArray

    msg = GroundPositionArray(header=copy_header(header, base_frame),
                              plane_height=float(plane_height))
    for i in range(points.shape[0]):
        ok = bool(np.all(np.isfinite(points[i])))
        p = points[i] if ok else np.zeros(3)
        msg.positions.append(GroundPosition(
            id=str(ids[i]) if ids is not None else str(i), class_id=str(det.class_names[i]),
            score=float(det.scores[i]),
            position=Point(x=float(p[0]), y=float(p[1]), z=float(p[2])), valid=ok))
    return msg


def objects_msg(detections: Any, objects: Any, header: Header) -> Any:
    """``detections/objects``: a vision_msgs/Detection3DArray in ``objects.parent_frame``
    (stamp of ``header``), one Detection3D per 2D detection that has a 3D position, with the
    2D detection's ``id`` and hypotheses (class first, then any CLIP labels), each posed at
    where the object stands (``footprint``), then one hypothesis
    ``position:<source>`` (ground_plane | depth_mask | depth_box) whose score is the share of
    sampled pixels with a valid depth (1.0 for ground_plane). ``bbox``: centre, yaw about z
    (facing along the line of sight), size = (along the line of sight, across, vertical)."""
    from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose

    out = Detection3DArray(header=copy_header(header, objects.parent_frame))
    for i, d2 in enumerate(detections.detections):
        if i >= len(objects) or not objects.valid[i]:
            continue
        d = Detection3D(header=copy_header(header, objects.parent_frame), id=d2.id)
        cx, cy, cz = (float(v) for v in objects.center[i])
        fx, fy, fz = (float(v) for v in objects.footprint[i])
        half = float(objects.yaw[i]) / 2.0
        box = d.bbox
        box.center.position.x, box.center.position.y, box.center.position.z = cx, cy, cz
        box.center.orientation.z, box.center.orientation.w = math.sin(half), math.cos(half)
        box.size.x, box.size.y, box.size.z = (float(v) for v in objects.size[i])
        for r in d2.results:
            h = ObjectHypothesisWithPose()
            h.hypothesis.class_id = r.hypothesis.class_id
            h.hypothesis.score = r.hypothesis.score
            p = h.pose.pose
            p.position.x, p.position.y, p.position.z = fx, fy, fz
            p.orientation.z, p.orientation.w = math.sin(half), math.cos(half)
            d.results.append(h)
        src = ObjectHypothesisWithPose()
        src.hypothesis.class_id = f"position:{objects.source[i]}"
        src.hypothesis.score = float(objects.depth_fraction[i])
        p = src.pose.pose
        p.position.x, p.position.y, p.position.z = cx, cy, cz
        p.orientation.z, p.orientation.w = math.sin(half), math.cos(half)
        d.results.append(src)
        out.detections.append(d)
    return out


def mask_detections_msg(det: Any, masks: Any, header: Header) -> Any:
    """``masks/detections``: one Detection2D per prompt with ``id`` = its mask id in the
    ``masks`` image (prompt index + 1), bbox = the mask's bounding box, results = the
    detector's class and score (when the prompt is a detection) plus a hypothesis
    ``mask_score`` with SAM's predicted IoU."""
    from vision_msgs.msg import (BoundingBox2D, Detection2D, Detection2DArray,
                                 ObjectHypothesis, ObjectHypothesisWithPose)

    out = Detection2DArray(header=copy_header(header))
    for i in range(len(masks.scores)):
        d = Detection2D(header=copy_header(header), id=str(i + 1))
        x1, y1, x2, y2 = (float(v) for v in masks.bboxes[i])
        d.bbox = BoundingBox2D(size_x=x2 - x1, size_y=y2 - y1)
        d.bbox.center.position.x = (x1 + x2) / 2.0
        d.bbox.center.position.y = (y1 + y2) / 2.0
        if det is not None and i < masks.n_detection_prompts:
            d.results.append(ObjectHypothesisWithPose(hypothesis=ObjectHypothesis(
                class_id=str(det.class_names[i]), score=float(det.scores[i]))))
        d.results.append(ObjectHypothesisWithPose(hypothesis=ObjectHypothesis(
            class_id="mask_score", score=float(masks.scores[i]))))
        out.detections.append(d)
    return out


def classification_msg(labels: Sequence[tuple[str, float]], header: Header) -> Any:
    from vision_msgs.msg import Classification, ObjectHypothesis

    return Classification(header=copy_header(header), results=[
        ObjectHypothesis(class_id=str(n), score=float(s)) for n, s in labels])


def detections_from_msg(msg: Any) -> Any:
    """Detection2DArray (from a detector node) → core Detections: the first hypothesis of
    each detection is its class and score (as detections_msg writes them). Class ids are
    not carried by vision_msgs; they are numbered by first appearance of each name."""
    from perception2d_ros.models.detections import Detections

    xyxy, names, scores = [], [], []
    for d in msg.detections:
        cx, cy = d.bbox.center.position.x, d.bbox.center.position.y
        xyxy.append([cx - d.bbox.size_x / 2, cy - d.bbox.size_y / 2,
                     cx + d.bbox.size_x / 2, cy + d.bbox.size_y / 2])
        hyp = d.results[0].hypothesis if d.results else None
        names.append(hyp.class_id if hyp is not None else "")
        scores.append(hyp.score if hyp is not None else 0.0)
    ids = {n: i for i, n in enumerate(dict.fromkeys(names))}
    return Detections(np.asarray(xyxy, np.float32).reshape(-1, 4),
                      np.asarray(scores, np.float32), np.asarray([ids[n] for n in names]),
                      names)


def detection_ids_from_msg(msg: Any) -> list[str]:
    """``Detection2D.id`` of each detection (track ids when a tracker published them)."""
    return [str(d.id) for d in msg.detections]
