"""Thin ROS 2 layer: nodes, message conversions, QoS, publishing, bag play/record, the node
list for launch. rclpy is imported here (and in the top layer), nowhere below. May import
pipeline/, models/, engines/, geometry/, io/; never cli/, bench/ or demo/."""
