"""The native TensorRT backend (TensorRT 10/11 named-tensor API): :class:`TensorRTEngine`,
the engine cache (key: ONNX sha256 + precision + input shapes + TensorRT version + GPU) and
the build from ONNX, with the version-specific decisions in :func:`plan_trt_build`.
tensorrt and torch (device buffers) are imported when an engine is made.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from perception2d_ros.engines.base import (BackendUnavailable, Engine, EngineError,
                                           SignatureError, TensorSpec, cuda_available,
                                           default_cache_dir, onnx_sha256)

LOG = logging.getLogger("perception2d.engines")


def tensorrt_available() -> tuple[bool, str]:
    """(available, reason). Never raises."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "python module 'tensorrt' is not installed"
    ok, why = cuda_available()
    if not ok:
        return False, why
    return True, "tensorrt + CUDA GPU found"


def engine_cache_key(onnx_hash: str, precision: str,
                     input_shapes: Mapping[str, Sequence[Sequence[int]]],
                     trt_version: str, gpu_name: str, compute_capability: str) -> str:
    """Key of a cached TensorRT engine: everything that makes an engine invalid when it
    changes. ``input_shapes`` maps input name → (min, opt, max) shapes."""
    shapes = ";".join(f"{n}={'/'.join('x'.join(map(str, s)) for s in v)}"
                      for n, v in sorted(input_shapes.items()))
    text = "|".join([onnx_hash, precision, shapes, trt_version, gpu_name, compute_capability])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class TensorRTEngine(Engine):  # exercised only where tensorrt + a GPU exist
    """Native TensorRT engine (TensorRT 10/11 named-tensor API) with device buffers from torch.

    ``profiles`` maps each dynamic input to (min, opt, max) shapes. The engine is loaded from
    the cache when the key matches; built otherwise (a loud log line first); never rebuilt
    when the key matches unless ``rebuild=True``.
    """

    backend = "tensorrt"
    device = "cuda"

    def __init__(self, onnx_path: str | Path, *, precision: str = "fp16",
                 profiles: Mapping[str, Sequence[Sequence[int]]] | None = None,
                 cache_dir: str | Path | None = None, workspace_mb: int = 2048,
                 rebuild: bool = False, int8_calibration_cache: str | Path | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        ok, why = tensorrt_available()
        if not ok:
            raise BackendUnavailable(f"tensorrt backend unavailable: {why}")
        import tensorrt as trt
        import torch

        self._trt = trt
        self._torch = torch
        self.onnx_path = Path(onnx_path)
        self.precision = precision
        self.logger = trt.Logger(trt.Logger.WARNING)
        props = torch.cuda.get_device_properties(0)
        self.profiles = {k: [tuple(s) for s in v] for k, v in (profiles or {}).items()}
        key = engine_cache_key(onnx_sha256(self.onnx_path), precision, self.profiles,
                               trt.__version__, props.name, f"{props.major}.{props.minor}")
        cache = Path(cache_dir or default_cache_dir()) / "trt"
        cache.mkdir(parents=True, exist_ok=True)
        self.engine_path = cache / f"{self.onnx_path.stem}-{precision}-{key}.engine"
        if self.engine_path.is_file() and not rebuild:
            LOG.info("loading cached TensorRT engine %s", self.engine_path)
            data = self.engine_path.read_bytes()
        else:
            LOG.warning("BUILDING TensorRT engine for %s (%s) — this can take minutes; "
                        "prebuild with `perception2d models build`", self.onnx_path, precision)
            data = build_serialized_engine(
                trt, self.onnx_path, precision=precision, profiles=self.profiles,
                logger=self.logger, workspace_mb=workspace_mb,
                calibration_cache=int8_calibration_cache, progress=progress,
                timing_cache=cache / "timing.cache")
            tmp = self.engine_path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(self.engine_path)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize {self.engine_path}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            spec = TensorSpec(name, tuple(int(d) for d in self.engine.get_tensor_shape(name)),
                              np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(spec)
            else:
                self.outputs.append(spec)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.cuda.stream(self.stream):
            keep = []
            for spec in self.inputs:
                t = torch.as_tensor(np.ascontiguousarray(feeds[spec.name])).cuda(non_blocking=True)
                keep.append(t)
                if not self.context.set_input_shape(spec.name, tuple(t.shape)):
                    raise SignatureError(
                        f"input '{spec.name}': shape {tuple(t.shape)} is outside the "
                        f"engine's optimization profile {self.profiles.get(spec.name, 'fixed')}"
                        "; rebuild with a --profile that covers it")
                self.context.set_tensor_address(spec.name, t.data_ptr())
            outs = {}
            for spec in self.outputs:
                shape = tuple(self.context.get_tensor_shape(spec.name))
                t = torch.empty(shape, dtype=_torch_dtype(torch, spec.dtype), device="cuda")
                outs[spec.name] = t
                self.context.set_tensor_address(spec.name, t.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EngineError("TensorRT execution failed")
        self.stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}

    def close(self) -> None:
        self.context = None
        self.engine = None


def tensorrt_major(version: str) -> int:
    """Major version of a ``tensorrt.__version__`` string ("10.3.0" → 10)."""
    try:
        return int(str(version).split(".")[0])
    except ValueError as exc:
        raise EngineError(f"unrecognised TensorRT version '{version}'") from exc


@dataclass(frozen=True)
class TrtBuildPlan:
    """How to build for a TensorRT version (the version-specific decisions, kept apart from
    the calls so they can be checked without TensorRT).

    ``strongly_typed``: create the network with ``STRONGLY_TYPED`` (types come from the
    ONNX; fp16 means an fp16 export). ``builder_flags``: ``BuilderFlag`` names to set
    (TensorRT 10 weak typing only). ``int8_calibrator``: attach the cache-only calibrator."""

    major: int
    strongly_typed: bool
    builder_flags: tuple[str, ...] = ()
    int8_calibrator: bool = False


def plan_trt_build(version: str, precision: str, onnx_fp16: bool) -> TrtBuildPlan:
    """The build plan for ``precision`` on TensorRT ``version`` (10 or 11), or EngineError
    saying why that precision cannot be built there.

    TensorRT 10 (JetPack 6.1+): fp32 with no precision flag; an fp16 ONNX strongly typed;
    fp16 from an fp32 ONNX by weak typing with ``BuilderFlag.FP16``; int8 with
    ``BuilderFlag.INT8`` + a calibration cache. TensorRT 11 removed the precision flags and
    the calibrator: every network is strongly typed, so fp16 needs an fp16 ONNX export and
    int8 an explicitly quantized (Q/DQ) ONNX."""
    major = tensorrt_major(version)
    if major < 10:
        raise EngineError(f"TensorRT {version} is too old: perception2d uses the TensorRT 10/11 "
                          "named-tensor API (JetPack 6 or a TensorRT 10+ wheel)")
    if precision not in ("fp32", "fp16", "int8"):
        raise EngineError(f"precision must be fp32, fp16 or int8; got '{precision}'")
    if major >= 11:
        if precision == "fp16" and not onnx_fp16:
            raise EngineError(
                f"TensorRT {version} builds strongly typed networks only: fp16 needs an fp16 "
                "ONNX export (e.g. ModelOpt AutoCast), this ONNX is fp32; use precision fp32 "
                "or an fp16 export")
        if precision == "int8":
            raise EngineError(f"TensorRT {version} has no int8 calibration: int8 needs an "
                              "explicitly quantized (Q/DQ) ONNX; use precision fp32 or fp16")
        return TrtBuildPlan(major, strongly_typed=True)
    if onnx_fp16:  # the export fixes the types: build it as it is
        return TrtBuildPlan(major, strongly_typed=True)
    if precision == "fp32":  # TensorRT 10's default (weak typing, no precision flags)
        return TrtBuildPlan(major, strongly_typed=False)
    flags = ("FP16", "INT8") if precision == "int8" else ("FP16",)
    return TrtBuildPlan(major, strongly_typed=False, builder_flags=flags,
                        int8_calibrator=precision == "int8")


def onnx_is_fp16(onnx_path: str | Path) -> bool:
    """Whether an ONNX export carries fp16 weights (a strongly typed fp16 model)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def build_serialized_engine(trt: Any, onnx_path: str | Path, *, precision: str,
                            profiles: Mapping[str, Sequence[Sequence[int]]], logger: Any,
                            workspace_mb: int = 2048,
                            calibration_cache: str | Path | None = None,
                            progress: Callable[[str], None] | None = None,
                            timing_cache: str | Path | None = None) -> bytes:
    """Build a serialized engine from ONNX with the ``trt`` module (TensorRT 10 or 11), using
    only the calls documented for that version (:func:`plan_trt_build`). ``timing_cache``: a
    file read before and written after the build (builds after the first are faster).
    Any failure (a removed API, out of memory, a parser or builder error) raises
    :class:`EngineError` with the reason, so ``create_engine`` falls back cleanly."""
    try:
        return _build_serialized_engine(trt, Path(onnx_path), precision, profiles, logger,
                                        workspace_mb, calibration_cache, progress,
                                        timing_cache)
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - any build failure is a clean fallback
        raise EngineError(f"TensorRT {getattr(trt, '__version__', '?')} engine build failed "
                          f"for {onnx_path}: {type(exc).__name__}: {exc}") from exc


def _build_serialized_engine(trt: Any, onnx_path: Path, precision: str,
                             profiles: Mapping[str, Sequence[Sequence[int]]], logger: Any,
                             workspace_mb: int, calibration_cache: str | Path | None,
                             progress: Callable[[str], None] | None,
                             timing_cache: str | Path | None) -> bytes:
    plan = plan_trt_build(trt.__version__, precision, onnx_is_fp16(onnx_path))
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and plan.major == 10:  # 11: always strongly typed, flag ignored
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.int8_calibrator:
        if not calibration_cache or not Path(calibration_cache).is_file():
            raise EngineError("int8 needs a calibration cache file (int8_calibration_cache)")
        config.int8_calibrator = _CacheOnlyCalibrator(trt, Path(calibration_cache))
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profiles.items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)
    cache_obj = None
    if timing_cache is not None:
        tc = Path(timing_cache)
        cache_obj = config.create_timing_cache(tc.read_bytes() if tc.is_file() else b"")
        if not config.set_timing_cache(cache_obj, False):
            LOG.warning("TensorRT timing cache %s does not match this GPU/TensorRT; starting "
                        "a new one", tc)
            cache_obj = config.create_timing_cache(b"")
            config.set_timing_cache(cache_obj, False)
    if progress is not None and hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _ProgressMonitor(trt, progress)
    t0 = time.monotonic()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise EngineError(f"TensorRT engine build failed for {onnx_path} (see the TensorRT log "
                          "above)")
    LOG.warning("TensorRT engine built in %.1f s", time.monotonic() - t0)
    if cache_obj is not None:
        tc = Path(timing_cache)  # type: ignore[arg-type]
        tmp = tc.with_suffix(".tmp")
        tmp.write_bytes(bytes(cache_obj.serialize()))
        tmp.replace(tc)
    return bytes(blob)


def _torch_dtype(torch: Any, dtype: np.dtype) -> Any:
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
            np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
            np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool}[np.dtype(dtype)]


def _ProgressMonitor(trt: Any, report: Callable[[str], None]) -> Any:  # noqa: N802
    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, parent_phase, phase_name, num_steps):  # noqa: ANN001
            report(f"{phase_name} (0/{num_steps})")

        def step_complete(self, phase_name, step):  # noqa: ANN001
            report(f"{phase_name} step {step}")
            return True

        def phase_finish(self, phase_name):  # noqa: ANN001
            report(f"{phase_name} done")

    return Monitor()


def _CacheOnlyCalibrator(trt: Any, cache: Path) -> Any:  # noqa: N802
    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):  # noqa: ANN001
            return None

        def read_calibration_cache(self) -> bytes:
            return cache.read_bytes()

        def write_calibration_cache(self, data) -> None:  # noqa: ANN001
            cache.write_bytes(bytes(data))

    return Calibrator()
