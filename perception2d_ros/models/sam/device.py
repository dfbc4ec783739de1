"""SAM pre/postprocessing on a torch device (frames kept there: ``detect.device_frames``).

Fidelity to the host path: the image is resized with antialiased bilinear (Pillow's filter;
Pillow is the reference) and the masks upscaled with the same per-axis matrices as
:class:`SamSegmenter`.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def sam_preprocess(image: Any, transform: Any, image_format: str = "BGR") -> Any:
    """HxWx3 uint8 device image → encoder input [1,3,S,S] float32 on the device: resized
    (longest side S, antialiased bilinear, rounded to uint8 as Pillow does), normalised,
    zero-padded bottom-right."""
    import torch
    import torch.nn.functional as F

    h, w = int(image.shape[0]), int(image.shape[1])
    nh, nw = transform.input_size((h, w))
    x = image.permute(2, 0, 1)[None].float()
    if image_format == "BGR":
        x = x.flip(1)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=True).round_().clamp_(0, 255)
    mean = torch.as_tensor(transform.pixel_mean, device=x.device).reshape(1, 3, 1, 1)
    std = torch.as_tensor(transform.pixel_std, device=x.device).reshape(1, 3, 1, 1)
    s = transform.target_length
    out = torch.zeros((1, 3, s, s), dtype=torch.float32, device=x.device)
    out[:, :, :nh, :nw] = (x - mean) / std
    return out


def sam_postprocess(low_res: Any, iou: Any, transform: Any, original_size: tuple[int, int],
                    select: str, mask_threshold: float, offset: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Device decoder outputs → host (masks [N,H,W] bool, scores, stability, chosen), the
    same selection and upscaling as :meth:`SamSegmenter.postprocess` (per-axis matrices)."""
    import torch

    low = low_res.float()
    iou = iou.float()
    n, k = low.shape[:2]
    cache = transform.__dict__.setdefault("_pp_device", {})
    key = (tuple(original_size), low.shape[-1], str(low.device))
    if key not in cache:
        ay, ax = transform.postprocess_matrices(original_size, low.shape[-1])
        if len(cache) > 8:
            cache.clear()
        cache[key] = (torch.from_numpy(ay).to(low.device), torch.from_numpy(ax).to(low.device))
    ay, ax = cache[key]

    def upscale(x: Any) -> Any:
        return torch.matmul(torch.matmul(ay, x), ax.T)

    def stability(logits: Any) -> Any:
        inter = (logits > mask_threshold + offset).sum((-1, -2)).double()
        union = (logits > mask_threshold - offset).sum((-1, -2)).double()
        return (inter / union).float()

    idx = torch.arange(n, device=low.device)
    if select == "stability" and k > 1:
        logits_all = upscale(low)
        stab_all = stability(logits_all)
        chosen = torch.nan_to_num(stab_all, nan=-1.0).argmax(1)
        logits = logits_all[idx, chosen]
        stab = stab_all[idx, chosen]
    else:
        chosen = iou.argmax(1) if k > 1 else torch.zeros(n, dtype=torch.long,
                                                          device=low.device)
        logits = upscale(low[idx, chosen])
        stab = stability(logits)
    masks = logits > mask_threshold
    return (masks, iou[idx, chosen].cpu().numpy(), stab.cpu().numpy(),
            chosen.cpu().numpy().astype(np.int64))


def combine_masks(masks: Any, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Device [N,H,W] bool masks → host (uint16 instance-id image, areas int64, bboxes int32
    xyxy), as :func:`sam.instance_id_image` / ``SamResult.areas`` / :func:`sam.mask_bboxes`
    (higher score wins overlaps, ties: lower index; only the id image comes back)."""
    import torch

    n, h, w = masks.shape
    ids = torch.zeros((h, w), dtype=torch.int32, device=masks.device)
    s = np.where(np.isnan(scores), -np.inf, np.asarray(scores, np.float64))
    for i in np.lexsort((-np.arange(n), s)):
        ids.masked_fill_(masks[int(i)], int(i) + 1)
    areas = masks.reshape(n, -1).sum(1)
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    big = torch.iinfo(torch.int64).max
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1)
    boxes = torch.where((areas > 0)[:, None], boxes, 0)
    return (ids.cpu().numpy().astype(np.uint16), areas.cpu().numpy().astype(np.int64),
            boxes.cpu().numpy().astype(np.int32))
