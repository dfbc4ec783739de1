"""SAM promptable masks: the segmenter runtime (image encoder + prompt decoder), prompts and
results, model files, export of official checkpoints to ONNX with parity, device pre/post,
and the sam stage.
"""
