"""The one node list. ``launch/bringup.launch.py`` (full ROS installs) and
``perception2d bringup`` (pip-only) both build their nodes from :func:`node_list`, so the two
cannot drift. ROS-free: returns plain descriptions."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SEPARATE_NODES = [  # stage → node kind in separate-node mode, in pipeline order
    ("rectify", "rectify_node"),
    ("detect", "detector_node"),
    ("track", "track_node"),
    ("sam", "sam_node"),
    ("clip", "clip_node"),
    ("lseg", "lseg_node"),
]
ALL_STAGES = ("rectify", "detect", "track", "sam", "clip", "lseg")


@dataclass
class NodeSpec:
    """One node to start: executable (console script / module), name, parameters (params
    file first, then overrides), remappings (from → to)."""

    kind: str
    name: str
    module: str
    params_files: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    remappings: list[tuple[str, str]] = field(default_factory=list)

    def ros_args(self, namespace: str, use_sim_time: bool, log_level: str) -> list[str]:
        """The ``--ros-args`` a process for this node gets (same as ros2 launch passes)."""
        args = ["--ros-args", "-r", f"__node:={self.name}"]
        if namespace:
            args += ["-r", f"__ns:={namespace}"]
        for f in self.params_files:
            args += ["--params-file", f]
        for k, v in {**self.overrides, "use_sim_time": use_sim_time}.items():
            args += ["-p", f"{k}:={_param_text(v)}"]
        for src, dst in self.remappings:
            args += ["-r", f"{src}:={dst}"]
        args += ["--log-level", log_level]
        return args


def _param_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_param_text(x) for x in v) + "]"
    return str(v)


def default_params_file() -> Path:
    here = Path(__file__).resolve().parents[2] / "config" / "perception2d.yaml"
    if here.is_file():
        return here
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("perception2d")) / "config" / "perception2d.yaml"


def enabled_stages(params_file: str | Path) -> list[str]:
    """Stages switched on in the params file (``/**`` or ``pipeline_node`` ``stages``)."""
    with open(params_file, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    stages = None
    for key in ("pipeline_node", "/**"):
        block = (data.get(key) or {}).get("ros__parameters") or {}
        if "stages" in block:
            stages = block["stages"]
            break
    stages = list(stages or ["rectify", "detect"])
    bad = [s for s in stages if s not in ALL_STAGES]
    if bad:
        raise ValueError(f"{params_file}: stages: unknown {bad}; known {list(ALL_STAGES)}")
    return [s for s in ALL_STAGES if s in stages]


def node_list(*, pipeline: bool = True, params_file: str | Path | None = None,
              image_topic: str = "image_raw", camera_info_topic: str = "camera_info",
              image_transport: str | None = None) -> list[NodeSpec]:
    """Nodes for the given mode. Topic names are relative to the namespace unless absolute.

    pipeline=True: one ``pipeline_node`` running every enabled stage on the same frame.
    pipeline=False: one node per enabled stage, chained over topics (image_rect, detections).
    ``image_transport`` (raw | compressed; None = the params file's) applies to the nodes that
    read the camera's images; nodes fed by ``rectify_node`` always read its raw image_rect.
    Detections chain: detector → ``detections`` when it is the last box producer, else
    ``detections/raw`` → track_node → ``detections`` (or ``detections/tracked`` when CLIP
    runs) → sam_node / clip_node (``detections_in``) → clip_node publishes ``detections``.
    """
    pfile = str(params_file or default_params_file())
    stages = enabled_stages(pfile)
    remap_in = [("image_raw", image_topic), ("camera_info", camera_info_topic)]
    camera_side = {"image_transport": image_transport} if image_transport else {}
    if pipeline:
        return [NodeSpec("pipeline_node", "pipeline_node",
                         "perception2d_ros.ros.pipeline_node", [pfile],
                         {"stages": stages, **camera_side}, remap_in)]
    specs = []
    # with CLIP on, the detector's boxes go to detections/raw and clip_node publishes the
    # labelled `detections` — the same topic and content as pipeline mode
    raw_dets = "detections/raw" if ("clip" in stages or "track" in stages) else "detections"
    # what sam/clip consume: the tracker's output when tracking, else the detector's
    boxes = ("detections/tracked" if "clip" in stages else "detections") \
        if "track" in stages else raw_dets
    for stage, kind in SEPARATE_NODES:
        if stage not in stages:
            continue
        overrides: dict[str, Any] = {"stages": [stage]}
        # images from rectify_node are raw sensor_msgs/Image; only camera-facing nodes decode
        overrides.update(camera_side if kind == "rectify_node" or "rectify" not in stages
                         else {"image_transport": "raw"})
        remaps: list[tuple[str, str]] = []
        if kind == "rectify_node":
            remaps = list(remap_in)
        elif kind == "detector_node":
            if "rectify" not in stages:  # images are used as they come (no rectification)
                remaps = [("image_rect", image_topic), ("camera_info_rect", camera_info_topic)]
            if raw_dets != "detections":
                remaps.append(("detections", raw_dets))
        else:
            if "rectify" not in stages:
                remaps.append(("image_rect", image_topic))
            if kind == "track_node":
                remaps = [("detections_in", raw_dets)]
                if boxes != "detections":
                    remaps.append(("detections", boxes))
            if kind in ("sam_node", "clip_node"):
                remaps.append(("detections_in", boxes))
                if "track" in stages:
                    overrides["detections_in_tracked"] = True
        specs.append(NodeSpec(kind, kind, f"perception2d_ros.ros.{kind}", [pfile],
                              overrides, remaps))
    return specs


def pipeline_config(params_file: str | Path | None = None, node: str = "pipeline_node"
                    ) -> dict[str, Any]:
    """The pipeline config a node named ``node`` would get from the params file:
    ``/**`` parameters, then the node's own block; dotted names become nested keys."""
    from perception2d_ros.pipeline.config import merge_config

    with open(params_file or default_params_file(), encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    flat: dict[str, Any] = {}
    for key in ("/**", node):
        flat.update((data.get(key) or {}).get("ros__parameters") or {})
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        cur = nested
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
    cfg = merge_config(nested)
    cfg["detect"]["classes"] = [c for c in cfg["detect"]["classes"] if c]
    return cfg
