"""YOLO detectors behind one ROS-free wrapper: YOLOX, YOLOv5, YOLOv8/v11, YOLOv10 (end-to-end).

``YoloDetector`` = ``preprocess`` (letterbox → NCHW float32) → ``engine.infer`` →
``postprocess`` (decode → score filter → class allow-list → class-aware NMS → max_det → boxes
mapped back to the caller's image and clipped). ``detect(image_bgr)`` chains the three.

Formats (raw output of one image, batch 1):

========  =======================  =============================================  ==========
format    output                   content                                        preprocess
========  =======================  =============================================  ==========
yolox     [1, A, 5+nc]             raw grid: (dx, dy, log w, log h), obj, cls;     BGR 0–255,
                                   decoded here with strides 8/16/32 (64 for P6)  top-left
yolov5    [1, 3A, 5+nc]            cx, cy, w, h (input px), obj, cls              RGB 0–1,
                                                                                  centred
yolov8    [1, 4+nc, A]             cx, cy, w, h (input px), cls (no obj)          RGB 0–1,
                                                                                  centred
yolov10   [1, K, 6]                x1, y1, x2, y2, score, cls (NMS-free)          RGB 0–1,
                                                                                  centred
========  =======================  =============================================  ==========

``A`` is the number of grid cells over strides 8/16/32 (3549 at 416², 8400 at 640²); all
letterboxes pad with grey 114. The format comes from the manifest / the caller, or is
inferred from the output signature (+ Ultralytics ONNX metadata, which carries ``names``,
``stride`` and ``imgsz``). Scores are ``obj × cls`` where the model has an objectness.
Format names and inference, class names and the decode helpers: :mod:`.formats`.
"""
from __future__ import annotations

import ast
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from perception2d_ros.models.detections import Detections
from perception2d_ros.models.yolo.class_names import canonical_class_names, resolve_class_name
from perception2d_ros.models.yolo.formats import (ALIASES, FORMATS, PREPROCESS, STRIDES,
                                                  STRIDES_P6, FormatError, cxcywh_to_xyxy,
                                                  grid_cells, grid_table, infer_format,
                                                  load_labels, normalize_format, parse_names)
from perception2d_ros.models.yolo.nms import nms
from perception2d_ros.models.yolo.preprocess import Letterbox, LetterboxMeta, clip_boxes

LOG = logging.getLogger("perception2d.yolo")


class YoloDetector:
    """A YOLO model on an :class:`~perception2d_ros.engines.base.Engine`.

    Args:
        engine: the engine running the ONNX/TensorRT/torch model (one image input NCHW).
        format: one of :data:`FORMATS` (aliases accepted); ``None`` infers it from the output.
        class_names: class index → name; ``None``: from the model metadata, else
            ``class_<i>``.
        input_size: (height, width) when the engine's input is dynamic; ignored otherwise.
        conf: keep detections with score > conf.
        iou: NMS IoU threshold (a box is dropped when IoU with a kept box is > iou).
        max_det: at most this many detections per image (highest scores).
        classes: allow-list of class ids and/or names (``None``: all classes).
        multi_label: score every (box, class) pair above ``conf`` (COCO-eval style, may
            return one box with several classes); default one class per box (argmax).
        agnostic: class-agnostic NMS (default class-aware).
        end2end_nms: run NMS on yolov10 (end-to-end) outputs too (default off: the model has
            done it).
        max_candidates: at most this many highest-scoring candidates enter NMS.
        nms_box_offset: 0 (default) continuous IoU as torchvision / Ultralytics / YOLOX eval;
            1 reproduces the legacy "+1 px" box area of the YOLOX numpy demo NMS.
        metadata: ONNX custom metadata (default: ``engine.metadata`` where present).
    """

    def __init__(self, engine: Any, *, format: str | None = None,
                 class_names: Sequence[str] | None = None,
                 input_size: Sequence[int] | None = None, conf: float = 0.25,
                 iou: float = 0.45, max_det: int = 100,
                 classes: Sequence[int | str] | None = None, multi_label: bool = False,
                 agnostic: bool = False, end2end_nms: bool = False,
                 max_candidates: int = 30000, nms_box_offset: float = 0.0,
                 metadata: Mapping[str, str] | None = None) -> None:
        if not getattr(engine, "inputs", None):
            raise ValueError("engine must declare at least one input")
        if not getattr(engine, "outputs", None):
            raise ValueError("engine must declare at least one output")
        self.engine = engine
        self.metadata: dict[str, str] = dict(
            metadata if metadata is not None else getattr(engine, "metadata", {}) or {})
        self.input_spec = engine.inputs[0]
        self.input_name = self.input_spec.name
        self.input_hw = self._input_hw(input_size)
        self.conf = _check_unit("conf", conf)
        self.iou = _check_unit("iou", iou)
        if int(max_det) < 1:
            raise ValueError(f"max_det must be >= 1; got {max_det}")
        self.max_det = int(max_det)
        if int(max_candidates) < 1:
            raise ValueError(f"max_candidates must be >= 1; got {max_candidates}")
        self.max_candidates = int(max_candidates)
        self.multi_label = bool(multi_label)
        self.agnostic = bool(agnostic)
        self.end2end_nms = bool(end2end_nms)
        if nms_box_offset not in (0, 1):
            raise ValueError(f"nms_box_offset must be 0 or 1; got {nms_box_offset}")
        self.nms_box_offset = float(nms_box_offset)
        out_shape = self._output_shape()
        if format is None:
            self.format, why = infer_format(out_shape, self.input_hw, self.metadata)
            LOG.info("YOLO format %s inferred: %s", self.format, why)
        else:
            self.format = normalize_format(format)
        self.num_classes = self._num_classes(out_shape)
        names = list(class_names) if class_names is not None else parse_names(self.metadata)
        if names and self.num_classes is not None and len(names) != self.num_classes:
            raise ValueError(f"class_names has {len(names)} names but the {self.format} model "
                             f"outputs {self.num_classes} classes")
        if not names:
            names = [f"class_{i}" for i in range(self.num_classes or 0)]
        # the COCO-80 list is published with COCO's official names (motorcycle, not motorbike)
        self.class_names: list[str] = canonical_class_names(names)
        self.class_allow = self._allow_list(classes)
        self.letterbox = Letterbox(self.input_hw, **PREPROCESS[self.format])
        self._strides = self._yolox_strides(out_shape) if self.format == "yolox" else None
        self._grid: np.ndarray | None = None
        self.timings: dict[str, float] = {}
        self.model_path: Path | None = None  # set by from_model
        self.model_name: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, name_or_path: str | Path, engine_config: Any = None,
                   format: str | None = None, labels: str | Path | Sequence[str] | None = None,
                   conf: float = 0.25, iou: float = 0.45, max_det: int = 100,
                   classes: Sequence[int | str] | None = None, *,
                   models_dir: str | Path | None = None, allow_outside: bool = True,
                   **kwargs: Any) -> "YoloDetector":
        """Load a manifest model (e.g. ``"yolox_nano"``) or an ONNX file.

        The file is resolved and sha256-verified by :func:`model_store.resolve`; the engine
        is made by :func:`engines.create_engine` with ``engine_config`` (default: auto).
        ``format`` / ``labels`` default to the manifest entry, then the model itself.
        ``labels``: a labels file (path, or a file name in the models directory) or a list.
        ``allow_outside``: accept a file path outside the models directory (the CLI: a user
        naming a file; nodes pass False unless ``detect.allow_outside_models_dir``).
        Extra keyword arguments go to :class:`YoloDetector` (``multi_label``, ...).
        """
        from perception2d_ros.engines import model_store
        from perception2d_ros.engines.factory import create_engine

        path, entry = model_store.resolve(name_or_path, models_dir, allow_outside=allow_outside)
        engine = create_engine(path, engine_config)
        fmt = format or (entry.format if entry and entry.format in FORMATS + tuple(ALIASES)
                         else None)
        names: Sequence[str] | None
        if labels is None and entry is not None and entry.labels:
            labels = model_store.models_dir(models_dir) / entry.labels
        if labels is None:
            names = None
        elif isinstance(labels, (str, Path)):
            lp = Path(labels)
            if not lp.is_file() and (model_store.models_dir(models_dir) / lp).is_file():
                lp = model_store.models_dir(models_dir) / lp
            names = load_labels(lp)
        else:
            names = list(labels)
        input_size = kwargs.pop("input_size", None)
        if input_size is None and entry is not None and entry.input_size:
            input_size = entry.input_size
        det = cls(engine, format=fmt, class_names=names, input_size=input_size, conf=conf,
                  iou=iou, max_det=max_det, classes=classes, **kwargs)
        det.model_path = path
        det.model_name = entry.name if entry is not None else Path(path).stem
        return det

    def _input_hw(self, input_size: Sequence[int] | None) -> tuple[int, int]:
        shape = self.input_spec.shape
        fix = ("; this is not a YOLO detector for colour images: export it with one NCHW "
               "1x3xHxW float input, or choose another model (detect.model)")
        if len(shape) != 4:
            raise ValueError(f"input '{self.input_name}' must be NCHW (rank 4); got {shape}{fix}")
        if isinstance(shape[1], int) and shape[1] != 3:
            raise ValueError(f"input '{self.input_name}' must have 3 channels; got {shape}{fix}")
        h, w = shape[2], shape[3]
        if isinstance(h, int) and h > 0 and isinstance(w, int) and w > 0:
            if isinstance(input_size, int):
                input_size = (input_size, input_size)
            if input_size is not None and tuple(int(v) for v in input_size) != (h, w):
                LOG.warning("input_size %s ignored: the model input is fixed at %dx%d (h x w)",
                            list(input_size), h, w)
            return int(h), int(w)
        if input_size is None:
            imgsz = self.metadata.get("imgsz")
            input_size = ast.literal_eval(imgsz) if imgsz else (640, 640)
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        if len(input_size) != 2 or min(int(s) for s in input_size) <= 0:
            raise ValueError(f"input_size must be a positive (height, width); got {input_size}")
        return int(input_size[0]), int(input_size[1])

    def _output_shape(self) -> tuple[int, ...]:
        shape = self.engine.outputs[0].shape
        if len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape):
            return tuple(shape)
        # dynamic output (or a torch engine without shapes): probe once with a grey image
        probe = np.full((1, 3) + self.input_hw, 0.5, dtype=self.input_spec.dtype)
        out = self._first_output(self.engine.infer({self.input_name: probe}))
        return tuple(out.shape)

    def _num_classes(self, out_shape: Sequence[int]) -> int | None:
        a, b = out_shape[-2], out_shape[-1]
        if self.format in ("yolox", "yolov5"):
            if b < 6:
                raise FormatError(f"{self.format} output must be [1, N, 5+nc]; got {out_shape}")
            return b - 5
        if self.format == "yolov8":
            cells = {grid_cells(self.input_hw, s) for s in (STRIDES, STRIDES_P6)}
            n = a if b in cells else (b if a in cells else min(a, b))
            if n < 5:
                raise FormatError(f"yolov8 output must be [1, 4+nc, N]; got {out_shape}")
            return n - 4
        if b < 6:
            raise FormatError(f"yolov10 output must be [1, K, 6]; got {out_shape}")
        return None  # end-to-end: class count not visible in the shape

    def _yolox_strides(self, out_shape: Sequence[int]) -> tuple[int, ...]:
        a = out_shape[-2]
        for strides in (STRIDES, STRIDES_P6):
            if grid_cells(self.input_hw, strides) == a:
                return strides
        raise FormatError(f"yolox output has {a} rows but the grid at input {self.input_hw} "
                          f"has {grid_cells(self.input_hw)} (strides 8/16/32) or "
                          f"{grid_cells(self.input_hw, STRIDES_P6)} (P6) cells")

    def _allow_list(self, classes: Sequence[int | str] | None) -> np.ndarray | None:
        if classes is None:
            return None
        if isinstance(classes, (str, int)):
            classes = [classes]
        ids = []
        for c in classes:
            if isinstance(c, (int, np.integer)):
                if c < 0 or (self.class_names and c >= len(self.class_names)):
                    raise ValueError(f"classes: id {c} is out of range "
                                     f"0..{len(self.class_names) - 1}")
                ids.append(int(c))
            elif isinstance(c, str) and c.strip().isdigit() and c.strip() not in self.class_names:
                ids.append(int(c))
            elif isinstance(c, str):
                idx = resolve_class_name(c, self.class_names)   # VOC aliases accepted too
                if idx is None:
                    raise ValueError(f"classes: unknown class name '{c}' (model classes: "
                                     f"{', '.join(self.class_names[:10])}...)")
                ids.append(idx)
            else:
                raise ValueError(f"classes entries must be ids or names; got {c!r}")
        return np.unique(np.asarray(ids, np.int64))

    # ------------------------------------------------------------------ stages
    def preprocess(self, image_bgr: np.ndarray) -> tuple[np.ndarray, LetterboxMeta]:
        """H×W×3 uint8 BGR → ((1, 3, H, W) tensor in the model's dtype, meta).

        The float32 tensor is a buffer reused by the next call (run ``infer`` before calling
        ``preprocess`` again, or copy it)."""
        tensor, meta = self.letterbox(image_bgr)
        if tensor.dtype != self.input_spec.dtype:
            tensor = tensor.astype(self.input_spec.dtype)
        return tensor, meta

    def infer(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """Run the engine on a preprocessed tensor; returns output name → array."""
        return self.engine.infer({self.input_name: tensor})

    def postprocess(self, outputs: Mapping[str, np.ndarray] | np.ndarray,
                    meta: LetterboxMeta) -> Detections:
        """Raw model output → :class:`Detections` in the pixels of the image given to
        :meth:`preprocess` (``meta`` is its :class:`LetterboxMeta`)."""
        pred = self._first_output(outputs)
        boxes, scores, cls = self.decode(pred)
        if boxes.shape[0]:
            # map to source pixels before NMS (IoU is invariant to the uniform scale) and clip
            # afterwards, so the result matches a reference that suppresses unclipped boxes.
            boxes = meta.to_source(boxes, clip=False)
            if self.format != "yolov10" or self.end2end_nms:
                keep = nms(boxes, scores, self.iou,
                           class_ids=None if self.agnostic else cls, max_det=self.max_det,
                           box_offset=self.nms_box_offset)
            else:
                keep = np.argsort(-scores, kind="stable")[: self.max_det]
            boxes, scores, cls = boxes[keep], scores[keep], cls[keep]
            clip_boxes(boxes, meta.src_hw)
        return Detections.from_arrays(boxes, scores, cls, self.class_names)

    def detect(self, image_bgr: np.ndarray) -> Detections:
        """Detect objects in one H×W×3 uint8 BGR image. Stage times (ms) land in
        ``self.timings`` (preprocess, infer, postprocess)."""
        t0 = time.perf_counter()
        tensor, meta = self.preprocess(image_bgr)
        t1 = time.perf_counter()
        outputs = self.infer(tensor)
        t2 = time.perf_counter()
        dets = self.postprocess(outputs, meta)
        t3 = time.perf_counter()
        self.timings = {"preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3,
                        "postprocess": (t3 - t2) * 1e3}
        return dets

    __call__ = detect

    # ------------------------------------------------------------------ decoding
    def decode(self, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image's raw output → candidates above ``conf`` (allow-list applied).

        Returns ``(xyxy, scores, class_ids)``: (M, 4) float32 x1, y1, x2, y2 in network-input
        pixels, (M,) float32, (M,) int64; at most ``max_candidates``, best first not
        guaranteed.
        """
        pred = np.asarray(pred)
        if pred.ndim == 3:
            if pred.shape[0] != 1:
                raise ValueError(f"postprocess handles one image; got batch {pred.shape[0]}")
            pred = pred[0]
        if pred.ndim != 2:
            raise FormatError(f"{self.format} output must be [1, N, C]; got {pred.shape}")
        if pred.dtype != np.float32:
            pred = pred.astype(np.float32)
        if self.format == "yolox":
            boxes, scores, cls = self._decode_obj(pred, grid=True)
        elif self.format == "yolov5":
            boxes, scores, cls = self._decode_obj(pred, grid=False)
        elif self.format == "yolov8":
            boxes, scores, cls = self._decode_v8(pred)
        else:
            boxes, scores, cls = self._decode_v10(pred)
        if self.class_allow is not None and cls.size:
            m = np.isin(cls, self.class_allow)
            boxes, scores, cls = boxes[m], scores[m], cls[m]
        if scores.shape[0] > self.max_candidates:
            top = np.argpartition(-scores, self.max_candidates - 1)[: self.max_candidates]
            boxes, scores, cls = boxes[top], scores[top], cls[top]
        return boxes, scores, cls

    def _expect_cols(self, pred: np.ndarray, cols: int) -> None:
        if self.num_classes is not None and pred.shape[1] != cols:
            raise FormatError(f"{self.format} output must have {cols} columns per row "
                              f"({self.num_classes} classes); got {pred.shape}")

    def _yolox_grid(self, rows: int) -> np.ndarray:
        """(rows, 3) float64: grid x, grid y, stride of every output row (built once)."""
        if self._grid is None or self._grid.shape[0] != rows:
            grid = grid_table(self.input_hw, self._strides or STRIDES)
            if grid.shape[0] != rows:
                raise FormatError(f"yolox output has {rows} rows; the grid at input "
                                  f"{self.input_hw} has {grid.shape[0]} cells")
            self._grid = grid
        return self._grid

    def _decode_obj(self, pred: np.ndarray, grid: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """YOLOX / YOLOv5 rows [box(4), obj, cls(nc)]; score = obj × cls."""
        self._expect_cols(pred, 5 + (self.num_classes or 0))
        # obj*cls <= obj: an exact pre-filter; then only the (few) candidate rows are touched
        cand = np.flatnonzero(pred[:, 4] > self.conf)
        sub = pred[cand]
        pos, scores, cls = self._select(sub[:, 5:] * sub[:, 4:5])
        rows = sub[pos]
        if grid:
            gs = self._yolox_grid(pred.shape[0])[cand[pos]]  # grid x, grid y, stride
            stride = gs[:, 2:]
            xy = ((rows[:, :2] + gs[:, :2]) * stride).astype(np.float32)
            wh = (np.exp(rows[:, 2:4]) * stride).astype(np.float32)
        else:
            xy, wh = rows[:, :2], rows[:, 2:4]
        return cxcywh_to_xyxy(xy, wh), scores, cls

    def _decode_v8(self, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """YOLOv8/11 [4+nc, N] (or transposed [N, 4+nc]): cx, cy, w, h, cls scores."""
        nc = self.num_classes or 0
        if pred.shape[0] != 4 + nc and pred.shape[1] == 4 + nc:
            pred = pred.T
        if pred.shape[0] != 4 + nc:
            raise FormatError(f"yolov8 output must be [1, {4 + nc}, N]; got {pred.shape}")
        cls_all = pred[4:]  # (nc, N)
        best = cls_all.max(axis=0)
        cand = np.flatnonzero(best > self.conf)
        pos, scores, cls = self._select(cls_all[:, cand].T)
        box = pred[:4, cand[pos]].T
        return cxcywh_to_xyxy(box[:, :2], box[:, 2:4]), scores, cls

    def _decode_v10(self, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """End-to-end [K, 6]: x1, y1, x2, y2, score, class."""
        if pred.shape[1] < 6:
            raise FormatError(f"yolov10 output must be [1, K, 6]; got {pred.shape}")
        m = pred[:, 4] > self.conf
        sel = pred[m]
        return (np.ascontiguousarray(sel[:, :4]), np.ascontiguousarray(sel[:, 4]),
                np.rint(sel[:, 5]).astype(np.int64))

    def _select(self, cls_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(M, nc) class scores of M candidates → (positions among the M, scores, classes)
        above conf (argmax class, or every class above conf with ``multi_label``)."""
        if self.multi_label:
            i, j = np.nonzero(cls_scores > self.conf)
            return i, cls_scores[i, j], j.astype(np.int64)
        if cls_scores.shape[0] == 0 or cls_scores.shape[1] == 0:
            return np.zeros(0, np.intp), np.zeros(0, np.float32), np.zeros(0, np.int64)
        j = cls_scores.argmax(axis=1)
        s = cls_scores.max(axis=1)  # the value at j (any difference is a zero, below conf)
        pos = np.flatnonzero(s > self.conf)
        return pos, s[pos], j[pos].astype(np.int64, copy=False)

    @staticmethod
    def _first_output(outputs: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
        if isinstance(outputs, np.ndarray):
            return outputs
        if not outputs:
            raise ValueError("postprocess: no model outputs given")
        return next(iter(outputs.values()))

    def describe(self) -> str:
        return (f"{self.format} {self.input_hw[1]}x{self.input_hw[0]} "
                f"{len(self.class_names)} classes on {self.engine.describe()}")


def _check_unit(name: str, value: float) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]; got {value}")
    return v
