"""perception2d: ROS 2 camera perception. ``core`` is ROS-free; ``ros`` is the thin ROS layer."""
__version__ = "0.1.0"
