"""ros2 launch perception2d bringup.launch.py [namespace:=/camera] [pipeline:=true]
[params_file:=...] [image_topic:=image_raw] [camera_info_topic:=camera_info]
[use_sim_time:=false] [log_level:=info]

The node list comes from perception2d_ros.bringup.node_list — the same function the
pip-only `perception2d bringup` uses."""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from perception2d_ros.bringup import default_params_file, node_list

EXECUTABLES = {k: k for k in ("rectify_node", "detector_node", "sam_node", "clip_node",
                                "lseg_node", "pipeline_node")}


def _nodes(context, *args, **kwargs):
    get = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    specs = node_list(pipeline=get("pipeline").lower() == "true",
                      params_file=get("params_file") or None,
                      image_topic=get("image_topic"), camera_info_topic=get("camera_info_topic"))
    use_sim_time = get("use_sim_time").lower() == "true"
    return [Node(package="perception2d", executable=EXECUTABLES[s.kind], name=s.name,
                 namespace=get("namespace"), output="screen",
                 parameters=s.params_files + [{**s.overrides, "use_sim_time": use_sim_time}],
                 remappings=s.remappings,
                 arguments=["--ros-args", "--log-level", get("log_level")])
            for s in specs]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="/camera"),
        DeclareLaunchArgument("pipeline", default_value="true",
                              description="one process for all stages (true) or one node each"),
        DeclareLaunchArgument("params_file", default_value=str(default_params_file())),
        DeclareLaunchArgument("image_topic", default_value="image_raw"),
        DeclareLaunchArgument("camera_info_topic", default_value="camera_info"),
        DeclareLaunchArgument("use_sim_time", default_value="false"),
        DeclareLaunchArgument("log_level", default_value="info"),
        OpaqueFunction(function=_nodes),
    ])
