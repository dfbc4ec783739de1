"""``make demo``: the main job on a real camera sequence, over real ROS topics.

1. build a bag shaped like a robot's recording from the embedded real sequence
   (``config/demo.yaml``: Apollo's front camera, 21 raw 1920x1080 frames): JPEG
   ``sensor_msgs/CompressedImage`` on ``/camera/image_raw/compressed``, ``camera_info`` from the
   camera's real calibration, ``/tf_static`` base_link -> velodyne64 -> camera from its real
   extrinsics — or take ``--bag`` (your own bag: raw or compressed images + camera_info);
2. start ``perception2d bringup`` (the node list of ``ros2 launch``), record its outputs and
   play the bag into it (bag play -> nodes -> bag record);
3. write ``demo_output/``: ``output.mcap``, ``annotated/*.png`` (raw | rectified at native
   resolution with boxes, class, score, track id and ground distance), ``contact_sheet.png``,
   ``plot.png`` (per-stage latency, detections per frame, distance per track),
   ``summary.json`` / ``summary.txt`` (with the recall of the sequence's ground-truth
   vehicles) and a self-contained ``report.html``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT_TOPICS = ["image_rect", "camera_info_rect", "detections", "detections/label_info"]
ENABLE_HINTS = {
    "sam": "perception2d models fetch mobile_sam (or sam_vit_b), then keep `sam` in stages",
    "clip": "perception2d models fetch clip_vit_b32, then keep `clip` in stages",
    "lseg": "put demo_e200.ckpt in the models dir and run `perception2d models export "
            "lseg_demo_e200`, then keep `lseg` in stages",
}
STAGE_MODELS = {"sam": "sam_vit_b", "clip": "clip_vit_b32", "lseg": "lseg_demo_e200"}
VEHICLE_DEFAULT = ["car", "truck", "bus"]


class DemoError(Exception):
    """A problem the user can fix: printed as one line, exit status 2."""


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ------------------------------------------------------------------------------ params
def _weights_present(stage: str, params: dict[str, Any]) -> bool:
    from perception2d_ros.engines import model_store

    if params.get(f"{stage}.checkpoint"):
        return True
    name = str(params.get(f"{stage}.model") or STAGE_MODELS[stage])
    try:
        manifest = model_store.load_manifest(params.get("models_dir") or None)
        if name in model_store.load_overlay(params.get("models_dir") or None):
            return True
        if name in manifest:
            return model_store.check_entry(manifest[name], params.get("models_dir") or None)[0]
        return Path(name).expanduser().exists()
    except Exception:  # noqa: BLE001 - an unreadable models dir means: not present
        return False


def plan_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """The node parameters the demo runs with, for this build.

    Returns ``(params, stages_without_weights {stage: enabling command}, notes)``: stages
    the build lacks are dropped with a note; SAM/CLIP/LSeg without weights are dropped and
    listed once with the command that enables them (only when ``params`` asks for them).
    """
    p = dict(params)
    notes: list[str] = []
    missing: dict[str, str] = {}
    stages = list(p.get("stages") or ["rectify", "detect"])
    for stage in ("sam", "clip", "lseg"):
        if stage in stages and not _weights_present(stage, p):
            stages.remove(stage)
            missing[stage] = ENABLE_HINTS[stage]
    p["stages"] = stages
    return p, missing, notes


# ------------------------------------------------------------------------------ the bag
def build_demo_bag(seq: Any, out: Path, compressed: bool, limit: int | None = None) -> Path:
    """A robot-like bag from the sequence: images (JPEG CompressedImage, the files' own
    bytes, or decoded bgr8 Image), one camera_info per image with the same header, and
    /tf_static (latched) with the sequence's chain, all at the images' real stamps."""
    import cv2
    from tqdm import tqdm

    from perception2d_ros.io.bag_messages import camera_info_msg, image_msg, ns_to_stamp
    from perception2d_ros.io.bag_writer import BagWriter

    ns = seq.namespace
    image_topic = f"{ns}/image_raw/compressed" if compressed else f"{ns}/image_raw"
    files = list(zip(seq.stamps, seq.images))[:limit]
    with BagWriter(out, overwrite=True) as bag:
        ts = bag.typestore
        bag.add_topic(image_topic, "sensor_msgs/msg/CompressedImage" if compressed
                      else "sensor_msgs/msg/Image", qos="sensor_data")
        bag.add_topic(f"{ns}/camera_info", "sensor_msgs/msg/CameraInfo", qos="sensor_data")
        bag.add_topic("/tf_static", "tf2_msgs/msg/TFMessage", qos="latched")
        tfs = []
        for link in seq.tf_static:
            tfs.append(ts.types["geometry_msgs/msg/TransformStamped"](
                header=ts.types["std_msgs/msg/Header"](stamp=ns_to_stamp(ts, files[0][0]),
                                                       frame_id=link.parent),
                child_frame_id=link.child,
                transform=ts.types["geometry_msgs/msg/Transform"](
                    translation=ts.types["geometry_msgs/msg/Vector3"](*link.translation),
                    rotation=ts.types["geometry_msgs/msg/Quaternion"](*link.rotation))))
        bag.write("/tf_static", files[0][0], ts.types["tf2_msgs/msg/TFMessage"](transforms=tfs))
        header = ts.types["std_msgs/msg/Header"]
        for stamp, path in tqdm(files, desc="bag", unit="frame", file=sys.stderr, leave=False):
            if compressed:
                msg = ts.types["sensor_msgs/msg/CompressedImage"](
                    header=header(stamp=ns_to_stamp(ts, stamp), frame_id=seq.camera_frame),
                    format="bgr8; jpeg compressed bgr8",
                    data=np.frombuffer(path.read_bytes(), np.uint8))
            else:
                msg = image_msg(ts, cv2.imread(str(path), cv2.IMREAD_COLOR), stamp,
                                seq.camera_frame)
            bag.write(image_topic, stamp, msg)
            bag.write(f"{ns}/camera_info", stamp,
                      camera_info_msg(ts, seq.camera_info, stamp, seq.camera_frame))
    return out


def inspect_bag(bag: Path) -> dict[str, Any]:
    """The camera stream of a bag (rosbag2 or ROS 1; raw or compressed images):
    ``{"image_topic", "type", "transport", "ns", "image_name", "camera_info", "frames",
    "tf_static"}``.

    Raises:
        DemoError: unreadable bag, no camera image topic, or no camera_info beside it.
    """
    from perception2d_ros.io.bag_topics import bag_info, find_camera_topics

    if not Path(bag).exists():
        raise DemoError(f"{bag} does not exist")
    try:
        info = bag_info(bag)
    except Exception as exc:  # noqa: BLE001 - any reader failure is one line for the user
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DemoError(f"cannot read bag {bag} (a ROS 2 MCAP/sqlite3 or ROS 1 bag): "
                        f"{reason}") from None
    topics = info["topics"]
    try:
        cam = find_camera_topics(topics)
    except ValueError as exc:
        raise DemoError(f"{bag}: {exc}") from None
    if cam.camera_info is None:
        raise DemoError(f"{bag}: no sensor_msgs/CameraInfo {cam.namespace}/camera_info beside "
                        f"{cam.image}; the demo needs the camera's calibration (record it with "
                        "the images)")
    return {"image_topic": cam.image, "type": topics[cam.image]["type"],
            "transport": cam.transport, "ns": cam.namespace or "/",
            "image_name": cam.base.rsplit("/", 1)[-1], "camera_info": cam.camera_info,
            "frames": topics[cam.image]["count"], "tf_static": "/tf_static" in topics}


# ------------------------------------------------------------------------------ running
def play_lockstep(bag: Path, topics: list[str], image_topic: str, outputs: Any,
                  reliable: bool, timeout: float) -> int:
    """Play ``topics`` of ``bag`` in order, each image only once ``outputs()`` (detections
    recorded so far) has caught up with the images before it: no frame is ever skipped by a
    busy machine (CI). Returns the images played."""
    import sys as _sys

    from tqdm import tqdm

    from perception2d_ros.io.bag_reader import BagReader
    from perception2d_ros.ros.bag_play import (_wait_for_subscribers, get_msg_class,
                                               qos_for_topic, ros_node)

    stop = threading.Event()
    with BagReader(bag) as reader, ros_node("perception2d_demo_play") as node:
        metas = reader.topics
        pubs = {t: node.create_publisher(get_msg_class(metas[t].msgtype), t,
                                         qos_for_topic(t, reliable)) for t in topics}
        _wait_for_subscribers(pubs, 1, timeout, stop)
        images = 0
        bar = tqdm(total=metas[image_topic].count, desc="play (lockstep)", unit="frame",
                   file=_sys.stderr, leave=False)
        for m in reader.messages(topics):
            if m.topic == image_topic:
                deadline = time.monotonic() + timeout
                while outputs() < images and time.monotonic() < deadline:
                    time.sleep(0.005)
                images += 1
                bar.update(1)
            pubs[m.topic].publish(m.rawdata)
        bar.close()
        for pub in pubs.values():
            if reliable:
                pub.wait_for_all_acked(_seconds(2.0))
    return images


def _seconds(s: float) -> Any:
    from rclpy.duration import Duration

    return Duration(nanoseconds=int(s * 1e9))


def _write_params(path: Path, params: dict[str, Any]) -> Path:
    import yaml

    path.write_text("# written by `make demo`: the node parameters of this run\n"
                    + yaml.safe_dump({"/**": {"ros__parameters": params}}, sort_keys=False))
    return path


def run_nodes(bag: Path, cam: dict[str, Any], params_file: Path, out_bag: Path,
              record_topics: list[str], play_topics: list[str], pipeline: bool, rate: float,
              reliable: bool, timeout: float, lockstep: bool = False) -> None:
    """bag play -> ``perception2d bringup`` -> bag record, with progress bars."""
    from tqdm import tqdm

    from perception2d_ros.io.bag_types import find_interface_dirs
    from perception2d_ros.ros.bag_play import play
    from perception2d_ros.ros.bag_record import record

    ns = cam["ns"]
    bringup = subprocess.Popen(
        [sys.executable, "-m", "perception2d_ros.cli.main", "bringup", "--params-file",
         str(params_file), "--namespace", ns, "--pipeline", "true" if pipeline else "false",
         "--image-topic", cam["image_name"], "--image-transport", cam["transport"]],
        start_new_session=True)
    stop = threading.Event()
    ready = threading.Event()
    rec_result: dict[str, Any] = {}
    live: Counter[str] = Counter()

    def recorder() -> None:
        try:
            rec_result.update(record(out_bag, record_topics, stop_event=stop,
                                     on_ready=ready.set, topic_timeout=timeout, overwrite=True,
                                     msg_dirs=find_interface_dirs(),
                                     on_message=lambda t: live.update([t])))
        except Exception as exc:  # noqa: BLE001 - reported below
            rec_result["error"] = exc
            ready.set()

    rec = threading.Thread(target=recorder, daemon=True)
    rec.start()
    det_topic = f"{ns.rstrip('/')}/detections"
    try:
        log("waiting for the nodes (model load) and the recorder")
        if not ready.wait(timeout) or "error" in rec_result:
            raise RuntimeError(f"nodes did not come up: {rec_result.get('error', 'timeout')}")
        log(f"playing {cam['frames']} frames through the nodes"
            + (" (lockstep: each frame after the previous one's detections)" if lockstep
               else ""))
        if lockstep:
            play_lockstep(bag, play_topics, cam["image_topic"], lambda: live[det_topic],
                          reliable=reliable, timeout=timeout)
        else:
            play(bag, rate=rate, wait_subscribers=1, wait_timeout=timeout, progress=True,
                 reliable=reliable, topics=play_topics)
        deadline = time.monotonic() + 30
        bar = tqdm(total=cam["frames"], desc="outputs", unit="frame", file=sys.stderr,
                   leave=False)
        last = 0
        while time.monotonic() < deadline:
            got = live[det_topic]
            bar.update(max(0, got - last))
            last = max(last, got)
            if got >= cam["frames"]:
                break
            time.sleep(0.1)
        bar.close()
        # one more /diagnostics period so the latency covers every frame
        t_diag = live["/diagnostics"]
        end = time.monotonic() + 2.5
        while live["/diagnostics"] <= t_diag and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        stop.set()
        rec.join(timeout=15)
        if bringup.poll() is None:
            os.killpg(bringup.pid, signal.SIGINT)
            try:
                bringup.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(bringup.pid, signal.SIGKILL)
    if "error" in rec_result:
        raise RuntimeError(f"recording failed: {rec_result['error']}")


def run(bag: Path | None, out_dir: Path, params_file: Path | None, frames: int | None,
        timeout: float, pipeline: bool = True, rate: float = 1.0,
        demo_config: Path | None = None, lockstep: bool = False) -> int:
    """The demo end to end; returns the exit status (0: every frame came out)."""
    from perception2d_ros.demo.sequence import load_sequence

    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    seq = None
    if bag is None:
        seq = load_sequence(demo_config)
        extr = seq.extrinsics()
        base = dict(seq.params)
        if params_file is not None:  # the user's params over the demo's
            base.update(_flat_params(params_file))
        params, missing, notes = plan_params(base)
        compressed = params.get("image_transport") == "compressed"
        log(f"building the input bag from {seq.root.name} ({len(seq.images[:frames])} frames, "
            f"{'JPEG CompressedImage' if compressed else 'raw Image'}, camera_info, /tf_static)")
        bag = build_demo_bag(seq, out_dir / "input.mcap", compressed, frames)
    else:
        bag = Path(bag)
        base = _flat_params(params_file or _default_params())
        extr = None
        base["image_transport"] = inspect_bag(bag)["transport"]
        if params_file is None and "track" not in (base.get("stages") or []) and \
                "detect" in (base.get("stages") or ["rectify", "detect"]):  # ids in the report
            stages = list(base.get("stages") or ["rectify", "detect"])
            stages.insert(stages.index("detect") + 1, "track")
            base["stages"] = stages
        params, missing, notes = plan_params(base)
    cam = inspect_bag(bag)
    params_path = _write_params(out_dir / "params.yaml", params)
    from perception2d_ros.cli.bringup import preflight

    preflight(str(params_path), pipeline)  # one line for a bad parameter or model file
    log(f"input: {bag} ({cam['frames']} frames on {cam['image_topic']}, {cam['type']})")
    ns = cam["ns"].rstrip("/")
    rec_topics = [f"{ns}/{t}" for t in OUT_TOPICS] + ["/diagnostics"]
    ground_on = bool(params.get("extrinsics.enabled")) and "detect" in params["stages"]
    if ground_on:
        rec_topics.append(f"{ns}/detections/ground")
        from perception2d_ros.ros.publishing import TOPIC_TYPES

        if "detections/objects" in TOPIC_TYPES:  # 3D objects where the build has them
            rec_topics.append(f"{ns}/detections/objects")
    play_topics = [cam["image_topic"], cam["camera_info"]]
    if cam["tf_static"] and params.get("extrinsics.source") == "tf":
        play_topics.append("/tf_static")
    out_bag = out_dir / "output.mcap"
    run_nodes(bag, cam, params_path, out_bag, rec_topics, play_topics, pipeline, rate,
              reliable=params.get("image_reliability") == "reliable", timeout=timeout,
              lockstep=lockstep)
    summary, pics = summarize(bag, out_bag, out_dir, cam, params, missing, notes, seq, extr)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary["play"] = ("lockstep (each frame once the previous one's detections were recorded)"
                       if lockstep else f"recorded timing x{rate:g}")
    from perception2d_ros.demo.report import text_summary

    text = text_summary(summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "summary.txt").write_text(text + "\n")
    _write_html(out_dir, summary, text, pics)
    print("\n" + text, flush=True)
    lost = summary["frames_in"] - summary["frames_out"]
    if lost and lost <= summary["dropped"]:
        log(f"{lost} frame(s) skipped by the nodes' newest-frame-wins queue (the machine was "
            "busy); without --rate the demo plays in lockstep")
        return 0
    return 0 if lost == 0 else 1


def _default_params() -> Path:
    from perception2d_ros.ros.bringup import default_params_file

    return default_params_file()


def _flat_params(params_file: Path) -> dict[str, Any]:
    """``/**`` (then ``pipeline_node``) ros__parameters of a params file, dotted keys."""
    import yaml

    try:
        data = yaml.safe_load(Path(params_file).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DemoError(f"cannot read params file {params_file}: {exc}") from None
    out: dict[str, Any] = {}

    def flat(prefix: str, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                flat(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = v

    for key in ("/**", "pipeline_node"):
        flat("", (data.get(key) or {}).get("ros__parameters") or {})
    return out


# ------------------------------------------------------------------------------ outputs
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


def _write_html(out_dir: Path, summary: dict[str, Any], text: str,
                pics: list[tuple[str, np.ndarray]]) -> None:
    import cv2

    from perception2d_ros.demo.report import html_report

    page = html_report(summary, cv2.imread(str(out_dir / "plot.png")),
                       cv2.imread(str(out_dir / "contact_sheet.png")), pics, text)
    (out_dir / "report.html").write_text(page, encoding="utf-8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options (``python -m perception2d_ros.demo.run`` and ``perception2d demo``)."""
    p.add_argument("--bag", type=Path, default=None,
                   help="your own bag (raw or compressed images + camera_info); default: "
                        "built from the embedded sequence")
    p.add_argument("--out", type=Path, default=Path("demo_output"),
                   help="output directory (default: ./demo_output)")
    p.add_argument("--params-file", type=Path, default=None,
                   help="node parameters (default: the demo's, or config/perception2d.yaml "
                        "with --bag)")
    p.add_argument("--demo-config", type=Path, default=None, help="default: config/demo.yaml")
    p.add_argument("--frames", type=int, default=None, help="only the first N frames")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--pipeline", default="true", choices=["true", "false"],
                   help="one process for all stages (true) or one node per stage (false)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--rate", type=float, default=None,
                   help="play with the recorded timing at this speed factor (1 = real time; "
                        "the nodes keep only the newest frame, so a busy machine skips "
                        "frames). Default: lockstep, each frame once the previous one's "
                        "detections are recorded (every frame processed)")


def run_args(a: argparse.Namespace) -> int:
    """Run with parsed options: a user error (bad bag, params file, missing model file) is
    one line and its exit code (the CLI's shared handling), never a traceback."""
    from perception2d_ros.cli.errors import debug_enabled, run_main

    def checked() -> int:
        from perception2d_ros.cli.errors import check_input_bag

        if a.bag is not None:
            check_input_bag(a.bag)
        if a.params_file is not None:  # the same one-line checks as bringup / process
            from perception2d_ros.cli.bringup import preflight

            preflight(str(a.params_file), a.pipeline == "true")
        try:
            return run(a.bag, a.out.resolve(), a.params_file, a.frames, a.timeout,
                       a.pipeline == "true", a.rate or 1.0, a.demo_config, a.rate is None)
        except DemoError as exc:
            from perception2d_ros.cli.errors import UserError

            raise UserError(str(exc), 2) from None

    return run_main(checked, prog="make demo",
                    debug=getattr(a, "debug", False) or debug_enabled())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="perception2d-demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
