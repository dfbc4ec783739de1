"""Inference engines: signature validation, backend selection, cache keys, torch ↔ ORT parity.

A small torch module is exported to ONNX once per session (legacy exporter, opset 17) and run
on onnxruntime (CPU) and torch (CPU, and CUDA where torch sees a GPU); TensorRT tests run
only where tensorrt + a GPU exist.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from perception2d_ros.engines.base import (BackendUnavailable, EngineError, SignatureError,
                                           TensorSpec, cuda_available)
from perception2d_ros.engines.factory import EngineConfig, available_backends, create_engine
from perception2d_ros.engines.onnxruntime_backend import OrtEngine
from perception2d_ros.engines.tensorrt_backend import engine_cache_key, tensorrt_available
from perception2d_ros.engines.torch_backend import TorchEngine

TRT_OK, TRT_WHY = tensorrt_available()
CUDA_OK, CUDA_WHY = cuda_available()
INPUT_SHAPE = (1, 3, 16, 16)


def _make_module() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.SiLU(),
        torch.nn.Conv2d(8, 4, 3, stride=2, padding=1), torch.nn.Sigmoid(),
    ).eval()


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """(torch module, its ONNX export): input 'images' [1,3,16,16] → output 'scores'."""
    import torch

    module = _make_module()
    path = tmp_path_factory.mktemp("engines") / "small.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is deliberate
        torch.onnx.export(module, (torch.zeros(INPUT_SHAPE),), str(path), dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["scores"])
    return module, path


@pytest.fixture(scope="session")
def ort_engine(small_model: tuple[Any, Path]) -> OrtEngine:
    return OrtEngine(small_model[1], device="cpu", threads=1)


def test_ort_engine_signature(ort_engine: OrtEngine) -> None:
    assert [s.name for s in ort_engine.inputs] == ["images"]
    assert ort_engine.inputs[0].shape == INPUT_SHAPE
    assert ort_engine.inputs[0].dtype == np.float32
    assert [s.name for s in ort_engine.outputs] == ["scores"]
    out = ort_engine.infer({"images": np.zeros(INPUT_SHAPE, np.float32)})
    assert out["scores"].shape == (1, 4, 8, 8)
    assert "images[1,3,16,16]:float32" in ort_engine.describe()


@pytest.mark.parametrize("feeds,match", [
    ({"input": np.zeros(INPUT_SHAPE, np.float32)}, r"missing \['images'\].*unexpected \['input'\]"),
    ({}, r"missing \['images'\]"),
    ({"images": np.zeros((3, 16, 16), np.float32)}, r"input 'images': expected rank 4"),
    ({"images": np.zeros((1, 3, 16, 15), np.float32)}, r"input 'images': dim 3 must be 16"),
    ({"images": np.zeros((2, 3, 16, 16), np.float32)}, r"input 'images': dim 0 must be 1"),
    ({"images": np.zeros(INPUT_SHAPE, np.float64)},
     r"input 'images': expected dtype float32, got float64"),
    ({"images": np.zeros(INPUT_SHAPE, np.uint8)}, r"input 'images': expected dtype float32"),
], ids=["wrong-name", "missing", "rank", "dim", "batch", "float64", "uint8"])
def test_ort_engine_rejects_bad_feeds(ort_engine: OrtEngine, feeds: dict, match: str) -> None:
    with pytest.raises(SignatureError, match=match):
        ort_engine.infer(feeds)


def test_tensor_spec_dynamic_dims_accept_any_size() -> None:
    spec = TensorSpec("images", (1, 3, "height", None), np.dtype(np.float32))
    spec.check(np.zeros((1, 3, 7, 9), np.float32))
    assert spec.shape_str == "[1,3,?,?]"
    with pytest.raises(SignatureError, match="dim 1 must be 3"):
        spec.check(np.zeros((1, 4, 7, 9), np.float32))


def test_ort_engine_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="model file not found"):
        OrtEngine(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(EngineError, match="onnxruntime could not load"):
        OrtEngine(bad)


def test_auto_selects_onnxruntime_and_logs_why(small_model: tuple[Any, Path],
                                               caplog: pytest.LogCaptureFixture) -> None:
    """auto: ONNX Runtime on a machine without a GPU; with a CUDA GPU that only torch can
    use (ORT a CPU build, no TensorRT), torch runs the graph on the GPU — logged either way."""
    if TRT_OK:
        pytest.skip(f"this machine has TensorRT ({TRT_WHY}); auto would pick it")
    import onnxruntime as ort

    gpu_torch = CUDA_OK and not ({"CUDAExecutionProvider", "TensorrtExecutionProvider"}
                                 & set(ort.get_available_providers()))
    with caplog.at_level(logging.INFO, logger="perception2d.engines"):
        engine = create_engine(small_model[1], EngineConfig(backend="auto", threads=1))
    chosen = [r.getMessage() for r in caplog.records if "chosen" in r.getMessage()]
    assert len(chosen) == 1, caplog.text
    msg = chosen[0]
    assert "tensorrt" in msg and TRT_WHY in msg, f"the log must say why TensorRT was skipped: {msg}"
    if gpu_torch:
        assert engine.backend == "torch" and engine.device == "cuda"
        assert "torch chosen (ONNX Runtime has no GPU provider; CUDA GPU" in msg
    else:
        assert engine.backend == "onnxruntime"
        assert "onnxruntime chosen" in msg and "CPUExecutionProvider" in msg
    assert available_backends()["onnxruntime"][0]


def test_explicit_tensorrt_unavailable_raises(small_model: tuple[Any, Path]) -> None:
    if TRT_OK:
        pytest.skip(f"TensorRT is usable here ({TRT_WHY}); nothing to refuse")
    with pytest.raises(BackendUnavailable, match=r"backend 'tensorrt' is not available: .+") as e:
        create_engine(small_model[1], EngineConfig(backend="tensorrt"))
    assert TRT_WHY in str(e.value)
    with pytest.raises(BackendUnavailable, match="device=cpu"):
        create_engine(small_model[1], EngineConfig(backend="tensorrt", device="cpu"))


def test_engine_config_validation() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        EngineConfig(backend="tflite")
    with pytest.raises(ValueError, match="device must be"):
        EngineConfig(device="tpu")
    with pytest.raises(ValueError, match="precision must be"):
        EngineConfig(precision="bf16")


def test_engine_cache_key_changes_with_every_component() -> None:
    base: dict[str, Any] = dict(
        onnx_hash="a" * 64, precision="fp16",
        input_shapes={"images": [(1, 3, 640, 640)] * 3},
        trt_version="10.3.0", gpu_name="NVIDIA H100", compute_capability="9.0")
    key = engine_cache_key(**base)
    assert key == engine_cache_key(**base) and len(key) == 32
    changes = {
        "onnx_hash": "b" * 64, "precision": "int8",
        "input_shapes": {"images": [(1, 3, 640, 640), (1, 3, 640, 640), (4, 3, 640, 640)]},
        "trt_version": "10.4.0", "gpu_name": "NVIDIA L4", "compute_capability": "8.9",
    }
    keys = {key}
    for field, value in changes.items():
        changed = engine_cache_key(**{**base, field: value})
        assert changed != key, f"changing {field} must change the key"
        keys.add(changed)
    assert len(keys) == 1 + len(changes)
    renamed = engine_cache_key(**{**base, "input_shapes": {"input": [(1, 3, 640, 640)] * 3}})
    assert renamed != key


def test_torch_engine_cpu_matches_onnxruntime(small_model: tuple[Any, Path],
                                              ort_engine: OrtEngine) -> None:
    module, _ = small_model
    spec = TensorSpec("images", INPUT_SHAPE, np.dtype(np.float32))
    torch_engine = create_engine(small_model[1], EngineConfig(backend="torch", device="cpu"),
                                 torch_factory=lambda: TorchEngine(module, [spec], ["scores"],
                                                                   device="cpu"))
    assert torch_engine.backend == "torch" and torch_engine.device == "cpu"
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal(INPUT_SHAPE).astype(np.float32)
        a = torch_engine.infer({"images": x})["scores"]
        b = ort_engine.infer({"images": x})["scores"]
        assert a.shape == b.shape == (1, 4, 8, 8) and a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(SignatureError, match="input 'images'"):
        torch_engine.infer({"images": np.zeros((1, 3, 8, 8), np.float32)})


@pytest.mark.skipif(not CUDA_OK, reason=f"no CUDA for torch here: {CUDA_WHY}")
@pytest.mark.parametrize("precision,graph,tol", [("fp32", False, 2e-3), ("fp32", True, 2e-3),
                                                 ("fp16", True, 2e-2)])
def test_torch_engine_cuda_matches_onnxruntime(small_model: tuple[Any, Path],
                                               ort_engine: OrtEngine, precision: str,
                                               graph: bool, tol: float) -> None:
    """CUDA (TF32 convolutions allowed, so fp32 tolerance is loose), fp16 and CUDA-graph
    replay: every call's output belongs to its own input (no stale or aliased buffers)."""
    import copy

    spec = TensorSpec("images", INPUT_SHAPE, np.dtype(np.float32))
    engine = TorchEngine(copy.deepcopy(small_model[0]), [spec], ["scores"], device="cuda",
                         precision=precision, cuda_graph=graph)
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal(INPUT_SHAPE).astype(np.float32) for _ in range(4)]
    outs = [engine.infer({"images": x})["scores"] for x in xs]
    for x, out in zip(xs, outs):
        assert out.dtype == np.float32 and out.shape == (1, 4, 8, 8)
        np.testing.assert_allclose(out, ort_engine.infer({"images": x})["scores"], atol=tol)
    assert not np.allclose(outs[0], outs[1])
    engine.close()


@pytest.mark.skipif(not TRT_OK, reason=f"TensorRT not usable here: {TRT_WHY}")
def test_tensorrt_build_cache_and_match_onnxruntime(small_model: tuple[Any, Path],
                                                    ort_engine: OrtEngine,
                                                    tmp_path: Path) -> None:
    from perception2d_ros.engines.tensorrt_backend import TensorRTEngine

    trt = TensorRTEngine(small_model[1], precision="fp32", cache_dir=tmp_path)
    assert trt.engine_path.is_file()
    x = np.random.default_rng(1).standard_normal(INPUT_SHAPE).astype(np.float32)
    np.testing.assert_allclose(trt.infer({"images": x})["scores"],
                               ort_engine.infer({"images": x})["scores"], atol=1e-3)
    mtime = trt.engine_path.stat().st_mtime_ns
    again = TensorRTEngine(small_model[1], precision="fp32", cache_dir=tmp_path)
    assert again.engine_path == trt.engine_path
    assert trt.engine_path.stat().st_mtime_ns == mtime, "a matching cache must not rebuild"
    with pytest.raises(SignatureError, match="input 'images'"):
        again.infer({"images": x.astype(np.float64)})
