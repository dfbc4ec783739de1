"""The ONNX graph run by torch (``engines/onnx_torch.py``, ``backend: torch``): the GPU backend
where only torch + CUDA exist. Checked against ONNX Runtime on the project's real models and
real images; the CUDA tests run where torch sees a GPU.

More graphs are checked where their exports are built: LSeg in test_lseg.py, the CLIP towers
in test_clip_parity.py, the SAM decoder in test_sam_parity.py (export-time fixtures)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from perception2d_ros.engines.base import EngineError, cuda_available
from perception2d_ros.engines.factory import EngineConfig, create_engine
from perception2d_ros.engines.torch_backend import TorchEngine
from perception2d_ros.models.yolo.detector import YoloDetector

torch = pytest.importorskip("torch", reason="torch is an export/test extra (requirements/test.txt)")
from perception2d_ros.engines import onnx_kernels  # noqa: E402  (imports torch)
CUDA_OK, CUDA_WHY = cuda_available()
ORT = EngineConfig(backend="onnxruntime", device="cpu")
TORCH_CPU = EngineConfig(backend="torch", device="cpu", fallback=False)


def _images(data_dir: Path, n: int) -> list[np.ndarray]:
    paths = sorted((data_dir / "coco" / "images").glob("*.jpg"))[:n]
    assert len(paths) == n
    return [cv2.imread(str(p)) for p in paths]


def _same_detections(a, b, px: float, score: float) -> int:
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    np.testing.assert_allclose(a.xyxy, b.xyxy, atol=px)
    np.testing.assert_allclose(a.scores, b.scores, atol=score)
    return len(a)


def test_yolox_nano_on_torch_matches_onnxruntime(data_dir: Path, models_dir: Path) -> None:
    """The shipped detector on the torch backend gives ORT's detections on real images."""
    ref = YoloDetector.from_model("yolox_nano", ORT, models_dir=models_dir)
    ours = YoloDetector.from_model("yolox_nano", TORCH_CPU, models_dir=models_dir)
    assert isinstance(ours.engine, TorchEngine) and ours.engine.device == "cpu"
    found = sum(_same_detections(ours.detect(img), ref.detect(img), px=1e-3, score=1e-5)
                for img in _images(data_dir, 6))
    assert found >= 5


def test_host_part_is_computed_once_per_shape(tmp_path: Path) -> None:
    """Shape arithmetic (Shape → Gather → Concat → Reshape) runs on the host at the first call
    for a shape; later calls run only the device ops, and a new shape gets its own plan."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Mul", ["flat", "two"], ["y0"]),
        helper.make_node("Softmax", ["y0"], ["y"], axis=-1),
    ]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [], [0]),
             helper.make_tensor("zero1", TensorProto.INT64, [1], [0]),
             helper.make_tensor("minus1", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["n", 3, 4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["n", 12])], inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), path)   # IR 8: every ORT >= 1.10 reads it
    eng = create_engine(path, TORCH_CPU)
    ref = create_engine(path, ORT)
    rng = np.random.default_rng(0)
    for n in (2, 5, 2):
        x = rng.standard_normal((n, 3, 4)).astype(np.float32)
        np.testing.assert_allclose(eng.infer({"x": x})["y"], ref.infer({"x": x})["y"],
                                   atol=1e-6)
    plans = eng.module._plans
    assert len(plans) == 2                      # one per input shape
    for steps, _ in plans.values():   # nothing of the shape arithmetic runs per call
        assert [s[-1] for s in steps] == ["Reshape", "Mul", "Softmax"]


def test_unsupported_op_is_named_at_build_and_falls_back(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Det", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    path = tmp_path / "det.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), path)   # IR 8: every ORT >= 1.10 reads it
    with pytest.raises(EngineError, match=r"unsupported ONNX ops \['Det'\]"):
        create_engine(path, TORCH_CPU)
    # with fallback (the default) the next backend runs it
    eng = create_engine(path, EngineConfig(backend="torch", device="cpu"))
    assert eng.backend == "onnxruntime"
    assert eng.infer({"x": np.array([[2, 0], [0, 3]], np.float32)})["y"] == pytest.approx(6.0)


def test_supported_ops_cover_every_shipped_graph(models_dir: Path) -> None:
    import onnx

    ops = {n.op_type for n in onnx.load(str(models_dir / "yolox_nano.onnx")).graph.node}
    assert ops <= set(onnx_kernels.supported_ops())


@pytest.mark.skipif(not CUDA_OK, reason=f"no CUDA for torch here: {CUDA_WHY}")
@pytest.mark.parametrize("precision,px", [("fp32", 0.5), ("fp16", 2.0)])
def test_yolox_nano_on_cuda_graph_matches_onnxruntime(data_dir: Path, models_dir: Path,
                                                      precision: str, px: float) -> None:
    """On CUDA (TF32 convolutions in fp32; fp16) with a CUDA graph: every confident ORT box
    (score 0.05 above the threshold) is found with the same class within ``px``. Order is not
    compared: near-equal scores may swap."""
    ref = YoloDetector.from_model("yolox_nano", ORT, models_dir=models_dir)
    ours = YoloDetector.from_model(
        "yolox_nano", EngineConfig(backend="torch", device="cuda", precision=precision,
                                   fallback=False), models_dir=models_dir)
    checked = 0
    for img in _images(data_dir, 6):
        a, b = ours.detect(img), ref.detect(img)
        assert ours.engine.cuda_graph, "the fixed-shape detector must run as a CUDA graph"
        for box, cls, score in zip(b.xyxy, b.class_ids, b.scores):
            if score < ref.conf + 0.05:
                continue
            d = np.abs(a.xyxy - box).max(axis=1) if len(a) else np.array([np.inf])
            assert ((d <= px) & (a.class_ids == cls)).any(), (box, cls, a.xyxy, a.class_ids)
            checked += 1
    assert checked >= 5
