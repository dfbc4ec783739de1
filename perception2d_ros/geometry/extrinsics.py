"""Camera extrinsics: rotation helpers (roll/pitch/yaw, quaternions), :class:`Extrinsics`
(the camera optical frame in the robot base frame), :data:`BODY_TO_OPTICAL` and the ground-plane
intersection of rays.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from perception2d_ros.geometry.calibration import _as_float_array, _as_points, _readonly

__all__ = ["BODY_TO_OPTICAL", "Extrinsics"]

#: Rotation of the camera optical frame (z fwd, x right, y down) expressed in the camera body
#: frame (x fwd, y left, z up): its columns are the optical axes in body coordinates. Equal to
#: roll=-pi/2, pitch=0, yaw=-pi/2, the usual URDF ``camera_link -> camera_optical_frame`` joint.
BODY_TO_OPTICAL: np.ndarray = np.array(
    [[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]
)
BODY_TO_OPTICAL.flags.writeable = False


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
