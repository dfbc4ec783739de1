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
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from perception2d_ros.demo.inputs import (DemoError, build_demo_bag, default_params,
                                          flat_params, inspect_bag, log, plan_params,
                                          write_params)
from perception2d_ros.demo.nodes import run_nodes
from perception2d_ros.demo.summary import summarize

OUT_TOPICS = ["image_rect", "camera_info_rect", "detections", "detections/label_info"]


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
            base.update(flat_params(params_file))
        params, missing, notes = plan_params(base)
        compressed = params.get("image_transport") == "compressed"
        log(f"building the input bag from {seq.root.name} ({len(seq.images[:frames])} frames, "
            f"{'JPEG CompressedImage' if compressed else 'raw Image'}, camera_info, /tf_static)")
        bag = build_demo_bag(seq, out_dir / "input.mcap", compressed, frames)
    else:
        bag = Path(bag)
        base = flat_params(params_file or default_params())
        extr = None
        base["image_transport"] = inspect_bag(bag)["transport"]
        if params_file is None and "track" not in (base.get("stages") or []) and \
                "detect" in (base.get("stages") or ["rectify", "detect"]):  # ids in the report
            stages = list(base.get("stages") or ["rectify", "detect"])
            stages.insert(stages.index("detect") + 1, "track")
            base["stages"] = stages
        params, missing, notes = plan_params(base)
    cam = inspect_bag(bag)
    params_path = write_params(out_dir / "params.yaml", params)
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
