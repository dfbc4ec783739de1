"""The ``make demo`` sequence: a real camera's frames, calibration, TF chain and 2D ground
truth, described by ``config/demo.yaml`` — and the ground-truth check of the demo's output.

ROS-free: plain YAML/numpy. The demo turns a :class:`Sequence` into a robot-like bag
(``perception2d_ros.demo.inputs``) and compares the recorded detections with :func:`gt_recall`
(``perception2d_ros.demo.summary``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Sequence", "StaticTransform", "compose", "find_demo_config", "gt_recall",
           "load_sequence", "map_boxes_raw_to_rect", "package_root", "read_camera_info_dump",
           "read_ground_truth", "read_transform_dump"]


def package_root() -> Path:
    """Where ``config/`` and ``data/`` are: the source checkout, else the installed share."""
    src = Path(__file__).resolve().parents[2]
    if (src / "config" / "demo.yaml").is_file():
        return src
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("perception2d"))


def find_demo_config() -> Path:
    """``config/demo.yaml`` of the source checkout or the installed package."""
    return package_root() / "config" / "demo.yaml"


@dataclass(frozen=True)
class StaticTransform:
    """One ``/tf_static`` link: pose of ``child`` in ``parent`` (translation m, quaternion
    ``[x, y, z, w]``)."""

    parent: str
    child: str
    translation: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    source: str = ""

    def matrix(self) -> np.ndarray:
        """4x4 homogeneous transform child -> parent."""
        from perception2d_ros.geometry.extrinsics import _quaternion_to_matrix

        m = np.eye(4)
        m[:3, :3] = _quaternion_to_matrix(self.rotation, f"{self.parent}->{self.child} rotation")
        m[:3, 3] = self.translation
        return m


def compose(chain: Seq[StaticTransform], parent: str, child: str) -> np.ndarray:
    """4x4 pose of ``child`` in ``parent`` from a chain of links listed parent-first.

    Raises:
        ValueError: the links do not connect ``parent`` to ``child``.
    """
    by_child = {t.child: t for t in chain}
    m = np.eye(4)
    frame = child
    while frame != parent:
        link = by_child.get(frame)
        if link is None:
            raise ValueError(f"no TF link ends in {frame!r} on the way from {parent!r} to "
                             f"{child!r} (links: {[(t.parent, t.child) for t in chain]})")
        m = link.matrix() @ m
        frame = link.parent
    return m


def read_transform_dump(path: Path) -> StaticTransform:
    """A ``geometry_msgs/TransformStamped`` dump (``rostopic echo`` / ``ros2 topic echo``:
    ``header.frame_id``, ``child_frame_id``, ``transform.translation`` / ``rotation``)."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    try:
        tr, rot = doc["transform"]["translation"], doc["transform"]["rotation"]
        return StaticTransform(
            str(doc["header"]["frame_id"]), str(doc["child_frame_id"]),
            (float(tr["x"]), float(tr["y"]), float(tr["z"])),
            (float(rot["x"]), float(rot["y"]), float(rot["z"]), float(rot["w"])),
            source=str(path))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a TransformStamped dump (missing {exc})") from None


def read_camera_info_dump(path: Path) -> dict[str, Any]:
    """The calibration file (any layout ``CameraModel.from_yaml`` reads: camera_calibration
    YAML, ROS 1 or ROS 2 CameraInfo dump) as a CameraInfo dict (lowercase fields)."""
    from perception2d_ros.geometry.camera import CameraModel

    return dict(CameraModel.from_yaml(path).to_camera_info_dict())


def read_ground_truth(path: Path, stamps: Iterable[int]) -> dict[int, np.ndarray]:
    """Apollo ``det_gt.txt`` (per frame: ``stamp count`` then ``count`` rows ``x y w h class``)
    -> ``{stamp_ns: (N, 5) [x1, y1, x2, y2, class]}`` for the frames in ``stamps`` only (the
    file interleaves the rows of two cameras)."""
    wanted = set(int(s) for s in stamps)
    out: dict[int, np.ndarray] = {}
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    i = 0
    while i < len(lines):
        stamp, count = int(lines[i][0]), int(lines[i][1])
        rows = [[float(v) for v in r[:5]] for r in lines[i + 1:i + 1 + count]]
        i += 1 + count
        if stamp in wanted:
            arr = np.array(rows, np.float64).reshape(-1, 5)
            arr[:, 2] += arr[:, 0]
            arr[:, 3] += arr[:, 1]
            out[stamp] = arr
    return out


@dataclass
class Sequence:
    """The demo sequence as ``config/demo.yaml`` describes it (paths resolved)."""

    root: Path
    images: list[Path]
    stamps: list[int]
    calibration: Path
    camera_info: dict[str, Any]
    namespace: str
    camera_frame: str
    base_frame: str
    tf_static: list[StaticTransform]
    ground_truth: Path | None
    vehicle_classes: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    config: Path | None = None

    @property
    def rate_hz(self) -> float:
        """Mean frame rate from the stamps."""
        if len(self.stamps) < 2:
            return 10.0
        return (len(self.stamps) - 1) / ((self.stamps[-1] - self.stamps[0]) / 1e9)

    def extrinsics(self) -> Any:
        """:class:`~perception2d_ros.geometry.extrinsics.Extrinsics` of the camera optical frame in
        ``base_frame``, composed from ``tf_static``."""
        from perception2d_ros.geometry.extrinsics import Extrinsics

        m = compose(self.tf_static, self.base_frame, self.camera_frame)
        return Extrinsics(self.base_frame, m[:3, 3], m[:3, :3], self.camera_frame)


def load_sequence(config: Path | None = None) -> Sequence:
    """Read ``config/demo.yaml`` (or ``config``) and the files it names.

    Raises:
        ValueError / FileNotFoundError: naming the file and the key.
    """
    import yaml

    config = Path(config) if config else find_demo_config()
    doc = yaml.safe_load(config.read_text()) or {}
    base = package_root() if not doc.get("sequence", "").startswith("/") else Path("/")
    root = (base / doc["sequence"]).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{config}: sequence directory {root} does not exist")
    image_dir = root / doc.get("images", "images")
    images = sorted(p for p in image_dir.glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"{config}: no *.jpg in {image_dir}")
    try:
        stamps = [int(p.stem) for p in images]
    except ValueError:
        raise ValueError(f"{image_dir}: image file names must be stamps in ns") from None
    calibration = root / doc["calibration"]
    chain: list[StaticTransform] = []
    for i, link in enumerate(doc.get("tf_static") or []):
        if "file" in link:
            chain.append(read_transform_dump(root / link["file"]))
            continue
        try:
            chain.append(StaticTransform(str(link["parent"]), str(link["child"]),
                                         tuple(float(v) for v in link["translation"]),
                                         tuple(float(v) for v in link["rotation"]),
                                         source=str(config)))
        except KeyError as exc:
            raise ValueError(f"{config}: tf_static[{i}] lacks {exc}") from None
    gt = doc.get("ground_truth")
    return Sequence(
        root=root, images=images, stamps=stamps, calibration=calibration,
        camera_info=read_camera_info_dump(calibration),
        namespace=str(doc.get("namespace", "/camera")),
        camera_frame=str(doc["camera_frame"]), base_frame=str(doc.get("base_frame", "base_link")),
        tf_static=chain, ground_truth=(root / gt) if gt else None,
        vehicle_classes=[str(c) for c in doc.get("vehicle_classes", ["car", "truck", "bus"])],
        params=dict(doc.get("params") or {}), config=config)


# ------------------------------------------------------------------------ ground truth check
def map_boxes_raw_to_rect(camera: Any, boxes: np.ndarray, samples: int = 16) -> np.ndarray:
    """Boxes ``(N, 4+)`` ``[x1, y1, x2, y2, …]`` in raw pixels -> the axis-aligned boxes
    enclosing their outlines in rectified pixels (each edge sampled at ``samples`` points
    and undistorted through the calibration); extra columns are kept."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, boxes.shape[-1] if len(boxes) else 4)
    out = boxes.copy()
    t = np.linspace(0.0, 1.0, samples)
    for i, b in enumerate(boxes):
        x1, y1, x2, y2 = b[:4]
        xs = np.concatenate([x1 + (x2 - x1) * t, np.full(samples, x2),
                             x1 + (x2 - x1) * t, np.full(samples, x1)])
        ys = np.concatenate([np.full(samples, y1), y1 + (y2 - y1) * t,
                             np.full(samples, y2), y1 + (y2 - y1) * t])
        pts = camera.undistort_points(np.stack([xs, ys], axis=1))
        out[i, :4] = [np.nanmin(pts[:, 0]), np.nanmin(pts[:, 1]),
                      np.nanmax(pts[:, 0]), np.nanmax(pts[:, 1])]
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of boxes ``a (N, 4)`` and ``b (M, 4)`` (xyxy)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:4] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:4] - b[:, :2], axis=1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def gt_recall(
    gt: Mapping[int, np.ndarray],
    detections: Mapping[int, tuple[np.ndarray, Seq[str], np.ndarray]],
    vehicle_classes: Iterable[str],
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """Recall of the ground-truth boxes at ``iou_threshold``.

    Per frame, detections of a vehicle class are matched one-to-one to GT boxes greedily in
    descending score order (each takes the unmatched GT box of highest IoU ≥ the threshold,
    as the COCO evaluation does). GT and detection boxes must be in the same pixels.

    Args:
        gt: ``{stamp: (N, 5) [x1, y1, x2, y2, class]}``.
        detections: ``{stamp: (xyxy (M, 4), class names, scores (M,))}``.
        vehicle_classes: detector class names that count as vehicles.

    Returns:
        ``{"iou_threshold", "gt_boxes", "matched", "recall", "per_object": [...],
        "matches": {stamp: [(gt index, detection index, iou), …]}}``; ``per_object`` groups
        the GT boxes by their row order in the file (the same physical object in every
        frame of this sequence), each with its mean size, matches and recall.
    """
    vehicles = set(vehicle_classes)
    total = matched = 0
    per_row: dict[int, dict[str, Any]] = {}
    matches: dict[int, list[tuple[int, int, float]]] = {}
    for stamp, g in sorted(gt.items()):
        xyxy, names, scores = detections.get(stamp, (np.zeros((0, 4)), [], np.zeros(0)))
        keep = [i for i, n in enumerate(names) if n in vehicles]
        iou = _iou(np.asarray(g[:, :4]), np.asarray(xyxy, np.float64).reshape(-1, 4)[keep])
        taken: set[int] = set()
        frame_matches = []
        for j in np.argsort([-scores[k] for k in keep], kind="stable"):
            cand = [(iou[i, j], i) for i in range(len(g))
                    if i not in taken and iou[i, j] >= iou_threshold]
            if cand:
                best, i = max(cand)
                taken.add(i)
                frame_matches.append((int(i), int(keep[j]), float(best)))
        matches[stamp] = frame_matches
        total += len(g)
        matched += len(taken)
        for i, row in enumerate(g):
            rec = per_row.setdefault(i, {"gt_class": int(row[4]), "frames": 0, "matched": 0,
                                         "sizes": []})
            rec["frames"] += 1
            rec["matched"] += int(i in taken)
            rec["sizes"].append((row[2] - row[0], row[3] - row[1]))
    per_object = []
    for i, rec in sorted(per_row.items()):
        w, h = np.mean(rec.pop("sizes"), axis=0)
        per_object.append({"row": i, **rec, "mean_size_px": [round(float(w), 1),
                                                             round(float(h), 1)],
                           "recall": rec["matched"] / rec["frames"]})
    return {"iou_threshold": iou_threshold, "gt_boxes": total, "matched": matched,
            "recall": matched / total if total else math.nan, "per_object": per_object,
            "matches": matches}
