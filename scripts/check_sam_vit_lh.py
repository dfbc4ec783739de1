#!/usr/bin/env python3
"""Manual check of the big SAM encoders (≈ 8 min and ≈ 12 GB RAM on a 2-core CPU).

    .venv/bin/python scripts/check_sam_vit_lh.py vit_l vit_h

For each arch: the official architecture with seeded random weights, saved in the official
``.pth`` layout, exported through our path (ViT-H's 2.5 GB encoder goes to an ONNX external-data
file), then ``sam_parity.parity_check`` against ``segment_anything.SamPredictor`` on a real
COCO image (GT boxes, point prompts, refinement). One JSON line per arch on stdout.
CI runs the same check for ViT-B and MobileSAM (test_sam_parity.py, test_sam_mobile.py);
ViT-L/H share every line of that code but are too big for CI. A run's output:
docs/results/sam_vit_lh_parity_2026-11-26.jsonl.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "test"))

from pycocotools.coco import COCO  # noqa: E402

import test_sam_parity as T  # noqa: E402  (the CI parity test's data and prompts)
from perception2d_ros.models.sam import checkpoint as sam_checkpoint  # noqa: E402
from perception2d_ros.models.sam import export as sam_export  # noqa: E402
from perception2d_ros.models.sam import parity as sam_parity  # noqa: E402


def main(archs: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(T.ANNOTATIONS))
    name = T.PARITY_IMAGES[1]
    boxes, pts, labs, _ = T._prompts(coco, name)
    image = cv2.imread(str(T.COCO_DIR / "images" / name))
    ok = True
    for arch in archs:
        root = Path(tempfile.mkdtemp(prefix=f"sam_{arch}_"))
        try:
            t = time.time()
            ckpt = sam_checkpoint.save_checkpoint(
                sam_checkpoint.random_state_dict(arch, seed=0), root / f"{arch}.pth")
            files = sam_export.export_onnx(None, ckpt, root / "exp")
            t_export = time.time() - t
            enc = json.loads(Path(files["meta"]).read_text())["files"]["encoder"]
            t = time.time()
            rep = sam_parity.parity_check(arch, ckpt, files, image, boxes[:6], points=pts[:2],
                                          point_labels=labs[:2], multimask_modes=(True,))
            row = {"export_s": round(t_export), "parity_s": round(time.time() - t),
                   "passed": rep["passed"], "external_data": bool(enc.get("external_data")),
                   "encoder_bytes": enc["size"] + enc.get("external_data", {}).get("size", 0),
                   "preprocess_max_abs_diff": rep["preprocess_max_abs_diff"],
                   "embedding_max_abs_diff": rep["embedding_max_abs_diff"]}
            for s in ("boxes_multi", "points_multi", "points_refined_single"):
                for m in ("low_res_max_abs_diff", "iou_pred_max_abs_diff", "mask_iou_min"):
                    if s in rep:
                        row[f"{s}.{m}"] = rep[s][m]
            ok = ok and rep["passed"]
            print(json.dumps({arch: row}), flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["vit_l", "vit_h"]))
