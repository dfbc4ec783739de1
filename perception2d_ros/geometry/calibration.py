"""Camera calibrations as robots store them: validation of the ``sensor_msgs/CameraInfo``
fields (K, D, R, P, binning, ROI), the calibration file layouts :meth:`CameraModel.from_yaml`
reads (camera_calibration_parsers YAML, ROS 1 / ROS 2 CameraInfo dumps) and the small
field/array validators the geometry modules share.

Binning and ROI follow image_geometry: the calibration (``width``, ``height``, ``K``, ``P``)
is at full sensor resolution; images arrive binned by ``binning_x``/``binning_y`` (0 means 1)
and cropped to ``roi`` (all zeros means the full image; offsets and size in full-resolution
pixels). :func:`image_window` and :func:`window_matrix` give the image size and the K / P of
such images (principal point shifted by the ROI offset, then focal length and principal point
divided by the binning).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from perception2d_ros.geometry.distortion import DISTORTION_MODELS

__all__ = [
    "CALIBRATION_LAYOUTS",
    "RegionOfInterest",
    "calibration_digest",
    "calibration_layout",
    "camera_info_fields",
    "check_d",
    "check_k",
    "check_p",
    "check_r",
    "image_window",
    "load_calibration_doc",
    "parsers_doc_fields",
    "window_matrix",
]

_ROTATION_TOL = 1e-3  # max |R R^T - I| accepted for camera_info.r


# ---------------------------------------------------------------------- field validators
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


# ---------------------------------------------------------------------- calibration files
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


def load_calibration_doc(path: Path) -> Mapping[str, Any]:
    """The first YAML document of a calibration file, which must be a mapping."""
    import yaml  # local: only needed here

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
    return doc


def parsers_doc_fields(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``CameraModel`` keyword arguments from the camera_calibration_parsers layout (see
    :meth:`CameraModel.from_yaml`)."""

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
    return {
        "width": doc["image_width"],
        "height": doc["image_height"],
        "k": matrix("camera_matrix", 3, 3),
        "d": matrix("distortion_coefficients", None, None),
        "distortion_model": doc.get("distortion_model", "plumb_bob"),
        "r": matrix("rectification_matrix", 3, 3),
        "p": matrix("projection_matrix", 3, 4),
        "camera_name": doc.get("camera_name", "") or "",
    }


# ---------------------------------------------------------------------- CameraInfo fields
def check_k(k: npt.ArrayLike) -> np.ndarray:
    """``camera_info.k`` as a read-only 3x3 array, validated (calibrated, upper triangular)."""
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
    return _readonly(k_arr.reshape(3, 3))


def check_d(d: npt.ArrayLike | None, distortion_model: str) -> np.ndarray:
    """``camera_info.d`` for a supported ``distortion_model``, read-only; None or empty means
    no distortion (zeros of the model's length)."""
    n_coeffs = DISTORTION_MODELS[distortion_model]
    d_arr = _as_float_array([] if d is None else d, "camera_info.d", None)
    if d_arr.size == 0:
        d_arr = np.zeros(n_coeffs)
    elif d_arr.size != n_coeffs:
        raise ValueError(
            f"camera_info.d has {d_arr.size} coefficients but distortion_model "
            f"{distortion_model!r} needs exactly {n_coeffs} (or 0 for no distortion)"
        )
    return _readonly(d_arr)


def check_r(r: npt.ArrayLike | None) -> np.ndarray:
    """``camera_info.r`` as a read-only 3x3 rotation; None or all zeros -> identity."""
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
    return _readonly(r_arr)


def check_p(p: npt.ArrayLike | None, k_full: np.ndarray) -> np.ndarray:
    """``camera_info.p`` as a read-only 3x4 array, validated; None -> ``[K | 0]``."""
    if p is None:
        p_arr = np.hstack([k_full, np.zeros((3, 1))])
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
    return _readonly(p_arr)


# ---------------------------------------------------------------------- binning and ROI
def image_window(
    width: int, height: int, binning_x: int, binning_y: int, roi: RegionOfInterest
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """The part of the ``width`` x ``height`` calibration image that the received images show,
    ``(roi_x, roi_y, roi_w, roi_h)`` in full-resolution pixels, and the size ``(w, h)`` of
    those images after binning (0 means 1). ValueError if the ROI does not fit or the binning
    leaves nothing."""
    bx, by = max(binning_x, 1), max(binning_y, 1)
    if roi.is_full():
        roi_x, roi_y, roi_w, roi_h = 0, 0, width, height
    else:
        roi_x, roi_y = roi.x_offset, roi.y_offset
        roi_w = roi.width or width - roi_x
        roi_h = roi.height or height - roi_y
        fits = roi_x + roi_w <= width and roi_y + roi_h <= height
        if not fits or roi_w <= 0 or roi_h <= 0:
            raise ValueError(
                f"camera_info.roi {roi} does not fit in the "
                f"{width}x{height} image"
            )
    img_w, img_h = roi_w // bx, roi_h // by
    if img_w <= 0 or img_h <= 0:
        raise ValueError(
            f"camera_info.binning_x/binning_y ({bx}, {by}) leave an empty image from "
            f"{roi_w}x{roi_h}"
        )
    return (roi_x, roi_y, roi_w, roi_h), (img_w, img_h)


def window_matrix(
    m: np.ndarray, window: tuple[int, int, int, int], binning_x: int, binning_y: int
) -> np.ndarray:
    """A full-resolution K (3x3) or P (3x4) for images cropped to ``window`` (from
    :func:`image_window`) and then binned: read-only copy."""
    out = m.copy()
    out[0, 2] -= window[0]
    out[1, 2] -= window[1]
    out[0, :] /= max(binning_x, 1)
    out[1, :] /= max(binning_y, 1)
    return _readonly(out)


def calibration_digest(
    width: int,
    height: int,
    distortion_model: str,
    binning_x: int,
    binning_y: int,
    window: tuple[int, int, int, int],
    arrays: tuple[np.ndarray, ...],
) -> str:
    """Hex SHA-256 of every field that affects geometry (``CameraModel.calibration_key``);
    ``arrays`` are D, K, R, P at full resolution."""
    h = hashlib.sha256()
    h.update(
        repr(
            (width, height, distortion_model, max(binning_x, 1), max(binning_y, 1), *window)
        ).encode()
    )
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------- CameraInfo out
def camera_info_fields(camera: Any, k: np.ndarray, d: np.ndarray, r: np.ndarray,
                       model: str) -> dict[str, Any]:
    """CameraInfo fields of ``camera`` (a ``CameraModel``) with ``k``, ``d``, ``r`` and
    ``model`` given (its own, or those of its rectified image) as plain Python values; ``p`` is
    the camera's full-resolution P; ``roi`` is a dict."""
    return {
        "width": camera.width,
        "height": camera.height,
        "distortion_model": model,
        "d": [float(x) for x in d],
        "k": [float(x) for x in k.ravel()],
        "r": [float(x) for x in r.ravel()],
        "p": [float(x) for x in camera.p_full.ravel()],
        "binning_x": camera.binning_x,
        "binning_y": camera.binning_y,
        "roi": {
            "x_offset": camera.roi.x_offset,
            "y_offset": camera.roi.y_offset,
            "height": camera.roi.height,
            "width": camera.roi.width,
            "do_rectify": camera.roi.do_rectify,
        },
    }
