"""Box-prompted SAM mask quality on COCO (``perception2d eval masks``): every GT box is a
prompt, each predicted mask is compared with its GT instance mask."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from perception2d_ros.models.sam.results import mask_iou
from perception2d_ros.models.sam.runtime import SamSegmenter
from perception2d_ros.models.sam.spec import SamError


def evaluate_coco_masks(segmenter: SamSegmenter, images_dir: str | Path,
                        annotations: str | Path, *, max_images: int | None = None,
                        multimask: bool = False, progress: Any = None) -> dict[str, Any]:
    """Box-prompted mask quality on COCO: every non-crowd GT box of an image is a prompt
    (one encoder run per image, one decoder run for its boxes); each predicted mask is
    compared with its GT instance mask (polygons / RLE decoded with pycocotools).

    Returns ``{"miou", "instances", "images", "per_image": [{file_name, instances, miou}],
    "ious": [...]}`` — mIoU is the mean over instances. Images absent from ``images_dir`` are
    skipped (counted in ``missing_images``)."""
    import cv2

    try:
        from pycocotools.coco import COCO
    except ImportError as exc:  # pragma: no cover - pycocotools is in requirements/test.txt
        raise SamError("`eval masks` needs pycocotools (pip install pycocotools)") from exc
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotations))
    images_dir = Path(images_dir)
    ious: list[float] = []
    per_image = []
    missing = 0
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        path = images_dir / info["file_name"]
        if not path.is_file():
            missing += 1
            continue
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=False))
                if a.get("area", 1) > 0 and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        if not anns:
            continue
        if max_images is not None and len(per_image) >= max_images:
            break
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SamError(f"cannot read image {path}")
        boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)])
        segmenter.set_image(image, frame_id=("coco", img_id))
        res = segmenter.predict(boxes=boxes, multimask=multimask)
        img_ious = [mask_iou(res.masks[i], coco.annToMask(a).astype(bool))
                    for i, a in enumerate(anns)]
        ious.extend(img_ious)
        per_image.append({"file_name": info["file_name"], "instances": len(anns),
                          "miou": float(np.mean(img_ious))})
        if progress is not None:
            progress(f"{info['file_name']}: {len(anns)} instances, mIoU {np.mean(img_ious):.3f}")
    return {"miou": float(np.mean(ious)) if ious else float("nan"), "instances": len(ious),
            "images": len(per_image), "missing_images": missing, "multimask": multimask,
            "per_image": per_image, "ious": ious}
