"""The calibrated camera: :class:`CameraModel` (rectification, pixel <-> ray, projection).

ROS-free (numpy + OpenCV). :class:`CameraModel` mirrors ``image_geometry.PinholeCameraModel``
and reads the fields of ``sensor_msgs/CameraInfo`` duck-typed, so the ROS layer can hand it a
message directly. Calibration fields and files: :mod:`perception2d_ros.geometry.calibration`;
distortion math: :mod:`perception2d_ros.geometry.distortion`; camera pose:
:mod:`perception2d_ros.geometry.extrinsics`.

Conventions
-----------
* Pixels are ``(u, v)`` = (column, row) with the centre of the top-left pixel at ``(0, 0)``
  (OpenCV / ROS convention). Point arrays are ``(N, 2)`` float64.
* The camera optical frame (REP 103 ``*_optical_frame``) has z forward, x right, y down.
  Rays are ``(N, 3)`` float64 unit vectors in that frame, i.e. the frame of the
  ``header.frame_id`` of the camera_info (the *unrectified* camera; for a stereo camera with
  a non-identity ``R`` the rectified frame is ``R`` applied to it).
* "raw" pixels are in the image as the camera sends it (distorted, described by ``K`` and
  ``D``); "rectified" pixels are in the image produced by :meth:`CameraModel.rectify`
  (described by ``R`` and ``P[:, :3]``). The 4th column of ``P`` (stereo baseline ``Tx``,
  ``Ty``) is ignored by every method here: rays and points are about *this* camera.
* The skew term of ``K`` (``K[1]``) is ignored, as OpenCV's undistortion does; the skew of
  ``P`` is honoured.

Distortion models: ``plumb_bob``, ``rational_polynomial`` and ``equidistant`` (see
:mod:`~perception2d_ros.geometry.distortion`). An empty ``d`` means "no distortion" (as
image_geometry treats it) and is stored as zeros of the model's length; any other length is
an error.

Binning and ROI follow image_geometry (see :mod:`~perception2d_ros.geometry.calibration`):
:attr:`CameraModel.k` / :attr:`CameraModel.p` are adjusted for both and every image or pixel
method works on images of :attr:`CameraModel.image_size`. ``roi.do_rectify`` is carried
through but a distinct rectified ROI is not computed (the rectified image has the raw image's
size, as image_geometry does).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from perception2d_ros.geometry.calibration import (
    CALIBRATION_LAYOUTS,
    RegionOfInterest,
    _as_int,
    _as_points,
    _camera_info_dump_fields,
    _get,
    _readonly,
    calibration_digest,
    calibration_layout,
    camera_info_fields,
    check_d,
    check_k,
    check_p,
    check_r,
    image_window,
    load_calibration_doc,
    parsers_doc_fields,
    window_matrix,
)
from perception2d_ros.geometry.distortion import (
    DISTORTION_MODELS,
    distort_rays,
    rectify_maps,
    undistort_normalized,
)
from perception2d_ros.geometry.extrinsics import Extrinsics

__all__ = ["CameraModel"]


class CameraModel:
    """Calibrated monocular camera (``sensor_msgs/CameraInfo`` semantics).

    Construct with :meth:`from_camera_info`, :meth:`from_yaml` or directly from arrays.
    Instances are immutable; the rectification maps are computed lazily on first use and
    cached (thread-safe). :attr:`calibration_key` changes iff the calibration does.
    """

    def __init__(
        self,
        width: int,
        height: int,
        k: npt.ArrayLike,
        d: npt.ArrayLike | None = None,
        *,
        distortion_model: str = "plumb_bob",
        r: npt.ArrayLike | None = None,
        p: npt.ArrayLike | None = None,
        binning_x: int = 0,
        binning_y: int = 0,
        roi: Any = None,
        camera_name: str = "",
        frame_id: str = "",
    ) -> None:
        """Validate and store a calibration.

        Args:
            width, height: full-resolution calibration image size in pixels (> 0).
            k: 3x3 intrinsic matrix (9 numbers, row-major).
            d: distortion coefficients for ``distortion_model`` (see module docstring);
                None or empty means no distortion.
            distortion_model: ``plumb_bob``, ``rational_polynomial`` or ``equidistant``.
            r: 3x3 rectification rotation (None or all zeros -> identity).
            p: 3x4 projection matrix of the rectified image (None -> ``[K | 0]``).
            binning_x, binning_y: binning of the received images (0 or 1 = none).
            roi: region of interest (RegionOfInterest message, mapping or None = full).
            camera_name, frame_id: informational, not part of the calibration key.

        Raises:
            ValueError: naming the offending field (``camera_info.<field>``).
        """
        self.width = _as_int(width, "camera_info.width")
        self.height = _as_int(height, "camera_info.height")
        if self.width <= 0:
            raise ValueError(f"camera_info.width is {self.width}; must be > 0")
        if self.height <= 0:
            raise ValueError(f"camera_info.height is {self.height}; must be > 0")

        if not isinstance(distortion_model, str) or distortion_model not in DISTORTION_MODELS:
            raise ValueError(
                f"camera_info.distortion_model {distortion_model!r} is not supported; "
                f"expected one of {sorted(DISTORTION_MODELS)}"
            )
        self.distortion_model = distortion_model
        self.camera_name = str(camera_name)
        self.frame_id = str(frame_id)

        self._k_full = check_k(k)
        self._d = check_d(d, distortion_model)
        self._r = check_r(r)
        self._p_full = check_p(p, self._k_full)

        self.binning_x = _as_int(binning_x, "camera_info.binning_x")
        self.binning_y = _as_int(binning_y, "camera_info.binning_y")
        if self.binning_x < 0 or self.binning_y < 0:
            raise ValueError(
                f"camera_info.binning_x/binning_y must be >= 0, got {self.binning_x}, "
                f"{self.binning_y}"
            )
        self.roi = RegionOfInterest.from_any(roi)
        window, self._image_size = image_window(self.width, self.height, self.binning_x,
                                                self.binning_y, self.roi)
        self._k = window_matrix(self._k_full, window, self.binning_x, self.binning_y)
        self._p = window_matrix(self._p_full, window, self.binning_x, self.binning_y)
        self._p3_inv = _readonly(np.linalg.inv(self._p[:, :3]))

        self._is_identity = bool(
            distortion_model != "equidistant"  # zero-coefficient fisheye is still a fisheye
            and not self._d.any()
            and np.array_equal(self._r, np.eye(3))
            and np.array_equal(self._p_full[:, :3], self._k_full)
        )
        self._key = calibration_digest(
            self.width, self.height, self.distortion_model, self.binning_x, self.binning_y,
            window, (self._d, self._k_full, self._r, self._p_full))
        self._maps: tuple[np.ndarray, np.ndarray] | None = None
        self._maps_lock = threading.Lock()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_camera_info(cls, msg: Any) -> CameraModel:
        """Build from a ``sensor_msgs/CameraInfo`` (or any object/mapping with its fields).

        Reads ``width, height, distortion_model, d, k, r, p, binning_x, binning_y, roi``
        (binning and roi optional) and ``header.frame_id`` when present.
        """
        header = _get(msg, "header", None)
        frame_id = _get(header, "frame_id", "") if header is not None else ""
        return cls(
            _get(msg, "width"),
            _get(msg, "height"),
            _get(msg, "k"),
            _get(msg, "d"),
            distortion_model=_get(msg, "distortion_model"),
            r=_get(msg, "r"),
            p=_get(msg, "p"),
            binning_x=_get(msg, "binning_x", 0),
            binning_y=_get(msg, "binning_y", 0),
            roi=_get(msg, "roi", None),
            frame_id=frame_id,
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> CameraModel:
        """Load a calibration file in any of the layouts robots have them in.

        * ``camera_calibration_parsers`` / ``camera_info_manager`` YAML (what
          ``camera_calibration`` writes): ``image_width, image_height, camera_matrix,
          distortion_coefficients, rectification_matrix, projection_matrix`` (matrices as
          ``{rows, cols, data}``); optional ``camera_name``, ``distortion_model`` (default
          ``plumb_bob`` as for legacy files).
        * a ROS 2 ``sensor_msgs/CameraInfo`` dump (``ros2 topic echo --once …/camera_info``):
          ``height, width, distortion_model, d, k, r, p``; optional ``header, binning_x,
          binning_y, roi``.
        * a ROS 1 dump (``rostopic echo -n1 …/camera_info``): the same with ``D, K, R, P``.

        A trailing ``---`` (as ``topic echo`` prints) is fine; with several messages the first
        is used. Errors are ``ValueError`` prefixed with the path; an unknown layout gets one
        line naming the layouts accepted.
        """
        path = Path(path)
        doc = load_calibration_doc(path)
        layout = calibration_layout(doc)
        try:
            if layout == "camera_calibration_parsers":
                return cls(**parsers_doc_fields(doc))
            if layout in ("ros2_camera_info", "ros1_camera_info"):
                return cls.from_camera_info(_camera_info_dump_fields(doc, layout))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        keys = ", ".join(sorted(str(k) for k in doc)[:12])
        raise ValueError(f"{path}: unknown calibration layout (keys: {keys}); "
                         f"{CALIBRATION_LAYOUTS}")

    # ------------------------------------------------------------------ properties
    @property
    def k(self) -> np.ndarray:
        """3x3 intrinsics of the received (binned, ROI-cropped) raw image."""
        return self._k

    @property
    def p(self) -> np.ndarray:
        """3x4 projection matrix of the rectified image, adjusted for binning and ROI."""
        return self._p

    @property
    def k_full(self) -> np.ndarray:
        """3x3 intrinsics as calibrated (full resolution), i.e. camera_info.k."""
        return self._k_full

    @property
    def p_full(self) -> np.ndarray:
        """3x4 projection as calibrated (full resolution), i.e. camera_info.p."""
        return self._p_full

    @property
    def d(self) -> np.ndarray:
        """Distortion coefficients, length ``DISTORTION_MODELS[distortion_model]``."""
        return self._d

    @property
    def r(self) -> np.ndarray:
        """3x3 rectification rotation (camera frame -> rectified frame)."""
        return self._r

    @property
    def image_size(self) -> tuple[int, int]:
        """``(width, height)`` of the images this model rectifies (after binning and ROI)."""
        return self._image_size

    @property
    def is_identity(self) -> bool:
        """True when rectification is a no-op: a pinhole model (not equidistant) with D all
        zero, R = I and P[:, :3] == K (exactly)."""
        return self._is_identity

    @property
    def calibration_key(self) -> str:
        """Hex digest of every field that affects geometry (not camera_name/frame_id)."""
        return self._key

    def __repr__(self) -> str:
        return (
            f"CameraModel({self.width}x{self.height}, {self.distortion_model}, "
            f"image_size={self._image_size}, identity={self._is_identity}, "
            f"key={self._key[:12]})"
        )

    # ------------------------------------------------------------------ camera_info out
    def to_camera_info_dict(self) -> dict[str, Any]:
        """CameraInfo fields (``width, height, distortion_model, d, k, r, p, binning_x,
        binning_y, roi``) as plain Python ints/floats/lists; ``roi`` is a dict. Round-trips
        through :meth:`from_camera_info` to the same :attr:`calibration_key`."""
        return camera_info_fields(self, self._k_full, self._d, self._r, self.distortion_model)

    def rectified_camera_info_dict(self) -> dict[str, Any]:
        """CameraInfo fields describing the rectified image (``camera_info_rect``):
        ``k = P[:, :3]``, ``d`` = five zeros, ``r = I``, ``p`` unchanged, ``plumb_bob``."""
        return camera_info_fields(self, self._p_full[:, :3], np.zeros(5), np.eye(3),
                                  "plumb_bob")

    def rectified(self) -> CameraModel:
        """The model of the rectified image (from :meth:`rectified_camera_info_dict`)."""
        m = CameraModel.from_camera_info(self.rectified_camera_info_dict())
        m.camera_name, m.frame_id = self.camera_name, self.frame_id
        return m

    # ------------------------------------------------------------------ images
    def rectify_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """Fixed-point remap tables ``(map1, map2)`` for :attr:`image_size`.

        ``map1`` is (H, W, 2) int16, ``map2`` (H, W) uint16 (``cv2.CV_16SC2``), computed once
        per model with ``cv2.initUndistortRectifyMap`` (``cv2.fisheye`` for equidistant) from
        the binning/ROI-adjusted K and P[:, :3] and R; read-only and shared.
        """
        maps = self._maps
        if maps is not None:
            return maps
        with self._maps_lock:
            if self._maps is None:
                m1, m2 = rectify_maps(self._k_pinhole(), self._d, self._r, self._p[:, :3],
                                      self._image_size, self.distortion_model)
                self._maps = (_readonly(m1), _readonly(m2))
            return self._maps

    def rectify(
        self,
        image: np.ndarray,
        interpolation: int = cv2.INTER_LINEAR,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rectify a raw image of :attr:`image_size` (HxW or HxWxC, any cv2.remap dtype).

        Pixels that map outside the raw image become 0. If :attr:`is_identity`, returns
        ``image`` itself (no copy) — or copies it into ``out`` when ``out`` is given.

        Args:
            image: raw image, shape ``(H, W)`` or ``(H, W, C)`` with ``(W, H) == image_size``.
                Do not pass Bayer or YUV422 images: convert them to colour/mono first.
            interpolation: cv2 interpolation flag.
            out: optional preallocated C-contiguous array of the same shape and dtype, not
                overlapping ``image``; the result is written there and returned.

        Raises:
            ValueError: wrong image size, or ``out`` of the wrong shape/dtype/overlapping.
        """
        if not isinstance(image, np.ndarray):
            raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
        w, h = self._image_size
        if image.ndim not in (2, 3) or image.shape[:2] != (h, w):
            raise ValueError(
                f"image has shape {image.shape}; this camera model expects {h}x{w} "
                f"(camera_info {self.width}x{self.height}, binning "
                f"{self.binning_x}/{self.binning_y}, roi {self.roi})"
            )
        if out is not None:
            if (not isinstance(out, np.ndarray) or out.shape != image.shape
                    or out.dtype != image.dtype):
                raise ValueError(
                    f"out must be an array of shape {image.shape} and dtype {image.dtype}, got "
                    f"{getattr(out, 'shape', None)} {getattr(out, 'dtype', type(out).__name__)}"
                )
            if not out.flags.c_contiguous or not out.flags.writeable:
                raise ValueError("out must be C-contiguous and writeable")
            if np.shares_memory(out, image):
                raise ValueError("out must not overlap image (cv2.remap cannot work in place)")
        if self._is_identity:
            if out is None:
                return image
            np.copyto(out, image)
            return out
        map1, map2 = self.rectify_maps()
        result = cv2.remap(
            image, map1, map2, interpolation, dst=out, borderMode=cv2.BORDER_CONSTANT
        )
        if out is not None:
            if not np.shares_memory(result, out):  # cv2 reallocated: should not happen
                np.copyto(out, result.reshape(out.shape))
            return out
        return result.reshape(image.shape)  # cv2 drops a trailing channel axis of size 1

    # ------------------------------------------------------------------ points
    def _k_pinhole(self) -> np.ndarray:
        k = self._k.copy()
        k[0, 1] = 0.0  # skew ignored (see module docstring)
        return k

    def _raw_to_rays(self, pts: np.ndarray) -> np.ndarray:
        """Raw pixels (N, 2) -> unnormalized rays (N, 3) in the camera frame; NaN rows where
        the distortion cannot be inverted (outside the region where it is one-to-one)."""
        k = self._k
        xd = (pts[:, 0] - k[0, 2]) / k[0, 0]
        yd = (pts[:, 1] - k[1, 2]) / k[1, 1]
        return undistort_normalized(xd, yd, self.distortion_model, self._d)

    def _rays_to_raw(self, rays: np.ndarray) -> np.ndarray:
        """Rays (N, 3) in the camera frame -> raw pixels (N, 2); NaN for rays that cannot be
        imaged (behind a pinhole camera)."""
        k = self._k
        xd, yd = distort_rays(rays, self.distortion_model, self._d)
        return np.stack([k[0, 0] * xd + k[0, 2], k[1, 1] * yd + k[1, 2]], axis=1)

    def _rect_to_rays(self, pts: np.ndarray) -> np.ndarray:
        h = np.hstack([pts, np.ones((pts.shape[0], 1))])
        return (h @ self._p3_inv.T) @ self._r  # R^T applied to each row: back to camera frame

    def _rays_to_rect(self, rays: np.ndarray) -> np.ndarray:
        rr = rays @ self._r.T
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(rr[:, 2] > 0, rr[:, 2], np.nan)
            uvw = (rr / z[:, None]) @ self._p[:, :3].T
        return uvw[:, :2]

    def undistort_points(self, pts_px: npt.ArrayLike) -> np.ndarray:
        """Raw pixels ``(N, 2)`` -> rectified pixels ``(N, 2)`` in ``P`` (like
        ``cv2.undistortPoints(pts, K, D, R=R, P=P)`` but iterated to convergence).

        The distortion is inverted by Newton's method to < 1e-9 (normalized units); rows
        where it has no valid inverse (far outside the calibrated field of view) are NaN.
        """
        pts = _as_points(pts_px, 2, "pts_px")
        if self._is_identity:
            return pts.copy()
        return self._rays_to_rect(self._raw_to_rays(pts))

    def distort_points(self, pts_rect: npt.ArrayLike) -> np.ndarray:
        """Rectified pixels ``(N, 2)`` -> raw pixels ``(N, 2)`` (inverse of
        :meth:`undistort_points`); NaN rows for points behind a pinhole camera."""
        pts = _as_points(pts_rect, 2, "pts_rect")
        if self._is_identity:
            return pts.copy()
        return self._rays_to_raw(self._rect_to_rays(pts))

    def pixel_to_ray(self, pts: npt.ArrayLike, rectified: bool = False) -> np.ndarray:
        """Pixels ``(N, 2)`` -> unit rays ``(N, 3)`` in the camera optical frame
        (z forward, x right, y down; the unrectified camera frame, i.e. ``R^T`` is applied
        to rectified pixels). ``rectified`` says whether ``pts`` are rectified or raw pixels.
        NaN rows where a raw pixel cannot be undistorted."""
        arr = _as_points(pts, 2, "pts")
        rays = self._rect_to_rays(arr) if rectified else self._raw_to_rays(arr)
        return rays / np.linalg.norm(rays, axis=1, keepdims=True)

    def project_points(self, points_cam: npt.ArrayLike, rectified: bool = False) -> np.ndarray:
        """3D points ``(N, 3)`` in the camera optical frame -> pixels ``(N, 2)``, raw
        (through the distortion, like ``cv2.projectPoints``) or ``rectified`` (through R and
        P). NaN rows for points that cannot be imaged (behind a pinhole camera)."""
        arr = _as_points(points_cam, 3, "points_cam")
        return self._rays_to_rect(arr) if rectified else self._rays_to_raw(arr)

    def pixel_to_ground(
        self,
        pts_px: npt.ArrayLike,
        extrinsics: Extrinsics,
        plane_height: float = 0.0,
        rectified: bool = False,
    ) -> np.ndarray:
        """Pixels ``(N, 2)`` -> points ``(N, 3)`` in ``extrinsics.parent_frame`` where their
        rays meet the plane ``z = plane_height``; NaN rows for rays that miss it."""
        return extrinsics.ground_intersection(self.pixel_to_ray(pts_px, rectified), plane_height)

