"""`track_node`: the track stage as its own node (detections_in → tracked `detections`, no
image); see perception_node.NODE_KINDS."""
from perception2d_ros.ros.perception_node import main_for


def main(args=None) -> None:
    main_for("track_node", args)


if __name__ == "__main__":
    main()
