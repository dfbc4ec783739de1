"""3D objects from boxes on constructed scenes with known answers.

The scene: an upright rectangular face (the front of an object) ``width`` wide and ``height``
tall, standing on the ground plane at ``x = dist`` (base_link: x forward, y left, z up),
centred at ``y = lateral``, seen by a known camera. Boxes are the face's projection; depth
images and SAM masks are ray-cast from the same scene, pixel by pixel.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from perception2d_ros.geometry.camera import CameraModel
from perception2d_ros.geometry.extrinsics import Extrinsics
from perception2d_ros.geometry.objects3d import depth_to_metres, lift_objects

PINHOLE = CameraModel(640, 480, [500, 0, 320, 0, 500, 240, 0, 0, 1])
# a real lens (OpenCV's left*.jpg calibration, plumb_bob) for the rectified-image case
DISTORTED = CameraModel(640, 480, [532.8, 0, 342.5, 0, 532.9, 233.9, 0, 0, 1],
                        [-0.281, 0.0254, 0.00122, -0.000134, 0.161])


def _scene_hits(camera, extr, px, rectified, dist, lateral, width, height, plane=0.0):
    """Depth (optical z, metres; NaN = sky) and face-hit flag for pixels ``px``."""
    rays = camera.pixel_to_ray(px, rectified=rectified)
    rb = extr.rays_to_base(rays)
    c = np.asarray(extr.translation)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_g = np.where(rb[:, 2] < -1e-12, (plane - c[2]) / rb[:, 2], np.inf)
        s_f = np.where(rb[:, 0] > 1e-12, (dist - c[0]) / rb[:, 0], np.inf)
    p = c + s_f[:, None] * np.where(np.isfinite(s_f)[:, None], rb, 0)
    face = (np.isfinite(s_f) & (np.abs(p[:, 1] - lateral) <= width / 2)
            & (p[:, 2] >= plane) & (p[:, 2] <= plane + height) & (s_f <= s_g))
    s = np.where(face, s_f, s_g)
    z = s * rays[:, 2]
    z[~np.isfinite(z)] = np.nan
    return z, face


def _grid(camera):
    w, h = camera.image_size
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)


def _render(camera, extr, rectified=False, **scene):
    """Depth in metres registered to the raw image; instance ids of the face (id 1) in the
    working image (raw or rectified); the face's 2D box in the working image."""
    w, h = camera.image_size
    px = _grid(camera)
    depth, _ = _scene_hits(camera, extr, px, False, **scene)
    _, face = _scene_hits(camera, extr, px, rectified, **scene)
    ids = face.reshape(h, w).astype(np.uint16)
    corners = _face_corners(**scene)
    uv = camera.project_points((corners - extr.translation) @ extr.rotation, rectified=rectified)
    box = np.array([uv[:, 0].min(), uv[:, 1].min(), uv[:, 0].max(), uv[:, 1].max()])
    return depth.reshape(h, w).astype(np.float32), ids, box


def _face_corners(dist, lateral, width, height, plane=0.0):
    return np.array([[dist, lateral + sy * width / 2, plane + z] for sy in (-1, 1)
                     for z in (0.0, height)])


def _extent(extr, center, **scene):
    """(along the line of sight, across it) extents of the face as the objects report them."""
    c = np.asarray(extr.translation)
    d = np.array([center[0] - c[0], center[1] - c[1], 0.0])
    h = d / np.linalg.norm(d)
    lat = np.array([-h[1], h[0], 0.0])
    pts = _face_corners(**scene) - c
    return np.ptp(pts @ h), np.ptp(pts @ lat)


LEVEL = Extrinsics.from_body_pose([0.0, 0.0, 1.2], [0.0, 0.0, 0.0])
PITCHED = Extrinsics.from_body_pose([0.3, 0.0, 1.5], [0.0, math.radians(8), 0.0])
TILTED = Extrinsics.from_body_pose([0.3, -0.2, 1.5], [math.radians(4), math.radians(6),
                                                      math.radians(3)])


def test_level_camera_ground_plane_answers_are_exact():
    scene = dict(dist=10.0, lateral=0.0, width=1.8, height=1.5)
    _, _, box = _render(PINHOLE, LEVEL, **scene)
    obj = lift_objects(box[None], PINHOLE, LEVEL)
    assert obj.valid.tolist() == [True] and obj.source == ["ground_plane"]
    np.testing.assert_allclose(obj.footprint[0], [10.0, 0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(obj.size[0], [0.0, 1.8, 1.5], atol=1e-9)
    np.testing.assert_allclose(obj.center[0], [10.0, 0.0, 0.75], atol=1e-9)
    assert obj.distance[0] == pytest.approx(10.0)
    assert obj.yaw[0] == pytest.approx(0.0)
    assert obj.parent_frame == "base_link"


@pytest.mark.parametrize("extr", [LEVEL, PITCHED, TILTED], ids=["level", "pitched", "tilted"])
@pytest.mark.parametrize("dist,lateral", [(6.0, 0.0), (12.0, 2.5), (25.0, -3.0)])
def test_ground_plane_position_and_size(extr, dist, lateral):
    scene = dict(dist=dist, lateral=lateral, width=1.8, height=1.5)
    _, _, box = _render(PINHOLE, extr, **scene)
    obj = lift_objects(box[None], PINHOLE, extr)
    assert obj.valid[0] and obj.source[0] == "ground_plane"
    # the box is the bounding rectangle of a perspective quadrilateral: its bottom-centre is
    # the standing point up to the tilt. A rolled camera sees one bottom corner lower than the
    # other, so the box bottom lies below the standing point: tolerance 2 % of the range,
    # 4 % with 4 degrees of roll
    tol = (0.04 if extr is TILTED else 0.02) * dist
    np.testing.assert_allclose(obj.footprint[0][:2], [dist, lateral], atol=tol)
    assert obj.footprint[0][2] == pytest.approx(0.0, abs=1e-9)
    _, across = _extent(extr, obj.center[0], **scene)
    assert obj.size[0][1] == pytest.approx(across, rel=0.05)
    assert obj.size[0][2] == pytest.approx(1.5, rel=0.05)
    c = extr.translation
    assert obj.yaw[0] == pytest.approx(math.atan2(lateral - c[1], dist - c[0]), abs=0.02)


@pytest.mark.parametrize("extr", [LEVEL, PITCHED, TILTED], ids=["level", "pitched", "tilted"])
def test_standing_point_is_exact_for_any_camera_orientation(extr):
    """A box whose bottom-centre is the image of the standing point recovers it exactly."""
    foot = np.array([[11.0, -1.5, 0.0]])
    u, v = PINHOLE.project_points((foot - extr.translation) @ extr.rotation)[0]
    obj = lift_objects(np.array([[u - 20, v - 60, u + 20, v]]), PINHOLE, extr)
    np.testing.assert_allclose(obj.footprint[0], foot[0], atol=1e-9)


def test_plane_height_shifts_the_answer():
    scene = dict(dist=8.0, lateral=0.5, width=1.0, height=1.0, plane=-0.4)
    _, _, box = _render(PINHOLE, LEVEL, **scene)
    obj = lift_objects(box[None], PINHOLE, LEVEL, plane_height=-0.4)
    np.testing.assert_allclose(obj.footprint[0], [8.0, 0.5, -0.4], atol=0.02)
    assert obj.size[0][2] == pytest.approx(1.0, rel=0.01)


def test_targets_at_or_beyond_the_horizon_get_no_ground_position():
    # level camera: the horizon is image row cy = 240; boxes ending above it never meet the
    # ground in front of the camera
    boxes = np.array([[300, 100, 340, 239.0],    # above the horizon
                      [300, 100, 340, 240.0],    # on it (ray parallel to the ground)
                      [300, 100, 340, 300.0]])   # below: valid
    obj = lift_objects(boxes, PINHOLE, LEVEL)
    assert obj.valid.tolist() == [False, False, True]
    assert obj.source == ["", "", "ground_plane"]
    assert np.isnan(obj.center[:2]).all() and np.isfinite(obj.center[2]).all()


def test_empty_detections():
    obj = lift_objects(np.zeros((0, 4)), PINHOLE, LEVEL, depth_m=np.zeros((480, 640)))
    assert len(obj) == 0 and obj.center.shape == (0, 3)


@pytest.mark.parametrize("extr", [LEVEL, TILTED], ids=["level", "tilted"])
def test_depth_box_median_of_the_central_region(extr):
    scene = dict(dist=9.0, lateral=1.0, width=1.8, height=1.5)
    depth, _, box = _render(PINHOLE, extr, **scene)
    obj = lift_objects(box[None], PINHOLE, extr, depth_m=depth)
    assert obj.source == ["depth_box"] and obj.depth_fraction[0] == 1.0
    # median of the face's central points: the face centre
    np.testing.assert_allclose(obj.center[0], [9.0, 1.0, 0.75], atol=0.05)
    along, across = _extent(extr, obj.center[0], **scene)
    # a flat face: along the line of sight only its obliqueness, over the central half
    assert obj.size[0][0] == pytest.approx(along / 2, abs=0.03)
    # width = the box's pixel width at the median depth; a rolled camera's axis-aligned box
    # is wider than the face by about height * sin(roll) (4 degrees: +0.1 m)
    roll = 0.07 if extr is TILTED else 0.0
    assert obj.size[0][1] == pytest.approx(across + 1.5 * roll, rel=0.05)
    assert obj.size[0][2] == pytest.approx(1.5 + across * roll, rel=0.05)  # likewise
    c = extr.translation
    assert obj.distance[0] == pytest.approx(math.hypot(9.0 - c[0], 1.0 - c[1]), abs=0.05)


def test_depth_mask_extent_and_zero_nan_pixels_ignored():
    scene = dict(dist=7.0, lateral=-1.0, width=2.0, height=1.2)
    depth, ids, box = _render(PINHOLE, PITCHED, **scene)
    # knock out 40 % of the depth inside the mask: zeros (16UC1 "no return") and NaNs
    rng = np.random.default_rng(0)
    holes = (ids == 1) & (rng.random(ids.shape) < 0.4)
    mm = np.where(np.isnan(depth), 0, np.round(depth * 1000)).astype(np.uint16)
    mm[holes] = 0
    obj = lift_objects(box[None], PINHOLE, PITCHED, instance_ids=ids, n_mask_prompts=1,
                       depth_m=depth_to_metres(mm, "16UC1"))
    assert obj.source == ["depth_mask"]
    assert 0.5 < obj.depth_fraction[0] < 0.7
    np.testing.assert_allclose(obj.center[0], [7.0, -1.0, 0.6], atol=0.05)
    along, across = _extent(PITCHED, obj.center[0], **scene)
    np.testing.assert_allclose(obj.size[0], [along, across, 1.2], rtol=0.05, atol=0.02)
    f32 = depth.copy()
    f32[holes] = np.nan
    obj32 = lift_objects(box[None], PINHOLE, PITCHED, instance_ids=ids, n_mask_prompts=1,
                         depth_m=depth_to_metres(f32, "32FC1"))
    np.testing.assert_allclose(obj32.center, obj.center, atol=2e-3)  # mm rounding only


def test_depth_on_a_distorted_camera_with_rectified_boxes():
    """Depth is registered to the raw image; boxes and masks are in the rectified one."""
    scene = dict(dist=6.0, lateral=0.3, width=1.0, height=1.4)
    depth, ids, box = _render(DISTORTED, PITCHED, rectified=True, **scene)
    for masks in (None, ids):
        obj = lift_objects(box[None], DISTORTED, PITCHED, rectified=True, depth_m=depth,
                           instance_ids=masks, n_mask_prompts=1)
        assert obj.source == ["depth_box" if masks is None else "depth_mask"]
        np.testing.assert_allclose(obj.center[0], [6.0, 0.3, 0.7], atol=0.05)
        _, across = _extent(PITCHED, obj.center[0], **scene)
        assert obj.size[0][1] == pytest.approx(across, rel=0.05)
        assert obj.size[0][2] == pytest.approx(1.4, rel=0.05)


def test_depth_rescues_a_target_beyond_the_horizon_and_missing_depth_falls_back():
    depth = np.full((480, 640), np.nan, np.float32)
    depth[100:200, 280:360] = 30.0   # something 30 m away, above the horizon
    boxes = np.array([[280, 100, 360, 200.0], [300, 300, 340, 400.0]])
    obj = lift_objects(boxes, PINHOLE, LEVEL, depth_m=depth)
    assert obj.source == ["depth_box", "ground_plane"]  # second box: no depth -> ground
    assert obj.center[0][0] == pytest.approx(30.0, abs=1e-3)
    no_depth = lift_objects(boxes, PINHOLE, LEVEL)
    assert no_depth.valid.tolist() == [False, True]


@pytest.mark.parametrize("encoding,value,metres", [("16UC1", 1500, 1.5), ("32FC1", 1.5, 1.5),
                                                   ("16UC1", 0, None), ("32FC1", 0.0, None),
                                                   ("32FC1", float("nan"), None),
                                                   ("32FC1", float("inf"), None)])
def test_depth_to_metres(encoding, value, metres):
    arr = np.full((2, 3), value, np.uint16 if encoding == "16UC1" else np.float32)
    out = depth_to_metres(arr, encoding)
    assert out.dtype == np.float32
    if metres is None:
        assert np.isnan(out).all()
    else:
        np.testing.assert_allclose(out, metres)


def test_depth_errors_name_the_field():
    with pytest.raises(ValueError, match="depth.encoding 'bgr8'"):
        depth_to_metres(np.zeros((2, 2, 3), np.uint8), "bgr8")
    with pytest.raises(ValueError, match="depth image 320x240 does not match"):
        lift_objects(np.array([[0, 0, 10, 10.0]]), PINHOLE, LEVEL,
                     depth_m=np.zeros((240, 320), np.float32))


def test_debug_image_label_shows_the_distance():
    from perception2d_ros.io.debug_draw import _with_distance

    boxes = np.array([[300, 100, 340, 239.0], [300, 200, 340, 300.0]])  # 2nd: 10 m ahead
    obj = lift_objects(boxes, PINHOLE, LEVEL)
    assert _with_distance(None, obj, 2) == ["", "10.0 m"]
    assert _with_distance(["a cat 0.91", ""], obj, 2) == ["a cat 0.91", "10.0 m"]
    assert _with_distance(["x", "y"], None, 2) == ["x", "y"]
