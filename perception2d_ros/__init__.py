"""perception2d: ROS 2 camera perception. Layers, bottom to top: geometry/ and io/ ->
engines/ -> models/ -> pipeline/ -> ros/ -> cli/, bench/, demo/ (README: Architecture).
Only ros/ (and the top layer) import rclpy."""
