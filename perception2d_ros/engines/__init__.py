"""Inference engines (ROS-free): the Engine interface and its ONNX Runtime / TensorRT / torch
backends, the ONNX->torch interpreter, frames kept on a torch device, the model store
(manifest, sha256, confinement), fetch. May import geometry/ and io/; never models/ or above.
"""
