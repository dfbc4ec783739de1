"""Input/output (ROS-free): sensor_msgs image encodings <-> numpy, image files, rosbag2 / ROS 1
bag reading and writing (rosbags), debug drawing. May import geometry/; nothing above it.
"""
