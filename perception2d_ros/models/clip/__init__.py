"""CLIP open-vocabulary labels: tokenizer, preprocessing, checkpoint loading, ONNX export,
the shared vocabulary + text-embedding cache, the labeler runtime, parity, and the clip
stage. Importing the runtime does not import torch.
"""
