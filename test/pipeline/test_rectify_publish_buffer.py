"""Rectify writes straight into the buffer its ``image_rect`` message publishes from.

``RectifyStage`` remaps into an array whose memory is an ``array.array('B')``;
``array_to_image_msg`` takes that buffer as the message's ``data`` with no copy; the stage
reuses it for the next frame only when no message, frame or view still holds it. Real
calibration and a real image; messages only (no rclpy.init, no DDS)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("rclpy", reason="message types come with the ROS environment")

from std_msgs.msg import Header  # noqa: E402

from perception2d_ros.geometry.camera import CameraModel  # noqa: E402
from perception2d_ros.io.image_codec import (message_buffer_array,  # noqa: E402
                                               message_buffer_of)
from perception2d_ros.pipeline.frame import Frame  # noqa: E402
from perception2d_ros.pipeline.rectify import RectifyStage  # noqa: E402
from perception2d_ros.ros import conversions as conv  # noqa: E402

pytestmark = pytest.mark.ros
DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def camera_and_image() -> tuple[CameraModel, np.ndarray]:
    cam = CameraModel.from_yaml(DATA / "camera_info" / "camerav1_1280x720.yaml")
    img = cv2.imread(str(sorted((DATA / "coco").rglob("*.jpg"))[0]))
    return cam, cv2.resize(img, tuple(cam.image_size))


def _frame(cam: CameraModel, img: np.ndarray) -> Frame:
    return Frame(image=img, encoding="bgr8", stamp_ns=1, frame_id="cam", camera=cam)


@pytest.mark.parametrize("shape,dtype", [((720, 1280, 3), np.uint8), ((5, 7), np.uint16),
                                          ((3, 4, 3), np.float32)])
def test_message_buffer_is_found_only_for_the_whole_buffer(shape, dtype) -> None:
    a = message_buffer_array(shape, dtype)
    buf = message_buffer_of(a)
    assert buf is not None and buf.typecode == "B" and len(buf) == a.nbytes
    assert message_buffer_of(a[1:]) is None            # a part of it
    assert message_buffer_of(np.empty(shape, dtype)) is None   # ordinary numpy memory
    if a.ndim == 3:
        assert message_buffer_of(a[:, :, 0]) is None    # not contiguous


def test_image_rect_message_takes_the_rectified_buffer_without_copy(camera_and_image) -> None:
    cam, img = camera_and_image
    stage = RectifyStage()
    frame = _frame(cam, img)
    stage.process(frame)
    np.testing.assert_array_equal(frame.rectified, cam.rectify(img))
    msg = conv.array_to_image_msg(frame.rectified, "bgr8", Header(frame_id="cam"))
    assert msg.data is message_buffer_of(frame.rectified)        # no copy
    assert (msg.height, msg.width, msg.step) == (720, 1280, 1280 * 3)
    np.testing.assert_array_equal(
        np.frombuffer(msg.data, np.uint8).reshape(720, 1280, 3), cam.rectify(img))


def test_buffer_held_by_a_message_is_never_overwritten(camera_and_image) -> None:
    cam, img = camera_and_image
    stage = RectifyStage()
    f1 = _frame(cam, img)
    stage.process(f1)
    msg = conv.array_to_image_msg(f1.rectified, "bgr8", Header(frame_id="cam"))
    kept = bytes(msg.data)
    del f1                                              # only the message holds it now
    f2 = _frame(cam, cv2.flip(img, 1))
    stage.process(f2)
    assert message_buffer_of(f2.rectified) is not msg.data
    assert bytes(msg.data) == kept                      # the published image is intact


def test_buffer_is_reused_once_released(camera_and_image) -> None:
    cam, img = camera_and_image
    stage = RectifyStage()
    f1 = _frame(cam, img)
    stage.process(f1)
    first = f1.rectified.ctypes.data
    msg = conv.array_to_image_msg(f1.rectified, "bgr8", Header(frame_id="cam"))
    del f1, msg                                         # published and dropped
    f2 = _frame(cam, img)
    stage.process(f2)
    assert f2.rectified.ctypes.data == first            # same memory, no new allocation
