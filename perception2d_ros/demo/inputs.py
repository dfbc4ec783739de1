"""What the demo runs on: the node parameters for this build (stages without weights
dropped, params files read and written) and the input bag (built from the embedded sequence
as a robot would record it, or the user's, inspected for its camera stream).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

ENABLE_HINTS = {
    "sam": "perception2d models fetch mobile_sam (or sam_vit_b), then keep `sam` in stages",
    "clip": "perception2d models fetch clip_vit_b32, then keep `clip` in stages",
    "lseg": "put demo_e200.ckpt in the models dir and run `perception2d models export "
            "lseg_demo_e200`, then keep `lseg` in stages",
}
STAGE_MODELS = {"sam": "sam_vit_b", "clip": "clip_vit_b32", "lseg": "lseg_demo_e200"}


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


def write_params(path: Path, params: dict[str, Any]) -> Path:
    """``params`` as the params file ``perception2d bringup`` reads (``/**`` ros__parameters)."""
    import yaml

    path.write_text("# written by `make demo`: the node parameters of this run\n"
                    + yaml.safe_dump({"/**": {"ros__parameters": params}}, sort_keys=False))
    return path


def default_params() -> Path:
    """The installed ``config/perception2d.yaml`` (the nodes' defaults, used with ``--bag``)."""
    from perception2d_ros.ros.bringup import default_params_file

    return default_params_file()


def flat_params(params_file: Path) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------ the bag
def build_demo_bag(seq: Any, out: Path, compressed: bool, limit: int | None = None) -> Path:
    """A robot-like bag from the sequence: images (JPEG CompressedImage, the files' own
    bytes, or decoded bgr8 Image), one camera_info per image with the same header, and
    /tf_static (latched) with the sequence's chain, all at the images' real stamps."""
    import cv2
    from tqdm import tqdm

    from perception2d_ros.io.bag_writer import BagWriter

    from perception2d_ros.io.bag_messages import camera_info_msg, image_msg, ns_to_stamp

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

