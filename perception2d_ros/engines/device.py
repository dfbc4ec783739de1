"""Frames that stay on a torch device (GPU): upload once, rectify there; the models' device
pre/postprocessing (``models/*/device.py``) then works on that copy, and only what is
published comes back to the host.

Used by the pipeline when its models run on the torch backend on a CUDA device
(``device_frames``: see :func:`perception2d_ros.pipeline.build.build_pipeline`). Every function
also runs on torch's CPU device, which is how the tests compare it with the numpy path here.

Fidelity to the host path (the reference, bit-exact with the official implementations):

* rectify: ``grid_sample`` at the exact sample positions of the fixed-point cv2 maps; bilinear
  weights in float instead of cv2's 5-bit fixed point: pixels differ by at most a few levels.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np


def torch_device_of(engine: Any) -> str | None:
    """The torch device an engine runs on (``'cuda'``, ``'cuda:1'``, ``'cpu'``), or None when
    it is not a torch engine (ORT / TensorRT take host arrays)."""
    from perception2d_ros.engines.torch_backend import TorchEngine

    return engine.device if isinstance(engine, TorchEngine) else None


def on_device(tensor: Any, device: str | None) -> bool:
    """Whether ``tensor`` is a torch tensor on ``device`` ('cuda' matches 'cuda:0')."""
    if device is None or not hasattr(tensor, "device"):
        return False
    import torch

    want, have = torch.device(device), tensor.device
    if want.type != have.type:
        return False
    if want.type == "cuda":
        cur = torch.cuda.current_device()
        return (want.index if want.index is not None else cur) == \
            (have.index if have.index is not None else cur)
    return True


class DeviceFrames:
    """Upload / rectify / download of frames on one torch device.

    ``upload`` goes through a pinned staging buffer (reused per shape) on CUDA, so the copy is
    asynchronous and at full PCIe speed; rectify grids are built once per calibration."""

    def __init__(self, device: str = "cuda") -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._staging: dict[tuple, Any] = {}
        self._grids: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        self._copied: Any = None
        self._lock = threading.Lock()

    def upload(self, image: np.ndarray) -> Any:
        """HxW or HxWxC uint8 host image → the same on the device."""
        torch = self.torch
        src = torch.from_numpy(np.ascontiguousarray(image))
        if not self.cuda:
            return src.clone()
        key = (tuple(src.shape), src.dtype)
        with self._lock:
            buf = self._staging.get(key)
            if buf is None:
                buf = self._staging[key] = torch.empty(src.shape, dtype=src.dtype,
                                                       pin_memory=True)
            if self._copied is not None:      # the previous async copy may still read it
                self._copied.synchronize()
            buf.copy_(src)
            out = buf.to(self.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        return out

    @staticmethod
    def download(t: Any) -> np.ndarray:
        return t.cpu().numpy()

    def _grid(self, camera: Any) -> Any:
        import cv2

        key = id(camera)
        entry = self._grids.get(key)
        if entry is None or entry[0] is not camera:
            map1, map2 = camera.rectify_maps()
            mx, my = cv2.convertMaps(map1, map2, cv2.CV_32FC1)  # the same sample positions
            h, w = mx.shape
            grid = np.stack([mx * (2.0 / (w - 1)) - 1.0, my * (2.0 / (h - 1)) - 1.0], -1)
            entry = (camera, self.torch.from_numpy(grid.astype(np.float32))[None]
                     .to(self.device))
            self._grids[key] = entry
            while len(self._grids) > 8:
                self._grids.popitem(last=False)
        return entry[1]

    def rectify(self, image: Any, camera: Any, interpolation: int = 1) -> Any:
        """Rectify a device image (HxW or HxWxC uint8) with ``camera``'s maps; pixels that map
        outside the raw image become 0 (as ``cv2.remap`` with a constant border)."""
        import torch.nn.functional as F

        if camera.is_identity:
            return image
        # float32 sample positions and pixels: in fp16 a 1280-px grid is off by up to 0.3 px
        x = image[None, None] if image.dim() == 2 else image.permute(2, 0, 1)[None]
        mode = "nearest" if interpolation == 0 else "bilinear"
        y = F.grid_sample(x.float(), self._grid(camera), mode=mode,
                          padding_mode="zeros", align_corners=True)
        y = y.round_().clamp_(0, 255).to(self.torch.uint8)[0]
        return y[0] if image.dim() == 2 else y.permute(1, 2, 0).contiguous()


def to_bgr(image: Any, encoding: str) -> Any | None:
    """A device HxWx3 BGR view of a device image in ``encoding`` (bgr8 / rgb8 / mono8), or
    None for encodings converted on the host."""
    if encoding == "bgr8":
        return image
    if encoding == "rgb8":
        return image.flip(-1)
    if encoding == "mono8":
        return image[..., None].expand(*image.shape, 3)
    return None
