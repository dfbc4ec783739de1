"""Tracking: per-frame cost and accuracy on real clips (no ROS).

    .venv/bin/python benchmarks/eval_tracking.py --out docs/results/tracking_cpu.json

1. Cost: ``ByteTracker.update`` and the whole ``track`` stage (update + filtering the
   detections + id strings) per frame with 50 boxes (50 objects moving at constant velocity,
   1 px box noise, scores uniform in [0.2, 0.95], 300 frames), then per frame on the real clips.
2. CLEAR MOT (MOTA, IDF1, ID switches; py-motmetrics) on the Apollo front-camera clip
   (test/data/realcam/tracking/apollo_obstacle_960, 21 frames). Its det_gt.txt has boxes but
   no identities; every frame has exactly one box of class 0 (the minivan ahead) and one of
   class 1 (the box truck further on), so within this clip the class *is* the identity —
   that is the ground truth used. Matching: IoU ≥ 0.5.
3. Proxy checks with no ground truth, on the Udacity highway clip (38 frames) and on Apollo:
   each real vehicle keeps one id across the clip; unique ids vs vehicles present. Udacity:
   two cars (black, left of x=490 px at 640 wide; white, right of it) are in every frame
   (checked by eye); a tracked box of a near car (height ≥ 30 px) on that side belongs to
   it. Apollo: the minivan = the GT class-0 box (IoU ≥ 0.5).

Detections: the shipped yolox_nano (ONNX Runtime, CPU) with ``detect.conf_threshold`` 0.1
(so ByteTrack's low-score association has its boxes) and the default ``track.*``.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "test" / "data" / "realcam" / "tracking"
sys.path.insert(0, str(ROOT))


def cost_50_boxes(frames: int = 300, n: int = 50, seed: int = 0) -> dict[str, Any]:
    from perception2d_ros.models.detections import Detections
    from perception2d_ros.pipeline.frame import Frame
    from perception2d_ros.models.tracking.stage import TrackStage
    from perception2d_ros.models.tracking.bytetrack import ByteTracker

    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1800, (n, 2))
    wh = rng.uniform(20, 120, (n, 2))
    vel = rng.normal(0, 3, (n, 2))
    seq = []
    for f in range(frames):
        c = xy + vel * f
        boxes = np.concatenate([c, c + wh], 1) + rng.normal(0, 1, (n, 4))
        seq.append((boxes.astype(np.float32), rng.uniform(0.2, 0.95, n).astype(np.float32)))
    tracker = ByteTracker()
    t_update = []
    for boxes, scores in seq:
        t0 = time.perf_counter()
        tracker.update(boxes, scores, np.zeros(n, np.int64))
        t_update.append(time.perf_counter() - t0)
    stage = TrackStage()
    t_stage = []
    for i, (boxes, scores) in enumerate(seq):
        frame = Frame(np.zeros((1, 1), np.uint8), "mono8", i, "cam")
        frame.detections = Detections(boxes, scores, np.zeros(n, np.int64), ["car"] * n)
        t0 = time.perf_counter()
        stage.process(frame)
        t_stage.append(time.perf_counter() - t0)
    warm = 5  # the first frames import lap and allocate
    return {"boxes": n, "frames": frames, "update_ms": _ms(t_update[warm:]),
            "stage_ms": _ms(t_stage[warm:]), "tracks_at_end": len(tracker)}


def _ms(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"p50": round(float(np.median(a)), 4), "p95": round(float(np.percentile(a, 95)), 4),
            "mean": round(float(a.mean()), 4)}


def run_clip(images: list[Path], detector: Any) -> tuple[list[dict[str, Any]], list[float]]:
    """Detect + track every image; per frame the tracked boxes with ids."""
    import cv2

    from perception2d_ros.pipeline.frame import Frame
    from perception2d_ros.models.tracking.stage import TrackStage

    stage = TrackStage()
    out, cost = [], []
    for i, path in enumerate(images):
        frame = Frame(np.zeros((1, 1), np.uint8), "mono8", i, "cam")
        frame.detections = detector.detect(cv2.imread(str(path)))
        raw = [[round(float(v), 1) for v in b] for b in frame.detections.xyxy]
        stage.process(frame)
        cost.append(frame.timings["track"])
        out.append({"image": path.name, "raw_xyxy": raw,
                    "tracked": [{"id": tid, "class": n, "score": round(float(s), 3),
                                 "xyxy": [round(float(v), 1) for v in b]}
                                for tid, n, s, b in zip(frame.track_ids,
                                                        frame.detections.class_names,
                                                        frame.detections.scores,
                                                        frame.detections.xyxy)]})
    return out, cost


def apollo_gt(scale: float = 0.5) -> dict[str, list[tuple[int, np.ndarray]]]:
    """stamp → [(identity, xyxy in the 960x540 frames)]; identity = GT class (see doc)."""
    lines = (DATA / "apollo_obstacle_960" / "det_gt.txt").read_text().split("\n")
    gt: dict[str, list[tuple[int, np.ndarray]]] = {}
    i = 0
    while i < len(lines) and lines[i].strip():
        stamp, n = lines[i].split()
        rows = []
        for r in lines[i + 1:i + 1 + int(n)]:
            x, y, w, h, c = (float(v) for v in r.split())
            rows.append((int(c), np.array([x, y, x + w, y + h]) * scale))
        classes = [c for c, _ in rows]
        if len(set(classes)) != len(classes):
            raise ValueError(f"det_gt.txt {stamp}: a class twice; it cannot be the identity")
        gt[stamp] = rows
        i += 1 + int(n)
    return gt


def mot_metrics(frames: list[dict[str, Any]], gt: dict[str, list]) -> dict[str, Any]:
    import motmetrics as mm

    acc = mm.MOTAccumulator(auto_id=True)
    for f in frames:
        g = gt[Path(f["image"]).stem]
        gb = np.array([b for _, b in g]).reshape(-1, 4)
        hb = np.array([t["xyxy"] for t in f["tracked"]]).reshape(-1, 4)
        # motmetrics' own iou_matrix calls np.asfarray (gone in NumPy 2): same distance here,
        # 1 - IoU, NaN (no match possible) where IoU < 0.5
        from perception2d_ros.models.tracking.bytetrack import iou_matrix

        dist = 1.0 - iou_matrix(gb, hb)
        dist[dist > 0.5] = np.nan
        acc.update([c for c, _ in g], [t["id"] for t in f["tracked"]], dist)
    mh = mm.metrics.create()
    names = ["num_frames", "mota", "motp", "idf1", "num_switches", "num_false_positives",
             "num_misses", "num_objects", "num_unique_objects", "mostly_tracked",
             "recall", "precision"]
    s = mh.compute(acc, metrics=names, name="apollo")
    return {k: (round(float(v), 4) if isinstance(v, float) else int(v))
            for k, v in s.loc["apollo"].to_dict().items()}


def ids_of(frames: list[dict[str, Any]], pick: Any) -> dict[str, Any]:
    """The ids given to one real object (``pick(frame_index, tracked) -> bool``)."""
    ids, seen = [], 0
    for i, f in enumerate(frames):
        mine = [t["id"] for t in f["tracked"] if pick(i, t)]
        ids += mine
        seen += bool(mine)
    return {"ids": sorted(set(ids), key=int), "frames_with_id": seen,
            "one_id": len(set(ids)) == 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = ap.parse_args()

    from perception2d_ros.bench.common import machine_info
    from perception2d_ros.engines.factory import EngineConfig
    from perception2d_ros.models.tracking.bytetrack import DEFAULTS
    from perception2d_ros.models.yolo.detector import YoloDetector

    print("cost: 50 boxes x 300 frames ...", file=sys.stderr)
    cost = cost_50_boxes()
    detector = YoloDetector.from_model("yolox_nano", engine_config=EngineConfig(
        backend="onnxruntime", device="cpu"), conf=0.1, iou=0.45, max_det=100)
    print("apollo clip ...", file=sys.stderr)
    apollo, apollo_cost = run_clip(sorted((DATA / "apollo_obstacle_960").glob("*.jpg")),
                                   detector)
    gt = apollo_gt()
    from perception2d_ros.models.tracking.bytetrack import iou_matrix

    def minivan(i: int, t: dict[str, Any]) -> bool:
        g = dict(gt[Path(apollo[i]["image"]).stem])[0]
        return iou_matrix(g[None], np.array(t["xyxy"])[None])[0, 0] >= 0.5

    print("udacity clip ...", file=sys.stderr)
    udacity, udacity_cost = run_clip(sorted((DATA / "udacity_highway_640").glob("*.jpg")),
                                     detector)

    def near(side: str) -> Any:
        def pick(i: int, t: dict[str, Any]) -> bool:
            x1, y1, x2, y2 = t["xyxy"]
            cx = (x1 + x2) / 2
            return y2 - y1 >= 30 and ((cx < 490) if side == "left" else (cx >= 490))
        return pick

    all_ids = lambda frames: sorted({t["id"] for f in frames for t in f["tracked"]},  # noqa
                                    key=int)
    result = {
        "what": "ByteTrack-style tracker (perception2d_ros.models.tracking.bytetrack): cost per frame "
                "and accuracy on real clips",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "versions": _versions(),
        "track_params": DEFAULTS,
        "detector": "yolox_nano, onnxruntime cpu, conf_threshold 0.1, iou 0.45",
        "cost_50_boxes": cost,
        "cost_real_ms": {"apollo": _ms(apollo_cost[2:]), "udacity": _ms(udacity_cost[2:])},
        "apollo": {
            "frames": len(apollo),
            "gt_identity": "class of the det_gt.txt box (one box per class per frame)",
            "clear_mot": mot_metrics(apollo, gt),
            "detector_recall_iou50": detector_recall(apollo, gt),
            "minivan": ids_of(apollo, minivan),
            "unique_ids": all_ids(apollo),
            "vehicles_in_gt": 2,
        },
        "udacity": {
            "frames": len(udacity),
            "black_car_left": ids_of(udacity, near("left")),
            "white_car_right": ids_of(udacity, near("right")),
            "unique_ids": all_ids(udacity),
            "near_vehicles_present": 2,
        },
        "per_frame": {"apollo": apollo, "udacity": udacity},
    }
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    summary = {k: v for k, v in result.items() if k != "per_frame"}
    print(json.dumps(summary, indent=1))


def detector_recall(frames: list[dict[str, Any]], gt: dict[str, list]) -> dict[str, float]:
    """Share of frames in which the detector (any score >= 0.1) has a box at IoU >= 0.5
    with each GT object: the ceiling for the tracker's recall."""
    from perception2d_ros.models.tracking.bytetrack import iou_matrix

    hit: dict[int, int] = {}
    for f in frames:
        raw = np.array(f["raw_xyxy"]).reshape(-1, 4)
        for ident, b in gt[Path(f["image"]).stem]:
            ok = len(raw) and iou_matrix(b[None], raw).max() >= 0.5
            hit[ident] = hit.get(ident, 0) + bool(ok)
    return {f"gt_{k}": round(v / len(frames), 3) for k, v in sorted(hit.items())}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("numpy", "lap", "motmetrics", "onnxruntime", "opencv-python-headless"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


if __name__ == "__main__":
    main()
