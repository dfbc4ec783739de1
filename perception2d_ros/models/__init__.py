"""Model families (ROS-free), one package each with the same shape: runtime (pre/post
processing around an engine), export (official checkpoint -> ONNX, parity), stage (the
pipeline stage). May import engines/, geometry/, io/ and the bottom of pipeline/
(pipeline.frame, pipeline.results); never the rest of pipeline/, ros/, cli/.
"""
