"""``perception2d`` command line: one entry point, one module per command family.

Each module in ``COMMANDS`` exposes ``add_parser(subparsers)`` which registers its
sub-command(s) and sets ``func`` (called with the parsed ``argparse.Namespace``; returns an
exit code). Modules that contribute an ``eval`` target expose ``add_eval_parser(subparsers)``.
Modules must import heavy dependencies (onnxruntime, torch, rclpy) inside their functions,
not at import time, so ``perception2d --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# module name under perception2d_ros.cli
COMMANDS = [
    "bag",        # bag make/play/record/info
    "rectify",    # rectify images with a camera_info YAML
    "detect",     # detect + eval detect
    "label",      # CLIP zero-shot labels + eval clip
    "segment",    # SAM masks + eval masks
    "seglabels",  # LSeg label maps + eval seg
    "models",     # models list/fetch/export/build/verify
    "bench",      # benchmarks
    "process",    # offline pipeline over a bag
    "bringup",    # pip-only bringup entry point (same node list as the launch file)
    "demo",       # the main job on the embedded real sequence, with a report
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perception2d", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    eval_parser = sub.add_parser("eval", help="evaluate a stage on labelled data")
    eval_sub = eval_parser.add_subparsers(dest="eval_target", metavar="TARGET")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"perception2d_ros.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"perception2d_ros.cli.{name}":
                continue  # command family not built yet
            raise
        module.add_parser(sub)
        if hasattr(module, "add_eval_parser"):
            module.add_eval_parser(eval_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error prints one line (``perception2d CMD: error: …``) and
    exits 1 or 2; ``--debug`` (anywhere before ``--ros-args``) or ``PERCEPTION2D_DEBUG=1``
    also prints the traceback."""
    from perception2d_ros.cli.errors import debug_enabled, run_main, strip_debug_flag

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    parser = build_parser()
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also PERCEPTION2D_DEBUG=1)")
    args, ros_args = parser.parse_known_args(strip_debug_flag(argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if ros_args and not getattr(args, "accepts_ros_args", False):
        parser.error(f"unrecognized arguments: {' '.join(ros_args)}")
    args.ros_args = ros_args
    args.debug = debug
    prog = "perception2d " + " ".join(
        str(v) for v in (args.command, getattr(args, "eval_target", None)) if v)
    return run_main(lambda: args.func(args), prog=prog, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
