"""Frames kept on the models' torch device (``detect.device_frames``, engines/device.py): upload
once, rectify, letterbox, decode + NMS on the device. The same pipeline code runs on torch's
CPU device here and on CUDA where a GPU is present; it is compared with the host pipeline
(cv2 / numpy / ONNX Runtime, the reference) on real COCO frames with a real calibration."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from perception2d_ros.geometry.camera import CameraModel
from perception2d_ros.engines.base import cuda_available
from perception2d_ros.pipeline.build import build_pipeline
from perception2d_ros.pipeline.config import merge_config
from perception2d_ros.pipeline.frame import Frame

torch = pytest.importorskip("torch", reason="torch is an export/test extra (requirements/test.txt)")
CUDA_OK, CUDA_WHY = cuda_available()
IMAGES = ("000000397133.jpg", "000000037777.jpg", "000000252219.jpg", "000000087038.jpg")


def _pipeline(models_dir: Path, device_frames: str, **detect: object):
    cfg = merge_config({"stages": ["rectify", "detect"], "models_dir": str(models_dir),
                        "detect": {"device_frames": device_frames, **detect}})
    return build_pipeline(cfg)


def _frames(data_dir: Path, size: tuple[int, int]) -> list[Frame]:
    cam = CameraModel.from_yaml(data_dir / "camera_info" / "camerav1_1280x720.yaml")
    if size != (1280, 720):
        raise AssertionError("the frames are made for the camerav1 calibration")
    out = []
    for i, name in enumerate(IMAGES):
        img = cv2.resize(cv2.imread(str(data_dir / "coco" / "images" / name)), size)
        out.append(Frame(img, "bgr8", i, "cam", camera=cam))
    return out


def _match(a, b, px: float, margin: float = 0.05) -> float:
    """Fraction of ``b``'s boxes that ``a`` has (same class, every coordinate within px).
    Boxes of ``b`` within ``margin`` of the confidence threshold (0.3) are not counted: a
    grey level of difference may legitimately move them across it."""
    sure = b.scores > 0.3 + margin
    if not sure.any():
        return 1.0
    hit = 0
    for box, cls in zip(b.xyxy[sure], b.class_ids[sure]):
        d = np.abs(a.xyxy - box).max(axis=1) if len(a) else np.array([np.inf])
        hit += bool(len(a) and ((d <= px) & (a.class_ids == cls)).any())
    return hit / int(sure.sum())


def _compare(device_pipe, host_pipe, frames, px: float, min_match: float) -> None:
    seen = 0
    for f in frames:
        g = Frame(f.image, f.encoding, f.stamp_ns, f.frame_id, camera=f.camera)
        h = Frame(f.image, f.encoding, f.stamp_ns, f.frame_id, camera=f.camera)
        device_pipe.run(g)
        host_pipe.run(h)
        assert g.device_bgr is not None and h.device_bgr is None
        diff = np.abs(g.rectified.astype(np.int16) - h.rectified.astype(np.int16))
        # float bilinear vs cv2's 5-bit fixed-point weights: a few grey levels at most
        assert diff.max() <= 4 and diff.mean() < 0.3, (diff.max(), diff.mean())
        assert _match(g.detections, h.detections, px) >= min_match
        assert _match(h.detections, g.detections, px) >= min_match
        seen += len(h.detections)
    assert seen >= 8


def test_device_frames_on_cpu_match_the_host_pipeline(data_dir: Path, models_dir: Path) -> None:
    dev = _pipeline(models_dir, "on", backend="torch", device="cpu")
    host = _pipeline(models_dir, "off", backend="onnxruntime", device="cpu")
    assert dev.stages[1].device_detector is not None
    assert host.stages[1].device_detector is None
    _compare(dev, host, _frames(data_dir, (1280, 720)), px=2.0, min_match=0.9)


def test_device_frames_auto_stays_on_the_host_without_cuda(models_dir: Path) -> None:
    pipe = _pipeline(models_dir, "auto", backend="torch", device="cpu")
    assert pipe.stages[1].device_detector is None   # auto: only for a CUDA device
    with pytest.raises(ValueError, match="detect.device_frames: on needs the detector on "
                                         "the torch backend"):
        _pipeline(models_dir, "on", backend="onnxruntime", device="cpu")
    with pytest.raises(ValueError, match="detect.device_frames: 'gpu' is not one of"):
        _pipeline(models_dir, "gpu")


def test_device_letterbox_equals_the_host_letterbox(data_dir: Path, models_dir: Path) -> None:
    """The device letterbox tensor vs :class:`Letterbox`: the same geometry, padding and
    values (±1 grey level from the float resize) for YOLOX (top-left, BGR, 0–255) and the
    Ultralytics convention (centred, RGB, /255)."""
    from perception2d_ros.models.yolo.device import DeviceDetector
    from perception2d_ros.models.yolo.preprocess import Letterbox
    from perception2d_ros.models.yolo.detector import YoloDetector

    det = YoloDetector.from_model("yolox_nano", _torch_cpu(), models_dir=models_dir)
    img = cv2.imread(str(data_dir / "coco" / "images" / IMAGES[0]))
    for lb in (det.letterbox, Letterbox((416, 416), align="center", color="rgb",
                                         scale=1 / 255.0)):
        det.letterbox = lb
        dd = DeviceDetector(det)
        ours, meta = dd.letterbox(torch.from_numpy(img))
        ref, ref_meta = lb(img)
        assert meta == ref_meta
        tol = 1.0001 * float(lb.scale)
        np.testing.assert_allclose(ours.numpy(), ref, atol=tol)


def _torch_cpu():
    from perception2d_ros.engines.factory import EngineConfig

    return EngineConfig(backend="torch", device="cpu", fallback=False)


@pytest.mark.skipif(not CUDA_OK, reason=f"no CUDA for torch here: {CUDA_WHY}")
def test_device_frames_on_cuda_match_the_host_pipeline(data_dir: Path, models_dir: Path) -> None:
    dev = _pipeline(models_dir, "auto", backend="torch", device="cuda", precision="fp16")
    assert dev.stages[1].device_detector is not None   # auto: on for CUDA
    host = _pipeline(models_dir, "off", backend="onnxruntime", device="cpu")
    _compare(dev, host, _frames(data_dir, (1280, 720)), px=3.0, min_match=0.8)


def test_device_clip_crops_equal_the_host_crops(data_dir: Path) -> None:
    """CLIP crops cut and resized on the device (antialiased bicubic in float) vs the host's
    Pillow-exact crops: the same squares and frame-border fill; pixels within a few levels."""
    from perception2d_ros.models.clip.preprocess import (MEAN_RGB_U8, OPENAI_MEAN, OPENAI_STD,
                                                       preprocess_bgr, preprocess_crops_bgr)
    from perception2d_ros.models.clip.device import clip_preprocess

    img = cv2.imread(str(data_dir / "coco" / "images" / IMAGES[0]))
    h, w = img.shape[:2]
    boxes = np.array([[10.0, 20.0, 200.0, 180.0], [w - 60.0, h - 300.0, w - 1.0, h - 1.0],
                      [0.0, 0.0, w - 1.0, h - 1.0], [300.0, 100.0, 330.0, 400.0]])
    t = torch.from_numpy(img)
    for b in (boxes, None):
        ours = clip_preprocess(t, b, 224, 0.1, OPENAI_MEAN, OPENAI_STD, MEAN_RGB_U8).numpy()
        ref = preprocess_crops_bgr(img, b, 224, 0.1) if b is not None \
            else preprocess_bgr(img, 224)[None]
        assert ours.shape == ref.shape
        level = 1 / 255 / min(OPENAI_STD)            # one grey level, normalised
        diff = np.abs(ours - ref)
        assert diff.mean() < 0.5 * level and diff.max() <= 8 * level, \
            (diff.mean() / level, diff.max() / level)


def test_device_mask_combination_equals_the_host_one() -> None:
    """Instance-id image (overlaps: higher score wins, ties: lower index, NaN lowest), areas
    and mask boxes computed on the device equal the host functions exactly."""
    from perception2d_ros.models.sam.device import combine_masks
    from perception2d_ros.models.sam.results import SamResult, instance_id_image, mask_bboxes

    rng = np.random.default_rng(3)
    h, w, n = 60, 90, 7
    masks = np.zeros((n, h, w), bool)
    for i in range(n - 1):                       # overlapping rectangles; the last is empty
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        masks[i, y:y + rng.integers(5, 40), x:x + rng.integers(5, 60)] = True
    scores = np.array([0.5, 0.9, 0.5, np.nan, 0.2, 0.9, 0.1], np.float32)
    res = SamResult(masks, scores, scores, np.zeros(n, np.int64),
                    np.zeros((n, 1, 4, 4), np.float32), np.zeros((n, 1), np.float32), (h, w))
    ids, areas, boxes = combine_masks(torch.from_numpy(masks), scores)
    assert ids.dtype == np.uint16 and np.array_equal(ids, instance_id_image(res))
    assert np.array_equal(areas, res.areas)
    assert np.array_equal(boxes, mask_bboxes(masks)) and boxes.dtype == np.int32


@pytest.mark.parametrize("multi_label", [False, True])
def test_device_decode_equals_the_host_decode(data_dir: Path, models_dir: Path,
                                              multi_label: bool) -> None:
    """The device decode of a real YOLOX-nano output (grid, exp, obj × cls, threshold,
    multi-label) keeps the host decode's candidates with the same classes and boxes."""
    from perception2d_ros.models.yolo.device import DeviceDetector
    from perception2d_ros.models.yolo.detector import YoloDetector

    det = YoloDetector.from_model("yolox_nano", _torch_cpu(), models_dir=models_dir,
                                  conf=0.05, multi_label=multi_label)
    img = cv2.imread(str(data_dir / "coco" / "images" / IMAGES[0]))
    pred = det.infer(det.preprocess(img)[0])["output"]
    hb, hs, hc = det.decode(pred)
    db, ds, dc = (t.numpy() for t in DeviceDetector(det).decode(torch.from_numpy(pred)))
    assert len(hs) == len(ds) >= 20
    o1, o2 = np.lexsort((hc, hs)), np.lexsort((dc, ds))
    np.testing.assert_array_equal(hc[o1], dc[o2])
    np.testing.assert_allclose(hs[o1], ds[o2], atol=1e-6)
    np.testing.assert_allclose(hb[o1], db[o2], atol=1e-3)
