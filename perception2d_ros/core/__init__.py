"""ROS-free core: camera geometry, image codecs, engines, model wrappers. Never imports rclpy."""
