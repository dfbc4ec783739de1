"""``perception2d bringup`` — the pip-only equivalent of ``ros2 launch perception2d
bringup.launch.py``: the same node list, each node in its own process with the same
``--ros-args``. Ctrl-C / SIGTERM stops them all."""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bringup", help="start the perception nodes (pip-only launch)")
    p.add_argument("--params-file", default=None, help="params YAML (default: config/perception2d.yaml)")
    p.add_argument("--namespace", default="/camera")
    p.add_argument("--pipeline", default="true", choices=["true", "false"],
                   help="one process for all stages (true) or one node per stage")
    p.add_argument("--image-topic", default="image_raw")
    p.add_argument("--camera-info-topic", default="camera_info")
    p.add_argument("--image-transport", choices=["raw", "compressed"], default=None,
                   help="camera image transport (default: the params file's image_transport)")
    p.add_argument("--use-sim-time", action="store_true")
    p.add_argument("--log-level", default="info")
    p.add_argument("--print", action="store_true", help="print the node commands and exit")
    p.set_defaults(func=run, accepts_ros_args=True)


def commands(args: argparse.Namespace) -> list[list[str]]:
    from perception2d_ros.ros.bringup import node_list

    extra = [a for a in getattr(args, "ros_args", []) if a != "--ros-args"]
    cmds = []
    for spec in node_list(pipeline=args.pipeline == "true", params_file=args.params_file,
                          image_topic=args.image_topic, camera_info_topic=args.camera_info_topic,
                          image_transport=args.image_transport):
        cmds.append([sys.executable, "-m", spec.module]
                    + spec.ros_args(args.namespace, args.use_sim_time, args.log_level) + extra)
    return cmds


def preflight(params_file: str | None, pipeline: bool = True, check_files: bool = True
              ) -> None:
    """Check before any node starts what would make a node fail at configure (params file,
    every parameter, model paths and files), so a mistake is one line here, not a node that
    sits unconfigured. Raises :class:`perception2d_ros.cli.errors.UserError` and model errors.
    """
    from perception2d_ros.ros.bringup import node_list
    from perception2d_ros.cli.errors import load_params
    from perception2d_ros.engines.model_params import check_model_files

    load_params(params_file)  # the file itself: present, YAML, a ROS params file
    try:
        specs = node_list(pipeline=pipeline, params_file=params_file)
    except ValueError as exc:
        from perception2d_ros.cli.errors import UserError, one_line

        raise UserError(one_line(exc)) from exc
    for spec in specs:
        cfg = load_params(params_file, node=spec.name, overrides=spec.overrides)
        if check_files:
            check_model_files(cfg)


def run(args: argparse.Namespace) -> int:
    # --print shows the commands (maybe for another machine): parameters are checked, the
    # model files only where the nodes start
    preflight(args.params_file, args.pipeline == "true", check_files=not args.print)
    cmds = commands(args)
    if args.print:
        for c in cmds:
            print(" ".join(c))
        return 0
    procs = [subprocess.Popen(c) for c in cmds]
    stopping = False

    def stop(signum, frame):  # noqa: ANN001
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    rc = 0
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        for p in procs:
            if p.poll() not in (None, 0) and not stopping:
                print(f"perception2d bringup: {p.args[2]} exited with {p.returncode}; "
                      "stopping the others", file=sys.stderr)
                rc = p.returncode
                stop(None, None)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    return rc
