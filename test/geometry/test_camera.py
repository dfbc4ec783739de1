"""Tests for perception2d_ros.geometry.camera (and its calibration, distortion and extrinsics
modules) on real calibration data.

Data: OpenCV's left01..14.jpg chessboard sample (9x6 inner corners) with its intrinsics
(left_intrinsics.yml, OpenCV FileStorage) and camera_calibration YAMLs in
test/data/camera_info (see test/data/ATTRIBUTION.md).
"""
from __future__ import annotations

import array
import math
import re
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from perception2d_ros.geometry.camera import CameraModel
from perception2d_ros.geometry.distortion import DISTORTION_MODELS
from perception2d_ros.geometry.extrinsics import BODY_TO_OPTICAL, Extrinsics

BOARD = (9, 6)  # inner corners (columns, rows)


# ----------------------------------------------------------------------------- helpers
def _load_intrinsics(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    fs = cv2.FileStorage(str(data_dir / "chessboard" / "left_intrinsics.yml"), cv2.FILE_STORAGE_READ)
    try:
        k = fs.getNode("camera_matrix").mat()
        d = fs.getNode("distortion_coefficients").mat().ravel()
    finally:
        fs.release()
    return k, d


def _find_corners(gray: np.ndarray) -> np.ndarray | None:
    """Sub-pixel chessboard corners as (rows=6, cols=9, 2) float64, or None."""
    found, corners = cv2.findChessboardCorners(gray, BOARD)
    if not found:
        return None
    corners = cv2.cornerSubPix(
        gray, corners, (5, 5), (-1, -1),
        (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_COUNT, 50, 1e-3),
    )
    return corners.reshape(BOARD[1], BOARD[0], 2).astype(np.float64)


def _collinearity_rms(grid: np.ndarray) -> float:
    """RMS distance (px) of each board row and column of corners from its best-fit line."""
    dists = []
    for line in list(grid) + list(grid.transpose(1, 0, 2)):
        centred = line - line.mean(axis=0)
        normal = np.linalg.svd(centred)[2][1]
        dists.append(centred @ normal)
    return float(np.sqrt(np.mean(np.square(np.concatenate(dists)))))


def _pixel_grid(w: int, h: int, nx: int = 33, ny: int = 25, margin: float = 0.0) -> np.ndarray:
    xs = np.linspace(margin, w - 1 - margin, nx)
    ys = np.linspace(margin, h - 1 - margin, ny)
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


def _info(**overrides) -> dict:
    """A valid plumb_bob camera_info dict (left_plumb_bob.yaml numbers) with overrides."""
    base = {
        "width": 640,
        "height": 480,
        "distortion_model": "plumb_bob",
        "d": [-0.2651, -0.0467, 0.00183, -0.000315, 0.2523],
        "k": [536.07, 0.0, 342.37, 0.0, 536.02, 235.54, 0.0, 0.0, 1.0],
        "r": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        "p": [536.07, 0.0, 342.37, 0.0, 0.0, 536.02, 235.54, 0.0, 0.0, 0.0, 1.0, 0.0],
        "binning_x": 0,
        "binning_y": 0,
        "roi": {"x_offset": 0, "y_offset": 0, "height": 0, "width": 0, "do_rectify": False},
    }
    base.update(overrides)
    return base


@pytest.fixture(scope="module")
def board_views(data_dir: Path):
    """[(name, gray image)] for the chessboard images."""
    paths = sorted((data_dir / "chessboard").glob("left*.jpg"))
    assert len(paths) >= 10
    return [(p.name, cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)) for p in paths]


@pytest.fixture(scope="module")
def board_camera(data_dir: Path) -> CameraModel:
    k, d = _load_intrinsics(data_dir)
    return CameraModel(640, 480, k, d)


def _yaml(data_dir: Path, name: str) -> CameraModel:
    return CameraModel.from_yaml(data_dir / "camera_info" / f"{name}.yaml")


# ----------------------------------------------------------------------------- rectification
def test_rectification_straightens_chessboard_lines(board_views, board_camera):
    results = []
    for name, gray in board_views:
        raw = _find_corners(gray)
        rect = _find_corners(board_camera.rectify(gray))
        if raw is None or rect is None:
            continue
        before, after = _collinearity_rms(raw), _collinearity_rms(rect)
        print(f"{name}: collinearity RMS before {before:.3f} px, after {after:.3f} px")
        results.append((name, before, after))
    assert len(results) >= 10, "chessboard not found in enough images"
    for name, before, after in results:
        assert after < 0.3, (name, before, after)
        assert after < before / 3, (name, before, after)


def test_undistorted_corners_are_collinear_and_match_opencv(board_views, board_camera):
    k, d = board_camera.k, board_camera.d
    n_checked = 0
    for name, gray in board_views:
        raw = _find_corners(gray)
        if raw is None:
            continue
        pts = raw.reshape(-1, 2)
        ours = board_camera.undistort_points(pts)
        ref = cv2.undistortPoints(pts.reshape(-1, 1, 2), k, d, P=board_camera.p).reshape(-1, 2)
        assert np.abs(ours - ref).max() < 0.05, name
        # Point-level straightening, independent of re-detecting corners in the image.
        assert _collinearity_rms(ours.reshape(raw.shape)) < 0.3, name
        n_checked += 1
    assert n_checked >= 10


def test_rectify_maps_cached_and_out_parameter(data_dir, board_views, board_camera):
    maps = board_camera.rectify_maps()
    assert maps[0].dtype == np.int16 and maps[0].shape == (480, 640, 2)
    assert maps[1].dtype == np.uint16 and maps[1].shape == (480, 640)
    assert board_camera.rectify_maps()[0] is maps[0]  # computed once

    gray = board_views[0][1]
    expected = board_camera.rectify(gray)
    out = np.empty_like(gray)
    result = board_camera.rectify(gray, out=out)
    assert result is out
    np.testing.assert_array_equal(out, expected)
    nearest = board_camera.rectify(gray, interpolation=cv2.INTER_NEAREST)
    assert not np.array_equal(nearest, expected)

    colour = cv2.imread(str(data_dir / "coco" / "images" / "000000397133.jpg"))
    colour = cv2.resize(colour, (640, 480))
    rect = board_camera.rectify(colour)
    assert rect.shape == colour.shape and rect.dtype == np.uint8

    with pytest.raises(ValueError, match="expects 480x640"):
        board_camera.rectify(np.zeros((240, 320), np.uint8))
    with pytest.raises(ValueError, match="out must"):
        board_camera.rectify(gray, out=np.empty((480, 640), np.float32))
    with pytest.raises(ValueError, match="overlap"):
        board_camera.rectify(gray, out=gray)


@pytest.mark.parametrize(("name", "size"), [
    ("camerav1_1280x720", (1280, 720)),
    ("camerav2_1280x960", (1280, 960)),
])
def test_real_camera_info_yaml_rectifies_like_cv2_undistort(data_dir, name, size):
    cam = _yaml(data_dir, name)
    assert cam.image_size == size and cam.distortion_model == "plumb_bob"
    assert not cam.is_identity
    img = cv2.imread(str(data_dir / "coco" / "images" / "000000397133.jpg"))
    img = cv2.resize(img, size)
    rect = cam.rectify(img)
    assert rect.shape == img.shape and rect.dtype == img.dtype
    ref = cv2.undistort(img, cam.k, cam.d, newCameraMatrix=cam.p[:, :3])
    diff = np.abs(rect.astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() < 0.5, diff.mean()
    # ...and rectification really moved pixels.
    assert np.abs(rect.astype(np.int16) - img.astype(np.int16)).mean() > 2.0


def test_identity_passthrough(data_dir):
    cam = _yaml(data_dir, "left_plumb_bob").rectified()
    assert cam.is_identity
    img = np.arange(480 * 640, dtype=np.uint32).astype(np.uint8).reshape(480, 640)
    assert cam.rectify(img) is img
    out = np.empty_like(img)
    assert cam.rectify(img, out=out) is out
    np.testing.assert_array_equal(out, img)
    pts = _pixel_grid(640, 480, 5, 4)
    np.testing.assert_array_equal(cam.undistort_points(pts), pts)
    # Zero distortion alone is not identity when P differs from K.
    info = _info(d=[0.0] * 5)
    info["p"] = list(info["p"])
    info["p"][0] = 500.0
    assert not CameraModel.from_camera_info(info).is_identity
    assert CameraModel.from_camera_info(_info(d=[0.0] * 5)).is_identity
    assert CameraModel.from_camera_info(_info(d=[])).is_identity  # empty D = no distortion


# ----------------------------------------------------------------------------- camera_info
def test_camera_info_round_trip_and_calibration_key(data_dir):
    cam = _yaml(data_dir, "left_rational_polynomial")
    info = cam.to_camera_info_dict()
    assert set(info) == {"width", "height", "distortion_model", "d", "k", "r", "p",
                         "binning_x", "binning_y", "roi"}
    assert all(type(v) is float for v in info["d"] + info["k"] + info["r"] + info["p"])
    assert len(info["d"]) == 8 and len(info["k"]) == 9 and len(info["p"]) == 12
    again = CameraModel.from_camera_info(info)
    assert again.calibration_key == cam.calibration_key
    np.testing.assert_array_equal(again.k, cam.k)

    # A ROS-like message: attributes, array.array D, numpy K/R/P, nested roi, header.
    msg = SimpleNamespace(
        header=SimpleNamespace(frame_id="cam_optical"),
        width=info["width"], height=info["height"], distortion_model=info["distortion_model"],
        d=array.array("d", info["d"]), k=np.array(info["k"]), r=np.array(info["r"]),
        p=np.array(info["p"]), binning_x=0, binning_y=0,
        roi=SimpleNamespace(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False),
    )
    from_msg = CameraModel.from_camera_info(msg)
    assert from_msg.calibration_key == cam.calibration_key
    assert from_msg.frame_id == "cam_optical"

    changed = dict(info, d=[info["d"][0] + 1e-6] + info["d"][1:])
    assert CameraModel.from_camera_info(changed).calibration_key != cam.calibration_key
    assert CameraModel.from_camera_info(dict(info, binning_x=2)).calibration_key != cam.calibration_key
    # binning 0 and 1 both mean "no binning".
    assert CameraModel.from_camera_info(dict(info, binning_x=1)).calibration_key == cam.calibration_key

    rect_info = cam.rectified_camera_info_dict()
    assert rect_info["distortion_model"] == "plumb_bob"
    assert rect_info["d"] == [0.0] * 5
    assert rect_info["r"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert rect_info["p"] == info["p"]
    np.testing.assert_array_equal(np.reshape(rect_info["k"], (3, 3)), cam.p_full[:, :3])


def test_binning_and_roi_follow_image_geometry(data_dir):
    full = _yaml(data_dir, "left_plumb_bob")
    info = full.to_camera_info_dict()
    raw = _pixel_grid(640, 480, 17, 13, margin=20)
    rect_full = full.undistort_points(raw)

    binned = CameraModel.from_camera_info(dict(info, binning_x=2, binning_y=2))
    assert binned.image_size == (320, 240)
    np.testing.assert_allclose(binned.k[0, 0], full.k[0, 0] / 2)
    np.testing.assert_allclose(binned.undistort_points(raw / 2), rect_full / 2, atol=1e-7)

    roi = {"x_offset": 100, "y_offset": 60, "width": 400, "height": 300, "do_rectify": False}
    cropped = CameraModel.from_camera_info(dict(info, roi=roi))
    assert cropped.image_size == (400, 300)
    off = np.array([100.0, 60.0])
    inside = np.all((raw >= off) & (raw < off + [400, 300]), axis=1)
    np.testing.assert_allclose(
        cropped.undistort_points(raw[inside] - off), rect_full[inside] - off, atol=1e-7
    )

    # Rectifying the ROI crop equals cropping the full rectified image wherever the crop's
    # maps stay inside the crop.
    img = cv2.imread(str(data_dir / "chessboard" / "left01.jpg"), cv2.IMREAD_GRAYSCALE)
    rect_crop = cropped.rectify(img[60:360, 100:500])
    ref = full.rectify(img)[60:360, 100:500]
    src = cropped.rectify_maps()[0]
    valid = (src[..., 0] >= 1) & (src[..., 0] < 398) & (src[..., 1] >= 1) & (src[..., 1] < 298)
    assert valid.mean() > 0.8
    diff = np.abs(rect_crop.astype(np.int16) - ref.astype(np.int16))[valid]
    assert diff.mean() < 0.2 and np.percentile(diff, 99.9) <= 2


def test_stereo_like_rectification_rotation(data_dir):
    """Non-identity R: undistort_points matches OpenCV and rays are in the camera frame."""
    base = _yaml(data_dir, "left_plumb_bob")
    r = cv2.Rodrigues(np.array([0.01, -0.03, 0.005]))[0]
    p = np.array([[500.0, 0, 330, -30.0], [0, 500.0, 240, 0], [0, 0, 1, 0]])
    cam = CameraModel(640, 480, base.k, base.d, r=r, p=p)
    raw = _pixel_grid(640, 480, 9, 7, margin=30)
    ours = cam.undistort_points(raw)
    ref = cv2.undistortPointsIter(
        raw.reshape(-1, 1, 2), cam.k, cam.d, r, p[:, :3],
        (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 200, 1e-14),
    ).reshape(-1, 2)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    np.testing.assert_allclose(cam.distort_points(ours), raw, atol=1e-6)
    np.testing.assert_allclose(
        cam.pixel_to_ray(raw), cam.pixel_to_ray(ours, rectified=True), atol=1e-12
    )


# ----------------------------------------------------------------------------- distortion models
@pytest.mark.parametrize("name", ["left_plumb_bob", "left_rational_polynomial", "left_equidistant"])
def test_distort_undistort_round_trip(data_dir, name):
    cam = _yaml(data_dir, name)
    assert cam.distortion_model == name.removeprefix("left_")
    raw = _pixel_grid(640, 480)
    rect = cam.undistort_points(raw)
    valid = np.isfinite(rect).all(axis=1)
    if cam.distortion_model == "equidistant":
        # This fitted polynomial theta_d(theta) peaks at theta_d ~ 0.664; raw pixels beyond
        # that radius (the image corners) have no inverse and must be NaN, all others valid.
        theta = np.linspace(0, 1.5, 15001)
        k1, k2, k3, k4 = cam.d
        t2 = theta**2
        theta_d_max = np.max(theta * (1 + k1 * t2 + k2 * t2**2 + k3 * t2**3 + k4 * t2**4))
        radius = np.hypot((raw[:, 0] - cam.k[0, 2]) / cam.k[0, 0], (raw[:, 1] - cam.k[1, 2]) / cam.k[1, 1])
        np.testing.assert_array_equal(valid, radius < theta_d_max)
        assert valid.mean() > 0.9
    else:
        assert valid.all()
    back = cam.distort_points(rect[valid])
    err = np.abs(back - raw[valid]).max()
    assert err < 1e-3, err


def test_distort_points_match_opencv_projection(data_dir):
    """distort_points/project_points agree with cv2.projectPoints and cv2.fisheye."""
    rng = np.random.default_rng(0)
    pts_cam = np.column_stack([rng.uniform(-0.5, 0.5, 200), rng.uniform(-0.4, 0.4, 200), np.ones(200)])
    for name in ("left_plumb_bob", "left_rational_polynomial", "left_equidistant"):
        cam = _yaml(data_dir, name)
        ours = cam.project_points(pts_cam)
        if cam.distortion_model == "equidistant":
            ref = cv2.fisheye.projectPoints(
                pts_cam.reshape(-1, 1, 3), np.zeros(3), np.zeros(3), cam.k, cam.d
            )[0].reshape(-1, 2)
            ref2 = cv2.fisheye.distortPoints(
                pts_cam[:, None, :2].copy(), cam.k, cam.d
            ).reshape(-1, 2)
            np.testing.assert_allclose(ours, ref2, atol=1e-6)
        else:
            ref = cv2.projectPoints(pts_cam, np.zeros(3), np.zeros(3), cam.k, cam.d)[0].reshape(-1, 2)
        np.testing.assert_allclose(ours, ref, atol=1e-6, err_msg=name)
        # With R = I and P = K, rectified pixels of a 3D point are its pinhole projection.
        rect_px = cam.project_points(pts_cam, rectified=True)
        np.testing.assert_allclose(cam.distort_points(rect_px), ref, atol=1e-6, err_msg=name)
    # Points behind a pinhole camera cannot be imaged.
    assert np.isnan(_yaml(data_dir, "left_plumb_bob").project_points([[0.1, 0.2, -1.0]])).all()


def test_fisheye_rays_beyond_90_degrees():
    cam = CameraModel(800, 800, [200, 0, 400, 0, 200, 400, 0, 0, 1], [0.0] * 4,
                      distortion_model="equidistant")
    rays = np.array([[1.0, 0.0, -0.2], [0.0, -1.0, 0.1], [0.3, 0.4, 1.0]])
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    px = cam.project_points(rays)
    assert np.isfinite(px).all()
    np.testing.assert_allclose(cam.pixel_to_ray(px), rays, atol=1e-9)
    # The rectified (pinhole) image cannot show rays beyond 90 degrees.
    assert np.isnan(cam.undistort_points(px[:1])).all()


# ----------------------------------------------------------------------------- rays & ground
def test_pixel_to_ray_convention(data_dir):
    cam = _yaml(data_dir, "camerav1_1280x720")
    cx, cy = cam.p[0, 2], cam.p[1, 2]
    rays = cam.pixel_to_ray([[cx, cy], [cx + 100, cy], [cx, cy + 100]], rectified=True)
    np.testing.assert_allclose(rays[0], [0, 0, 1], atol=1e-12)
    assert rays[1, 0] > 0 and abs(rays[1, 1]) < 1e-12  # right of centre -> +x
    assert rays[2, 1] > 0 and abs(rays[2, 0]) < 1e-12  # below centre -> +y (down)
    np.testing.assert_allclose(np.linalg.norm(rays, axis=1), 1.0, atol=1e-12)


def test_extrinsics_body_to_optical_convention():
    ext = Extrinsics.from_body_pose([0.1, 0.2, 0.3], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(ext.rotation, BODY_TO_OPTICAL)
    axes = ext.rays_to_base(np.eye(3))  # optical x (right), y (down), z (forward)
    np.testing.assert_allclose(axes, [[0, -1, 0], [0, 0, -1], [1, 0, 0]], atol=1e-15)
    # The usual URDF optical joint rpy (-pi/2, 0, -pi/2) gives the same rotation.
    same = Extrinsics.from_rpy([0.1, 0.2, 0.3], [-math.pi / 2, 0.0, -math.pi / 2])
    np.testing.assert_allclose(same.rotation, ext.rotation, atol=1e-15)
    via_q = Extrinsics.from_quaternion([0.1, 0.2, 0.3], same.quaternion_xyzw)
    np.testing.assert_allclose(via_q.rotation, ext.rotation, atol=1e-12)
    np.testing.assert_allclose(np.abs(same.quaternion_xyzw), [0.5, 0.5, 0.5, 0.5], atol=1e-12)
    # Positive body pitch looks down: the optical axis points below the horizon.
    down = Extrinsics.from_body_pose([0, 0, 1], [0.0, 0.3, 0.0])
    fwd = down.rays_to_base([[0, 0, 1]])[0]
    np.testing.assert_allclose(fwd, [math.cos(0.3), 0, -math.sin(0.3)], atol=1e-12)
    np.testing.assert_allclose(down.points_to_base([[0, 0, 2]])[0], [0, 0, 1] + 2 * fwd, atol=1e-12)


def test_extrinsics_from_dict():
    a = Extrinsics.from_dict({"parent_frame": "base_footprint", "translation": [1, 2, 3],
                              "body_rpy": [0.1, 0.2, 0.3], "child_frame": "cam_optical"})
    b = Extrinsics.from_body_pose([1, 2, 3], [0.1, 0.2, 0.3], "base_footprint", "cam_optical")
    np.testing.assert_array_equal(a.rotation, b.rotation)
    assert a.parent_frame == "base_footprint" and a.child_frame == "cam_optical"
    c = Extrinsics.from_dict({"translation": [1, 2, 3], "quaternion": list(b.quaternion_xyzw)})
    assert c.parent_frame == "base_link"
    np.testing.assert_allclose(c.rotation, b.rotation, atol=1e-12)
    d = Extrinsics.from_dict({"translation": [0, 0, 0], "rpy": [0.1, 0.2, 0.3]})
    np.testing.assert_allclose(d.rotation, Extrinsics.from_rpy([0, 0, 0], [0.1, 0.2, 0.3]).rotation)
    with pytest.raises(ValueError, match="unknown keys.*'rotation'"):
        Extrinsics.from_dict({"translation": [0, 0, 0], "rotation": [0, 0, 0]})
    with pytest.raises(ValueError, match="exactly one of quaternion, rpy, body_rpy"):
        Extrinsics.from_dict({"translation": [0, 0, 0], "rpy": [0, 0, 0], "body_rpy": [0, 0, 0]})
    with pytest.raises(ValueError, match="extrinsics.translation"):
        Extrinsics.from_dict({"rpy": [0, 0, 0]})
    with pytest.raises(ValueError, match="extrinsics.quaternion has zero norm"):
        Extrinsics.from_quaternion([0, 0, 0], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="extrinsics.translation contains non-finite"):
        Extrinsics.from_rpy([0, float("nan"), 0], [0, 0, 0])


@pytest.mark.parametrize("name", ["camerav1_1280x720", "left_equidistant"])
@pytest.mark.parametrize("plane_height", [0.0, 0.25])
def test_pixel_to_ground_recovers_floor_points(data_dir, name, plane_height):
    cam = _yaml(data_dir, name)
    ext = Extrinsics.from_body_pose([0.3, -0.1, 1.2], [0.02, 0.35, 0.1])
    xs, ys = np.meshgrid(np.linspace(0.5, 12.0, 40), np.linspace(-5.0, 5.0, 41))
    floor = np.column_stack([xs.ravel(), ys.ravel(), np.full(xs.size, plane_height)])
    in_cam = (floor - ext.translation) @ ext.rotation  # R^T (p - t), row-wise
    floor, in_cam = floor[in_cam[:, 2] > 0.2], in_cam[in_cam[:, 2] > 0.2]
    if cam.distortion_model == "equidistant":
        px = cv2.fisheye.projectPoints(in_cam.reshape(-1, 1, 3), np.zeros(3), np.zeros(3),
                                       cam.k, cam.d)[0].reshape(-1, 2)
    else:
        px = cv2.projectPoints(in_cam, np.zeros(3), np.zeros(3), cam.k, cam.d)[0].reshape(-1, 2)
    w, h = cam.image_size
    # Inside the image and (for the fitted fisheye) inside its invertible field of view.
    keep = (px[:, 0] >= 0) & (px[:, 0] <= w - 1) & (px[:, 1] >= 0) & (px[:, 1] <= h - 1)
    keep &= np.hypot(*(in_cam[:, :2] / in_cam[:, 2:]).T) < 0.7
    assert keep.sum() > 100
    back = cam.pixel_to_ground(px[keep], ext, plane_height=plane_height)
    err = np.linalg.norm(back - floor[keep], axis=1)
    assert err.max() < 1e-3, err.max()
    # Same through rectified pixels.
    back_rect = cam.pixel_to_ground(cam.undistort_points(px[keep]), ext, plane_height, rectified=True)
    assert np.linalg.norm(back_rect - floor[keep], axis=1).max() < 1e-3


def test_ground_intersection_misses_are_nan():
    cam = CameraModel(640, 480, [500, 0, 320, 0, 500, 240, 0, 0, 1])
    ext = Extrinsics.from_body_pose([0.0, 0.0, 1.0], [0.0, 0.0, 0.0])  # level, 1 m up
    pts = cam.pixel_to_ground([[320, 100], [320, 240], [320, 340], [420, 440]], ext)
    assert np.isnan(pts[0]).all()  # above the horizon
    assert np.isnan(pts[1]).all()  # on the horizon (parallel to the floor)
    np.testing.assert_allclose(pts[2], [5.0, 0.0, 0.0], atol=1e-12)  # 1 m * 500 / 100 px
    np.testing.assert_allclose(pts[3], [2.5, -0.5, 0.0], atol=1e-12)
    # A plane above the camera is hit only by upward rays.
    up = cam.pixel_to_ground([[320, 100], [320, 340]], ext, plane_height=2.0)
    assert np.isfinite(up[0]).all() and np.isnan(up[1]).all()
    np.testing.assert_allclose(up[0, 2], 2.0)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("overrides", "patterns"), [
    ({"k": [0.0] * 9}, ["camera_info.k", "uncalibrated camera: K\\[0\\] is 0"]),
    ({"k": [536.0, 0, float("nan"), 0, 536.0, 235.0, 0, 0, 1]}, ["camera_info.k", "nan"]),
    ({"d": [-0.26, float("nan"), 0.0, 0.0, 0.25]}, ["camera_info.d", "nan", "index 1"]),
    ({"p": [536.0, 0, 342.0, 0, 0, 536.0, float("inf"), 0, 0, 0, 1, 0]}, ["camera_info.p", "inf"]),
    ({"r": [1, 0, 0, 0, float("nan"), 0, 0, 0, 1]}, ["camera_info.r", "nan"]),
    ({"d": [0.1, 0.01, 0.0, 0.0]}, ["camera_info.d", "4 coefficients", "'plumb_bob'", "exactly 5"]),
    ({"d": [0.1] * 8}, ["camera_info.d", "'plumb_bob'"]),
    ({"distortion_model": "equidistant"}, ["camera_info.d", "'equidistant'", "exactly 4"]),
    ({"distortion_model": "rational_polynomial"}, ["camera_info.d", "exactly 8"]),
    ({"distortion_model": "fisheye"}, ["camera_info.distortion_model", "'fisheye'"]),
    ({"distortion_model": ""}, ["camera_info.distortion_model"]),
    ({"width": 0}, ["camera_info.width is 0"]),
    ({"height": 0}, ["camera_info.height is 0"]),
    ({"width": 640.5}, ["camera_info.width must be an integer"]),
    ({"k": [536.0, 0, 342.0, 0, 536.0, 235.0]}, ["camera_info.k must have 9 elements"]),
    ({"r": [1, 0, 0, 0, 2, 0, 0, 0, 1]}, ["camera_info.r is not a rotation"]),
    ({"p": [0.0] * 12}, ["camera_info.p", "P\\[0\\]"]),
    ({"roi": {"x_offset": 600, "y_offset": 0, "width": 100, "height": 100}}, ["camera_info.roi"]),
    ({"binning_x": -1}, ["camera_info.binning_x"]),
])
def test_validation_errors_name_the_field(overrides, patterns):
    with pytest.raises(ValueError) as info:
        CameraModel.from_camera_info(_info(**overrides))
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_missing_field_and_yaml_errors(tmp_path, data_dir):
    info = _info()
    del info["k"]
    with pytest.raises(ValueError, match="camera_info.k is missing"):
        CameraModel.from_camera_info(info)
    text = (data_dir / "camera_info" / "left_plumb_bob.yaml").read_text()
    broken = tmp_path / "broken.yaml"
    broken.write_text(text.replace("projection_matrix", "projection_matrx"))
    with pytest.raises(ValueError, match="broken.yaml: missing key 'projection_matrix'"):
        CameraModel.from_yaml(broken)
    bad_model = tmp_path / "bad_model.yaml"
    bad_model.write_text(text.replace("distortion_model: plumb_bob", "distortion_model: pinhole"))
    with pytest.raises(ValueError, match="bad_model.yaml: camera_info.distortion_model 'pinhole'"):
        CameraModel.from_yaml(bad_model)
    assert sorted(DISTORTION_MODELS) == ["equidistant", "plumb_bob", "rational_polynomial"]


def test_point_shape_validation(board_camera):
    with pytest.raises(ValueError, match=r"pts_px must have shape \(N, 2\)"):
        board_camera.undistort_points(np.zeros((4, 3)))
    assert board_camera.undistort_points(np.zeros((0, 2))).shape == (0, 2)
    assert board_camera.undistort_points([320.0, 240.0]).shape == (1, 2)


# ----------------------------------------------------------------------------- properties
@st.composite
def plumb_bob_cameras(draw):
    w = draw(st.integers(64, 2000))
    h = draw(st.integers(48, 1500))
    fx = draw(st.floats(0.5, 2.0)) * max(w, h)
    fy = fx * draw(st.floats(0.95, 1.05))
    cx = w / 2 + draw(st.floats(-0.05, 0.05)) * w
    cy = h / 2 + draw(st.floats(-0.05, 0.05)) * h
    d = [draw(st.floats(-0.5, 0.5)), draw(st.floats(-0.3, 0.3)), draw(st.floats(-0.01, 0.01)),
         draw(st.floats(-0.01, 0.01)), draw(st.floats(-0.2, 0.2))]
    return w, h, [fx, 0, cx, 0, fy, cy, 0, 0, 1], d


def _distort_normalized(x: np.ndarray, y: np.ndarray, d: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's plumb_bob distortion of normalized coordinates (test-local reference)."""
    k1, k2, p1, p2, k3 = d
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2**2 + k3 * r2**3
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


def _well_posed(k: list[float], d: list[float], w: int, h: int) -> bool:
    """True if the distortion is one-to-one over the image: the radial part increases until it
    passes (with margin) the distorted radius of the image corners, and the full 2-D map
    (radial + tangential) has a clearly positive Jacobian determinant over that disc."""
    rd_max = max(np.hypot(x - k[2], y - k[5]) for x in (0, w) for y in (0, h)) / min(k[0], k[4])
    r = np.linspace(0, 10 * rd_max, 20000)
    r2 = r * r
    g = r * (1 + d[0] * r2 + d[1] * r2**2 + d[4] * r2**3)
    reach = np.flatnonzero(g >= 1.2 * rd_max)
    if not reach.size or not np.all(np.diff(g[: reach[0] + 1]) > 0):
        return False
    rr, th = np.meshgrid(np.linspace(0, r[reach[0]], 60), np.linspace(0, 2 * np.pi, 72))
    x, y, eps = rr * np.cos(th), rr * np.sin(th), 1e-6
    fx0, fy0 = _distort_normalized(x, y, d)
    fx1, fy1 = _distort_normalized(x + eps, y, d)
    fx2, fy2 = _distort_normalized(x, y + eps, d)
    det = ((fx1 - fx0) * (fy2 - fy0) - (fx2 - fx0) * (fy1 - fy0)) / eps**2
    return bool(det.min() > 0.05)


@settings(max_examples=40, deadline=None)
@given(plumb_bob_cameras())
def test_property_plumb_bob_round_trip(camera):
    w, h, k, d = camera
    assume(_well_posed(k, d, w, h))
    cam = CameraModel(w, h, k, d)
    raw = _pixel_grid(w, h, 12, 9)
    rect = cam.undistort_points(raw)
    assert np.isfinite(rect).all()
    np.testing.assert_allclose(cam.distort_points(rect), raw, atol=1e-6)  # distort∘undistort
    np.testing.assert_allclose(cam.undistort_points(cam.distort_points(rect)), rect, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(plumb_bob_cameras(), st.booleans())
def test_property_pixel_to_ray_unit_vectors(camera, rectified):
    w, h, k, d = camera
    assume(_well_posed(k, d, w, h))
    cam = CameraModel(w, h, k, d)
    rays = cam.pixel_to_ray(_pixel_grid(w, h, 9, 7), rectified=rectified)
    np.testing.assert_allclose(np.linalg.norm(rays, axis=1), 1.0, atol=1e-12)
    assert (rays[:, 2] > 0).all()
