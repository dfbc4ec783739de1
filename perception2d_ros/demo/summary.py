"""The demo's results, read back from its input and output bags: per-frame detections,
ground distances and tracks, the nodes' latency from /diagnostics, the recall of the
sequence's ground-truth vehicles, and every frame drawn (annotated PNGs, contact sheet, plot).
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

VEHICLE_DEFAULT = ["car", "truck", "bus"]


def _decode_image(msg: Any, kind: str) -> np.ndarray:
    """A bag's Image or CompressedImage as bgr8 (for drawing)."""
    from perception2d_ros.io.image_codec import convert, decode_compressed, to_bgr8

    if kind.endswith("CompressedImage"):
        img, enc = decode_compressed(msg.format, msg.data)
        return img if enc == "bgr8" else convert(img, enc, "bgr8")
    return to_bgr8(msg)


def _stamp(msg: Any) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


def summarize(in_bag: Path, out_bag: Path, out_dir: Path, cam: dict[str, Any],
              params: dict[str, Any], missing: dict[str, str], notes: list[str],
              seq: Any = None, extr: Any = None
              ) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """Read both bags, draw every frame, check against the GT. Returns the summary dict and
    the annotated frames (name, 1600 px wide copy) for the HTML report."""
    import cv2
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm

    from perception2d_ros.io.bag_reader import BagReader

    from perception2d_ros.io.bag_types import find_interface_dirs
    from perception2d_ros.geometry.camera import CameraModel
    from perception2d_ros.demo.report import (FrameView, annotate_frame, contact_sheet,
                                                   plot_summary)
    from perception2d_ros.demo.sequence import (gt_recall, map_boxes_raw_to_rect,
                                                     read_ground_truth)

    ns = cam["ns"].rstrip("/")
    raw_msgs: dict[int, Any] = {}
    camera = None
    with BagReader(in_bag, msg_dirs=find_interface_dirs()) as reader:
        for topic, _, msg in reader.decoded([cam["image_topic"], cam["camera_info"]]):
            if topic == cam["camera_info"]:
                if camera is None:
                    camera = CameraModel.from_camera_info(msg)
            else:
                raw_msgs[_stamp(msg)] = msg
    rect: dict[int, Any] = {}
    dets: dict[int, Any] = {}
    ground: dict[int, Any] = {}
    diag: dict[str, dict[str, str]] = {}
    objects_frames = 0
    with BagReader(out_bag, msg_dirs=find_interface_dirs()) as reader:
        for topic, _, msg in reader.decoded():
            if topic == f"{ns}/image_rect":
                rect[_stamp(msg)] = msg
            elif topic == f"{ns}/detections":
                dets[_stamp(msg)] = msg
            elif topic == f"{ns}/detections/ground":
                ground[_stamp(msg)] = msg
            elif topic == f"{ns}/detections/objects":
                objects_frames += 1
            elif topic == "/diagnostics":
                for st in msg.status:
                    if st.name.startswith("perception2d"):
                        diag[st.name] = {kv.key: kv.value for kv in st.values}
    tracking = "track" in params["stages"]
    gt = {}
    if seq is not None and seq.ground_truth is not None and seq.ground_truth.is_file():
        gt = read_ground_truth(seq.ground_truth, raw_msgs)
    vehicles = seq.vehicle_classes if seq is not None else VEHICLE_DEFAULT
    per_class: Counter[str] = Counter()
    per_frame: list[dict[str, int]] = []
    frames_json: list[dict[str, Any]] = []
    views: list[FrameView] = []
    det_boxes: dict[int, tuple[np.ndarray, list[str], np.ndarray]] = {}
    tracks: dict[str, dict[str, Any]] = {}
    rectified = "rectify" in params["stages"] and camera is not None
    for i, stamp in enumerate(sorted(raw_msgs)):
        d = dets.get(stamp)
        items = list(d.detections) if d is not None else []
        names = [det.results[0].hypothesis.class_id if det.results else "?" for det in items]
        scores = [float(det.results[0].hypothesis.score) if det.results else 0.0
                  for det in items]
        xyxy = np.array([[det.bbox.center.position.x - det.bbox.size_x / 2,
                          det.bbox.center.position.y - det.bbox.size_y / 2,
                          det.bbox.center.position.x + det.bbox.size_x / 2,
                          det.bbox.center.position.y + det.bbox.size_y / 2]
                         for det in items], np.float64).reshape(-1, 4)
        det_boxes[stamp] = (xyxy, names, np.array(scores))
        per_class.update(names)
        per_frame.append(dict(Counter(names)))
        g = ground.get(stamp)
        positions = list(g.positions) if g is not None else []
        labels, rows = [], []
        for j, det in enumerate(items):
            pos = positions[j] if j < len(positions) else None
            dist = (float(np.hypot(pos.position.x, pos.position.y))
                    if pos is not None and pos.valid else None)
            tid = str(det.id) if tracking and det.id else None
            parts = ([f"#{tid}"] if tid else []) + ([f"{dist:.1f} m"] if dist else [])
            labels.append(" ".join(parts))
            rows.append({"class": names[j], "score": round(scores[j], 3), "id": str(det.id),
                         "box_xyxy": [round(float(v), 1) for v in xyxy[j]],
                         "ground_xyz": ([round(pos.position.x, 2), round(pos.position.y, 2),
                                         round(pos.position.z, 2)] if pos is not None
                                        and pos.valid else None),
                         "distance_m": round(dist, 2) if dist else None})
            if tid:
                t = tracks.setdefault(tid, {"id": tid, "class": names[j], "frames": 0,
                                            "distances": []})
                t["frames"] += 1
                if dist:
                    t["distances"].append((i, dist))
        frames_json.append({"index": i, "stamp_ns": stamp, "detections": rows,
                            "ground": g is not None})
        gt_raw = gt.get(stamp)
        views.append(FrameView(
            index=i, stamp_ns=stamp, raw=None, rect=None, xyxy=xyxy, names=names,
            scores=scores, labels=labels,
            xyxy_raw=(_boxes_rect_to_raw(camera, xyxy) if rectified and len(xyxy) else None),
            gt_raw=gt_raw,
            gt_rect=(map_boxes_raw_to_rect(camera, gt_raw) if rectified and gt_raw is not None
                     else None)))
    # ground-truth recall, in the pixels of the published boxes
    recall = None
    if gt:
        gt_cmp = ({s: map_boxes_raw_to_rect(camera, b) for s, b in gt.items()} if rectified
                  else gt)
        recall = gt_recall(gt_cmp, det_boxes, vehicles)
        recall["compared_in"] = ("rectified pixels: GT boxes (raw pixels) mapped through the "
                                 "calibration, each outline undistorted" if rectified
                                 else "raw pixels")
        recall["vehicle_classes"] = list(vehicles)
        recall["matches"] = {str(k): v for k, v in recall["matches"].items()}
    # pictures: decode, draw, write (two threads: cv2 releases the GIL)
    png_dir = out_dir / "annotated"
    png_dir.mkdir(exist_ok=True)
    for old in png_dir.glob("*.png"):
        old.unlink()

    def render(view: FrameView) -> tuple[str, np.ndarray]:
        from perception2d_ros.io.image_codec import image_to_array

        view.raw = _decode_image(raw_msgs[view.stamp_ns], cam["type"])
        r = rect.get(view.stamp_ns)
        if r is not None:
            img = np.ascontiguousarray(image_to_array(r))
            view.rect = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        pic = annotate_frame(view, camera if rectified else None)
        name = f"frame_{view.index:03d}.png"
        cv2.imwrite(str(png_dir / name), pic, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        view.raw = view.rect = None
        small = cv2.resize(pic, (1600, round(pic.shape[0] * 1600 / pic.shape[1])),
                           interpolation=cv2.INTER_AREA)
        return name, small

    with ThreadPoolExecutor(2) as pool:
        pics = list(tqdm(pool.map(render, views), total=len(views), desc="report",
                         unit="frame", file=sys.stderr, leave=False))
    cv2.imwrite(str(out_dir / "contact_sheet.png"),
                contact_sheet([p for _, p in pics], columns=3, width=960))
    latency = _latency(diag)
    track_list = []
    for t in sorted(tracks.values(), key=lambda t: -t["frames"]):
        ds = t.pop("distances")
        t["distance_m"] = [round(ds[0][1], 2), round(ds[-1][1], 2)] if ds else None
        t["distance_per_frame"] = [[f, round(d, 2)] for f, d in ds]
        track_list.append(t)
    dist_plot = {t["id"]: [(f, d) for f, d in t["distance_per_frame"]]
                 for t in track_list if t["distance_per_frame"]}
    if not dist_plot and ground:  # no tracks: distance of each frame's nearest detection
        near = [(f["index"], min(r["distance_m"] for r in f["detections"] if r["distance_m"]))
                for f in frames_json if any(r["distance_m"] for r in f["detections"])]
        dist_plot = {"nearest": near} if near else {}
    cv2.imwrite(str(out_dir / "plot.png"), plot_summary(
        {k: (v["p50"], v["p95"]) for k, v in latency.items()}, per_frame, dist_plot))
    backend = next((v for d in diag.values() for k, v in d.items() if k.endswith(".backend")),
                   "unknown")
    summary: dict[str, Any] = {
        "input_bag": str(in_bag), "input_kind": f"{cam['type']} on {cam['image_topic']}",
        "output_bag": str(out_bag), "output_dir": str(out_dir),
        "frames_in": len(raw_msgs), "frames_out": len(dets), "image_rect": len(rect),
        "ground_frames": len(ground), "objects_frames": objects_frames,
        "dropped": sum(int(d.get("dropped_newest_wins", 0)) for d in diag.values()),
        "detections_per_class": dict(per_class.most_common()),
        "detections_per_frame": [sum(f.values()) for f in per_frame],
        "latency_ms": latency, "backend": backend,
        "model": str(params.get("detect.model", "yolox_nano")),
        "stages_run": list(params["stages"]), "stages_without_weights": missing,
        "notes": notes, "calibration": _calibration_json(camera, seq),
        "extrinsics": _extrinsics_json(params, seq, extr), "gt_recall": recall,
        "tracks": track_list, "frames": frames_json,
        "diagnostics_nodes": sorted(diag), "errors": {k: v for d in diag.values()
                                                      for k, v in d.items()
                                                      if k.startswith("errors.")},
    }
    return summary, pics


def _boxes_rect_to_raw(camera: Any, xyxy: np.ndarray, samples: int = 16) -> np.ndarray:
    """Rectified boxes -> boxes enclosing their outlines in raw pixels."""
    t = np.linspace(0.0, 1.0, samples)
    out = np.zeros((len(xyxy), 4))
    for i, (x1, y1, x2, y2) in enumerate(xyxy):
        xs = np.concatenate([x1 + (x2 - x1) * t, np.full(samples, x2),
                             x1 + (x2 - x1) * t, np.full(samples, x1)])
        ys = np.concatenate([np.full(samples, y1), y1 + (y2 - y1) * t,
                             np.full(samples, y2), y1 + (y2 - y1) * t])
        p = camera.distort_points(np.stack([xs, ys], axis=1))
        out[i] = [np.nanmin(p[:, 0]), np.nanmin(p[:, 1]), np.nanmax(p[:, 0]),
                  np.nanmax(p[:, 1])]
    return out


def _latency(diag: dict[str, dict[str, str]]) -> dict[str, dict[str, float]]:
    """Per-stage p50/p95 (ms) from the nodes' last /diagnostics, in pipeline order."""
    out: dict[str, dict[str, float]] = {}
    for values in diag.values():
        for key, value in values.items():
            for q in ("p50", "p95"):
                if key.endswith(f"_ms_{q}"):
                    out.setdefault(key[: -len(f"_ms_{q}")], {})[q] = float(value)
    order = ["decode", "rectify", "detect", "track", "sam", "clip", "lseg", "total",
             "receive_to_publish"]
    return dict(sorted(((k, v) for k, v in out.items() if "p50" in v and "p95" in v),
                       key=lambda kv: order.index(kv[0]) if kv[0] in order else 50))


def _calibration_json(camera: Any, seq: Any) -> dict[str, Any] | None:
    if camera is None:
        return None
    return {"file": str(seq.calibration) if seq is not None else "camera_info of the bag",
            "width": int(camera.image_size[0]), "height": int(camera.image_size[1]),
            "distortion_model": camera.distortion_model,
            "K": [round(float(v), 4) for v in np.asarray(camera.k).reshape(-1)],
            "D": [round(float(v), 6) for v in np.asarray(camera.d).reshape(-1)],
            "P": [round(float(v), 4) for v in np.asarray(camera.p).reshape(-1)]}


def _extrinsics_json(params: dict[str, Any], seq: Any, extr: Any) -> dict[str, Any] | None:
    if not params.get("extrinsics.enabled"):
        return None
    if extr is None or params.get("extrinsics.source") != "tf":
        return {"source": str(params.get("extrinsics.source", "params")),
                "parent_frame": params.get("extrinsics.parent_frame", "base_link"),
                "child_frame": "(image frame_id)",
                "translation": list(params.get("extrinsics.translation", [0, 0, 0]))}
    src = "tf: the bag's /tf_static, looked up by the nodes at each image stamp"
    return {"source": src, "parent_frame": extr.parent_frame, "child_frame": extr.child_frame,
            "translation": [round(float(v), 4) for v in extr.translation],
            "quaternion_xyzw": [round(float(v), 6) for v in extr.quaternion_xyzw],
            "camera_height_m": round(float(extr.translation[2]), 3),
            "chain": [{"parent": t.parent, "child": t.child, "translation": list(t.translation),
                       "rotation_xyzw": list(t.rotation), "source": Path(t.source).name}
                      for t in seq.tf_static],
            "assumed": "base_link -> velodyne64 (lidar mounting height): see config/demo.yaml"}

