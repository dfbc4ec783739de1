"""CLIP zero-shot labelling (ROS-free).

* :mod:`.tokenizer` — CLIP BPE tokenizer (ids identical to open_clip's).
* :mod:`.preprocess` — open_clip's eval transform in numpy (+ square crops for boxes).
* :mod:`.model` — checkpoint loading (no pickled code executed), ONNX export of the image and
  text towers with a JSON sidecar, parity check against open_clip (torch needed here only).
* :mod:`.vocabulary` — :class:`Vocabulary` and the shared :class:`TextEmbeddingCache`.
* :mod:`.labeler` — :class:`ClipLabeler` (ONNX Runtime / TensorRT through core.engines).

Importing this package does not import torch or onnxruntime.
"""
from perception2d_ros.core.clip.labeler import ClipLabeler, Label, LabelResult
from perception2d_ros.core.clip.vocabulary import (
    DEFAULT_TEMPLATES, TextEmbeddingCache, Vocabulary)

__all__ = ["ClipLabeler", "Label", "LabelResult", "DEFAULT_TEMPLATES", "TextEmbeddingCache",
           "Vocabulary"]
