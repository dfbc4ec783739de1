"""The SAM prompt decoder graph run by torch (``backend: torch``, the GPU backend where only
torch + CUDA exist; here on the CPU) against the ONNX Runtime decoder that
test_sam_parity.py proves equal to ``segment_anything.SamPredictor``: same embedding of a
real COCO image, real GT boxes and clicks, batched prompts of two sizes (dynamic N)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from perception2d_ros.engines.factory import EngineConfig, create_engine
from perception2d_ros.engines.torch_backend import TorchEngine
from perception2d_ros.models.sam.runtime import SamSegmenter

pytestmark = pytest.mark.slow
pytest.importorskip("torch", reason="torch is an export/test extra (requirements/test.txt)")


def test_decoder_on_torch_matches_onnxruntime(sam_random_export, data_dir: Path) -> None:
    _, exported, _ = sam_random_export
    ref = SamSegmenter.from_exported(exported, EngineConfig(backend="onnxruntime",
                                                            device="cpu"))
    torch_cfg = EngineConfig(backend="torch", device="cpu", fallback=False)
    dec = create_engine(exported["decoder"], torch_cfg)
    single = create_engine(exported["decoder_single"], torch_cfg)
    assert isinstance(dec, TorchEngine)
    ours = SamSegmenter(ref.encoder, dec, single, meta=ref.meta)
    coco = json.loads((data_dir / "coco" / "annotations" / "instances_tinycoco.json").read_text())
    per_image: dict[int, list] = {}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        per_image.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    image_id = max(per_image, key=lambda k: len(per_image[k]))   # the busiest image
    image = next(im for im in coco["images"] if im["id"] == image_id)
    boxes = np.array(per_image[image_id][:5], np.float64)
    assert len(boxes) >= 3
    bgr = cv2.imread(str(data_dir / "coco" / "images" / image["file_name"]))
    ref.set_image(bgr)
    ours.set_embedding(ref.embedding, bgr.shape[:2])
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None, :]
    for args in ({"boxes": boxes}, {"boxes": boxes[:2]},
                 {"points": centres, "point_labels": np.ones((len(boxes), 1), np.float32)}):
        for multimask in (True, False):
            a, b = ours.predict(multimask=multimask, **args), ref.predict(multimask=multimask,
                                                                          **args)
            np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, atol=1e-3)
            np.testing.assert_allclose(a.iou_predictions, b.iou_predictions, atol=1e-4)
            assert np.array_equal(a.chosen, b.chosen)
    assert len(dec.module._plans) >= 2   # one plan per prompt count
