"""3D objects from 2D detections: where each object stands in the robot's frame, and its size.

Two sources of position, per detection:

* ``ground_plane`` (no depth, or no valid depth inside the object): the ray through the box's
  bottom-centre pixel meets the ground plane ``z = plane_height`` of the extrinsics' parent
  frame — the point where the object stands (the ground positions of ``detections/ground``).
  Width = distance across the line of sight between the ground points under the box's
  bottom-left and bottom-right corners; height = where the ray through the box's top-centre
  pixel passes the object (the vertical plane through the standing point, facing the
  camera), above the plane. The extent along the line of sight is not observed: 0. A box
  whose bottom is at or above the horizon gets no position.
* ``depth_mask`` / ``depth_box`` (an aligned depth image): the depth pixels inside the SAM mask
  of the detection when SAM ran in the same process, else a grid over the central half of
  the box (the middle 50 % in x and y, where the object is, not the background around it).
  Zeros and NaNs are ignored. ``depth_mask``: the box spans the 2nd–98th percentiles of the
  masked points (robust to a few stray mask pixels on the background) along the line of
  sight, across it and vertically; ``depth_box``: the position is the median of the central
  points, width and height are the box's pixel extent at that median depth and
  the extent along the line of sight is the 2nd–98th percentile spread of those points.

Boxes are upright and turned to face the camera: ``yaw`` = heading of the line of sight from
the camera to the object in the parent frame; sizes are (along the line of sight, across it,
vertical). ``center`` is the box's geometric centre (for ``ground_plane``: above the
standing point by half the height); ``footprint`` is where it meets the ground
(``ground_plane``) or the centre's projection onto the plane (depth). ``distance`` =
horizontal distance from the camera's optical centre to ``center``.

The depth image is registered to the colour camera as it is *published* (raw pixels, before
rectification): pixels of a rectified working image are mapped back through the calibration
before sampling. 16UC1 depth is in millimetres, 32FC1 in metres (REP 118).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Objects3D", "lift_objects", "frame_objects", "depth_to_metres", "POSITION_SOURCES"]

POSITION_SOURCES = ("ground_plane", "depth_mask", "depth_box")
_MAX_MASK_POINTS = 4096
_BOX_GRID = 24  # samples per axis over the central half of a box


@dataclass
class Objects3D:
    """3D objects of one frame, one row per detection (index = detection index).

    ``valid`` (N,) bool: a position was found; ``center``, ``footprint`` (N, 3) in
    ``parent_frame``; ``size`` (N, 3) metres (along the line of sight, across, vertical);
    ``yaw`` (N,) radians; ``distance`` (N,) metres; ``source`` N strings from
    :data:`POSITION_SOURCES` ('' where invalid); ``depth_fraction`` (N,) share of the sampled
    pixels that had a valid depth (1.0 for ground_plane). Invalid rows hold NaN.
    """

    parent_frame: str
    valid: np.ndarray
    center: np.ndarray
    footprint: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    distance: np.ndarray
    source: list[str]
    depth_fraction: np.ndarray

    def __len__(self) -> int:
        return int(self.valid.shape[0])

    @classmethod
    def empty(cls, parent_frame: str, n: int = 0) -> Objects3D:
        nan3 = np.full((n, 3), np.nan)
        return cls(parent_frame, np.zeros(n, bool), nan3.copy(), nan3.copy(), nan3.copy(),
                   np.full(n, np.nan), np.full(n, np.nan), [""] * n, np.zeros(n))


def depth_to_metres(depth: np.ndarray, encoding: str) -> np.ndarray:
    """A depth image as float32 metres with NaN where there is no measurement.

    ``16UC1``/``mono16``: millimetres (0 = none); ``32FC1``: metres (0, NaN, inf = none).
    Raises ValueError naming ``depth.encoding`` for anything else."""
    if encoding not in ("16UC1", "mono16", "32FC1"):
        raise ValueError(f"depth.encoding '{encoding}' is not a depth encoding; expected "
                         "16UC1 (millimetres) or 32FC1 (metres)")
    arr = np.asarray(depth)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise ValueError(f"depth image: expected one channel, got shape {arr.shape}")
    if encoding in ("16UC1", "mono16"):
        out = arr.astype(np.float32) * np.float32(1e-3)
    else:
        out = arr.astype(np.float32, copy=True)
    out[~np.isfinite(out) | (out <= 0)] = np.nan
    return out


def _horizontal(v: np.ndarray) -> np.ndarray:
    h = np.array([v[0], v[1], 0.0])
    n = float(np.linalg.norm(h))
    return h / n if n > 1e-9 else np.array([1.0, 0.0, 0.0])


def lift_objects(xyxy: np.ndarray, camera: Any, extrinsics: Any, *, plane_height: float = 0.0,
                 rectified: bool = False, instance_ids: np.ndarray | None = None,
                 n_mask_prompts: int = 0, depth_m: np.ndarray | None = None) -> Objects3D:
    """3D objects for boxes ``xyxy`` (N, 4) in the working image's pixels.

    Args:
        camera: the raw camera's CameraModel (``rectified`` says whether the boxes are in
            its rectified image).
        extrinsics: :class:`~perception2d_ros.geometry.extrinsics.Extrinsics` of the camera optical
            frame in the frame the objects are reported in.
        instance_ids: SAM's HxW instance-id image (id i + 1 = detection i for i <
            ``n_mask_prompts``), in the working image's pixels, or None.
        depth_m: HxW float metres, NaN = no measurement (:func:`depth_to_metres`), registered
            to the raw colour image, or None.
    Raises:
        ValueError naming ``depth`` when its size differs from the camera's image size.
    """
    boxes = np.asarray(xyxy, np.float64).reshape(-1, 4)
    n = boxes.shape[0]
    out = Objects3D.empty(extrinsics.parent_frame, n)
    if n == 0:
        return out
    if depth_m is not None and tuple(depth_m.shape[::-1]) != tuple(camera.image_size):
        raise ValueError(f"depth image {depth_m.shape[1]}x{depth_m.shape[0]} does not match "
                         f"the colour camera's {camera.image_size[0]}x{camera.image_size[1]} "
                         "(depth_topic must be registered to the colour camera)")
    c = np.asarray(extrinsics.translation, np.float64)
    _ground_objects(boxes, camera, extrinsics, plane_height, rectified, out)
    if depth_m is not None:
        for i in range(n):
            mask_px = None
            if instance_ids is not None and i < n_mask_prompts:
                ys, xs = np.nonzero(instance_ids == i + 1)
                if len(xs):
                    step = max(1, int(math.ceil(len(xs) / _MAX_MASK_POINTS)))
                    mask_px = np.stack([xs[::step], ys[::step]], 1).astype(np.float64)
            _depth_object(i, boxes[i], mask_px, camera, extrinsics, plane_height, rectified,
                          depth_m, c, out)
    return out


def _ground_objects(boxes: np.ndarray, camera: Any, extr: Any, plane_height: float,
                    rectified: bool, out: Objects3D) -> None:
    x1, y1, x2, y2 = boxes.T
    xc = (x1 + x2) / 2.0
    pts = np.concatenate([np.stack([xc, y2], 1), np.stack([x1, y2], 1),
                          np.stack([x2, y2], 1), np.stack([xc, y1], 1)])
    rays = camera.pixel_to_ray(pts, rectified=rectified)
    n = boxes.shape[0]
    ground = extr.ground_intersection(rays[:3 * n], plane_height)
    foot, left, right = ground[:n], ground[n:2 * n], ground[2 * n:]
    top = extr.rays_to_base(rays[3 * n:])
    c = np.asarray(extr.translation, np.float64)
    for i in range(n):
        if not np.isfinite(foot[i]).all():
            continue  # bottom of the box at/above the horizon: no ground position
        h = _horizontal(foot[i] - c)
        lat = np.array([-h[1], h[0], 0.0])
        # across the line of sight only: with a rolled camera the two bottom corners meet
        # the ground at different ranges, which is not width
        width = abs(float(np.dot(left[i] - right[i], lat))) \
            if np.isfinite(left[i]).all() and np.isfinite(right[i]).all() else 0.0
        along = float(np.dot(foot[i] - c, h))
        dh = float(np.dot(top[i], h))
        height = 0.0
        if dh > 1e-9 and np.isfinite(top[i]).all():
            p = c + (along / dh) * top[i]
            height = max(0.0, float(p[2] - plane_height))
        out.valid[i] = True
        out.footprint[i] = foot[i]
        out.center[i] = [foot[i][0], foot[i][1], plane_height + height / 2.0]
        out.size[i] = [0.0, width, height]
        out.yaw[i] = math.atan2(h[1], h[0])
        out.distance[i] = float(np.linalg.norm((out.center[i] - c)[:2]))
        out.source[i] = "ground_plane"
        out.depth_fraction[i] = 1.0


def _sample_depth(px: np.ndarray, camera: Any, rectified: bool, depth_m: np.ndarray
                  ) -> np.ndarray:
    """Depth (metres, NaN = none) at working-image pixels ``px`` (N, 2)."""
    raw = camera.distort_points(px) if rectified else px
    h, w = depth_m.shape
    good = np.isfinite(raw).all(1)
    u = np.full(px.shape[0], -1, np.int64)
    v = np.full(px.shape[0], -1, np.int64)
    u[good] = np.rint(raw[good, 0])  # pixel centres are at integer coordinates (OpenCV)
    v[good] = np.rint(raw[good, 1])
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    z = np.full(px.shape[0], np.nan, np.float64)
    z[ok] = depth_m[v[ok], u[ok]]
    return z


def _depth_object(i: int, box: np.ndarray, mask_px: np.ndarray | None, camera: Any,
                  extr: Any, plane_height: float, rectified: bool, depth_m: np.ndarray,
                  c: np.ndarray, out: Objects3D) -> None:
    x1, y1, x2, y2 = box
    if mask_px is not None:
        px = mask_px
        source = "depth_mask"
    else:
        w, h = x2 - x1, y2 - y1
        gx = np.linspace(x1 + 0.25 * w, x2 - 0.25 * w, _BOX_GRID)
        gy = np.linspace(y1 + 0.25 * h, y2 - 0.25 * h, _BOX_GRID)
        px = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
        source = "depth_box"
    z = _sample_depth(px, camera, rectified, depth_m)
    ok = np.isfinite(z)
    if not ok.any():
        return  # keep the ground-plane result (if any)
    rays = camera.pixel_to_ray(px[ok], rectified=rectified)
    cam_pts = rays * (z[ok] / rays[:, 2])[:, None]  # depth = z in the optical frame
    pts = extr.points_to_base(cam_pts)
    pts = pts[np.isfinite(pts).all(1)]
    if len(pts) == 0:
        return
    med = np.median(pts, axis=0)
    hdir = _horizontal(med - c)
    lat = np.array([-hdir[1], hdir[0], 0.0])
    local = np.stack([(pts - c) @ hdir, (pts - c) @ lat, pts[:, 2]], 1)
    lo, hi = ((np.percentile(local, 2, axis=0), np.percentile(local, 98, axis=0))
              if len(local) >= 20 else (local.min(0), local.max(0)))
    if source == "depth_mask":
        mid = (lo + hi) / 2.0
        center = c * np.array([1, 1, 0]) + mid[0] * hdir + mid[1] * lat + np.array([0, 0, mid[2]])
        size = hi - lo
    else:
        center = med
        zc = float(np.median(z[ok]))
        edges = np.array([[x1, (y1 + y2) / 2], [x2, (y1 + y2) / 2],
                          [(x1 + x2) / 2, y1], [(x1 + x2) / 2, y2]])
        er = camera.pixel_to_ray(edges, rectified=rectified)
        ep = er * (zc / er[:, 2])[:, None]
        size = np.array([hi[0] - lo[0], float(np.linalg.norm(ep[0] - ep[1])),
                         float(np.linalg.norm(ep[2] - ep[3]))])
    out.valid[i] = True
    out.center[i] = center
    out.footprint[i] = [center[0], center[1], plane_height]
    out.size[i] = size
    out.yaw[i] = math.atan2(hdir[1], hdir[0])
    out.distance[i] = float(np.linalg.norm((center - c)[:2]))
    out.source[i] = source
    out.depth_fraction[i] = float(ok.mean())


def frame_objects(frame: Any, extrinsics: Any, plane_height: float = 0.0) -> Objects3D | None:
    """:func:`lift_objects` for a pipeline frame (``pipeline.frame.Frame``): its detections in
    the working image, its SAM masks when the sam stage ran, its aligned depth when it has
    one. None when the frame has no detections or no camera model."""
    det = frame.detections
    if det is None or frame.camera is None or extrinsics is None:
        return None
    masks = getattr(frame, "masks", None)
    ids = getattr(masks, "instance_ids", None) if masks is not None else None
    return lift_objects(np.asarray(det.xyxy), frame.camera, extrinsics,
                        plane_height=plane_height, rectified=frame.rectified is not None,
                        instance_ids=None if ids is None else np.asarray(ids),
                        n_mask_prompts=int(getattr(masks, "n_detection_prompts", 0) or 0),
                        depth_m=getattr(frame, "depth", None))
