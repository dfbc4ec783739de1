"""CLIP crops on a torch device: the same square crops and antialiased bicubic resize as
:mod:`perception2d_ros.models.clip.preprocess`, without a host round trip."""
from __future__ import annotations

from typing import Any

import numpy as np


def clip_preprocess(image: Any, boxes: Any, size: int, padding: float,
                    mean: Any, std: Any, fill: Any) -> Any:
    """CLIP inputs [N,3,S,S] float32 on the device from an HxWx3 uint8 BGR device image:
    one square crop per box (:func:`clip.preprocess.square_box`, out-of-frame parts =
    ``fill``), or the whole frame when ``boxes`` is None (shortest side to S, centre crop);
    antialiased bicubic (a = -0.5, Pillow's filter) rounded to uint8, then
    ``(x / 255 - mean) / std``."""
    import torch
    import torch.nn.functional as F

    from perception2d_ros.models.clip.preprocess import shortest_side_size, square_box

    h, w = int(image.shape[0]), int(image.shape[1])
    rgb = image.flip(-1).permute(2, 0, 1).float()          # 3,H,W RGB
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=image.device).reshape(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=image.device).reshape(1, 3, 1, 1)

    def resize(x: Any, hw: tuple[int, int]) -> Any:
        if tuple(x.shape[-2:]) == hw:
            return x
        return F.interpolate(x, size=hw, mode="bicubic", align_corners=False,
                             antialias=True).round_().clamp_(0, 255)

    if boxes is None:
        nh, nw = shortest_side_size(h, w, size)
        x = resize(rgb[None], (nh, nw))
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        out = x[:, :, top:top + size, left:left + size]
    else:
        fill_t = torch.as_tensor(fill, dtype=torch.float32, device=image.device).reshape(3, 1, 1)
        crops = []
        for box in np.asarray(boxes, np.float64).reshape(-1, 4):
            x0, y0, x1, y1 = square_box(box, padding, (h, w))
            s = x1 - x0
            sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
            if (sx0, sy0, sx1, sy1) == (x0, y0, x1, y1):
                crop = rgb[:, y0:y1, x0:x1]
            else:
                crop = fill_t.expand(3, s, s).clone()
                if sx1 > sx0 and sy1 > sy0:
                    crop[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[:, sy0:sy1, sx0:sx1]
            crops.append(resize(crop[None], (size, size)))
        if not crops:
            return torch.zeros((0, 3, size, size), dtype=torch.float32, device=image.device)
        out = torch.cat(crops)
    return (out / 255.0 - mean_t) / std_t
