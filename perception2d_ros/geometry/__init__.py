"""Camera geometry (ROS-free): the camera model, calibration files and CameraInfo fields,
distortion models and rectification maps, extrinsics and the ground plane, the TF buffer,
3D objects. Imports numpy/OpenCV only; nothing from the rest of perception2d_ros.
"""
