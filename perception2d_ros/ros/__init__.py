"""Thin ROS 2 layer: nodes, message conversions, QoS, parameters."""
