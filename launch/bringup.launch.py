"""ros2 launch perception2d bringup.launch.py [namespace:=/camera] [pipeline:=true]
[params_file:=...] [image_topic:=image_raw] [camera_info_topic:=camera_info]
[use_sim_time:=false] [log_level:=info]

The node list comes from perception2d_ros.ros.bringup.node_list — the same function the
pip-only `perception2d bringup` uses."""
from pathlib import Path

import yaml
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from perception2d_ros.ros.bringup import default_params_file, node_list

EXECUTABLES = {k: k for k in ("rectify_node", "detector_node", "track_node", "sam_node",
                                "clip_node", "lseg_node", "pipeline_node")}


BOOL_CHOICES = ["true", "false"]
LOG_LEVELS = ["debug", "info", "warn", "error", "fatal"]


class LaunchArgumentError(RuntimeError):
    """A bad launch argument: launch prints the message as one line and exits non-zero."""


def _check_params_file(path: str) -> None:
    """Fail with one line naming the problem unless ``path`` is a readable ROS 2 params YAML
    (a mapping of node names to ``ros__parameters``)."""
    fix = "give a ROS 2 parameters YAML, e.g. params_file:=<path>/perception2d.yaml"
    p = Path(path)
    if not p.is_file():
        raise LaunchArgumentError(f"params_file {path}: no such file; {fix}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise LaunchArgumentError(f"params_file {path}: not valid YAML{line}; {fix}") from None
    if not isinstance(data, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("ros__parameters"), dict)
            for v in data.values()):
        raise LaunchArgumentError(
            f"params_file {path}: expected node names mapping to ros__parameters "
            f"(like '/**: {{ros__parameters: {{...}}}}'); {fix}")


def _nodes(context, *args, **kwargs):
    get = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    params_file = get("params_file")
    _check_params_file(params_file)
    try:
        specs = node_list(pipeline=get("pipeline") == "true", params_file=params_file,
                          image_topic=get("image_topic"),
                          camera_info_topic=get("camera_info_topic"))
    except ValueError as exc:  # e.g. an unknown stage
        raise LaunchArgumentError(str(exc)) from None
    use_sim_time = get("use_sim_time") == "true"
    return [Node(package="perception2d", executable=EXECUTABLES[s.kind], name=s.name,
                 namespace=get("namespace"), output="screen",
                 parameters=s.params_files + [{**s.overrides, "use_sim_time": use_sim_time}],
                 remappings=s.remappings,
                 arguments=["--ros-args", "--log-level", get("log_level")])
            for s in specs]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="/camera"),
        DeclareLaunchArgument("pipeline", default_value="true", choices=BOOL_CHOICES,
                              description="one process for all stages (true) or one node each"),
        DeclareLaunchArgument("params_file", default_value=str(default_params_file()),
                              description="ROS 2 parameters YAML for every node"),
        DeclareLaunchArgument("image_topic", default_value="image_raw"),
        DeclareLaunchArgument("camera_info_topic", default_value="camera_info"),
        DeclareLaunchArgument("use_sim_time", default_value="false", choices=BOOL_CHOICES),
        DeclareLaunchArgument("log_level", default_value="info", choices=LOG_LEVELS),
        OpaqueFunction(function=_nodes),
    ])
