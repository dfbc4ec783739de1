"""The ROS-free TF buffer: chain composition, static vs dynamic, interpolation, errors."""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from perception2d_ros.geometry.extrinsics import Extrinsics
from perception2d_ros.geometry.tf_buffer import TransformBuffer, TransformError, slerp

S = 1_000_000_000
# the Apollo front camera in its lidar frame (real extrinsics, test/data/realcam)
CAM_T = [0.4301553490164852, 0.0001724492058138627, -0.3335629252912848]
CAM_Q = [-0.5032473552377276, 0.4993366298247822, -0.506011022936818, 0.491281868409466]


def _yaw_q(yaw: float) -> list[float]:
    return [0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2)]


def _chain() -> TransformBuffer:
    buf = TransformBuffer()
    buf.set_transform("base_link", "velodyne64", 0, [0.2, 0.0, 1.9], [0, 0, 0, 1], static=True)
    buf.set_transform("velodyne64", "onsemi_obstacle", 0, CAM_T, CAM_Q, static=True)
    return buf


def test_static_chain_composes_like_the_matrices():
    e = _chain().lookup("base_link", "onsemi_obstacle", 123 * S)
    cam = Extrinsics.from_quaternion(CAM_T, CAM_Q)
    np.testing.assert_allclose(e.rotation, cam.rotation, atol=1e-12)
    np.testing.assert_allclose(e.translation, np.add(CAM_T, [0.2, 0.0, 1.9]), atol=1e-12)
    assert (e.parent_frame, e.child_frame) == ("base_link", "onsemi_obstacle")


def test_inverse_and_sibling_lookups():
    buf = _chain()
    buf.set_transform("base_link", "imu", 0, [1.0, 2.0, 0.5], _yaw_q(0.3), static=True)
    fwd = buf.lookup("base_link", "onsemi_obstacle")
    inv = buf.lookup("onsemi_obstacle", "base_link")
    np.testing.assert_allclose(inv.rotation, fwd.rotation.T, atol=1e-12)
    np.testing.assert_allclose(inv.translation, -fwd.rotation.T @ fwd.translation, atol=1e-12)
    # imu <- camera through the common ancestor base_link: a point round-trips
    p_cam = np.array([[0.5, -0.2, 7.0]])
    p_base = fwd.points_to_base(p_cam)
    imu = buf.lookup("base_link", "imu")
    p_imu = (p_base - imu.translation) @ imu.rotation
    np.testing.assert_allclose(buf.lookup("imu", "onsemi_obstacle").points_to_base(p_cam),
                               p_imu, atol=1e-12)
    same = buf.lookup("/base_link", "base_link")  # a leading slash is ignored, as in tf2
    np.testing.assert_allclose(same.rotation, np.eye(3))


def test_dynamic_link_is_interpolated_at_the_stamp():
    buf = TransformBuffer()
    buf.set_transform("odom", "base_link", 10 * S, [0, 0, 0], _yaw_q(0.0))
    buf.set_transform("odom", "base_link", 11 * S, [2, 4, 0], _yaw_q(math.pi / 2))
    buf.set_transform("base_link", "camera", 0, [1, 0, 0], [0, 0, 0, 1], static=True)
    e = buf.lookup("odom", "camera", 10 * S + S // 4)
    yaw = math.atan2(e.rotation[1, 0], e.rotation[0, 0])
    assert yaw == pytest.approx(math.pi / 8, abs=1e-12)          # slerp: a quarter of 90 deg
    np.testing.assert_allclose(e.translation, [0.5 + math.cos(yaw), 1.0 + math.sin(yaw), 0],
                               atol=1e-12)
    exact = buf.lookup("odom", "camera", 11 * S)
    np.testing.assert_allclose(exact.translation, [2, 5, 0], atol=1e-12)
    latest = buf.lookup("odom", "camera", 0)                      # stamp 0 = the newest
    np.testing.assert_allclose(latest.translation, exact.translation, atol=1e-12)


def test_extrapolation_is_an_error_naming_the_link():
    buf = TransformBuffer()
    buf.set_transform("odom", "base_link", 10 * S, [0, 0, 0], [0, 0, 0, 1])
    buf.set_transform("odom", "base_link", 11 * S, [1, 0, 0], [0, 0, 0, 1])
    with pytest.raises(TransformError, match=r"odom -> base_link \(/tf\).*after the newest"):
        buf.lookup("odom", "base_link", 12 * S)
    with pytest.raises(TransformError, match="before the oldest"):
        buf.lookup("odom", "base_link", 9 * S)


def test_missing_link_is_named():
    buf = TransformBuffer()
    with pytest.raises(TransformError, match="no transform names frame 'onsemi_obstacle'.*"
                                             "none yet"):
        buf.lookup("base_link", "onsemi_obstacle")
    buf.set_transform("velodyne64", "onsemi_obstacle", 0, CAM_T, CAM_Q, static=True)
    with pytest.raises(TransformError, match="missing link between 'base_link' and "
                                             "'velodyne64'"):
        buf.lookup("base_link", "onsemi_obstacle")
    with pytest.raises(TransformError, match="empty frame name"):
        buf.lookup("base_link", "")


def test_cache_drops_old_dynamic_samples_and_static_replaces():
    buf = TransformBuffer(cache_s=2.0)
    for k in range(6):
        buf.set_transform("odom", "base_link", k * S, [k, 0, 0], [0, 0, 0, 1])
    assert buf.lookup("odom", "base_link", 3 * S).translation[0] == pytest.approx(3)
    with pytest.raises(TransformError, match="before the oldest"):
        buf.lookup("odom", "base_link", 2 * S)
    buf.set_transform("a", "b", 0, [1, 0, 0], [0, 0, 0, 1], static=True)
    buf.set_transform("a", "b", 0, [2, 0, 0], [0, 0, 0, 1], static=True)
    assert buf.lookup("a", "b", 99 * S).translation[0] == pytest.approx(2)
    assert buf.frames == ["a", "b", "base_link", "odom"]


@pytest.mark.parametrize("args,match", [
    (("", "b", [0, 0, 0], [0, 0, 0, 1]), "must be non-empty"),
    (("a", "a", [0, 0, 0], [0, 0, 0, 1]), "its own parent"),
    (("a", "b", [0, float("nan"), 0], [0, 0, 0, 1]), "not finite"),
    (("a", "b", [0, 0, 0], [0, 0, 0, 0]), "not a rotation"),
])
def test_bad_transforms_are_refused(args, match):
    parent, child, t, q = args
    with pytest.raises(ValueError, match=match):
        TransformBuffer().set_transform(parent, child, 0, t, q)


def test_loop_is_reported():
    buf = TransformBuffer()
    buf.set_transform("a", "b", 0, [0, 0, 0], [0, 0, 0, 1], static=True)
    buf.set_transform("b", "a", 0, [0, 0, 0], [0, 0, 0, 1], static=True)
    with pytest.raises(TransformError, match="TF loop"):
        buf.lookup("c", "a")


def test_slerp_endpoints_and_shortest_arc():
    q0, q1 = np.array(_yaw_q(0.0)), np.array(_yaw_q(2.0))
    np.testing.assert_allclose(slerp(q0, q1, 0.0), q0, atol=1e-12)
    np.testing.assert_allclose(slerp(q0, q1, 1.0), q1, atol=1e-12)
    # -q1 is the same rotation: interpolation takes the short way either way
    np.testing.assert_allclose(np.abs(slerp(q0, -q1, 0.5)), np.abs(slerp(q0, q1, 0.5)),
                               atol=1e-12)


def test_set_transforms_from_message_shaped_objects_and_wait_lookup():
    from types import SimpleNamespace as NS

    def ts(parent, child, sec, x):
        return NS(header=NS(frame_id=parent, stamp=NS(sec=sec, nanosec=0)),
                  child_frame_id=child,
                  transform=NS(translation=NS(x=x, y=0.0, z=0.0),
                               rotation=NS(x=0.0, y=0.0, z=0.0, w=1.0)))

    buf = TransformBuffer()
    assert buf.set_transforms([ts("odom", "base_link", 5, 0.0)]) == 1
    # the next /tf sample arrives after the lookup started: wait_lookup picks it up
    threading.Timer(0.1, lambda: buf.set_transforms([ts("odom", "base_link", 6, 1.0)])).start()
    t0 = time.monotonic()
    e = buf.wait_lookup("odom", "base_link", 5 * S + S // 2, timeout_s=5.0)
    assert e.translation[0] == pytest.approx(0.5)
    assert time.monotonic() - t0 < 4.0
    with pytest.raises(TransformError):
        buf.wait_lookup("odom", "base_link", 9 * S, timeout_s=0.05)
