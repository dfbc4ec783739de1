"""The pipeline configuration: core :data:`DEFAULTS` (each stage's own group comes from
:data:`~perception2d_ros.pipeline.registry.STAGES`), the stage order and parameter groups,
:func:`merge_config` (defaults + overrides) and :func:`validate_config` (errors naming the
parameter)."""
from __future__ import annotations

from typing import Any

from perception2d_ros.pipeline.rectify import INTERPOLATIONS
from perception2d_ros.pipeline.registry import STAGES

STAGE_ORDER = tuple(STAGES)   # rectify, detect, track, sam, clip, lseg

DEFAULTS: dict[str, Any] = {
    "stages": ["rectify", "detect"],
    "interpolation": "linear",
    "output_encoding": "passthrough",
    "models_dir": "",
    # separate sam/clip nodes: detections_in carries track ids (a track_node upstream)
    "detections_in_tracked": False,
    "extrinsics": {
        "enabled": False,
        "parent_frame": "base_link",
        "translation": [0.0, 0.0, 0.0],
        "rotation_rpy": [0.0, 0.0, 0.0],
        "rotation_quaternion": [0.0, 0.0, 0.0, 0.0],
        "plane_height": 0.0,
        # params: translation/rotation above; tf: look up parent_frame <- image
        # header.frame_id on /tf_static + /tf at the image stamp
        "source": "params",
        "tf_timeout_s": 0.1,   # tf: how long a frame waits for /tf to reach its stamp
    },
    # aligned depth image (relative to the camera namespace, e.g. depth/image_raw; '' = none):
    # sensor_msgs/Image 16UC1 mm or 32FC1 m registered to the colour camera, paired by stamp
    "depth_topic": "",
}

STAGE_GROUPS = ("detect", "extrinsics", "track", "sam", "clip", "lseg")


def _all_defaults() -> dict[str, Any]:
    groups = {name: entry.defaults() for name, entry in STAGES.items()}
    core = dict(DEFAULTS)
    head = {k: core.pop(k) for k in ("stages", "interpolation", "output_encoding", "models_dir",
                                     "detections_in_tracked")}
    return {**head, "detect": groups["detect"], **core,
            "vocabulary": [""],  # shared by CLIP and LSeg; [""] = the stage's default vocabulary
            **{name: groups[name] for name in ("sam", "clip", "lseg", "track")}}


def merge_config(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults (core + every stage) deep-merged with ``overrides``."""
    import copy

    out = copy.deepcopy(_all_defaults())

    def merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(out, overrides or {})
    return out


def validate_config(cfg: dict[str, Any]) -> None:
    """Raise ValueError naming the parameter for out-of-range or unknown values."""
    bad = [s for s in cfg["stages"] if s not in STAGE_ORDER]
    if bad:
        raise ValueError(f"stages: unknown stage(s) {bad}; known: {list(STAGE_ORDER)}")
    if cfg["output_encoding"] not in ("passthrough", "bgr8", "rgb8", "mono8"):
        raise ValueError(f"output_encoding: '{cfg['output_encoding']}' is not one of "
                         "passthrough, bgr8, rgb8, mono8")
    if cfg["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"interpolation: '{cfg['interpolation']}' is not one of "
                         f"{list(INTERPOLATIONS)}")
    d = cfg["detect"]
    for key in ("conf_threshold", "iou_threshold"):
        if not 0.0 <= float(d[key]) <= 1.0:
            raise ValueError(f"detect.{key}: {d[key]} is outside [0, 1]")
    if str(d.get("device_frames", "auto")) not in ("auto", "on", "off"):
        raise ValueError(f"detect.device_frames: '{d['device_frames']}' is not one of auto, "
                         "on, off")
    if int(d["max_detections"]) < 1:
        raise ValueError(f"detect.max_detections: {d['max_detections']} must be >= 1")
    e = cfg["extrinsics"]
    if len(e["translation"]) != 3 or len(e["rotation_rpy"]) != 3:
        raise ValueError("extrinsics.translation and extrinsics.rotation_rpy need 3 values each")
    if len(e.get("rotation_quaternion") or [0] * 4) != 4:
        raise ValueError("extrinsics.rotation_quaternion needs 4 values [x, y, z, w] "
                         "(all 0 = use rotation_rpy)")
    if e.get("source", "params") not in ("params", "tf"):
        raise ValueError(f"extrinsics.source: '{e['source']}' is not one of params, tf")
    if not float(e.get("tf_timeout_s", 0.1)) >= 0.0:
        raise ValueError(f"extrinsics.tf_timeout_s: {e['tf_timeout_s']} must be >= 0")
    if not isinstance(cfg.get("depth_topic", ""), str):
        raise ValueError(f"depth_topic: {cfg['depth_topic']!r} must be a topic name string")
    if "lseg" in cfg:
        from perception2d_ros.models.lseg.resample import parse_scales

        try:
            parse_scales(cfg["lseg"].get("scales", [1.0]))
        except ValueError as exc:
            raise ValueError(f"lseg.{exc}") from None
    if "track" in cfg:
        from perception2d_ros.models.tracking.bytetrack import TrackerConfig

        TrackerConfig.from_dict(cfg["track"])  # ValueError naming track.<key>
