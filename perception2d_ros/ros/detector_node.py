"""`detector_node`: PerceptionNode with the detector defaults (see perception_node.NODE_KINDS)."""
from perception2d_ros.ros.perception_node import main_for


def main(args=None) -> None:
    main_for("detector_node", args)


if __name__ == "__main__":
    main()
