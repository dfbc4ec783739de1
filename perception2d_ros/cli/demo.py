"""``perception2d demo``: the main job on the embedded real sequence (or ``--bag``), over real
ROS topics, with a report in ``demo_output/`` (see :mod:`perception2d_ros.demo.run`)."""
from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    from perception2d_ros.demo import run as demo

    p = sub.add_parser("demo", help="bag play -> nodes -> bag record on the embedded real "
                                    "camera sequence (or --bag) and a report",
                       description=demo.__doc__.splitlines()[0])
    demo.add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from perception2d_ros.demo import run as demo

    return demo.run_args(args)
