"""LSeg language-driven per-pixel labels: the labeler runtime (official multi-scale
resampling), vocabulary and palette, the network, checkpoints and ONNX export with parity,
and the lseg stage.
"""
