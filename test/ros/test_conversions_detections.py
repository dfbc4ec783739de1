"""Detections → Detection2DArray and the camera-model cache key (ros/conversions.py).

``detections_msg`` fills the default sub-messages in place instead of building and replacing
them (it is on every detector frame's path); the message must equal the straightforward
construction field for field. Messages only: no rclpy.init, no DDS."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="message types come with the ROS environment")

from builtin_interfaces.msg import Time  # noqa: E402
from sensor_msgs.msg import CameraInfo  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from vision_msgs.msg import (BoundingBox2D, Detection2D, Detection2DArray,  # noqa: E402
                             ObjectHypothesis, ObjectHypothesisWithPose)

from perception2d_ros.models.detections import Detections  # noqa: E402
from perception2d_ros.ros import conversions as conv  # noqa: E402

pytestmark = pytest.mark.ros


def _reference_msg(det: Detections, header: Header, extra: Any = None,
                   ids: Any = None) -> Detection2DArray:
    """Every message built with its constructor, one field at a time."""
    def hdr() -> Header:
        return Header(stamp=Time(sec=header.stamp.sec, nanosec=header.stamp.nanosec),
                      frame_id=header.frame_id)

    out = Detection2DArray(header=hdr())
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(det.xyxy, np.float64)):
        d = Detection2D(header=hdr(), id=str(ids[i]) if ids is not None else str(i))
        d.bbox = BoundingBox2D(size_x=float(x2 - x1), size_y=float(y2 - y1))
        d.bbox.center.position.x = float((x1 + x2) / 2.0)
        d.bbox.center.position.y = float((y1 + y2) / 2.0)
        hyps = [(det.class_names[i], float(det.scores[i]))]
        if extra is not None and extra[i] is not None:
            hyps = list(extra[i])
        for name, score in hyps:
            d.results.append(ObjectHypothesisWithPose(
                hypothesis=ObjectHypothesis(class_id=name, score=float(score))))
        out.detections.append(d)
    return out


def _dets(n: int, seed: int = 0) -> Detections:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1200, (n, 2)).astype(np.float32)
    xyxy = np.concatenate([xy, xy + rng.uniform(0.5, 300, (n, 2)).astype(np.float32)], 1)
    return Detections.from_arrays(xyxy, rng.uniform(0.3, 1, n), rng.integers(0, 3, n),
                                  ["person", "car", "dog"])


HEADER = Header(stamp=Time(sec=1_700_000_123, nanosec=456_789), frame_id="camera_optical")


@pytest.mark.parametrize("n", [0, 1, 7, 40])
def test_detections_msg_equals_constructor_built_message(n: int) -> None:
    det = _dets(n)
    msg = conv.detections_msg(det, HEADER)
    assert msg == _reference_msg(det, HEADER)
    assert len(msg.detections) == n
    if n:  # the doubles carried are the float32 boxes exactly
        d = msg.detections[-1]
        x1, y1, x2, y2 = det.xyxy[-1].astype(np.float64)
        assert d.bbox.size_x == x2 - x1 and d.bbox.center.position.y == (y1 + y2) / 2.0
        assert d.results[0].hypothesis.score == float(det.scores[-1])
        assert d.header == HEADER and d.header is not msg.header is not HEADER


def test_detections_msg_ids_and_extra_hypotheses() -> None:
    det = _dets(3, seed=1)
    extra = [[("forklift", 0.7), ("pallet", 0.2)], None, [("cone", 0.9)]]
    ids = ["5", "6", "7"]
    msg = conv.detections_msg(det, HEADER, extra_hypotheses=extra, ids=ids)
    assert msg == _reference_msg(det, HEADER, extra, ids)
    assert [d.id for d in msg.detections] == ids
    assert [h.hypothesis.class_id for h in msg.detections[0].results] == ["forklift", "pallet"]
    assert msg.detections[1].results[0].hypothesis.class_id == det.class_names[1]


def test_detections_round_trip_through_the_message() -> None:
    det = _dets(5, seed=2)
    back = conv.detections_from_msg(conv.detections_msg(det, HEADER))
    np.testing.assert_allclose(back.xyxy, det.xyxy, atol=1e-3)
    assert back.class_names == det.class_names
    np.testing.assert_array_equal(back.scores, det.scores)


def _info(**changes: Any) -> CameraInfo:
    msg = CameraInfo(width=1280, height=720, distortion_model="plumb_bob",
                     d=[-0.3, 0.1, 0.0, 0.0, 0.0],
                     k=[900.0, 0.0, 640.0, 0.0, 900.0, 360.0, 0.0, 0.0, 1.0],
                     r=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
                     p=[900.0, 0.0, 640.0, 0.0, 0.0, 900.0, 360.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    for k, v in changes.items():
        setattr(msg, k, v)
    return msg


def test_camera_info_key_tracks_the_calibration_not_the_header() -> None:
    a = _info()
    b = _info()
    b.header.stamp.sec = 99
    b.header.frame_id = "other"
    assert conv.camera_info_key(a) == conv.camera_info_key(b)
    assert hash(conv.camera_info_key(a)) == hash(conv.camera_info_key(b))
    for change in (dict(d=[-0.3, 0.1, 0.0, 0.0, 0.001]), dict(width=640),
                   dict(k=[901.0, 0.0, 640.0, 0.0, 900.0, 360.0, 0.0, 0.0, 1.0]),
                   dict(binning_x=2), dict(distortion_model="equidistant")):
        assert conv.camera_info_key(_info(**change)) != conv.camera_info_key(a), change
    c = _info()
    c.roi.width = 10
    assert conv.camera_info_key(c) != conv.camera_info_key(a)


def test_camera_model_cache_reuses_the_model_per_calibration() -> None:
    cache = conv.CameraModelCache(size=2)
    first = cache.get(_info())
    again = _info()
    again.header.stamp.sec = 5
    assert cache.get(again) is first
    other = cache.get(_info(k=[800.0, 0.0, 640.0, 0.0, 800.0, 360.0, 0.0, 0.0, 1.0]))
    assert other is not first and cache.get(_info()) is first
