"""A ROS-free TF buffer: the transform tree of ``/tf_static`` and ``/tf``, composed on lookup.

What tf2's ``BufferCore`` does for our one need — the pose of a camera's optical frame in the
robot's base frame at an image stamp — without tf2_ros (not on PyPI):

* every transform is an edge ``parent -> child`` (the pose of ``child`` in ``parent``); a child
  has one parent (a tree), frame names are compared without a leading ``/``;
* static edges (``/tf_static``) hold at any time; dynamic edges (``/tf``) keep a history of
  ``cache_s`` seconds and are interpolated at the requested stamp (translation linearly,
  rotation by slerp); a stamp outside a dynamic edge's history is an error (no extrapolation),
  except stamp 0, which means "the latest", as in tf2;
* :meth:`TransformBuffer.lookup` walks both frames up to their common ancestor and composes
  the edges; when the chain is incomplete it raises :class:`TransformError` naming the
  missing link (the frame whose parent is unknown, or the edge whose history misses the
  stamp).

Results are :class:`~perception2d_ros.geometry.extrinsics.Extrinsics` (rotation + translation of the
source frame in the target frame), so ground positions and 3D objects use them directly.
"""
from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from perception2d_ros.geometry.extrinsics import (Extrinsics, _matrix_to_quaternion,
                                                  _quaternion_to_matrix)

__all__ = ["TransformBuffer", "TransformError", "slerp"]


class TransformError(LookupError):
    """No transform between two frames at a stamp; the message names the missing link."""


def _frame(name: str) -> str:
    return str(name).lstrip("/")


def _unit(q: Sequence[float], what: str) -> np.ndarray:
    q = np.asarray(q, np.float64).reshape(4)
    n = float(np.linalg.norm(q))
    if not math.isfinite(n) or n < 1e-9:
        raise ValueError(f"{what}: rotation quaternion {q.tolist()} is not a rotation "
                         "(zero or non-finite norm)")
    return q / n


def slerp(q0: np.ndarray, q1: np.ndarray, s: float) -> np.ndarray:
    """Spherical linear interpolation of unit quaternions ``[x, y, z, w]`` (shortest arc),
    ``s`` in [0, 1]."""
    q0, q1 = np.asarray(q0, np.float64), np.asarray(q1, np.float64)
    dot = float(np.dot(q0, q1))
    if dot < 0.0:
        q1, dot = -q1, -dot
    if dot > 0.9995:  # nearly parallel: lerp is exact to ~1e-8 and avoids 0/0
        q = q0 + s * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = math.acos(min(1.0, dot))
    sin_t = math.sin(theta)
    return (math.sin((1 - s) * theta) * q0 + math.sin(s * theta) * q1) / sin_t


@dataclass
class _Edge:
    parent: str
    static: bool
    # dynamic history, sorted by stamp: stamps (ns), translations (3,), quaternions (4,)
    stamps: list[int] = field(default_factory=list)
    translations: list[np.ndarray] = field(default_factory=list)
    quaternions: list[np.ndarray] = field(default_factory=list)


class TransformBuffer:
    """The TF tree of one process. Thread-safe: subscription callbacks add, a worker looks up.

    Args:
        cache_s: how long dynamic transforms are kept (seconds of stamp time behind the
            newest one of the same edge), as tf2's ``cache_time`` (default 10 s).
    """

    def __init__(self, cache_s: float = 10.0) -> None:
        if not (math.isfinite(cache_s) and cache_s > 0):
            raise ValueError(f"cache_s: {cache_s} must be > 0")
        self.cache_ns = int(cache_s * 1e9)
        self._edges: dict[str, _Edge] = {}
        self._cond = threading.Condition()

    # ------------------------------------------------------------------ input
    def set_transform(self, parent: str, child: str, stamp_ns: int,
                      translation: Sequence[float], quaternion_xyzw: Sequence[float],
                      static: bool = False) -> None:
        """Add the pose of ``child`` in ``parent`` (a ``TransformStamped``). A static edge
        replaces any earlier one of the same child; a dynamic sample joins its history.
        Raises ValueError for a non-finite or degenerate transform or a self-loop."""
        parent, child = _frame(parent), _frame(child)
        what = f"transform {parent or '?'} -> {child or '?'}"
        if not parent or not child:
            raise ValueError(f"{what}: header.frame_id and child_frame_id must be non-empty")
        if parent == child:
            raise ValueError(f"{what}: a frame cannot be its own parent")
        t = np.asarray(translation, np.float64).reshape(3)
        if not np.isfinite(t).all():
            raise ValueError(f"{what}: translation {t.tolist()} is not finite")
        q = _unit(quaternion_xyzw, what)
        with self._cond:
            edge = self._edges.get(child)
            if static or edge is None or edge.parent != parent or edge.static != static:
                edge = _Edge(parent, static)
                self._edges[child] = edge
            if static:
                edge.stamps, edge.translations, edge.quaternions = [int(stamp_ns)], [t], [q]
            else:
                i = bisect.bisect_left(edge.stamps, int(stamp_ns))
                if i < len(edge.stamps) and edge.stamps[i] == int(stamp_ns):
                    edge.translations[i], edge.quaternions[i] = t, q
                else:
                    edge.stamps.insert(i, int(stamp_ns))
                    edge.translations.insert(i, t)
                    edge.quaternions.insert(i, q)
                cut = bisect.bisect_left(edge.stamps, edge.stamps[-1] - self.cache_ns)
                if cut:
                    del edge.stamps[:cut], edge.translations[:cut], edge.quaternions[:cut]
            self._cond.notify_all()

    def set_transforms(self, transforms: Iterable[object], static: bool = False) -> int:
        """Add ``geometry_msgs/TransformStamped``-shaped objects (a ``TFMessage``'s
        ``transforms``; rclpy or rosbags messages). Returns how many were added; a bad one
        raises ValueError naming its frames after the good ones before it were added."""
        n = 0
        for ts in transforms:
            h, tr = ts.header, ts.transform  # type: ignore[attr-defined]
            stamp = int(h.stamp.sec) * 1_000_000_000 + int(h.stamp.nanosec)
            v, r = tr.translation, tr.rotation
            self.set_transform(h.frame_id, ts.child_frame_id,  # type: ignore[attr-defined]
                               stamp, (v.x, v.y, v.z), (r.x, r.y, r.z, r.w), static)
            n += 1
        return n

    def clear(self) -> None:
        with self._cond:
            self._edges.clear()

    @property
    def frames(self) -> list[str]:
        """Every frame named by a transform (children and parents), sorted."""
        with self._cond:
            names = set(self._edges) | {e.parent for e in self._edges.values()}
        return sorted(names)

    # ------------------------------------------------------------------ lookup
    def _chain(self, frame: str) -> list[str]:
        chain = [frame]
        while chain[-1] in self._edges:
            nxt = self._edges[chain[-1]].parent
            if nxt in chain:  # a loop in the published tree
                raise TransformError(f"TF loop: {' -> '.join(chain + [nxt])}")
            chain.append(nxt)
        return chain

    def _edge_at(self, child: str, stamp_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """Rotation matrix and translation of ``child`` in its parent at ``stamp_ns``."""
        e = self._edges[child]
        if e.static or stamp_ns == 0:
            return _quaternion_to_matrix(e.quaternions[-1], "tf"), e.translations[-1]
        s = e.stamps
        if not s[0] <= stamp_ns <= s[-1]:
            when = "before the oldest" if stamp_ns < s[0] else "after the newest"
            raise TransformError(
                f"TF link {e.parent} -> {child} (/tf) has no transform at {stamp_ns} ns: "
                f"{when} one it holds ([{s[0]}, {s[-1]}] ns; no extrapolation)")
        i = bisect.bisect_left(s, stamp_ns)
        if s[i] == stamp_ns:
            return _quaternion_to_matrix(e.quaternions[i], "tf"), e.translations[i]
        a = (stamp_ns - s[i - 1]) / (s[i] - s[i - 1])
        t = (1 - a) * e.translations[i - 1] + a * e.translations[i]
        q = slerp(e.quaternions[i - 1], e.quaternions[i], a)
        return _quaternion_to_matrix(q, "tf"), t

    def lookup(self, target: str, source: str, stamp_ns: int = 0) -> Extrinsics:
        """The pose of ``source`` in ``target`` at ``stamp_ns`` (tf2's
        ``lookupTransform(target, source, time)``): ``rotation`` maps ``source`` vectors into
        ``target``, ``translation`` is ``source``'s origin in ``target``. Stamp 0 = latest.

        Raises TransformError naming the missing link when the frames are not connected or
        a dynamic link has no data at the stamp."""
        target, source = _frame(target), _frame(source)
        if not target or not source:
            raise TransformError(f"TF lookup {target or '?'} <- {source or '?'}: empty frame "
                                 "name (is the image header.frame_id set?)")
        with self._cond:
            if target == source:
                return Extrinsics(target, np.zeros(3), np.eye(3), source)
            up_src, up_tgt = self._chain(source), self._chain(target)
            common = next((f for f in up_src if f in set(up_tgt)), None)
            if common is None:
                raise TransformError(self._missing(target, source, up_tgt, up_src))
            # source -> common and target -> common, each a product of parent <- child edges
            r_sc, t_sc = self._compose(up_src[:up_src.index(common)], stamp_ns)
            r_tc, t_tc = self._compose(up_tgt[:up_tgt.index(common)], stamp_ns)
        # target <- source = (common <- target)^-1 (common <- source)
        rot = r_tc.T @ r_sc
        trans = r_tc.T @ (t_sc - t_tc)
        return Extrinsics(target, trans, _orthonormal(rot), source)

    def _compose(self, frames: list[str], stamp_ns: int) -> tuple[np.ndarray, np.ndarray]:
        """Pose of ``frames[0]`` in the parent of ``frames[-1]`` (frames walk upwards)."""
        rot, trans = np.eye(3), np.zeros(3)
        for child in frames:  # p <- child composed onto child <- frames[0]
            r, t = self._edge_at(child, stamp_ns)
            rot, trans = r @ rot, r @ trans + t
        return rot, trans

    def _missing(self, target: str, source: str, up_tgt: list[str], up_src: list[str]) -> str:
        known = set(self._edges) | {e.parent for e in self._edges.values()}
        parts = []
        for name, chain in (("source", up_src), ("target", up_tgt)):
            top = chain[-1]
            if top not in known:
                parts.append(f"no transform names frame '{top}'")
            else:
                parts.append(f"the chain from '{chain[0]}' ends at '{top}' "
                             f"({' -> '.join(reversed(chain))})")
        return (f"TF: no chain {target} <- {source}: missing link between '{up_tgt[-1]}' and "
                f"'{up_src[-1]}' (" + "; ".join(parts) + "); published frames: "
                + (", ".join(sorted(known)) or "none yet"))

    def wait_lookup(self, target: str, source: str, stamp_ns: int,
                    timeout_s: float) -> Extrinsics:
        """:meth:`lookup`, retried as transforms arrive for up to ``timeout_s`` (an image can
        arrive before the ``/tf`` sample after its stamp). Raises the last TransformError."""
        import time

        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            try:
                return self.lookup(target, source, stamp_ns)
            except TransformError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                with self._cond:
                    self._cond.wait(min(left, 0.05))


def _orthonormal(r: np.ndarray) -> np.ndarray:
    """Re-orthonormalise a composed rotation (rounding over long chains) via its quaternion."""
    return _quaternion_to_matrix(_matrix_to_quaternion(r), "tf")
