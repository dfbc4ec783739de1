"""`lseg_node`: the lseg stage as its own node (image_rect + detections_in → its outputs);
see perception_node.NODE_KINDS."""
from perception2d_ros.ros.perception_node import main_for


def main(args=None) -> None:
    main_for("lseg_node", args)


if __name__ == "__main__":
    main()
