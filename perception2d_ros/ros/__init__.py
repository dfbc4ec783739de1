"""Thin ROS 2 layer: nodes, message conversions, QoS, publishing, bag play/record, the node list
for launch. The only package that imports rclpy. May import everything below (pipeline/,
models/, engines/, geometry/, io/); never cli/ or demo/."""
