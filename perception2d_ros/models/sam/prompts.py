"""SAM prompts → decoder arrays: :func:`build_prompts` (boxes and points in the order of
segment-anything's ``PromptEncoder``) and :func:`_pad_prompts` (prompt counts rounded up to a
power of two for the device path's CUDA graphs)."""
from __future__ import annotations

from typing import Any

import numpy as np

from perception2d_ros.models.sam.spec import SamError

# point labels (segment-anything convention)
LABEL_PAD, LABEL_NEG, LABEL_POS, LABEL_BOX_TL, LABEL_BOX_BR = -1, 0, 1, 2, 3


def build_prompts(boxes: Any = None, points: Any = None, point_labels: Any = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Prompts in original-image pixels → decoder point arrays (unscaled) ``coords``
    [N,P,2] float64 and ``labels`` [N,P] float32, exactly as segment-anything's
    ``PromptEncoder`` orders them.

    boxes         [N,4] xyxy (or [4] for one box) → two corner points labelled 2, 3.
    points        [N,P,2] xy (N prompts of P points), or [P,2] = one prompt of P points.
    point_labels  [N,P] (or [P]): 1 foreground, 0 background, -1 ignored (ragged prompts).
    Points and boxes together must have the same N: prompt i = its points, then its box.
    Points without a box get one padding point (0,0) with label -1, as segment-anything adds.
    """
    box_arr = None
    if boxes is not None:
        box_arr = np.asarray(boxes, dtype=np.float64)
        if box_arr.ndim == 1:
            box_arr = box_arr[None]
        if box_arr.ndim != 2 or box_arr.shape[1] != 4:
            raise SamError(f"boxes must be [N,4] xyxy, got shape {box_arr.shape}")
        if box_arr.shape[0] == 0:
            box_arr = None if points is None else box_arr
    pts = None
    if points is not None:
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim == 2:
            pts = pts[None]
        if pts.ndim != 3 or pts.shape[2] != 2:
            raise SamError(f"points must be [N,P,2] or [P,2] xy, got shape {pts.shape}")
        if point_labels is None:
            raise SamError("point_labels are required with points (1 = fg, 0 = bg)")
        lab = np.asarray(point_labels, dtype=np.float32)
        if lab.ndim == 1:
            lab = lab[None]
        if lab.shape != pts.shape[:2]:
            raise SamError(f"point_labels shape {lab.shape} does not match points "
                           f"{pts.shape[:2]}")
        if not np.isin(lab, (LABEL_PAD, LABEL_NEG, LABEL_POS)).all():
            raise SamError("point_labels must be 1 (foreground), 0 (background) or -1 (ignore)")
    elif point_labels is not None:
        raise SamError("point_labels given without points")
    if pts is None and box_arr is None:
        return np.zeros((0, 0, 2)), np.zeros((0, 0), np.float32)
    if pts is not None and box_arr is not None:
        if pts.shape[0] != box_arr.shape[0]:
            raise SamError(f"{pts.shape[0]} point prompts but {box_arr.shape[0]} boxes; "
                           "with both, prompt i is points[i] + boxes[i]")
        corners = box_arr.reshape(-1, 2, 2)
        coords = np.concatenate([pts, corners], axis=1)
        labels = np.concatenate(
            [lab, np.tile(np.float32([LABEL_BOX_TL, LABEL_BOX_BR]), (len(corners), 1))], axis=1)
    elif box_arr is not None:
        coords = box_arr.reshape(-1, 2, 2)
        labels = np.tile(np.float32([LABEL_BOX_TL, LABEL_BOX_BR]), (len(coords), 1))
    else:
        assert pts is not None
        coords = np.concatenate([pts, np.zeros((pts.shape[0], 1, 2))], axis=1)
        labels = np.concatenate([lab, np.full((lab.shape[0], 1), LABEL_PAD, np.float32)], axis=1)
    return coords, labels.astype(np.float32)


def _pad_prompts(coords: np.ndarray, labels: np.ndarray, masks_in: np.ndarray,
                 has_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Decoder feeds with the prompt count rounded up to a power of two by padding prompts
    (all points label -1, no mask): the device path captures one CUDA graph per count, so
    counts 1..32 need 6 graphs instead of 32. Prompts are independent in the decoder, so the
    padding changes nothing in the real prompts' outputs."""
    n = coords.shape[0]
    size = 1 << max(0, (n - 1).bit_length())
    if size == n:
        return {"point_coords": coords, "point_labels": labels, "mask_input": masks_in,
                "has_mask_input": has_mask}
    extra = size - n

    def pad(a: np.ndarray, value: float) -> np.ndarray:
        return np.concatenate([a, np.full((extra,) + a.shape[1:], value, a.dtype)])

    return {"point_coords": pad(coords, 0.0), "point_labels": pad(labels, -1.0),
            "mask_input": pad(masks_in, 0.0), "has_mask_input": pad(has_mask, 0.0)}

