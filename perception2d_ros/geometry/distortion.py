"""Lens distortion math: OpenCV ``plumb_bob`` / ``rational_polynomial`` (pinhole) and
``equidistant`` (fisheye) distortion of normalized coordinates and its inverse (Newton iterated
to convergence), plus the rectification remap tables built from them.

Distortion models: ``plumb_bob`` (5 coefficients k1 k2 p1 p2 k3), ``rational_polynomial``
(8: k1 k2 p1 p2 k3 k4 k5 k6) and ``equidistant`` (4: k1 k2 k3 k4, OpenCV ``cv2.fisheye``).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = ["DISTORTION_MODELS", "distort_rays", "rectify_maps", "undistort_normalized"]

#: Supported ``distortion_model`` values and their number of coefficients.
DISTORTION_MODELS: dict[str, int] = {
    "plumb_bob": 5,
    "rational_polynomial": 8,
    "equidistant": 4,
}

_NEWTON_MAX_ITER = 50
_NEWTON_TOL = 1e-13  # normalized-coordinate residual at which the inverse stops
_INVERSE_ACCEPT = 1e-9  # normalized residual above which an inverse is reported as NaN


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



# ---------------------------------------------------------------------- per-model entry points
def undistort_normalized(
    xd: np.ndarray, yd: np.ndarray, distortion_model: str, d: np.ndarray
) -> np.ndarray:
    """Distorted normalized coordinates -> unnormalized rays (N, 3) in the camera frame; NaN
    rows where the distortion cannot be inverted (outside the region where it is one-to-one)."""
    if distortion_model == "equidistant":
        return _fisheye_undistort_rays(xd, yd, d)
    x, y = _pinhole_undistort(xd, yd, d)
    return np.stack([x, y, np.ones_like(x)], axis=1)


def distort_rays(
    rays: np.ndarray, distortion_model: str, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rays (N, 3) in the camera frame -> distorted normalized coordinates ``(xd, yd)``; NaN
    for rays that cannot be imaged (behind a pinhole camera)."""
    if distortion_model == "equidistant":
        return _fisheye_distort_rays(rays, d)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(rays[:, 2] > 0, rays[:, 2], np.nan)
        return _pinhole_distort(rays[:, 0] / z, rays[:, 1] / z, _coeffs8(d))


def rectify_maps(
    k: np.ndarray, d: np.ndarray, r: np.ndarray, p3: np.ndarray, size: tuple[int, int],
    distortion_model: str,
) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.initUndistortRectifyMap`` (``cv2.fisheye``'s for equidistant) fixed-point tables
    ``(map1, map2)`` (``cv2.CV_16SC2``) for images of ``size`` = ``(width, height)``."""
    if distortion_model == "equidistant":
        return cv2.fisheye.initUndistortRectifyMap(k, d, r, p3, size, cv2.CV_16SC2)
    return cv2.initUndistortRectifyMap(k, d, r, p3, size, cv2.CV_16SC2)
