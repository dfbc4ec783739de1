"""``make demo``: the main job on the embedded default, over real ROS topics.

1. build a bag from the repo's real images (COCO street/indoor scenes, 640x480, with the
   calibration of a real camera) — or take ``--bag`` (your own image_raw + camera_info bag);
2. start ``perception2d bringup`` (the same node list as ``ros2 launch``), record its outputs,
   play the bag into it (bag play → nodes → bag record);
3. write ``demo_output/``: output MCAP, annotated PNGs, ``summary.json``; print the summary.
Stages whose weights are absent are reported as skipped with the command that enables them.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NS = "/camera"
OUT_TOPICS = ["image_rect", "camera_info_rect", "detections", "detections/label_info"]
ENABLE_HINTS = {
    "sam": "perception2d models fetch mobile_sam (or sam_vit_b, or --checkpoint) and add `sam` "
           "to stages",
    "clip": "perception2d models fetch clip_vit_b32 and add `clip` to stages",
    "lseg": "put demo_e200.ckpt in the models dir, `perception2d models export lseg_demo_e200` and add "
            "`lseg` to stages",
}


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def build_default_bag(out: Path, frames: int) -> Path:
    from perception2d_ros.cli.bag import make_bag

    images = ROOT / "test" / "data" / "coco" / "images"
    staging = out.parent / "demo_images"
    staging.mkdir(parents=True, exist_ok=True)
    for f in sorted(images.glob("*.jpg"))[:frames]:
        link = staging / f.name
        if not link.exists():
            link.symlink_to(f)
    make_bag(out, ROOT / "test" / "data" / "camera_info" / "left_plumb_bob.yaml",
             images=staging, rate=4.0, frame_id="camera_optical", namespace=NS,
             resize=(640, 480), overwrite=True, progress=True)
    return out


def _reliable(params_file: Path) -> bool:
    """Play reliable when the nodes subscribe reliable (image_reliability: reliable)."""
    import yaml

    data = yaml.safe_load(Path(params_file).read_text()) or {}
    for key in ("/**", "pipeline_node"):
        block = (data.get(key) or {}).get("ros__parameters") or {}
        if block.get("image_reliability") == "reliable":
            return True
    return False


def stage_status(params_file: Path) -> dict[str, str]:
    from perception2d_ros.bringup import enabled_stages

    enabled = enabled_stages(params_file)
    status = {}
    for stage in ("rectify", "detect", "sam", "clip", "lseg"):
        if stage in enabled:
            status[stage] = "enabled"
        else:
            status[stage] = f"skipped (no weights here; to enable: {ENABLE_HINTS[stage]})" \
                if stage in ENABLE_HINTS else "disabled in params file"
    return status


def run(bag: Path | None, out_dir: Path, params_file: Path, frames: int, timeout: float,
        pipeline: bool = True, rate: float = 1.0) -> int:
    from tqdm import tqdm

    from perception2d_ros.core.bagio import bag_info, find_camera_topics, find_interface_dirs
    from perception2d_ros.ros.bag_play import play
    from perception2d_ros.ros.bag_record import record

    out_dir.mkdir(parents=True, exist_ok=True)
    if bag is None:
        log("building the input bag from the repo's real images")
        bag = build_default_bag(out_dir / "input.mcap", frames)
    info = bag_info(bag)
    try:  # <ns>/image_raw, <ns>/image_raw/compressed, … (rosbag2 or ROS 1 bags)
        cam = find_camera_topics(info["topics"])
    except ValueError as exc:
        log(f"{bag}: {exc}")
        return 2
    if cam.camera_info is None:
        log(f"{bag}: no sensor_msgs/CameraInfo {cam.namespace}/camera_info beside {cam.image}")
        return 2
    ns = cam.namespace
    n_frames = info["topics"][cam.image]["count"]
    log(f"input: {bag} ({n_frames} frames on {cam.image})")
    stages = stage_status(params_file)
    out_bag = out_dir / "output.mcap"

    bringup = subprocess.Popen(
        [sys.executable, "-m", "perception2d_ros.cli.main", "bringup", "--params-file",
         str(params_file), "--namespace", ns, "--pipeline", "true" if pipeline else "false",
         "--image-transport", cam.transport],
        start_new_session=True)
    stop = threading.Event()
    ready = threading.Event()
    topics = [f"{ns}/{t}" for t in OUT_TOPICS] + ["/diagnostics"]
    rec_result: dict = {}
    live: Counter[str] = Counter()

    def recorder() -> None:
        try:
            rec_result.update(record(out_bag, topics, stop_event=stop, on_ready=ready.set,
                                     topic_timeout=timeout, overwrite=True,
                                     msg_dirs=find_interface_dirs(),
                                     on_message=lambda t: live.update([t])))
        except Exception as exc:  # reported below
            rec_result["error"] = exc
            ready.set()

    rec = threading.Thread(target=recorder, daemon=True)
    rec.start()
    t_start = time.monotonic()
    try:
        log("waiting for the nodes (model load) and the recorder")
        if not ready.wait(timeout) or "error" in rec_result:
            log(f"nodes did not come up: {rec_result.get('error', 'timeout')}")
            return 1
        log("playing the bag through the nodes")
        play(bag, rate=rate, wait_subscribers=1, wait_timeout=timeout, progress=True,
             reliable=_reliable(params_file),
             topics=[cam.image, cam.camera_info])
        # wait for the last detections (the pipeline works behind the player)
        deadline = time.monotonic() + 30
        bar = tqdm(total=n_frames, desc="outputs", unit="frame", file=sys.stderr)
        last = 0
        while time.monotonic() < deadline:
            got = live[f"{ns}/detections"]
            bar.update(max(0, got - last))
            last = max(last, got)
            if got >= n_frames:
                break
            time.sleep(0.5)
        time.sleep(1.2)  # one more /diagnostics period
        bar.close()
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
        log(f"recording failed: {rec_result['error']}")
        return 1
    summary = summarize(bag, out_bag, out_dir, ns, stages, time.monotonic() - t_start)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return 0 if summary["frames_out"] == summary["frames_in"] else 1


def summarize(in_bag: Path, out_bag: Path, out_dir: Path, ns: str, stages: dict, seconds: float
              ) -> dict:
    import cv2
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import Image
    from vision_msgs.msg import Detection2DArray
    from diagnostic_msgs.msg import DiagnosticArray

    from perception2d_ros.core.bagio import (BagReader, bag_info, find_camera_topics,
                                             find_interface_dirs)
    from perception2d_ros.core.debug_draw import draw_detections
    from perception2d_ros.core.image_codec import image_to_array

    info_in = bag_info(in_bag)
    frames_in = info_in["topics"][find_camera_topics(info_in["topics"], namespace=ns).image][
        "count"]
    rect: dict[int, Image] = {}
    dets: dict[int, Detection2DArray] = {}
    diag = None
    with BagReader(out_bag, msg_dirs=find_interface_dirs()) as reader:
        for m in reader.messages():
            if m.topic == f"{ns}/image_rect":
                msg = deserialize_message(bytes(m.rawdata), Image)
                rect[_ns(msg.header.stamp)] = msg
            elif m.topic == f"{ns}/detections":
                msg = deserialize_message(bytes(m.rawdata), Detection2DArray)
                dets[_ns(msg.header.stamp)] = msg
            elif m.topic == "/diagnostics":
                d = deserialize_message(bytes(m.rawdata), DiagnosticArray)
                for st in d.status:
                    if "pipeline_node" in st.name or "detector_node" in st.name:
                        diag = {kv.key: kv.value for kv in st.values}
    per_class: Counter[str] = Counter()
    png_dir = out_dir / "annotated"
    png_dir.mkdir(exist_ok=True)
    for old in png_dir.glob("*.png"):
        old.unlink()
    for i, stamp in enumerate(sorted(dets)):
        d = dets[stamp]
        names = [det.results[0].hypothesis.class_id for det in d.detections]
        per_class.update(names)
        if stamp in rect:
            img = np.ascontiguousarray(image_to_array(rect[stamp]))
            xyxy = np.array([[det.bbox.center.position.x - det.bbox.size_x / 2,
                              det.bbox.center.position.y - det.bbox.size_y / 2,
                              det.bbox.center.position.x + det.bbox.size_x / 2,
                              det.bbox.center.position.y + det.bbox.size_y / 2]
                             for det in d.detections]).reshape(-1, 4)
            scores = [det.results[0].hypothesis.score for det in d.detections]
            draw_detections(img, xyxy, names, scores)
            cv2.imwrite(str(png_dir / f"frame_{i:03d}.png"), img)
    latency = {}
    if diag:
        for key, value in diag.items():
            if key.endswith(("_ms_p50", "_ms_p95")):
                latency[key] = float(value)
    return {
        "input_bag": str(in_bag), "output_bag": str(out_bag), "frames_in": frames_in,
        "frames_out": len(dets), "image_rect": len(rect),
        "detections_per_class": dict(per_class.most_common()),
        "latency_ms": latency, "backend": (diag or {}).get("detect.backend", "unknown"),
        "dropped": int((diag or {}).get("dropped_newest_wins", 0)),
        "stages": stages, "annotated_pngs": str(png_dir), "seconds": round(seconds, 1),
    }


def _ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def print_summary(s: dict) -> None:
    print("\n=== perception2d demo summary ===")
    print(f"frames in / out        : {s['frames_in']} / {s['frames_out']} "
          f"(image_rect: {s['image_rect']}, newest-wins drops: {s['dropped']})")
    print(f"backend                : {s['backend']}")
    dets = ", ".join(f"{k} {v}" for k, v in s["detections_per_class"].items()) or "none"
    print(f"detections per class   : {dets}")
    for key in sorted(s["latency_ms"]):
        print(f"latency {key:<15}: {s['latency_ms'][key]:.1f} ms")
    for stage, status in s["stages"].items():
        print(f"stage {stage:<17}: {status}")
    print(f"outputs                : {s['output_bag']}, {s['annotated_pngs']}/*.png, "
          f"summary.json ({s['seconds']} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="perception2d-demo", description=__doc__.splitlines()[0])
    p.add_argument("--bag", type=Path, default=None, help="your own bag (default: built)")
    p.add_argument("--out", type=Path, default=ROOT / "demo_output")
    p.add_argument("--params-file", type=Path, default=ROOT / "config" / "perception2d.yaml")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--pipeline", default="true", choices=["true", "false"],
                   help="one process for all stages (true) or one node per stage (false)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = p.parse_args(argv)
    from perception2d_ros.cli.errors import debug_enabled, run_main

    def checked() -> int:  # the same one-line checks as `perception2d process` / bringup
        from perception2d_ros.cli.bringup import preflight
        from perception2d_ros.cli.errors import check_input_bag

        if a.bag is not None:
            check_input_bag(a.bag)
        preflight(str(a.params_file), a.pipeline == "true")
        return run(a.bag, a.out, a.params_file, a.frames, a.timeout, a.pipeline == "true",
                   a.rate)

    return run_main(checked, prog="make demo", debug=a.debug or debug_enabled())


if __name__ == "__main__":
    sys.exit(main())
