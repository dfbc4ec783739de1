"""What the LSeg runtime knows about an exported image encoder: :class:`LSegMeta`, read
from the sidecar JSON next to the ONNX (input size, normalisation, logit scale, text model),
and the optional lang-seg :class:`HeadBlock` on the logits."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class HeadBlock:
    """lang-seg spatial regularisation block on the logits (arch_option 1 / 2)."""

    kind: str                 # bottleneck | depthwise
    activation: str           # relu | lrelu | tanh
    block_depth: int
    weight: np.ndarray        # (3, 3) correlation kernel (torch conv2d semantics)
    bias: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "HeadBlock | None":
        if not d:
            return None
        return cls(kind=str(d["kind"]), activation=str(d["activation"]),
                   block_depth=int(d["block_depth"]),
                   weight=np.asarray(d["weight"], np.float32).reshape(3, 3),
                   bias=float(d["bias"]))


@dataclass(frozen=True)
class LSegMeta:
    """What the runtime needs to know about an exported LSeg image encoder (its sidecar)."""

    input_size: tuple[int, int] = (480, 480)          # H, W
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pad_value: int = 0                                  # letterbox fill (pixel value)
    embed_stride: int = 2
    embed_dim: int = 512
    logit_scale: float = 1.0 / 0.07
    head_block: HeadBlock | None = None
    input_name: str = "image"
    output_name: str = "pixel_embeds"
    text_model: str = "ViT-B-32"
    text_templates: tuple[str, ...] = ("{}",)
    arch: str = "lseg_vitl16_384"
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LSegMeta":
        arch = d.get("arch", {})
        return cls(
            input_size=tuple(int(v) for v in d["input_size"]),
            mean=tuple(float(v) for v in d.get("mean", (0.5, 0.5, 0.5))),
            std=tuple(float(v) for v in d.get("std", (0.5, 0.5, 0.5))),
            pad_value=int(d.get("pad_value", 0)),
            embed_stride=int(d.get("embed_stride", 2)),
            embed_dim=int(d.get("embed_dim", 512)),
            logit_scale=float(d.get("logit_scale", 1.0 / 0.07)),
            head_block=HeadBlock.from_dict(d.get("head_block")),
            input_name=str(d.get("input_name", "image")),
            output_name=str(d.get("output_name", "pixel_embeds")),
            text_model=str(d.get("text_model", "ViT-B-32")),
            text_templates=tuple(d.get("text_templates", ("{}",))),
            arch=str(arch.get("name", "?") if isinstance(arch, Mapping) else arch),
            raw=dict(d),
        )

    @classmethod
    def from_sidecar(cls, path: str | Path) -> "LSegMeta":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(
                f"LSeg sidecar {p} not found: it is written next to the ONNX by "
                "perception2d_ros.models.lseg.export.export_onnx")
        return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
