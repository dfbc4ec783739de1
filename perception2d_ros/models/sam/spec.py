"""What an exported SAM is: the architectures, the model's fixed sizes and constants, the
ONNX tensor names, the ``sam.json`` sidecar (:class:`SamModelFiles`) and :class:`SamError`.
Shared by the runtime and the torch export side; imports nothing of the family."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

IMAGE_SIZE = 1024                 # encoder input side (padded square)
EMBED_SIZE = 64                   # image embedding side (IMAGE_SIZE / patch 16)
EMBED_DIM = 256
LOW_RES = 256                     # decoder mask side (4 x EMBED_SIZE)
PIXEL_MEAN = (123.675, 116.28, 103.53)   # RGB, segment_anything.modeling.Sam defaults
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0
STABILITY_OFFSET = 1.0
ARCHS = ("vit_b", "vit_l", "vit_h", "vit_t")     # vit_t: MobileSAM (TinyViT encoder)
ARCH_ALIASES = {"mobile_sam": "vit_t"}

META_FILE = "sam.json"
ENCODER_INPUT = "image"
ENCODER_OUTPUT = "image_embeddings"
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input",
                  "has_mask_input")
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions")


class SamError(RuntimeError):
    """SAM could not run: no image set, bad prompts, missing or inconsistent exported files."""


@dataclass(frozen=True)
class SamModelFiles:
    """An exported SAM: ONNX files and the sidecar metadata (``sam.json``)."""

    encoder: Path
    decoder: Path                  # multimask: K = 3
    decoder_single: Path | None    # single mask: K = 1
    meta: dict[str, Any]

    @classmethod
    def load(cls, where: str | Path | Mapping[str, Any]) -> "SamModelFiles":
        """From an export directory, its ``sam.json``, or the dict ``export_onnx`` returns."""
        if isinstance(where, Mapping):
            meta_path = Path(where["meta"])
        else:
            p = Path(where)
            meta_path = p / META_FILE if p.is_dir() else p
        if not meta_path.is_file():
            raise SamError(f"SAM export metadata not found: {meta_path} (export with "
                           "`perception2d models export` or sam_export.export_onnx)")
        meta = json.loads(meta_path.read_text())
        root = meta_path.parent
        files = meta.get("files", {})
        for key in ("encoder", "decoder"):
            if key not in files:
                raise SamError(f"{meta_path}: files.{key} missing")
        single = files.get("decoder_single")
        return cls(encoder=root / files["encoder"]["path"], decoder=root / files["decoder"]["path"],
                   decoder_single=root / single["path"] if single else None, meta=meta)
