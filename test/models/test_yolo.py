"""YOLO detection: letterbox, decoders, NMS, real-image accuracy, reference parity, geometry, CLI.

Real data: the 38 tinycoco images in test/data/coco/images with their COCO annotations in
test/data/coco/annotations/instances_tinycoco.json, and models/yolox_nano.onnx.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perception2d_ros.eval.coco import (
    EVAL_CONF,
    EVAL_IOU,
    EVAL_MAX_DET,
    category_mapping,
    evaluate_detector,
)
from perception2d_ros.models.detections import Detections
from perception2d_ros.engines.base import Engine, TensorSpec
from perception2d_ros.engines.factory import EngineConfig
from perception2d_ros.models.yolo.nms import box_iou, nms
from perception2d_ros.models.yolo.preprocess import Letterbox
from perception2d_ros.models.yolo.detector import YoloDetector
from perception2d_ros.models.yolo.formats import FORMATS, FormatError, grid_cells, infer_format

COCO_DIR = Path(__file__).resolve().parents[1] / "data" / "coco"
IMAGES = sorted((COCO_DIR / "images").glob("*.jpg"))
ANNOTATIONS = COCO_DIR / "annotations" / "instances_tinycoco.json"

# Measured on the 38 tinycoco images with YOLOX-nano 416 (onnxruntime CPU, conf 0.001,
# class-aware NMS 0.65, 100 dets, one class per box): mAP@[.5:.95] 0.2493, mAP@.5 0.3884
# (published YOLOX-nano on val2017: 25.8). Floors sit a little under so a regression shows.
MEASURED_MAP, MEASURED_MAP50 = 0.2493, 0.3884
MAP_FLOOR, MAP50_FLOOR = 0.24, 0.375


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def yolox() -> YoloDetector:
    """YOLOX-nano from the manifest on onnxruntime CPU (defaults conf 0.25, iou 0.45)."""
    return YoloDetector.from_model("yolox_nano", EngineConfig(backend="onnxruntime",
                                                              device="cpu"))


def _same_engine(det: YoloDetector, **kw: Any) -> YoloDetector:
    """Another detector on the already loaded engine, with different settings."""
    return YoloDetector(det.engine, format=det.format, class_names=det.class_names, **kw)


@pytest.fixture(scope="session")
def raw_outputs(yolox: YoloDetector) -> dict[str, tuple[np.ndarray, Any, tuple[int, int]]]:
    """image name → (raw [1, 3549, 85] output, LetterboxMeta, (h, w)) for all 38 images."""
    out = {}
    for path in IMAGES:
        image = cv2.imread(str(path))
        tensor, meta = yolox.preprocess(image)
        raw = yolox.infer(tensor)["output"].copy()
        out[path.name] = (raw, meta, image.shape[:2])
    return out


@pytest.fixture(scope="session")
def demo_utils() -> ModuleType:
    """yolox/utils/demo_utils.py loaded on its own (the yolox package __init__ pulls in
    training dependencies)."""
    spec = importlib.util.find_spec("yolox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("reference package 'yolox' is not installed (pip install --no-deps yolox)")
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "demo_utils.py"
    mod_spec = importlib.util.spec_from_file_location("yolox_demo_utils_ref", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def test_test_data_present() -> None:
    assert len(IMAGES) == 38, f"expected the 38 tinycoco images, found {len(IMAGES)}"
    coco = json.loads(ANNOTATIONS.read_text())
    assert {i["file_name"] for i in coco["images"]} == {p.name for p in IMAGES}
    assert all("coco_url" in i and "flickr_url" in i for i in coco["images"])
    assert coco["licenses"] and len(coco["categories"]) == 80


# --------------------------------------------------------------------------- letterbox
def _ref_topleft(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """YOLOX ``preproc`` (yolox/data/data_augment.py) up to the padded uint8 image."""
    padded = np.ones((hw[0], hw[1], 3), dtype=np.uint8) * 114
    r = min(hw[0] / img.shape[0], hw[1] / img.shape[1])
    resized = cv2.resize(img, (int(img.shape[1] * r), int(img.shape[0] * r)),
                         interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    padded[: int(img.shape[0] * r), : int(img.shape[1] * r)] = resized
    return padded


def _ref_center(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Ultralytics ``LetterBox(auto=False, scaleup=True)``: resize + copyMakeBorder."""
    h, w = img.shape[:2]
    r = min(hw[0] / h, hw[1] / w)
    new_w, new_h = int(round(w * r)), int(round(h * r))
    dw, dh = (hw[1] - new_w) / 2, (hw[0] - new_h) / 2
    if (w, h) != (new_w, new_h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT,
                              value=(114, 114, 114))


# source sizes: landscape, portrait, upscaled, exact, odd, extreme, back to landscape
LB_SIZES = [(480, 640), (640, 480), (230, 352), (416, 416), (101, 333), (1000, 37), (427, 640)]


def _real_image(h: int, w: int) -> np.ndarray:
    img = cv2.imread(str(IMAGES[9]))
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def test_letterbox_topleft_matches_yolox_preproc_and_reuses_buffers() -> None:
    lb = Letterbox((416, 416), align="topleft", color="bgr", scale=1.0)
    tensor0, padded0 = lb.tensor, lb.padded
    for h, w in LB_SIZES:  # one Letterbox over changing sizes: stale padding would show
        img = _real_image(h, w)
        tensor, meta = lb(img)
        ref = _ref_topleft(img, (416, 416))
        assert tensor is tensor0 and lb.padded is padded0, "buffers must be reused"
        np.testing.assert_array_equal(lb.padded, ref, err_msg=f"source {h}x{w}")
        np.testing.assert_array_equal(
            tensor, np.ascontiguousarray(ref.transpose(2, 0, 1), dtype=np.float32)[None])
        assert (meta.pad_x, meta.pad_y) == (0.0, 0.0)
        assert meta.resized_hw == (int(h * meta.scale), int(w * meta.scale))


def test_letterbox_center_matches_ultralytics_and_blob_from_image() -> None:
    lb = Letterbox(640, align="center", color="rgb", scale=1 / 255)
    tensor0 = lb.tensor
    for h, w in LB_SIZES:
        img = _real_image(h, w)
        tensor, meta = lb(img)
        ref = _ref_center(img, (640, 640))
        assert tensor is tensor0
        np.testing.assert_array_equal(lb.padded, ref, err_msg=f"source {h}x{w}")
        blob = cv2.dnn.blobFromImage(ref, scalefactor=1 / 255, swapRB=True)
        assert blob.shape == tensor.shape == (1, 3, 640, 640)
        np.testing.assert_array_equal(tensor, blob)
        # the box transform is exact: source corners land on the resized content corners
        corners = meta.to_network(np.array([[0, 0, w, h]], np.float32))[0]
        np.testing.assert_allclose(corners, [meta.pad_x, meta.pad_y, meta.pad_x + w * meta.scale,
                                             meta.pad_y + h * meta.scale], atol=1e-3)
        back = meta.to_source(corners[None], clip=False)[0]
        np.testing.assert_allclose(back, [0, 0, w, h], atol=1e-3)


def test_letterbox_mean_std_and_validation() -> None:
    img = _real_image(240, 320)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    lb = Letterbox(224, align="center", color="rgb", scale=1 / 255, mean=mean, std=std)
    tensor, _ = lb(img)
    ref = _ref_center(img, (224, 224))[:, :, ::-1].astype(np.float32) * np.float32(1 / 255)
    ref = (ref - np.array(mean, np.float32)) / np.array(std, np.float32)
    np.testing.assert_allclose(tensor[0], ref.transpose(2, 0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        lb(img.astype(np.float32))
    with pytest.raises(ValueError, match="H×W×3"):
        lb(img[:, :, 0])
    with pytest.raises(ValueError, match="align"):
        Letterbox(224, align="bottom")
    with pytest.raises(ValueError, match="std"):
        Letterbox(224, std=(1, 0, 1))


def _full_tensor(padded: np.ndarray, color: str, scale: float, mean: Any = None,
                 std: Any = None) -> np.ndarray:
    """The whole letterboxed image converted at once (what Letterbox did before it converted
    only the resized region per frame): channel order, scale, mean, std in float32."""
    planes = []
    for c in ((2, 1, 0) if color == "rgb" else (0, 1, 2)):
        plane = padded[:, :, c].astype(np.float32)
        if scale != 1.0:
            plane = np.multiply(padded[:, :, c], np.float32(scale), dtype=np.float32)
        if mean is not None:
            plane = plane - np.float32(mean[len(planes)])
        if std is not None:
            plane = plane / np.float32(std[len(planes)])
        planes.append(plane)
    return np.stack(planes)[None]


@pytest.mark.parametrize("kw", [
    dict(size=(416, 416), align="topleft", color="bgr", scale=1.0),
    dict(size=640, align="center", color="rgb", scale=1 / 255),
    dict(size=(224, 320), align="center", color="rgb", scale=1 / 255,
         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    dict(size=(320, 256), align="topleft", color="rgb", scale=1 / 255, scaleup=False),
], ids=["yolox", "ultralytics", "mean-std", "no-scaleup"])
def test_letterbox_region_conversion_equals_whole_image(kw: dict) -> None:
    """Only the resized region is converted per frame (the padding once per source size): the
    tensor must equal converting the whole letterboxed image, bit for bit, on real frames of
    changing sizes (a stale padding or region would show), including 1280×720."""
    size = kw.pop("size")
    lb = Letterbox(size, **kw)
    shapes = LB_SIZES + [(720, 1280), (720, 1280), (101, 333), (720, 1280)]
    for k, (h, w) in enumerate(shapes):
        img = cv2.resize(cv2.imread(str(IMAGES[k % len(IMAGES)])), (w, h),
                         interpolation=cv2.INTER_AREA)
        tensor, _ = lb(img)
        ref = _full_tensor(lb.padded, kw["color"], kw["scale"], kw.get("mean"), kw.get("std"))
        assert tensor.dtype == np.float32 and tensor.shape == ref.shape
        assert tensor.tobytes() == ref.tobytes(), f"source {h}x{w} (frame {k})"


# --------------------------------------------------------------------------- Detections / NMS
def test_detections_validation_and_json() -> None:
    d = Detections(np.array([[1, 2, 3, 4], [0, 0, 10, 5]]), [0.9, 0.5], [0, 2],
                   ["person", "car"])
    assert d.xyxy.dtype == np.float32 and d.scores.dtype == np.float32
    assert d.class_ids.dtype == np.int64 and len(d) == 2
    assert d.to_json() == [{"class_name": "person", "score": 0.9, "xyxy": [1.0, 2.0, 3.0, 4.0]},
                           {"class_name": "car", "score": 0.5, "xyxy": [0.0, 0.0, 10.0, 5.0]}]
    assert d.filter(d.scores > 0.6).class_names == ["person"]
    assert d.filter([1, 0]).class_names == ["car", "person"]
    assert d.of_classes(["car"]).class_names == ["car"] and len(d.of_classes([0])) == 1
    assert len(d.above(0.5)) == 2 and len(d.above(0.51)) == 1
    e = Detections.empty()
    assert len(e) == 0 and e.xyxy.shape == (0, 4) and e.to_json() == []
    with pytest.raises(ValueError, match="xyxy"):
        Detections(np.zeros((2, 3)), [1, 1], [0, 0], ["a", "b"])
    with pytest.raises(ValueError, match="scores"):
        Detections(np.zeros((2, 4)), [1], [0, 0], ["a", "b"])
    with pytest.raises(ValueError, match="class_ids"):
        Detections(np.zeros((1, 4)), [1], [0.5], ["a"])
    with pytest.raises(ValueError, match="class_names"):
        Detections(np.zeros((1, 4)), [1], [0], [])
    with pytest.raises(ValueError, match="x2 >= x1"):
        Detections(np.array([[5, 0, 1, 1]]), [1], [0], ["a"])


@pytest.mark.parametrize("xyxy,scores,ids,match", [
    ([[0, 0, np.inf, 1]], [0.5], [0], "NaN or inf"),
    ([[0, np.nan, 1, 1]], [0.5], [0], "NaN or inf"),
    ([[0, 0, 1, 1], [0, 5, 1, 4]], [0.5, 0.5], [0, 0], "row 1"),
    ([[0, 0, 1, 1]], [np.nan], [0], "scores contains NaN"),
    ([[0, 0, 1, 1]], [0.5], [-1], "class_ids must be >= 0"),
], ids=["inf", "nan", "y2<y1", "nan-score", "negative-id"])
def test_detections_value_errors_name_the_field(xyxy: list, scores: list, ids: list,
                                                match: str) -> None:
    names = ["a"] * len(ids)
    with pytest.raises(ValueError, match=match):
        Detections(np.array(xyxy, np.float32), scores, ids, names)


def _greedy_reference(boxes: np.ndarray, scores: np.ndarray, thr: float,
                      classes: np.ndarray | None) -> list[int]:
    """Textbook greedy NMS, per class when classes are given, one box at a time."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    iou = box_iou(boxes, boxes)
    keep: list[int] = []
    for i in order:
        if all(iou[i, k] <= thr or (classes is not None and classes[i] != classes[k])
               for k in keep):
            keep.append(i)
    return keep


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), seed=st.integers(0, 2**31 - 1),
       thr=st.sampled_from([0.3, 0.45, 0.65]), aware=st.booleans())
def test_nms_equals_greedy_reference(n: int, seed: int, thr: float, aware: bool) -> None:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-20, 100, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 60, (n, 2))], 1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / max(n, 1)  # distinct scores
    classes = rng.integers(0, 3, n) if aware else None
    keep = nms(boxes, scores, thr, class_ids=classes)
    assert keep.tolist() == _greedy_reference(boxes, scores, thr, classes)
    k = int(rng.integers(0, n + 1))
    assert nms(boxes, scores, thr, class_ids=classes, max_det=k).tolist() == keep[:k].tolist()


def test_nms_class_aware_with_negative_coordinates_and_legacy_offset(
        demo_utils: ModuleType) -> None:
    boxes = np.array([[-50, -50, -10, -10], [-48, -50, -10, -12], [-50, -50, -10, -10]],
                     np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    # same box, different class: kept; overlapping same class: suppressed
    assert nms(boxes, scores, 0.5, class_ids=np.array([0, 0, 1])).tolist() == [0, 2]
    assert nms(boxes, scores, 0.5).tolist() == [0]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (300, 2))
    b = np.concatenate([xy, xy + rng.uniform(2, 30, (300, 2))], 1).astype(np.float32)
    s = rng.uniform(0, 1, 300).astype(np.float32)
    assert nms(b, s, 0.45, box_offset=1.0).tolist() == demo_utils.nms(b, s, 0.45)


def _messy_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random boxes with duplicates, zero-area rows and (sometimes) a NaN row."""
    xy = rng.uniform(-20, 100, (n, 2))
    b = np.concatenate([xy, xy + rng.uniform(0, 60, (n, 2))], 1).astype(np.float32)
    if n > 3:
        b[rng.integers(0, n, 3)] = b[0]
        b[rng.integers(0, n), 2] = b[rng.integers(0, n), 0]
    return b


NMS_EDGES = [  # (boxes, scores, thr, classes, offset, kept)
    ([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 5, 5]], [0.9, 0.8, 0.7], 1.0, None, 0.0,
     [0, 1, 2]),  # duplicates: IoU exactly 1.0 is not > 1.0
    ([[0, 0, 2, 1], [0, 0, 1, 1]], [0.5, 0.9], 0.5, None, 0.0, [1, 0]),  # IoU exactly 0.5
    ([[0, 0, 2, 1], [0, 0, 1, 1]], [0.5, 0.9], 0.49, None, 0.0, [1]),
    ([[0, 0, 1, 1], [1, 0, 2, 1]], [0.9, 0.9], 0.0, None, 0.0, [0, 1]),  # touching, tie
    ([[0, 0, 1, 1], [1, 0, 2, 1]], [0.9, 0.9], 0.0, None, 1.0, [0]),  # +1 px: they overlap
    ([[3, 3, 3, 3], [3, 3, 3, 3]], [0.2, 0.3], 0.1, None, 0.0, [1, 0]),  # zero area
    ([[0, 0, 4, 4], [0, 0, 4, 4]], [0.3, 0.3], 0.5, [1, 0], 0.0, [0, 1]),  # other class
]


@pytest.mark.parametrize("boxes,scores,thr,classes,offset,kept", NMS_EDGES)
def test_nms_edge_cases_on_both_passes(boxes: list, scores: list, thr: float, classes: Any,
                                       offset: float, kept: list[int],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from perception2d_ros.models.yolo import nms as nms_module

    b, s = np.array(boxes, np.float32), np.array(scores, np.float32)
    cls = None if classes is None else np.array(classes)
    assert nms(b, s, thr, class_ids=cls, box_offset=offset).tolist() == kept
    monkeypatch.setattr(nms_module, "PYTHON_MAX", -1)
    assert nms(b, s, thr, class_ids=cls, box_offset=offset).tolist() == kept


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 90), seed=st.integers(0, 2**31 - 1),
       thr=st.sampled_from([0.0, 0.3, 0.45, 0.65, 1.0]), aware=st.booleans(),
       offset=st.sampled_from([0.0, 1.0]), bad=st.sampled_from([None, np.nan, np.inf, 1e31]),
       cap=st.booleans(), f16=st.booleans())
def test_nms_python_pass_equals_numpy_pass(n: int, seed: int, thr: float, aware: bool,
                                           offset: float, bad: float | None, cap: bool,
                                           f16: bool) -> None:
    """Up to PYTHON_MAX candidates NMS runs in plain Python; it must keep exactly what the
    float64 numpy pass keeps: tied scores, duplicate and zero-area boxes, both area
    conventions, max_det, float16 input, and (handed to the numpy pass) NaN / inf / huge
    coordinates."""
    from perception2d_ros.models.yolo import nms as nms_module

    rng = np.random.default_rng(seed)
    boxes = _messy_boxes(rng, n)
    if bad is not None and n:
        boxes[rng.integers(0, n), rng.integers(0, 4)] = bad
    scores = rng.integers(0, 6, n).astype(np.float32) / 5  # many ties
    if f16:
        with np.errstate(over="ignore"):  # 1e31 becomes inf
            boxes, scores = boxes.astype(np.float16), scores.astype(np.float16)
    classes = rng.integers(0, 3, n) if aware else None
    max_det = int(rng.integers(0, n + 1)) if cap else None
    kw = dict(class_ids=classes, max_det=max_det, box_offset=offset)
    with np.errstate(invalid="ignore", over="ignore"), pytest.MonkeyPatch.context() as mp:
        fast = nms(boxes, scores, thr, **kw)
        mp.setattr(nms_module, "PYTHON_MAX", -1)
        numpy_pass = nms(boxes, scores, thr, **kw)
    assert fast.dtype == numpy_pass.dtype == np.int64
    assert fast.tolist() == numpy_pass.tolist()


# --------------------------------------------------------------------------- synthetic decoders
class ArrayEngine(Engine):
    """An engine whose model always returns one given array (a synthetic YOLO head)."""

    backend = "array"

    def __init__(self, input_hw: tuple[int, int], output: np.ndarray) -> None:
        self.inputs = [TensorSpec("images", (1, 3) + input_hw, np.dtype(np.float32))]
        self.outputs = [TensorSpec("output", tuple(output.shape), np.dtype(np.float32))]
        self.output = output.astype(np.float32)

    def _run(self, feeds: Any) -> dict[str, np.ndarray]:
        return {"output": self.output}


NET = (64, 64)
CELLS = grid_cells(NET)  # 8*8 + 4*4 + 2*2 = 84
NAMES = ["person", "car", "dog"]
SRC_HW = (64, 128)  # letterboxed at scale 0.5; centred formats pad 16 px top and bottom


def _net_boxes(fmt: str, src_xyxy: np.ndarray) -> np.ndarray:
    lb = Letterbox(NET, align="topleft" if fmt == "yolox" else "center")
    return lb.geometry(SRC_HW).to_network(src_xyxy)


def _head(fmt: str, objects: list[tuple[list[float], dict[int, float]]]) -> np.ndarray:
    """Synthetic raw output of ``fmt`` for objects (source xyxy, {class: score})."""
    nc = len(NAMES)
    boxes = _net_boxes(fmt, np.array([o[0] for o in objects], np.float32).reshape(-1, 4))
    if fmt == "yolov10":
        rows = [list(b) + [s, c] for b, (_, cs) in zip(boxes, objects) for c, s in cs.items()]
        out = np.zeros((20, 6), np.float32)
        out[: len(rows)] = np.array(rows, np.float32).reshape(-1, 6)
        return out[None]
    n_rows = 3 * CELLS if fmt == "yolov5" else CELLS
    out = np.zeros((n_rows, (4 if fmt == "yolov8" else 5) + nc), np.float32)
    for k, (b, (_, cls_scores)) in enumerate(zip(boxes, objects)):
        cx, cy, w, h = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]
        if fmt == "yolox":  # row k = stride-8 cell (k % 8, k // 8): raw offsets, log sizes
            gx, gy = k % 8, k // 8
            out[k, :4] = [cx / 8 - gx, cy / 8 - gy, np.log(w / 8), np.log(h / 8)]
        else:
            out[k, :4] = [cx, cy, w, h]
        if fmt == "yolov8":
            for c, s in cls_scores.items():
                out[k, 4 + c] = s
        else:  # objectness × class score = the wanted score
            obj = max(cls_scores.values()) ** 0.5
            out[k, 4] = obj
            for c, s in cls_scores.items():
                out[k, 5 + c] = s / obj
    return (out.T if fmt == "yolov8" else out)[None]


def _run(fmt: str, objects: list, **kw: Any) -> Detections:
    head = _head(fmt, objects)
    det = YoloDetector(ArrayEngine(NET, head), format=fmt, class_names=NAMES, **kw)
    return det.detect(np.zeros(SRC_HW + (3,), np.uint8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoder_zero_and_below_threshold(fmt: str) -> None:
    assert len(_run(fmt, [])) == 0
    d = _run(fmt, [([10, 10, 40, 40], {0: 0.2}), ([60, 5, 90, 50], {1: 0.24})], conf=0.25)
    assert len(d) == 0 and d.xyxy.shape == (0, 4)
    d = _run(fmt, [([10, 10, 40, 40], {0: 0.2}), ([60, 5, 90, 50], {1: 0.3})], conf=0.25)
    assert d.class_names == ["car"]
    np.testing.assert_allclose(d.xyxy, [[60, 5, 90, 50]], atol=1e-3)  # source pixels
    np.testing.assert_allclose(d.scores, [0.3], atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoder_nms_keeps_best_of_overlapping(fmt: str) -> None:
    objects = [([20, 10, 60, 50], {2: 0.7}), ([21, 11, 61, 51], {2: 0.9}),
               ([19, 12, 59, 52], {2: 0.8}), ([90, 10, 120, 40], {2: 0.6})]
    want = [[21, 11, 61, 51], [90, 10, 120, 40]]
    if fmt == "yolov10":  # end-to-end: the model did NMS; all rows come back by score
        d = _run(fmt, objects)
        np.testing.assert_allclose(d.scores, [0.9, 0.8, 0.7, 0.6], atol=1e-6)
        d = _run(fmt, objects, end2end_nms=True)
    else:
        d = _run(fmt, objects)
    assert d.class_names == ["dog", "dog"]
    np.testing.assert_allclose(d.xyxy, want, atol=1e-3)
    np.testing.assert_allclose(d.scores, [0.9, 0.6], atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoder_class_aware_max_det_and_allow_list(fmt: str) -> None:
    nms_kw = {"end2end_nms": True} if fmt == "yolov10" else {}
    pair = [([20, 10, 60, 50], {0: 0.9}), ([21, 11, 61, 51], {1: 0.8})]
    d = _run(fmt, pair, **nms_kw)
    assert d.class_names == ["person", "car"], "different classes must not suppress each other"
    assert len(_run(fmt, pair, agnostic=True, **nms_kw)) == 1
    many = [([4 + 12 * i, 4, 12 + 12 * i, 20], {i % 3: 0.3 + 0.05 * i}) for i in range(10)]
    d = _run(fmt, many, max_det=3)
    np.testing.assert_allclose(d.scores, [0.75, 0.7, 0.65], atol=1e-6)
    d = _run(fmt, many, classes=["car"])
    assert d.class_names == ["car"] * 3 and np.all(d.class_ids == 1)
    d = _run(fmt, many, classes=[0, "dog"])
    assert sorted(set(d.class_names)) == ["dog", "person"] and len(d) == 7
    with pytest.raises(ValueError, match="unknown class name 'cat'"):
        _run(fmt, many, classes=["cat"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoder_clips_to_image_and_multi_label(fmt: str) -> None:
    d = _run(fmt, [([-10, -4, 40, 70], {0: 0.9})])
    np.testing.assert_allclose(d.xyxy, [[0, 0, 40, 64]], atol=1e-3)
    if fmt != "yolov10":
        d = _run(fmt, [([10, 10, 40, 40], {0: 0.6, 2: 0.5})], multi_label=True)
        assert sorted(d.class_names) == ["dog", "person"]
        assert _run(fmt, [([10, 10, 40, 40], {0: 0.6, 2: 0.5})]).class_names == ["person"]


def test_infer_format_from_signature_and_metadata() -> None:
    assert infer_format((1, 3549, 85), (416, 416))[0] == "yolox"
    assert infer_format((1, 25200, 85), (640, 640))[0] == "yolov5"
    assert infer_format((1, 84, 8400), (640, 640))[0] == "yolov8"
    assert infer_format((1, 300, 6), (640, 640))[0] == "yolov10"
    names = repr({i: f"c{i}" for i in range(80)})
    assert infer_format((1, 8400, 84), (640, 640), {"names": names})[0] == "yolov8"
    assert infer_format((1, 300, 6), (640, 640), {"end2end": "True", "names": names}
                        )[0] == "yolov10"
    with pytest.raises(FormatError, match="format="):
        infer_format((1, 1000, 7), (640, 640))
    head = _head("yolov8", [([10, 10, 40, 40], {1: 0.9})])
    det = YoloDetector(ArrayEngine(NET, head), metadata={"names": repr(dict(enumerate(NAMES)))})
    assert det.format == "yolov8" and det.class_names == NAMES
    assert det.letterbox.color == "rgb" and det.letterbox.align == "center"
    with pytest.raises(ValueError, match="class_names has 2 names"):
        YoloDetector(ArrayEngine(NET, head), class_names=["a", "b"])


# --------------------------------------------------------------------------- real images
def test_yolox_from_manifest(yolox: YoloDetector) -> None:
    assert yolox.format == "yolox" and yolox.input_hw == (416, 416)
    assert len(yolox.class_names) == 80 and yolox.class_names[0] == "person"
    assert yolox.letterbox.align == "topleft" and yolox.letterbox.color == "bgr"
    assert float(yolox.letterbox.scale) == 1.0 and yolox.letterbox.pad_value == 114


def test_yolox_nano_map_on_tinycoco(yolox: YoloDetector) -> None:
    det = _same_engine(yolox, conf=EVAL_CONF, iou=EVAL_IOU, max_det=EVAL_MAX_DET)
    result = evaluate_detector(det, COCO_DIR / "images", ANNOTATIONS)
    assert result.images == 38
    assert result.map >= MAP_FLOOR, (
        f"mAP@[.5:.95] {result.map:.4f} fell below {MAP_FLOOR} (measured {MEASURED_MAP})")
    assert result.map50 >= MAP50_FLOOR, (
        f"mAP@.5 {result.map50:.4f} fell below {MAP50_FLOOR} (measured {MEASURED_MAP50})")
    assert result.per_class["person"] > 0.3 and result.per_class["giraffe"] > 0.7
    assert result.images_per_s > 0


def test_category_mapping_uses_names_then_training_order() -> None:
    cats = json.loads(ANNOTATIONS.read_text())["categories"]
    labels = [line.strip() for line in
              (Path(__file__).resolve().parents[2] / "models" / "coco_classes.txt")
              .read_text().splitlines() if line.strip()]
    m = category_mapping(cats, labels)  # labels say 'motorbike', 'tvmonitor'...
    assert m[0] == 1 and m[3] == 4 and m[62] == 72 and m[79] == 90 and len(set(m.values())) == 80
    assert category_mapping(cats, ["dog", "person"]) == {0: 18, 1: 1}
    with pytest.raises(ValueError, match="cannot map"):
        category_mapping(cats, ["dog", "unicorn"])


def _reference_dets(du: ModuleType, raw: np.ndarray, ratio: float, conf: float, iou: float,
                    agnostic: bool) -> np.ndarray:
    """YOLOX onnx demo: demo_postprocess + xyxy / ratio + multiclass_nms → (K, 6)."""
    pred = du.demo_postprocess(raw.copy(), (416, 416))[0]
    boxes, scores = pred[:, :4], pred[:, 4:5] * pred[:, 5:]
    xyxy = np.ones_like(boxes)
    xyxy[:, 0] = boxes[:, 0] - boxes[:, 2] / 2.0
    xyxy[:, 1] = boxes[:, 1] - boxes[:, 3] / 2.0
    xyxy[:, 2] = boxes[:, 0] + boxes[:, 2] / 2.0
    xyxy[:, 3] = boxes[:, 1] + boxes[:, 3] / 2.0
    xyxy /= ratio
    dets = du.multiclass_nms(xyxy, scores, nms_thr=iou, score_thr=conf, class_agnostic=agnostic)
    return np.zeros((0, 6), np.float32) if dets is None else dets


def _sorted(boxes: np.ndarray, scores: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, ...]:
    order = np.lexsort((boxes[:, 0], -scores, cls))
    return boxes[order], scores[order], cls[order]


def _assert_same(ours: tuple[np.ndarray, ...], ref: np.ndarray, name: str) -> None:
    ob, os_, oc = _sorted(*ours)
    rb, rs, rc = _sorted(ref[:, :4].astype(np.float32), ref[:, 4].astype(np.float32),
                         ref[:, 5].astype(np.int64))
    assert ob.shape == rb.shape, f"{name}: {len(ob)} detections, reference {len(rb)}"
    np.testing.assert_array_equal(oc, rc, err_msg=f"{name}: classes differ")
    np.testing.assert_allclose(ob, rb, atol=1e-3, rtol=0, err_msg=f"{name}: boxes differ")
    np.testing.assert_allclose(os_, rs, atol=1e-5, rtol=0, err_msg=f"{name}: scores differ")


PARITY_CASES = [  # (conf, iou, class-agnostic, reference detections measured on the 38)
    pytest.param(0.25, 0.45, False, 250, id="conf0.25-iou0.45-class-aware"),
    pytest.param(0.25, 0.45, True, 200, id="conf0.25-iou0.45-class-agnostic"),
    pytest.param(0.001, 0.65, False, 15_000, id="conf0.001-iou0.65-class-aware"),
]


@pytest.mark.parametrize("conf,iou,agnostic,min_total", PARITY_CASES)
def test_postprocess_matches_yolox_reference(yolox: YoloDetector, raw_outputs: dict,
                                             demo_utils: ModuleType, conf: float, iou: float,
                                             agnostic: bool, min_total: int) -> None:
    """Our decode + NMS on the same ONNX output equals the yolox demo reference
    (demo_postprocess + multiclass_nms) on all 38 images.

    The reference's class-aware NMS scores every class of a box (our ``multi_label``), its
    class-agnostic NMS takes each box's best class (our default), and its numpy NMS uses the
    legacy "+1 px" box area, which flips a few suppressions against the continuous IoU we use
    by default (e.g. 000000386912.jpg at 0.25/0.45), so ``nms_box_offset=1``. We clip to the
    image after NMS; the reference does not clip, so its boxes are clipped before comparing.
    """
    det = _same_engine(yolox, conf=conf, iou=iou, max_det=10_000, agnostic=agnostic,
                       multi_label=not agnostic, nms_box_offset=1.0)
    total = 0
    for name, (raw, meta, hw) in raw_outputs.items():
        ref = _reference_dets(demo_utils, raw, meta.scale, conf, iou, agnostic)
        ref[:, 0:4:2] = ref[:, 0:4:2].clip(0, hw[1])
        ref[:, 1:4:2] = ref[:, 1:4:2].clip(0, hw[0])
        d = det.postprocess({"output": raw}, meta)
        _assert_same((d.xyxy, d.scores, d.class_ids), ref, name)
        total += len(d)
    assert total > min_total  # the comparison is not vacuous


def test_default_nms_differs_from_legacy_only_in_area_convention(
        yolox: YoloDetector, raw_outputs: dict) -> None:
    """With the continuous IoU (default) the kept set is a textbook greedy NMS of the decoded
    candidates; checked on real candidates of every image."""
    det = _same_engine(yolox, conf=0.25, iou=0.45, max_det=10_000, multi_label=True)
    for name, (raw, meta, _) in raw_outputs.items():
        boxes, scores, cls = det.decode(raw)
        boxes = meta.to_source(boxes, clip=False)
        keep = nms(boxes, scores, 0.45, class_ids=cls)
        assert keep.tolist() == _greedy_reference(boxes, scores, 0.45, cls), name


@pytest.mark.parametrize("conf", [0.001, 0.05, 0.3])
def test_nms_paths_keep_the_same_real_candidates(yolox: YoloDetector, raw_outputs: dict,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 conf: float) -> None:
    """Real YOLOX-nano candidates of all 38 images (up to ~500 at conf 0.001): the Python pass
    and the numpy pass keep the same boxes, class-aware and agnostic, both conventions."""
    from perception2d_ros.models.yolo import nms as nms_module

    det = _same_engine(yolox, conf=conf, max_det=10_000)
    for name, (raw, meta, _) in raw_outputs.items():
        boxes, scores, cls = det.decode(raw)
        boxes = meta.to_source(boxes, clip=False)
        for classes in (cls, None):
            for offset in (0.0, 1.0):
                runs = []
                for limit in (10**6, -1):  # always Python, never Python
                    monkeypatch.setattr(nms_module, "PYTHON_MAX", limit)
                    runs.append(nms(boxes, scores, 0.45, class_ids=classes, box_offset=offset))
                assert runs[0].tolist() == runs[1].tolist(), (name, offset, classes is None)


GEOMETRY_IMAGE = "000000181666.jpg"  # 640x425: a person and five cows, all confident


def _affine_boxes(xyxy: np.ndarray, sx: float, sy: float, tx: float, ty: float) -> np.ndarray:
    return xyxy * np.array([sx, sy, sx, sy], np.float32) + np.array([tx, ty, tx, ty], np.float32)


def test_boxes_map_back_to_the_callers_pixels(yolox: YoloDetector) -> None:
    """The same scene at three sizes / aspect ratios gives boxes on the same objects.

    Every confident (score >= 0.5) object of the original frame, mapped into the variant by
    the known transform, must be hit by a variant box with IoU >= 0.8. Matching ignores the
    class: YOLOX-nano flips cow/sheep/horse between views of these cows, while boxes left in
    network pixels (or mapped with the wrong padding/scale) miss by far (IoU ~0)."""
    image = cv2.imread(str(COCO_DIR / "images" / GEOMETRY_IMAGE))
    h, w = image.shape[:2]
    ref = yolox.detect(image).above(0.5)
    assert len(ref) >= 5
    loose = _same_engine(yolox, conf=0.1)
    big = cv2.resize(image, (1280, 720), interpolation=cv2.INTER_LINEAR)  # aspect changes
    sx, sy = 1280 / w, 720 / h
    portrait = cv2.copyMakeBorder(image[:, 250:610], 80, 35, 0, 0, cv2.BORDER_CONSTANT,
                                  value=(0, 0, 0))  # 360 wide, 540 tall
    variants = {
        "resize 1280x720": (big, (sx, sy, 0.0, 0.0)),
        "crop 640x480 of the 1280x720": (big[240:720, 540:1180], (sx, sy, -540.0, -240.0)),
        "portrait crop+pad 360x540": (portrait, (1.0, 1.0, -250.0, 80.0)),
    }
    for label, (img, (ax, ay, tx, ty)) in variants.items():
        got = loose.detect(np.ascontiguousarray(img))
        hh, ww = img.shape[:2]
        assert np.all(got.xyxy >= 0) and np.all(got.xyxy[:, [0, 2]] <= ww) \
            and np.all(got.xyxy[:, [1, 3]] <= hh), label
        want = _affine_boxes(ref.xyxy, ax, ay, tx, ty)
        inside = (want[:, 0] >= 0) & (want[:, 1] >= 0) & (want[:, 2] <= ww) & (want[:, 3] <= hh)
        assert inside.sum() >= 4, f"{label}: too few reference objects inside the view"
        for box, cls in zip(want[inside], ref.class_ids[inside]):
            best = box_iou(box[None], got.xyxy).max() if len(got) else 0.0
            assert best >= 0.8, (f"{label}: {yolox.class_names[cls]} expected at "
                                 f"{box.round(1).tolist()}, best IoU {best:.2f}")


# --------------------------------------------------------------------------- CLI
def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    from perception2d_ros.cli.main import main

    code = main(list(argv))
    return code, capsys.readouterr().out


def test_cli_detect_json_contract(capsys: pytest.CaptureFixture) -> None:
    paths = [str(COCO_DIR / "images" / n) for n in (GEOMETRY_IMAGE, "000000037777.jpg")]
    code, out = _cli(capsys, "detect", "--json", "--backend", "onnxruntime", *paths)
    assert code == 0
    result = json.loads(out)
    assert [r["image"] for r in result] == paths
    for r in result:
        h, w = cv2.imread(r["image"]).shape[:2]
        assert r["detections"], f"{r['image']}: no detections"
        for d in r["detections"]:
            assert set(d) == {"class_name", "score", "xyxy"}
            x1, y1, x2, y2 = d["xyxy"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h, (r["image"], d)
            assert 0.25 < d["score"] <= 1 and isinstance(d["class_name"], str)
    assert sum(d["class_name"] == "cow" for d in result[0]["detections"]) >= 4
    code, out = _cli(capsys, "detect", "--classes", "person,2", paths[0])
    assert code == 0 and "person" in out and "cow" not in out


def test_cli_eval_detect_json(capsys: pytest.CaptureFixture) -> None:
    code, out = _cli(capsys, "eval", "detect", "--images", str(COCO_DIR / "images"),
                     "--annotations", str(ANNOTATIONS), "--limit", "6", "--json")
    assert code == 0
    result = json.loads(out)
    assert {"map", "map50", "per_class", "images", "images_per_s"} <= set(result)
    assert result["images"] == 6 and 0 < result["map"] <= result["map50"] <= 1
    assert all(0 <= v <= 1 for v in result["per_class"].values()) and result["per_class"]
    code, _ = _cli(capsys, "detect", str(COCO_DIR / "images" / "missing.jpg"))
    assert code == 1
