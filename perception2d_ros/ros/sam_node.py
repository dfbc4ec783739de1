"""`sam_node`: the sam stage as its own node (image_rect + detections_in → its outputs);
see perception_node.NODE_KINDS."""
from perception2d_ros.ros.perception_node import main_for


def main(args=None) -> None:
    main_for("sam_node", args)


if __name__ == "__main__":
    main()
