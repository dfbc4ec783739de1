"""Camera geometry: calibration, rectification, pixel <-> ray, camera extrinsics.

ROS-free (numpy + OpenCV). :class:`CameraModel` mirrors ``image_geometry.PinholeCameraModel``
and reads the fields of ``sensor_msgs/CameraInfo`` duck-typed, so the ROS layer can hand it a
message directly; :class:`Extrinsics` places the camera in the robot base frame.

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

Distortion models: ``plumb_bob`` (5 coefficients k1 k2 p1 p2 k3), ``rational_polynomial``
(8: k1 k2 p1 p2 k3 k4 k5 k6) and ``equidistant`` (4: k1 k2 k3 k4, OpenCV ``cv2.fisheye``).
An empty ``d`` means "no distortion" (as image_geometry treats it) and is stored as zeros of
the model's length; any other length is an error.

Binning and ROI follow image_geometry: the calibration (``width``, ``height``, ``K``, ``P``)
is at full sensor resolution; images arrive binned by ``binning_x``/``binning_y`` (0 means 1)
and cropped to ``roi`` (all zeros means the full image; offsets and size in full-resolution
pixels). :attr:`CameraModel.k` / :attr:`CameraModel.p` are adjusted for both (principal
point shifted by the ROI offset, then focal length and principal point divided by the
binning) and every image or pixel method works on images of :attr:`CameraModel.image_size`.
``roi.do_rectify`` is carried through but a distinct rectified ROI is not computed (the
rectified image has the raw image's size, as image_geometry does).
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "CALIBRATION_LAYOUTS",
    "DISTORTION_MODELS",
    "CameraModel",
    "Extrinsics",
    "RegionOfInterest",
    "BODY_TO_OPTICAL",
    "calibration_layout",
]

#: Supported ``distortion_model`` values and their number of coefficients.
DISTORTION_MODELS: dict[str, int] = {
    "plumb_bob": 5,
    "rational_polynomial": 8,
    "equidistant": 4,
}

#: Rotation of the camera optical frame (z fwd, x right, y down) expressed in the camera body
#: frame (x fwd, y left, z up): its columns are the optical axes in body coordinates. Equal to
#: roll=-pi/2, pitch=0, yaw=-pi/2, the usual URDF ``camera_link -> camera_optical_frame`` joint.
BODY_TO_OPTICAL: np.ndarray = np.array(
    [[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]
)
BODY_TO_OPTICAL.flags.writeable = False

_ROTATION_TOL = 1e-3  # max |R R^T - I| accepted for camera_info.r
_NEWTON_MAX_ITER = 50
_NEWTON_TOL = 1e-13  # normalized-coordinate residual at which the inverse stops
_INVERSE_ACCEPT = 1e-9  # normalized residual above which an inverse is reported as NaN


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _get(obj: Any, name: str, default: Any = ...) -> Any:
    """Field ``name`` of a message-like object or a mapping."""
    if isinstance(obj, Mapping):
        if name in obj:
            return obj[name]
    elif hasattr(obj, name):
        return getattr(obj, name)
    if default is ...:
        raise ValueError(f"camera_info.{name} is missing")
    return default


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if out != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return out


def _as_float_array(value: Any, name: str, size: int | None) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of numbers: {exc}") from None
    if size is not None and arr.size != size:
        raise ValueError(f"{name} must have {size} elements, got {arr.size}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name} contains non-finite value {arr[i]!r} at index {i}")
    return arr.copy()


def _as_points(pts: npt.ArrayLike, dim: int, name: str) -> np.ndarray:
    arr = np.asarray(pts, dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == dim:
        arr = arr.reshape(1, dim)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{name} must have shape (N, {dim}), got {np.shape(pts)}")
    return arr


@dataclass(frozen=True)
class RegionOfInterest:
    """``sensor_msgs/RegionOfInterest`` in full-resolution pixels (all zeros = full image)."""

    x_offset: int = 0
    y_offset: int = 0
    height: int = 0
    width: int = 0
    do_rectify: bool = False

    @classmethod
    def from_any(cls, roi: Any) -> RegionOfInterest:
        """Build from a RegionOfInterest message, a mapping with its field names, or None."""
        if roi is None:
            return cls()
        if isinstance(roi, RegionOfInterest):
            return roi
        vals = {}
        for f in ("x_offset", "y_offset", "height", "width"):
            v = _get(roi, f, 0)
            vals[f] = _as_int(v, f"camera_info.roi.{f}")
            if vals[f] < 0:
                raise ValueError(f"camera_info.roi.{f} must be >= 0, got {vals[f]}")
        return cls(do_rectify=bool(_get(roi, "do_rectify", False)), **vals)

    def is_full(self) -> bool:
        return self.x_offset == 0 and self.y_offset == 0 and self.height == 0 and self.width == 0


#: The calibration file layouts :meth:`CameraModel.from_yaml` accepts (the error text).
CALIBRATION_LAYOUTS = (
    "accepted layouts: camera_calibration_parsers YAML (image_width, image_height, "
    "camera_matrix, distortion_coefficients, rectification_matrix, projection_matrix), a ROS 2 "
    "CameraInfo dump (`ros2 topic echo --once .../camera_info`: height, width, "
    "distortion_model, d, k, r, p) or a ROS 1 one (`rostopic echo -n1 .../camera_info`: "
    "height, width, distortion_model, D, K, R, P)"
)
_PARSERS_KEYS = ("image_width", "image_height", "camera_matrix", "distortion_coefficients",
                 "rectification_matrix", "projection_matrix")
_DUMP_MATRICES = ("d", "k", "r", "p")


def calibration_layout(doc: Mapping[str, Any]) -> str | None:
    """Which calibration layout a parsed YAML mapping is in: ``"camera_calibration_parsers"``,
    ``"ros2_camera_info"`` (lowercase ``k, d, r, p``), ``"ros1_camera_info"`` (uppercase
    ``K, D, R, P``) or None (none of them; see :data:`CALIBRATION_LAYOUTS`)."""
    keys = set(doc)
    if keys & {"camera_matrix", "image_width", "projection_matrix"}:
        return "camera_calibration_parsers"
    if keys & {"K", "P"}:
        return "ros1_camera_info"
    if keys & {"k", "p"}:
        return "ros2_camera_info"
    return None


_ARRAY_REPR = None


def _dump_sequence(value: Any, name: str) -> Any:
    """A matrix of a CameraInfo dump: a YAML list, or the ``array('d', [...])`` text older
    ``ros2 topic echo`` printed for sequences."""
    global _ARRAY_REPR
    if isinstance(value, str):
        import re

        if _ARRAY_REPR is None:
            _ARRAY_REPR = re.compile(r"\s*array\(\s*'[a-zA-Z]'\s*,\s*\[(.*)\]\s*\)\s*")
        m = _ARRAY_REPR.fullmatch(value)
        if m is None:
            raise ValueError(f"camera_info.{name} must be a list of numbers, got {value!r}")
        body = m.group(1).strip()
        try:
            return [float(v) for v in body.split(",")] if body else []
        except ValueError:
            raise ValueError(f"camera_info.{name} must be a list of numbers, got {value!r}") \
                from None
    return value


def _camera_info_dump_fields(doc: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """CameraInfo fields (lowercase) from a ``ros2 topic echo`` / ``rostopic echo`` dump."""
    upper = layout == "ros1_camera_info"
    names = {k: k.upper() if upper else k for k in _DUMP_MATRICES}
    expected = (f"a {'ROS 1' if upper else 'ROS 2'} CameraInfo dump has height, width, "
                f"distortion_model, {', '.join(names.values())}")
    fields: dict[str, Any] = {}
    for key in ("height", "width", "distortion_model"):
        if key not in doc:
            raise ValueError(f"missing key {key!r} ({expected})")
        fields[key] = doc[key]
    for key, src in names.items():
        if src not in doc:
            raise ValueError(f"missing key {src!r} ({expected})")
        fields[key] = _dump_sequence(doc[src], src)
    for key in ("binning_x", "binning_y"):
        if doc.get(key) is not None:
            fields[key] = doc[key]
    if isinstance(doc.get("roi"), Mapping):
        fields["roi"] = doc["roi"]
    header = doc.get("header")
    if isinstance(header, Mapping) and header.get("frame_id"):
        fields["header"] = {"frame_id": str(header["frame_id"])}
    return fields


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

        k_arr = _as_float_array(k, "camera_info.k", 9)
        if k_arr[0] == 0.0:
            raise ValueError(
                "camera_info.k: uncalibrated camera: K[0] is 0 (fx); all-zero intrinsics "
                "mean the camera was never calibrated"
            )
        if k_arr[0] < 0 or k_arr[4] <= 0:
            raise ValueError(
                f"camera_info.k: focal lengths must be > 0, got fx={k_arr[0]}, fy={k_arr[4]}"
            )
        if k_arr[3] != 0.0 or k_arr[6] != 0.0 or k_arr[7] != 0.0 or k_arr[8] != 1.0:
            raise ValueError(
                f"camera_info.k: last two rows must be [0 fy cy; 0 0 1], got {k_arr.tolist()}"
            )
        self._k_full = _readonly(k_arr.reshape(3, 3))

        n_coeffs = DISTORTION_MODELS[distortion_model]
        d_arr = _as_float_array([] if d is None else d, "camera_info.d", None)
        if d_arr.size == 0:
            d_arr = np.zeros(n_coeffs)
        elif d_arr.size != n_coeffs:
            raise ValueError(
                f"camera_info.d has {d_arr.size} coefficients but distortion_model "
                f"{distortion_model!r} needs exactly {n_coeffs} (or 0 for no distortion)"
            )
        self._d = _readonly(d_arr)

        if r is None:
            r_arr = np.eye(3)
        else:
            r_arr = _as_float_array(r, "camera_info.r", 9).reshape(3, 3)
            if not r_arr.any():
                r_arr = np.eye(3)  # unset R (some drivers publish zeros) means no rotation
        err = np.abs(r_arr @ r_arr.T - np.eye(3)).max()
        if err > _ROTATION_TOL or np.linalg.det(r_arr) <= 0:
            raise ValueError(
                f"camera_info.r is not a rotation matrix (|R R^T - I| = {err:.3g}, "
                f"det = {np.linalg.det(r_arr):.3g}): {r_arr.ravel().tolist()}"
            )
        self._r = _readonly(r_arr)

        if p is None:
            p_arr = np.hstack([self._k_full, np.zeros((3, 1))])
        else:
            p_arr = _as_float_array(p, "camera_info.p", 12).reshape(3, 4)
        if p_arr[0, 0] == 0.0 or p_arr[1, 1] == 0.0:
            raise ValueError(
                f"camera_info.p: P[0] or P[5] is 0 (rectified focal length); the camera "
                f"is not calibrated for rectification: {p_arr.ravel().tolist()}"
            )
        if p_arr[0, 0] < 0 or p_arr[1, 1] < 0:
            raise ValueError(f"camera_info.p: focal lengths must be > 0: {p_arr.ravel().tolist()}")
        if not np.array_equal(p_arr[2], [0.0, 0.0, 1.0, 0.0]) or p_arr[1, 0] != 0.0:
            raise ValueError(
                f"camera_info.p: rows must be [fx' s cx' Tx; 0 fy' cy' Ty; 0 0 1 0], "
                f"got {p_arr.ravel().tolist()}"
            )
        self._p_full = _readonly(p_arr)

        self.binning_x = _as_int(binning_x, "camera_info.binning_x")
        self.binning_y = _as_int(binning_y, "camera_info.binning_y")
        if self.binning_x < 0 or self.binning_y < 0:
            raise ValueError(
                f"camera_info.binning_x/binning_y must be >= 0, got {self.binning_x}, "
                f"{self.binning_y}"
            )
        self.roi = RegionOfInterest.from_any(roi)
        bx, by = max(self.binning_x, 1), max(self.binning_y, 1)
        if self.roi.is_full():
            roi_x, roi_y, roi_w, roi_h = 0, 0, self.width, self.height
        else:
            roi_x, roi_y = self.roi.x_offset, self.roi.y_offset
            roi_w = self.roi.width or self.width - roi_x
            roi_h = self.roi.height or self.height - roi_y
            fits = roi_x + roi_w <= self.width and roi_y + roi_h <= self.height
            if not fits or roi_w <= 0 or roi_h <= 0:
                raise ValueError(
                    f"camera_info.roi {self.roi} does not fit in the "
                    f"{self.width}x{self.height} image"
                )
        img_w, img_h = roi_w // bx, roi_h // by
        if img_w <= 0 or img_h <= 0:
            raise ValueError(
                f"camera_info.binning_x/binning_y ({bx}, {by}) leave an empty image from "
                f"{roi_w}x{roi_h}"
            )
        self._image_size = (img_w, img_h)

        k_eff, p_eff = self._k_full.copy(), self._p_full.copy()
        k_eff[0, 2] -= roi_x
        k_eff[1, 2] -= roi_y
        p_eff[0, 2] -= roi_x
        p_eff[1, 2] -= roi_y
        k_eff[0, :] /= bx
        k_eff[1, :] /= by
        p_eff[0, :] /= bx
        p_eff[1, :] /= by
        self._k = _readonly(k_eff)
        self._p = _readonly(p_eff)
        self._p3_inv = _readonly(np.linalg.inv(p_eff[:, :3]))

        self._is_identity = bool(
            distortion_model != "equidistant"  # zero-coefficient fisheye is still a fisheye
            and not self._d.any()
            and np.array_equal(self._r, np.eye(3))
            and np.array_equal(self._p_full[:, :3], self._k_full)
        )
        h = hashlib.sha256()
        h.update(
            repr(
                (self.width, self.height, self.distortion_model, bx, by,
                 roi_x, roi_y, roi_w, roi_h)
            ).encode()
        )
        for a in (self._d, self._k_full, self._r, self._p_full):
            h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
        self._key = h.hexdigest()
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
        import yaml  # local: only needed here

        path = Path(path)
        try:
            with path.open("r", encoding="utf-8") as f:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as exc:
            reason = " ".join(str(exc).split())
            raise ValueError(f"{path}: not valid YAML: {reason}") from None
        doc = docs[0] if docs else None
        if not isinstance(doc, Mapping):
            raise ValueError(f"{path}: expected a mapping of calibration keys; "
                             f"{CALIBRATION_LAYOUTS}")
        layout = calibration_layout(doc)
        try:
            if layout == "camera_calibration_parsers":
                return cls._from_parsers_doc(doc)
            if layout in ("ros2_camera_info", "ros1_camera_info"):
                return cls.from_camera_info(_camera_info_dump_fields(doc, layout))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        keys = ", ".join(sorted(str(k) for k in doc)[:12])
        raise ValueError(f"{path}: unknown calibration layout (keys: {keys}); "
                         f"{CALIBRATION_LAYOUTS}")

    @classmethod
    def _from_parsers_doc(cls, doc: Mapping[str, Any]) -> CameraModel:
        """The camera_calibration_parsers layout (see :meth:`from_yaml`)."""

        def matrix(key: str, rows: int | None, cols: int | None) -> list[float]:
            if key not in doc:
                raise ValueError(f"missing key {key!r}")
            m = doc[key]
            if not isinstance(m, Mapping) or "data" not in m:
                raise ValueError(f"{key} must be a mapping with rows, cols, data")
            data = list(m["data"] or [])
            r_, c_ = m.get("rows"), m.get("cols")
            if r_ is not None and c_ is not None and int(r_) * int(c_) != len(data):
                raise ValueError(
                    f"{key} has rows*cols = {int(r_) * int(c_)} but {len(data)} values"
                )
            if rows is not None and len(data) != rows * cols:
                raise ValueError(f"{key} must have {rows * cols} values, got {len(data)}")
            return data

        for key in ("image_width", "image_height"):
            if key not in doc:
                raise ValueError(f"missing key {key!r}")
        return cls(
            doc["image_width"],
            doc["image_height"],
            matrix("camera_matrix", 3, 3),
            matrix("distortion_coefficients", None, None),
            distortion_model=doc.get("distortion_model", "plumb_bob"),
            r=matrix("rectification_matrix", 3, 3),
            p=matrix("projection_matrix", 3, 4),
            camera_name=doc.get("camera_name", "") or "",
        )

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
    def _info_dict(self, k: np.ndarray, d: np.ndarray, r: np.ndarray, model: str) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "distortion_model": model,
            "d": [float(x) for x in d],
            "k": [float(x) for x in k.ravel()],
            "r": [float(x) for x in r.ravel()],
            "p": [float(x) for x in self._p_full.ravel()],
            "binning_x": self.binning_x,
            "binning_y": self.binning_y,
            "roi": {
                "x_offset": self.roi.x_offset,
                "y_offset": self.roi.y_offset,
                "height": self.roi.height,
                "width": self.roi.width,
                "do_rectify": self.roi.do_rectify,
            },
        }

    def to_camera_info_dict(self) -> dict[str, Any]:
        """CameraInfo fields (``width, height, distortion_model, d, k, r, p, binning_x,
        binning_y, roi``) as plain Python ints/floats/lists; ``roi`` is a dict. Round-trips
        through :meth:`from_camera_info` to the same :attr:`calibration_key`."""
        return self._info_dict(self._k_full, self._d, self._r, self.distortion_model)

    def rectified_camera_info_dict(self) -> dict[str, Any]:
        """CameraInfo fields describing the rectified image (``camera_info_rect``):
        ``k = P[:, :3]``, ``d`` = five zeros, ``r = I``, ``p`` unchanged, ``plumb_bob``."""
        return self._info_dict(self._p_full[:, :3], np.zeros(5), np.eye(3), "plumb_bob")

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
                size = self._image_size
                k, d, r, p3 = self._k_pinhole(), self._d, self._r, self._p[:, :3]
                if self.distortion_model == "equidistant":
                    m1, m2 = cv2.fisheye.initUndistortRectifyMap(k, d, r, p3, size, cv2.CV_16SC2)
                else:
                    m1, m2 = cv2.initUndistortRectifyMap(k, d, r, p3, size, cv2.CV_16SC2)
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
        if self.distortion_model == "equidistant":
            return _fisheye_undistort_rays(xd, yd, self._d)
        x, y = _pinhole_undistort(xd, yd, self._d)
        return np.stack([x, y, np.ones_like(x)], axis=1)

    def _rays_to_raw(self, rays: np.ndarray) -> np.ndarray:
        """Rays (N, 3) in the camera frame -> raw pixels (N, 2); NaN for rays that cannot be
        imaged (behind a pinhole camera)."""
        k = self._k
        if self.distortion_model == "equidistant":
            xd, yd = _fisheye_distort_rays(rays, self._d)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(rays[:, 2] > 0, rays[:, 2], np.nan)
                xd, yd = _pinhole_distort(rays[:, 0] / z, rays[:, 1] / z, _coeffs8(self._d))
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


# ---------------------------------------------------------------------- distortion math
def _coeffs8(d: np.ndarray) -> np.ndarray:
    out = np.zeros(8)
    out[: d.size] = d
    return out


def _pinhole_distort(
    x: np.ndarray, y: np.ndarray, c: np.ndarray, jacobian: bool = False
) -> tuple[np.ndarray, ...]:
    """OpenCV rational/plumb_bob distortion of normalized coords (and its Jacobian)."""
    k1, k2, p1, p2, k3, k4, k5, k6 = c
    r2 = x * x + y * y
    a = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    b = 1 + r2 * (k4 + r2 * (k5 + r2 * k6))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        cr = a / b
        xd = x * cr + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        yd = y * cr + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        if not jacobian:
            return xd, yd
        da = k1 + r2 * (2 * k2 + 3 * k3 * r2)
        db = k4 + r2 * (2 * k5 + 3 * k6 * r2)
        dc = (da * b - a * db) / (b * b)  # d cr / d r2
        j00 = cr + 2 * x * x * dc + 2 * p1 * y + 6 * p2 * x
        j01 = 2 * x * y * dc + 2 * p1 * x + 2 * p2 * y
        j10 = 2 * x * y * dc + 2 * p1 * x + 2 * p2 * y
        j11 = cr + 2 * y * y * dc + 6 * p1 * y + 2 * p2 * x
    return xd, yd, j00, j01, j10, j11


def _pinhole_newton(
    xd: np.ndarray, yd: np.ndarray, c: np.ndarray, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Damped Newton for ``distort(x, y) = (xd, yd)`` starting at ``(x, y)``, iterating only
    on the points not yet converged. Returns the solution and a mask of valid ones
    (residual <= _INVERSE_ACCEPT and Jacobian determinant > 0, i.e. not across a fold)."""
    x, y = x.copy(), y.copy()
    idx = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    for _ in range(_NEWTON_MAX_ITER):
        if idx.size == 0:
            break
        xs, ys, xds, yds = x[idx], y[idx], xd[idx], yd[idx]
        fx_, fy_, j00, j01, j10, j11 = _pinhole_distort(xs, ys, c, jacobian=True)
        ex, ey = fx_ - xds, fy_ - yds
        err = np.hypot(ex, ey)
        with np.errstate(divide="ignore", invalid="ignore"):
            det = j00 * j11 - j01 * j10
            dx = (j11 * ex - j01 * ey) / det
            dy = (-j10 * ex + j00 * ey) / det
        keep = (err > _NEWTON_TOL) & np.isfinite(err) & np.isfinite(dx) & np.isfinite(dy)
        idx, xs, ys, xds, yds = idx[keep], xs[keep], ys[keep], xds[keep], yds[keep]
        err, dx, dy = err[keep], dx[keep], dy[keep]
        step = np.ones_like(err)
        for _ in range(30):  # backtracking: halve the step where the residual would grow
            nx, ny = xs - step * dx, ys - step * dy
            nfx, nfy = _pinhole_distort(nx, ny, c)
            nerr = np.hypot(nfx - xds, nfy - yds)
            worse = ~(nerr < err)
            if not worse.any():
                break
            step = np.where(worse, step * 0.5, step)
        accept = nerr < err
        x[idx[accept]], y[idx[accept]] = nx[accept], ny[accept]
        idx = idx[accept]
    fx_, fy_, j00, j01, j10, j11 = _pinhole_distort(x, y, c, jacobian=True)
    err = np.hypot(fx_ - xd, fy_ - yd)
    return x, y, (err <= _INVERSE_ACCEPT) & (j00 * j11 - j01 * j10 > 0)


def _radial_first_root(rd: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Smallest r >= 0 with ``r * a(r^2) / b(r^2) == rd`` (the radial part of the
    distortion), by table look-up on the running maximum plus linear interpolation. NaN
    where the radial function never reaches ``rd`` before a pole or r = 64."""
    k1, k2, _, _, k3, k4, k5, k6 = c
    out = np.full(rd.shape, np.nan)
    finite = np.isfinite(rd)
    if not finite.any():
        return out
    target = float(rd[finite].max())
    r_max = 2.0
    while True:
        r = np.linspace(0.0, r_max, 8193)
        r2 = r * r
        b = 1 + r2 * (k4 + r2 * (k5 + r2 * k6))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            g = r * (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / b
        bad = np.flatnonzero(~(b > 0) | ~np.isfinite(g))
        if bad.size:  # stop at a pole of the rational model
            r, g = r[: bad[0]], g[: bad[0]]
        cm = np.maximum.accumulate(g) if g.size else g
        if bad.size or r_max >= 64.0 or (cm.size and cm[-1] >= target):
            break
        r_max *= 2.0
    if g.size < 2:
        return out
    i = np.searchsorted(cm, np.where(finite, rd, np.inf), side="left")
    hit = finite & (i < g.size)
    i = np.clip(i, 1, g.size - 1)
    g0, g1 = g[i - 1], g[i]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip((rd - g0) / (g1 - g0), 0.0, 1.0)
    r_root = r[i - 1] + t * (r[i] - r[i - 1])
    out[hit] = np.where(rd[hit] <= 0, 0.0, r_root[hit])
    return out


def _pinhole_undistort(
    xd: np.ndarray, yd: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Invert :func:`_pinhole_distort`: Newton started on the first monotonic branch of the
    radial distortion (the physically meaningful one, even for over-fitted rational models
    that fold back), retried from the distorted point and from OpenCV's fixed-point estimate
    where it fails. Points without a valid inverse -> NaN."""
    c = _coeffs8(d)
    rd = np.hypot(xd, yd)
    r0 = _radial_first_root(rd, c)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(rd > 0, r0 / rd, 1.0)
    x, y, ok = _pinhole_newton(xd, yd, c, xd * s, yd * s)
    retry = np.flatnonzero(~ok & np.isfinite(xd) & np.isfinite(yd))
    if retry.size:
        x2, y2, ok2 = _pinhole_newton(xd[retry], yd[retry], c, xd[retry], yd[retry])
        x[retry], y[retry], ok[retry] = x2, y2, ok2
        retry = retry[~ok2]
    if retry.size:
        src = np.stack([xd[retry], yd[retry]], axis=1).reshape(-1, 1, 2)
        guess = cv2.undistortPointsIter(
            src, np.eye(3), d, None, None,
            (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12),
        ).reshape(-1, 2)
        x2, y2, ok2 = _pinhole_newton(xd[retry], yd[retry], c, guess[:, 0], guess[:, 1])
        x[retry], y[retry], ok[retry] = x2, y2, ok2
    return np.where(ok, x, np.nan), np.where(ok, y, np.nan)


def _fisheye_theta_d(theta: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """theta_d(theta) of the equidistant model and its derivative."""
    k1, k2, k3, k4 = d
    t2 = theta * theta
    poly = 1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4)))
    dpoly = 1 + t2 * (3 * k1 + t2 * (5 * k2 + t2 * (7 * k3 + t2 * 9 * k4)))
    return theta * poly, dpoly


def _fisheye_distort_rays(rays: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.hypot(rays[:, 0], rays[:, 1])
    theta = np.arctan2(r, rays[:, 2])
    theta_d, _ = _fisheye_theta_d(theta, d)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(r > 0, theta_d / r, 0.0)
    return rays[:, 0] * scale, rays[:, 1] * scale


def _fisheye_undistort_rays(xd: np.ndarray, yd: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Distorted normalized coords -> rays (N, 3), by 1-D Newton on theta; NaN rows where
    theta_d(theta) has no monotonic inverse or theta >= pi."""
    theta_d = np.hypot(xd, yd)
    theta = theta_d.copy()
    for _ in range(_NEWTON_MAX_ITER):
        f, df = _fisheye_theta_d(theta, d)
        with np.errstate(divide="ignore", invalid="ignore"):
            delta = np.where(df > 0, (f - theta_d) / df, 0.0)
        theta = np.clip(theta - delta, 0.0, math.pi)
        if not (np.abs(delta) > _NEWTON_TOL).any():
            break
    f, df = _fisheye_theta_d(theta, d)
    bad = ~(np.abs(f - theta_d) <= _INVERSE_ACCEPT) | ~(df > 0) | (theta >= math.pi)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(theta_d > 0, np.sin(theta) / theta_d, 1.0)
    rays = np.stack([xd * s, yd * s, np.cos(theta)], axis=1)
    rays[bad] = np.nan
    return rays


# ---------------------------------------------------------------------- extrinsics
def _rpy_to_matrix(rpy: npt.ArrayLike, name: str) -> np.ndarray:
    roll, pitch, yaw = _as_float_array(rpy, name, 3)
    cr, sr, cp, sp, cy, sy = (math.cos(roll), math.sin(roll), math.cos(pitch),
                              math.sin(pitch), math.cos(yaw), math.sin(yaw))
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _quaternion_to_matrix(q: npt.ArrayLike, name: str) -> np.ndarray:
    x, y, z, w = _as_float_array(q, name, 4)
    n = math.sqrt(x * x + y * y + z * z + w * w)
    if n < 1e-9:
        raise ValueError(f"{name} has zero norm; expected a unit quaternion [x, y, z, w]")
    x, y, z, w = x / n, y / n, z / n, w / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _matrix_to_quaternion(m: np.ndarray) -> np.ndarray:
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        s = 2 * math.sqrt(tr + 1)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2 * math.sqrt(1 + m[0, 0] - m[1, 1] - m[2, 2])
        q = [s / 4, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = 2 * math.sqrt(1 + m[1, 1] - m[0, 0] - m[2, 2])
        q = [(m[0, 1] + m[1, 0]) / s, s / 4, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = 2 * math.sqrt(1 + m[2, 2] - m[0, 0] - m[1, 1])
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, s / 4, (m[1, 0] - m[0, 1]) / s]
    q = np.array(q)
    return q if q[3] >= 0 else -q


@dataclass(frozen=True, eq=False)
class Extrinsics:
    """Pose of the camera *optical* frame (z fwd, x right, y down) in ``parent_frame``
    (typically ``base_link``: x forward, y left, z up).

    ``rotation`` (3x3) maps optical-frame vectors to parent-frame vectors (its columns are
    the optical axes in the parent frame); ``translation`` (3,) is the optical centre in the
    parent frame, metres. This is the TF transform ``parent_frame -> child_frame``.
    Use :meth:`from_body_pose` when you have the pose of the camera *body* frame
    (``camera_link``, x forward) as in a URDF.
    """

    parent_frame: str
    translation: np.ndarray
    rotation: np.ndarray
    child_frame: str = ""

    def __post_init__(self) -> None:
        t = _as_float_array(self.translation, "extrinsics.translation", 3)
        r = _as_float_array(self.rotation, "extrinsics.rotation", 9).reshape(3, 3)
        err = np.abs(r @ r.T - np.eye(3)).max()
        if err > 1e-6 or np.linalg.det(r) <= 0:
            raise ValueError(
                f"extrinsics.rotation is not a rotation matrix (|R R^T - I| = {err:.3g})"
            )
        if not isinstance(self.parent_frame, str) or not self.parent_frame:
            raise ValueError(
                f"extrinsics.parent_frame must be a non-empty string, got {self.parent_frame!r}"
            )
        object.__setattr__(self, "translation", _readonly(t))
        object.__setattr__(self, "rotation", _readonly(r))

    # -------------------------------------------------------------- constructors
    @classmethod
    def from_quaternion(
        cls,
        translation: npt.ArrayLike,
        quaternion_xyzw: npt.ArrayLike,
        parent_frame: str = "base_link",
        child_frame: str = "",
    ) -> Extrinsics:
        """Optical-frame pose from a quaternion ``[x, y, z, w]`` (normalized here)."""
        return cls(parent_frame, np.asarray(translation, dtype=float),
                   _quaternion_to_matrix(quaternion_xyzw, "extrinsics.quaternion"), child_frame)

    @classmethod
    def from_rpy(
        cls,
        translation: npt.ArrayLike,
        rpy: npt.ArrayLike,
        parent_frame: str = "base_link",
        child_frame: str = "",
    ) -> Extrinsics:
        """Optical-frame pose from roll, pitch, yaw (radians, fixed axes X-Y-Z as in URDF/tf2:
        ``R = Rz(yaw) Ry(pitch) Rx(roll)``)."""
        return cls(parent_frame, np.asarray(translation, dtype=float),
                   _rpy_to_matrix(rpy, "extrinsics.rpy"), child_frame)

    @classmethod
    def from_body_pose(
        cls,
        translation: npt.ArrayLike,
        rpy: npt.ArrayLike,
        parent_frame: str = "base_link",
        child_frame: str = "",
    ) -> Extrinsics:
        """From the pose of the camera *body* frame (x forward, y left, z up; URDF
        ``camera_link``): rpy (0, 0, 0) = camera looking along parent +x, pitch > 0 = looking
        down. Composes with the fixed :data:`BODY_TO_OPTICAL` rotation."""
        r_body = _rpy_to_matrix(rpy, "extrinsics.body_rpy")
        return cls(parent_frame, np.asarray(translation, dtype=float), r_body @ BODY_TO_OPTICAL,
                   child_frame)

    _DICT_KEYS = ("parent_frame", "child_frame", "translation", "quaternion", "rpy", "body_rpy")

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> Extrinsics:
        """From a parameter mapping: ``translation`` [x, y, z] (required), exactly one of
        ``quaternion`` [x, y, z, w] / ``rpy`` [r, p, y] (both of the *optical* frame) /
        ``body_rpy`` [r, p, y] (camera body frame, see :meth:`from_body_pose`), optional
        ``parent_frame`` (default ``base_link``) and ``child_frame``. Unknown keys are errors.
        """
        if not isinstance(params, Mapping):
            raise ValueError(f"extrinsics must be a mapping, got {type(params).__name__}")
        unknown = sorted(set(params) - set(cls._DICT_KEYS))
        if unknown:
            raise ValueError(f"extrinsics: unknown keys {unknown}; allowed: {list(cls._DICT_KEYS)}")
        if "translation" not in params:
            raise ValueError("extrinsics.translation is missing")
        given = [k for k in ("quaternion", "rpy", "body_rpy") if k in params]
        if len(given) != 1:
            raise ValueError(
                f"extrinsics: give exactly one of quaternion, rpy, body_rpy (got {given or 'none'})"
            )
        parent = params.get("parent_frame", "base_link")
        child = params.get("child_frame", "")
        t = params["translation"]
        if given[0] == "quaternion":
            return cls.from_quaternion(t, params["quaternion"], parent, child)
        if given[0] == "rpy":
            return cls.from_rpy(t, params["rpy"], parent, child)
        return cls.from_body_pose(t, params["body_rpy"], parent, child)

    @property
    def quaternion_xyzw(self) -> np.ndarray:
        """Rotation as a unit quaternion ``[x, y, z, w]`` with w >= 0 (for TF)."""
        return _matrix_to_quaternion(self.rotation)

    # -------------------------------------------------------------- geometry
    def rays_to_base(self, rays: npt.ArrayLike) -> np.ndarray:
        """Directions ``(N, 3)`` in the optical frame -> directions in ``parent_frame``."""
        return _as_points(rays, 3, "rays") @ self.rotation.T

    def points_to_base(self, points: npt.ArrayLike) -> np.ndarray:
        """Points ``(N, 3)`` in the optical frame -> points in ``parent_frame``."""
        return _as_points(points, 3, "points") @ self.rotation.T + self.translation

    def ground_intersection(self, rays_cam: npt.ArrayLike, plane_height: float = 0.0) -> np.ndarray:
        """Intersect optical-frame rays ``(N, 3)`` (any length) from the camera centre with
        the plane ``z = plane_height`` of ``parent_frame``. Returns ``(N, 3)`` points in
        ``parent_frame``; NaN rows for rays parallel to the plane, pointing away from it, or
        NaN themselves."""
        if not math.isfinite(plane_height):
            raise ValueError(f"plane_height must be finite, got {plane_height}")
        d = self.rays_to_base(rays_cam)
        dz = d[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (plane_height - self.translation[2]) / dz
        ok = np.isfinite(s) & (s > 0) & (np.abs(dz) > 1e-12)
        s = np.where(ok, s, np.nan)
        out = self.translation + s[:, None] * d
        out[~ok] = np.nan
        return out
