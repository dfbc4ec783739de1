"""The perception node's parameters: the node kinds (default stages and input), every
parameter's declaration and description, the range/choice checks applied at set time and at
configure, and the pipeline config read back from the parameters."""
from __future__ import annotations

import math
from typing import Any, Sequence

from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult

from perception2d_ros.pipeline.config import STAGE_GROUPS, STAGE_ORDER, merge_config
from perception2d_ros.pipeline.rectify import INTERPOLATIONS

NODE_KINDS: dict[str, dict[str, Any]] = {
    # stages, input: raw = image_raw + camera_info (synced); rect = image_rect (+ camera_info_rect)
    "rectify_node": {"stages": ["rectify"], "input": "raw"},
    "detector_node": {"stages": ["detect"], "input": "rect"},
    "pipeline_node": {"stages": ["rectify", "detect"], "input": "raw"},
    # downstream stages as separate nodes: image_rect + detections_in (exact stamp match)
    "sam_node": {"stages": ["sam"], "input": "rect"},
    "clip_node": {"stages": ["clip"], "input": "rect"},
    "lseg_node": {"stages": ["lseg"], "input": "rect"},
    # detections_in → tracked `detections` (no image: the tracker needs boxes only)
    "track_node": {"stages": ["track"], "input": "rect"},
}


def _choice(*allowed: str) -> Any:
    return lambda v: None if v in allowed else f"'{v}' must be one of {', '.join(allowed)}"


def _number(lo: float, hi: float = float("inf"), lo_open: bool = False) -> Any:
    def check(v: Any) -> str | None:
        ok = (isinstance(v, (int, float)) and math.isfinite(v)
              and (lo < v if lo_open else lo <= v) and v <= hi)
        return None if ok else (f"{v} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}"
                                f"{']' if math.isfinite(hi) else ')'}")
    return check


#: parameter → check(value) returning the reason it is invalid (None = valid). Used by the
#: set-parameters callback (runtime changes) and at configure (values given at start).
PARAMETER_CHECKS: dict[str, Any] = {
    "input": _choice("raw", "rect"),
    "image_transport": _choice("raw", "compressed"),
    "stages": lambda v: None if all(s in STAGE_ORDER for s in v) else
    f"{list(v)}: stages must be among {list(STAGE_ORDER)}",
    "interpolation": _choice(*INTERPOLATIONS),
    "output_encoding": _choice("passthrough", "bgr8", "rgb8", "mono8"),
    "image_reliability": _choice("best_effort", "reliable"),
    "sync_slop_ms": _number(0.0),
    "diagnostics_period_s": _number(0.0, lo_open=True),
    "detect.backend": _choice("auto", "tensorrt", "onnxruntime", "torch"),
    "detect.device": _choice("auto", "cpu", "cuda"),
    "detect.precision": _choice("fp32", "fp16", "int8"),
    "detect.threads": _number(0),
    "detect.conf_threshold": _number(0.0, 1.0),
    "detect.iou_threshold": _number(0.0, 1.0),
    "detect.max_detections": _number(1),
    "extrinsics.source": _choice("params", "tf"),
    "extrinsics.tf_timeout_s": _number(0.0),
    **{f"track.{k}": _number(0.0, 1.0) for k in ("high_threshold", "low_threshold",
                                                 "new_track_threshold", "match_iou",
                                                 "low_match_iou")},
    "track.min_hits": _number(1),
    "track.max_age": _number(0),
}


def check_parameter(name: str, value: Any) -> str | None:
    """Why ``value`` is invalid for parameter ``name`` ("name: reason"), or None."""
    check = PARAMETER_CHECKS.get(name)
    reason = check(value) if check is not None else None
    return f"{name}: {reason}" if reason else None


def _desc(text: str, read_only: bool = False) -> ParameterDescriptor:
    return ParameterDescriptor(description=text, read_only=read_only)


class NodeParameters:
    """PerceptionNode's parameter declaration, checks and config (a mixin of the node)."""

    def _declare(self, d: dict[str, Any], spec: dict[str, Any]) -> None:
        p = self.declare_parameter
        p("stages", d["stages"], _desc("stages to run, in order: rectify, detect, track, sam, "
                                       "clip, lseg"))
        p("input", spec["input"], _desc("raw: image_raw + camera_info (synced); rect: image_rect"
                                        " (+ camera_info_rect for ground positions)"))
        p("image_transport", "raw", _desc(
            "image input transport (image_transport's convention, applied on activate): raw "
            "(sensor_msgs/Image on image_raw / image_rect) | compressed (sensor_msgs/"
            "CompressedImage on <image topic>/compressed, jpeg or png, decoded to bgr8/mono8)"))
        p("cameras", [""], _desc("camera namespaces served by this one process and one model per "
                                 "kind, relative to the node namespace ([''] = the node's own); "
                                 "e.g. [left, right] → left/image_raw, right/image_raw …"))
        p("autostart", True, _desc("configure and activate on start (no lifecycle manager)"))
        p("interpolation", d["interpolation"], _desc("rectification: nearest|linear|cubic|area|lanczos"))
        p("output_encoding", d["output_encoding"],
          _desc("image_rect encoding: passthrough (bayer/yuv become bgr8) | bgr8 | rgb8 | mono8"))
        p("queue_policy", "newest_wins", ParameterDescriptor(
            description="input queue: newest_wins (depth-1 slot, drops counted) — the only "
                        "policy; a growing queue is never used", read_only=True))
        p("models_dir", d["models_dir"], _desc("models directory ('' = default)"))
        p("image_reliability", "best_effort",
          _desc("image subscription reliability: best_effort (sensor data) or reliable"))
        p("sync_slop_ms", 20.0, _desc("max image/camera_info stamp difference"))
        p("publish_debug_image", False, _desc("publish the annotated debug_image"))
        p("depth_topic", d["depth_topic"], _desc(
            "aligned depth image for detections/objects, relative to the camera namespace "
            "(e.g. depth/image_raw; '' = none): sensor_msgs/Image 16UC1 mm or 32FC1 m, "
            "registered to the colour camera, paired by stamp (sync_slop_ms)"))
        p("diagnostics_period_s", 1.0, _desc("period of /diagnostics"))
        p("vocabulary", d["vocabulary"], _desc(
            "open-vocabulary phrases shared by CLIP and LSeg; changeable at runtime (also via "
            "the `vocabulary` topic, comma-separated); [''] = the stage's default"))
        p("detections_in_tracked", d["detections_in_tracked"], _desc(
            "separate sam/clip nodes: detections_in comes from a track_node, so its "
            "Detection2D.id are track ids (kept; CLIP accumulates labels per track)"))
        from perception2d_ros.models.tracking.bytetrack import DESCRIPTIONS as TRACK

        what = {"detect": "detector", "extrinsics": "camera pose in the base frame",
                "track": "tracker", "sam": "SAM masks", "clip": "CLIP labels",
                "lseg": "LSeg label map"}
        for group in STAGE_GROUPS:
            for key, value in d[group].items():
                text = TRACK.get(key) if group == "track" else None
                p(f"{group}.{key}", value if value != [] else [""],
                  _desc(text or f"{what[group]}: {key}"))

    def _config_from_params(self) -> dict[str, Any]:
        g = lambda n: self.get_parameter(n).value  # noqa: E731
        defaults = merge_config(None)
        cfg = merge_config({
            "stages": list(g("stages")),
            "interpolation": g("interpolation"),
            "output_encoding": g("output_encoding"),
            "models_dir": g("models_dir"),
            "depth_topic": g("depth_topic"),
            "detections_in_tracked": bool(g("detections_in_tracked")),
            "vocabulary": [v for v in g("vocabulary") if v],
            **{grp: {k: g(f"{grp}.{k}") for k in defaults[grp]} for grp in STAGE_GROUPS},
        })
        cfg["detect"]["classes"] = [c for c in cfg["detect"]["classes"] if c]
        cfg["extrinsics"]["translation"] = list(cfg["extrinsics"]["translation"])
        cfg["extrinsics"]["rotation_rpy"] = list(cfg["extrinsics"]["rotation_rpy"])
        return cfg

    def _on_set_parameters(self, params: Sequence[Any]) -> SetParametersResult:
        for prm in params:
            reason = check_parameter(prm.name, prm.value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)
