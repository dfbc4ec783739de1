"""YOLO on a torch device: letterbox, inference, decode and NMS on the frame's device; only the
kept boxes come back to the host (``detect.device_frames``, :mod:`perception2d_ros.engines.device`).

Fidelity to the host path: letterbox is a bilinear resize (half-pixel centres, as
``cv2.INTER_LINEAR``) rounded to uint8 like cv2's output, then the same colour order / scale /
mean / std and padding; decode uses the same formulas as :class:`YoloDetector`; NMS is
torchvision's ``batched_nms`` where torchvision is installed, else the host NMS on the (few)
candidates.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from perception2d_ros.engines.device import torch_device_of
from perception2d_ros.models.detections import Detections
from perception2d_ros.models.yolo.preprocess import LetterboxMeta


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

        from perception2d_ros.models.yolo.nms import nms
        from perception2d_ros.models.yolo.preprocess import clip_boxes

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
