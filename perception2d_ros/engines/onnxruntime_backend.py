"""The ONNX Runtime backend: :class:`OrtEngine`, a session with the best available providers
[TensorRT EP, CUDA EP, CPU] and its tuning (threads, no CPU arena for big models).
onnxruntime is imported when an engine is made.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from perception2d_ros.engines.base import (BackendUnavailable, Engine, EngineError, TensorSpec,
                                           default_cache_dir)

BIG_MODEL_BYTES = 64 * 2**20   # ONNX files above this run without ORT's CPU memory arena

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


class OrtEngine(Engine):
    """ONNX Runtime session. ``providers`` defaults to the best available of
    [TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider]."""

    backend = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        precision: str = "fp32",
        device: str = "auto",
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a runtime dependency
            raise BackendUnavailable(f"onnxruntime is not installed: {exc}") from exc
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise EngineError(f"model file not found: {self.path}")
        available = ort.get_available_providers()
        if providers is None:
            wanted = ["CPUExecutionProvider"] if device == "cpu" else [
                "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
            providers = [p for p in wanted if p in available]
        else:
            unknown = [p for p in providers if p not in available]
            if unknown:
                raise BackendUnavailable(
                    f"onnxruntime providers {unknown} not available here (have {available})")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        n_threads = threads if threads else max(1, min(os.cpu_count() or 1, 8))
        opts.intra_op_num_threads = n_threads
        opts.inter_op_num_threads = 1
        # Spinning threads burn a core between frames for no speed gain here (measured).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # ORT's CPU arena keeps extending for big models instead of reusing its blocks: SAM
        # ViT-B's encoder peaks at 6.7 GB after three runs with it, 3.9 GB without, no slower
        # (benchmarks/ort_arena_memory.py). Small models keep it (no malloc per frame).
        data = self.path.with_name(self.path.name + ".data")   # external weights (ViT-H)
        if self.path.stat().st_size + (data.stat().st_size if data.is_file() else 0) \
                > BIG_MODEL_BYTES:
            opts.enable_cpu_mem_arena = False
        provider_args: list[Any] = []
        for p in providers:
            if p == "TensorrtExecutionProvider":
                cache = Path(cache_dir or default_cache_dir()) / "ort_trt"
                cache.mkdir(parents=True, exist_ok=True)
                provider_args.append((p, {
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True,
                    "trt_fp16_enable": precision == "fp16",
                    "trt_int8_enable": precision == "int8",
                }))
            else:
                provider_args.append(p)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=provider_args)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime could not load {self.path}: {exc}") from exc
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] != "CPUExecutionProvider" else "cpu"
        self.inputs = [TensorSpec(i.name, tuple(_ort_dim(d) for d in i.shape),
                                  np.dtype(_ORT_TYPES.get(i.type, np.float32)))
                       for i in self.session.get_inputs()]
        self.outputs = [TensorSpec(o.name, tuple(_ort_dim(d) for d in o.shape),
                                   np.dtype(_ORT_TYPES.get(o.type, np.float32)))
                        for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, values))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


def _ort_dim(d: Any) -> int | str | None:
    return d if isinstance(d, int) else (d if isinstance(d, str) else None)
