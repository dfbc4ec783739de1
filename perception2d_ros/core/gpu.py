"""Frames that stay on the GPU: upload once, rectify, letterbox, detect (decode + NMS), SAM
pre/postprocessing — all torch ops on the device, host copies only for what is published.

Used by the pipeline when its models run on the torch backend on a CUDA device
(``device_frames``: see :func:`perception2d_ros.core.pipeline.build_pipeline`). Every function
also runs on torch's CPU device, which is how the tests compare it with the numpy path here.

Fidelity to the host path (the reference, bit-exact with the official implementations):

* rectify: ``grid_sample`` at the exact sample positions of the fixed-point cv2 maps; bilinear
  weights in float instead of cv2's 5-bit fixed point: pixels differ by at most a few levels.
* letterbox: bilinear resize (half-pixel centres, as ``cv2.INTER_LINEAR``), rounded to uint8
  like cv2's output, then the same colour order / scale / mean / std and padding.
* SAM: the image is resized with antialiased bilinear (Pillow's filter; Pillow is the
  reference) and the masks upscaled with the same per-axis matrices as the host path.
* detection decode: the same formulas as :class:`YoloDetector`; NMS is torchvision's
  ``batched_nms`` where torchvision is installed, else the host NMS on the (few) candidates.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from .detections import Detections
from .preprocess import LetterboxMeta


def torch_device_of(engine: Any) -> str | None:
    """The torch device an engine runs on (``'cuda'``, ``'cuda:1'``, ``'cpu'``), or None when
    it is not a torch engine (ORT / TensorRT take host arrays)."""
    from .engines import TorchEngine

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


# --------------------------------------------------------------------------- detection
class DeviceDetector:
    """A :class:`YoloDetector` whose engine is a torch engine, run on a device image:
    letterbox, inference, decode, NMS on the device; only the kept boxes come back."""

    def __init__(self, detector: Any) -> None:
        import torch

        self.torch = torch
        self.det = detector
        self.device = torch.device(torch_device_of(detector.engine) or "cpu")
        lb = detector.letterbox
        self.lb = lb
        mean = lb.mean if lb.mean is not None else np.zeros(3, np.float32)
        std = lb.std if lb.std is not None else np.ones(3, np.float32)
        self._mul = torch.from_numpy((float(lb.scale) / std).astype(np.float32)) \
            .reshape(1, 3, 1, 1).to(self.device)
        self._add = torch.from_numpy((-mean / std).astype(np.float32)) \
            .reshape(1, 3, 1, 1).to(self.device)
        self._grid: Any = None
        self.timings: dict[str, float] = {}
        try:
            import torchvision  # noqa: F401
            from torchvision.ops import batched_nms

            self._batched_nms = batched_nms
        except Exception:  # torchvision absent or built for another torch: host NMS
            self._batched_nms = None

    def letterbox(self, image: Any) -> tuple[Any, LetterboxMeta]:
        """HxWx3 uint8 BGR device image → ((1, 3, H, W) float32 device tensor, meta)."""
        import torch.nn.functional as F

        torch = self.torch
        lb = self.lb
        meta = lb.geometry(tuple(image.shape[:2]))
        nh, nw = meta.resized_hw
        x = image.permute(2, 0, 1)[None].float()
        if (nh, nw) != tuple(image.shape[:2]):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
            x = x.round_().clamp_(0, 255)   # cv2.resize writes uint8
        if lb.color == "rgb":
            x = x.flip(1)
        h, w = lb.size
        out = torch.full((1, 3, h, w), float(lb.pad_value), dtype=torch.float32,
                         device=image.device)
        y0, x0 = int(meta.pad_y), int(meta.pad_x)
        out[:, :, y0:y0 + nh, x0:x0 + nw] = x
        return out.mul_(self._mul).add_(self._add), meta

    def _yolox_grid(self, rows: int) -> Any:
        if self._grid is None or self._grid.shape[0] != rows:
            self._grid = self.torch.from_numpy(self.det._yolox_grid(rows).astype(np.float32)) \
                .to(self.device)
        return self._grid

    def _rows(self, pred: Any) -> tuple[Any, Any, Any]:
        """(centres, sizes in network px, class scores) of every row: YOLOX / v5 / v8."""
        torch = self.torch
        det = self.det
        if det.format in ("yolox", "yolov5"):
            cls_scores = pred[:, 5:] * pred[:, 4:5]
            if det.format == "yolov5":
                return pred[:, :2], pred[:, 2:4], cls_scores
            g = self._yolox_grid(pred.shape[0])
            return ((pred[:, :2] + g[:, :2]) * g[:, 2:], torch.exp(pred[:, 2:4]) * g[:, 2:],
                    cls_scores)
        nc = det.num_classes or 0
        if pred.shape[0] != 4 + nc and pred.shape[1] == 4 + nc:
            pred = pred.T
        return pred[:2].T, pred[2:4].T, pred[4:].T

    def dense(self, pred: Any) -> tuple[Any, Any, Any] | None:
        """Fixed-shape part of the decode: (xyxy network px, best-class score, class) for
        every output row (YOLOX / v5 / v8 without multi-label), or None for the formats whose
        decode is variable-shape throughout (v10, multi-label)."""
        det = self.det
        if det.multi_label or det.format not in ("yolox", "yolov5", "yolov8"):
            return None
        xy, wh, cls_scores = self._rows(pred[0].float() if pred.dim() == 3 else pred.float())
        scores, cls = cls_scores.max(1)
        return self.torch.cat([xy - wh / 2, xy + wh / 2], 1), scores, cls

    def select(self, boxes: Any, scores: Any, cls: Any) -> tuple[Any, Any, Any]:
        """Rows above ``conf`` (allow-list, ``max_candidates``): new tensors."""
        det = self.det
        m = scores > det.conf
        boxes, scores, cls = boxes[m], scores[m], cls[m]
        if det.class_allow is not None and cls.numel():
            allow = self.torch.from_numpy(det.class_allow).to(cls.device)
            m = self.torch.isin(cls, allow)
            boxes, scores, cls = boxes[m], scores[m], cls[m]
        if scores.shape[0] > det.max_candidates:
            top = self.torch.topk(scores, det.max_candidates).indices
            boxes, scores, cls = boxes[top], scores[top], cls[top]
        return boxes, scores, cls

    def decode(self, pred: Any) -> tuple[Any, Any, Any]:
        """Device raw output of one image → device (xyxy network px, scores, classes) above
        ``conf``, as :meth:`YoloDetector.decode`."""
        torch = self.torch
        det = self.det
        dense = self.dense(pred)
        if dense is not None:
            return self.select(*dense)
        pred = pred[0].float() if pred.dim() == 3 else pred.float()
        if det.format == "yolov10":  # end-to-end: x1, y1, x2, y2, score, class
            m = pred[:, 4] > det.conf
            sel = pred[m]
            boxes, scores, cls = sel[:, :4], sel[:, 4], sel[:, 5].round().long()
        else:  # multi-label: every class above conf
            xy, wh, cls_scores = self._rows(pred)
            i, j = torch.nonzero(cls_scores > det.conf, as_tuple=True)
            boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1)[i]
            return self.select(boxes, cls_scores[i, j], j)
        return boxes, scores, cls

    def detect(self, image: Any) -> Detections:
        """Detections (host arrays, source pixels of ``image``) of a device BGR image."""
        import time

        from .nms import nms
        from .preprocess import clip_boxes

        det = self.det
        t0 = time.perf_counter()
        tensor, meta = self.letterbox(image)
        t1 = time.perf_counter()
        outs = det.engine.infer_tensors({det.input_name: tensor})
        pred = next(iter(outs.values()))
        t2 = time.perf_counter()
        boxes, scores, cls = self.decode(pred)
        if boxes.shape[0]:
            # to source pixels with scalar ops (boxes is a fresh tensor: no upload per frame)
            boxes[:, 0::2] -= float(meta.pad_x)
            boxes[:, 1::2] -= float(meta.pad_y)
            boxes /= float(meta.scale)
            if det.format == "yolov10" and not det.end2end_nms:
                keep = self.torch.argsort(-scores, stable=True)[: det.max_det]
            elif self._batched_nms is not None and det.nms_box_offset == 0:
                keep = self._batched_nms(boxes, scores,
                                         self.torch.zeros_like(cls) if det.agnostic else cls,
                                         det.iou)[: det.max_det]
            else:
                keep = None
            if keep is not None:   # one device → host copy for all three
                packed = self.torch.cat([boxes[keep], scores[keep, None],
                                         cls[keep, None].to(boxes.dtype)], 1).cpu().numpy()
                b, s, c = packed[:, :4], packed[:, 4], packed[:, 5].astype(np.int64)
            else:
                b, s = boxes.cpu().numpy(), scores.cpu().numpy()
                c = cls.cpu().numpy().astype(np.int64)
                k = nms(b, s, det.iou, class_ids=None if det.agnostic else c,
                        max_det=det.max_det, box_offset=det.nms_box_offset)
                b, s, c = b[k], s[k], c[k]
            b = np.ascontiguousarray(b, np.float32)
            clip_boxes(b, meta.src_hw)
        else:
            b, s, c = np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
        dets = Detections.from_arrays(b, s.astype(np.float32), c, det.class_names)
        t3 = time.perf_counter()
        self.timings = {"preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3,
                        "postprocess": (t3 - t2) * 1e3}
        det.timings = self.timings
        return dets


# --------------------------------------------------------------------------- SAM
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


# --------------------------------------------------------------------------- CLIP
def clip_preprocess(image: Any, boxes: Any, size: int, padding: float,
                    mean: Any, std: Any, fill: Any) -> Any:
    """CLIP inputs [N,3,S,S] float32 on the device from an HxWx3 uint8 BGR device image:
    one square crop per box (:func:`clip.preprocess.square_box`, out-of-frame parts =
    ``fill``), or the whole frame when ``boxes`` is None (shortest side to S, centre crop);
    antialiased bicubic (a = -0.5, Pillow's filter) rounded to uint8, then
    ``(x / 255 - mean) / std``."""
    import torch
    import torch.nn.functional as F

    from .clip.preprocess import shortest_side_size, square_box

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
