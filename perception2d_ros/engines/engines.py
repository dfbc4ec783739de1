"""Inference engines: one interface, several backends, the same outputs whatever runs below.

Backends
--------
``tensorrt``  native TensorRT 10/11 (named-tensor API), engines built from ONNX and cached
              under a key of ONNX sha256 + precision + input shapes + TensorRT version + GPU.
``onnxruntime`` ONNX Runtime with providers [TensorRT EP, CUDA EP, CPU] as available.
``torch``     a ``torch.nn.Module`` (CUDA or CPU), CUDA graphs for fixed shapes on GPU; for an
              ONNX file the graph is run by :mod:`onnx_torch` (torch + CUDA is the GPU
              backend where neither TensorRT nor ONNX Runtime's CUDA build is installed).

``create_engine(..., backend="auto")`` picks the best available and logs why; an explicit
backend that is not available raises :class:`BackendUnavailable` at configure time.

Every engine exposes ``inputs`` / ``outputs`` (:class:`TensorSpec`) and
``infer(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]``; feeds are validated
against the declared signature (names, rank, fixed dims, dtype) with a clear error.
Heavy modules (onnxruntime, tensorrt, torch) are imported lazily.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

LOG = logging.getLogger("perception2d.engines")

BACKENDS = ("tensorrt", "onnxruntime", "torch")
BIG_MODEL_BYTES = 64 * 2**20   # ONNX files above this run without ORT's CPU memory arena
#: what every command's ``--backend`` and every stage's ``*.backend`` accept
BACKEND_CHOICES = ("auto",) + BACKENDS

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


class EngineError(RuntimeError):
    """An engine could not be created or run."""


class BackendUnavailable(EngineError):
    """The requested backend cannot run on this machine (module or device missing)."""


class SignatureError(ValueError):
    """Inputs do not match the model's declared signature."""


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor of a model signature. ``shape`` entries are ints (fixed) or
    ``None``/str (dynamic)."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    def check(self, array: np.ndarray, role: str = "input") -> None:
        if array.ndim != len(self.shape):
            raise SignatureError(
                f"{role} '{self.name}': expected rank {len(self.shape)} {self.shape_str}, "
                f"got shape {tuple(array.shape)}"
            )
        for axis, (want, got) in enumerate(zip(self.shape, array.shape)):
            if isinstance(want, int) and want >= 0 and want != got:
                raise SignatureError(
                    f"{role} '{self.name}': dim {axis} must be {want} {self.shape_str}, "
                    f"got shape {tuple(array.shape)}"
                )
        if np.dtype(array.dtype) != np.dtype(self.dtype):
            raise SignatureError(
                f"{role} '{self.name}': expected dtype {np.dtype(self.dtype).name}, "
                f"got {np.dtype(array.dtype).name}"
            )

    @property
    def shape_str(self) -> str:
        return "[" + ",".join("?" if not isinstance(d, int) or d < 0 else str(d)
                              for d in self.shape) + "]"


class Engine:
    """Base class. Subclasses set ``backend``, ``device``, ``inputs``, ``outputs`` and implement
    ``_run``."""

    backend: str = "?"
    device: str = "cpu"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def validate(self, feeds: Mapping[str, np.ndarray]) -> None:
        names = {s.name for s in self.inputs}
        missing = names - set(feeds)
        extra = set(feeds) - names
        if missing or extra:
            raise SignatureError(
                f"model inputs are {sorted(names)}; missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}"
            )
        for spec in self.inputs:
            spec.check(np.asarray(feeds[spec.name]))

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model. ``feeds`` maps input names to arrays; returns output name → array."""
        self.validate(feeds)
        return self._run(feeds)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> str:
        ins = ", ".join(f"{s.name}{s.shape_str}:{np.dtype(s.dtype).name}" for s in self.inputs)
        outs = ", ".join(f"{s.name}{s.shape_str}" for s in self.outputs)
        return f"{self.backend}({self.device}) in: {ins} out: {outs}"

    def close(self) -> None:
        """Free backend resources (GPU memory). Safe to call twice."""


# --------------------------------------------------------------------------- ONNX Runtime
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


# --------------------------------------------------------------------------- TensorRT
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


def cuda_available() -> tuple[bool, str]:
    """Whether a CUDA device can be used from python (via torch), with the reason."""
    try:
        import torch
    except ImportError:
        return False, "no CUDA runtime for python (torch not installed)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible"
    return True, f"CUDA GPU {torch.cuda.get_device_name(0)}"


def onnx_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def engine_cache_key(onnx_hash: str, precision: str,
                     input_shapes: Mapping[str, Sequence[Sequence[int]]],
                     trt_version: str, gpu_name: str, compute_capability: str) -> str:
    """Key of a cached TensorRT engine: everything that makes an engine invalid when it
    changes. ``input_shapes`` maps input name → (min, opt, max) shapes."""
    shapes = ";".join(f"{n}={'/'.join('x'.join(map(str, s)) for s in v)}"
                      for n, v in sorted(input_shapes.items()))
    text = "|".join([onnx_hash, precision, shapes, trt_version, gpu_name, compute_capability])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("PERCEPTION2D_CACHE_DIR",
                               Path.home() / ".cache" / "perception2d"))


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


# --------------------------------------------------------------------------- torch
class TorchEngine(Engine):
    """A ``torch.nn.Module`` behind the engine interface.

    ``input_specs`` / ``output_names`` declare the signature (torch modules have none).
    On CUDA, ``precision='fp16'`` casts the module to half and ``cuda_graph=True`` captures
    one CUDA graph per input shape (fixed-shape inputs, the real-time case; the newest
    ``MAX_GRAPHS`` shapes are kept). A module whose capture fails runs eagerly from then on
    (logged once). :meth:`infer_tensors` takes and returns device tensors, for stages that keep
    the frame on the GPU."""

    backend = "torch"
    MAX_GRAPHS = 16

    def __init__(self, module: Any, input_specs: Sequence[TensorSpec],
                 output_names: Sequence[str], *, device: str = "auto",
                 precision: str = "fp32", cuda_graph: bool = False) -> None:
        try:
            import torch
        except ImportError as exc:
            from perception2d_ros.engines.extras import TORCH_EXTRA_HINT

            raise BackendUnavailable("torch backend unavailable: torch is not installed; "
                                     + TORCH_EXTRA_HINT) from exc
        self._torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("torch backend on 'cuda' requested but no CUDA GPU visible")
        self.device = device
        self.half = precision == "fp16" and device.startswith("cuda")
        self.module = module.eval().to(device)
        if self.half:
            self.module = self.module.half()
        self.inputs = list(input_specs)
        self.outputs = [TensorSpec(n, (), np.dtype(np.float32)) for n in output_names]
        self._output_names = list(output_names)
        self.cuda_graph = cuda_graph and device.startswith("cuda")
        from collections import OrderedDict

        self._graphs: OrderedDict[tuple, tuple[Any, list[Any], list[Any]]] = OrderedDict()

    def _to_device(self, arr: Any) -> Any:
        torch = self._torch
        t = arr if isinstance(arr, torch.Tensor) else \
            torch.from_numpy(np.ascontiguousarray(arr))
        t = t.to(self.device, non_blocking=True)
        if self.half and t.is_floating_point():
            t = t.half()
        return t

    def _forward(self, tensors: list[Any]) -> list[Any]:
        out = self.module(*tensors)
        if isinstance(out, dict):
            return [out[n] for n in self._output_names]
        if not isinstance(out, (tuple, list)):
            out = [out]
        return list(out)

    def _capture(self, tensors: list[Any]) -> tuple[Any, list[Any], list[Any]]:
        torch = self._torch
        static_in = [t.clone() for t in tensors]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up before capture
                self._forward(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._forward(static_in)
        return graph, static_in, static_out

    def infer_tensors(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Device tensors (or arrays) in, device tensors out: no host copy of the outputs.
        With CUDA graphs the outputs are the graph's static buffers, valid until the next
        call: copy what must outlive it."""
        torch = self._torch
        with torch.inference_mode():
            tensors = [self._to_device(feeds[s.name]) for s in self.inputs]
            if not self.cuda_graph:
                outs = self._forward(tensors)
            else:
                key = tuple((tuple(t.shape), t.dtype) for t in tensors)
                entry = self._graphs.get(key)
                if entry is None:
                    try:
                        entry = self._capture(tensors)
                    except Exception as exc:  # e.g. an op that syncs with the host
                        LOG.warning("torch engine: CUDA graph capture failed (%s); running "
                                    "eagerly", str(exc).splitlines()[0] if str(exc) else exc)
                        self.cuda_graph = False
                        self._graphs.clear()
                        torch.cuda.synchronize()
                        return dict(zip(self._output_names, self._forward(tensors)))
                    self._graphs[key] = entry
                    while len(self._graphs) > self.MAX_GRAPHS:
                        self._graphs.popitem(last=False)
                else:
                    self._graphs.move_to_end(key)
                graph, static_in, static_out = entry
                for dst, src in zip(static_in, tensors):
                    dst.copy_(src)
                graph.replay()
                outs = static_out
            return dict(zip(self._output_names, outs))

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.infer_tensors(feeds)
        return {n: o.float().cpu().numpy() for n, o in outs.items()}

    def close(self) -> None:
        self._graphs.clear()
        self.module = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def torch_engine_from_onnx(onnx_path: str | Path, *, device: str = "auto",
                           precision: str = "fp32", cuda_graph: bool = True) -> TorchEngine:
    """The ONNX graph run by torch (:mod:`onnx_torch`): the GPU backend on machines with
    torch + CUDA but neither TensorRT nor ONNX Runtime's CUDA build."""
    try:
        from perception2d_ros.engines import onnx_torch
    except ImportError as exc:  # pragma: no cover - onnx is a runtime dependency
        raise BackendUnavailable(f"torch backend unavailable: {exc}") from exc
    try:
        module = onnx_torch.load_onnx_module(onnx_path)
        ins, outs = onnx_torch.graph_signature(onnx_path)
    except NotImplementedError as exc:
        raise EngineError(str(exc)) from exc
    except ImportError as exc:
        raise BackendUnavailable(f"torch backend unavailable: {exc}") from exc
    specs = [TensorSpec(n, tuple(d if d is not None else -1 for d in shape), dt)
             for n, shape, dt in ins]
    return TorchEngine(module, specs, outs, device=device, precision=precision,
                       cuda_graph=cuda_graph)


# --------------------------------------------------------------------------- selection
def model_file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable ONNX model (missing, truncated, not protobuf), or None.
    Parses the graph structure only (no external weights), so a model file that is fine but
    that a backend cannot run returns None."""
    p = Path(path)
    if not p.is_file():
        return f"{p} does not exist"
    if p.suffix.lower() != ".onnx":
        return None  # engines are built from ONNX files; other inputs are checked elsewhere
    try:
        import onnx
    except ImportError:
        return None
    try:
        onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError, OSError, …
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{type(exc).__name__}: {text}"
    return None


def _raise_if_unparsable(onnx_path: str | Path, exc: BaseException) -> None:
    from perception2d_ros.engines import model_store as ms

    problem = model_file_problem(onnx_path)
    if problem is None:
        return
    path = Path(onnx_path)
    got = ms.sha256_file(path) if path.is_file() else None
    known = None
    try:
        real = path.resolve()
        known = next((e for e in ms.load_manifest().values()
                      if ms.entry_path(e).resolve() == real), None)
    except Exception:  # noqa: BLE001 - the manifest is only a hint here
        pass
    sha = f"sha256 {got}" if got else "no sha256"
    if known is not None and known.sha256:
        sha += f", expected {known.sha256}"
    what = (f"`perception2d models verify {known.name}` checks it; replace it "
            f"({ms.how_to_get(known, path)})" if known is not None else
            "re-export or re-download it (`perception2d models verify` checks the models of "
            "the manifest)")
    raise ms.ModelFileError(
        f"model file {path} cannot be parsed ({problem}; {sha}): it is truncated or not "
        f"an ONNX model, so no backend can run it; {what}") from exc



def _nvidia_device_present() -> bool:
    """A cheap look for an NVIDIA GPU (device nodes) before importing torch to ask."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0",
                                           "/proc/driver/nvidia", "/dev/nvhost-ctrl-gpu"))


def _ort_has_gpu() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    provs = set(ort.get_available_providers())
    return bool(provs & {"CUDAExecutionProvider", "TensorrtExecutionProvider"})


def available_backends() -> dict[str, tuple[bool, str]]:
    """backend → (available, reason), in preference order."""
    result: dict[str, tuple[bool, str]] = {"tensorrt": tensorrt_available()}
    try:
        import onnxruntime as ort
        provs = ort.get_available_providers()
        result["onnxruntime"] = (True, f"providers {provs}")
    except ImportError:
        result["onnxruntime"] = (False, "onnxruntime not installed")
    from perception2d_ros.engines.extras import TORCH_EXTRA_HINT, has_torch

    torch_ok = has_torch()
    result["torch"] = (torch_ok, "torch installed" if torch_ok
                       else f"torch not installed ({TORCH_EXTRA_HINT})")
    return result


@dataclass
class EngineConfig:
    """What a stage asks for. ``backend``: auto|tensorrt|onnxruntime|torch."""

    backend: str = "auto"
    device: str = "auto"          # auto|cpu|cuda
    precision: str = "fp32"       # fp32|fp16|int8 (GPU backends)
    threads: int | None = None    # CPU threads for onnxruntime
    cache_dir: str | None = None
    fallback: bool = True         # on build/load failure fall back to the next backend
    profiles: dict[str, list[list[int]]] = field(default_factory=dict)
    cuda_graph: bool = True       # torch backend on CUDA: one graph per input shape

    def __post_init__(self) -> None:
        if self.backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; "
                             f"got '{self.backend}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda; got '{self.device}'")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ValueError(f"precision must be fp32, fp16 or int8; got '{self.precision}'")


def create_engine(onnx_path: str | Path, config: EngineConfig | None = None, *,
                  torch_factory: Callable[[], Engine] | None = None) -> Engine:
    """Create the engine for ``onnx_path`` according to ``config``.

    ``auto`` tries TensorRT (GPU), then ONNX Runtime (its best provider), then torch,
    logging why each was chosen or skipped — except where ONNX Runtime can only use the CPU
    and torch sees a CUDA GPU: then torch (the ONNX graph on the GPU) comes before it.
    ``torch_factory`` builds the torch engine; without one the ONNX graph itself is run by
    :func:`torch_engine_from_onnx`. An explicit backend
    that is unavailable raises :class:`BackendUnavailable`. With ``fallback`` a failure of a
    chosen GPU backend (build error, out of memory) falls back to the next one with a warning.
    """
    cfg = config or EngineConfig()
    avail = available_backends()
    if cfg.device == "cpu":
        avail["tensorrt"] = (False, "device=cpu requested")
    elif cfg.device == "cuda":  # an explicit GPU request is honoured or refused, never CPU
        avail = _cuda_capable(avail)
    if torch_factory is None:
        def torch_factory() -> Engine:
            return torch_engine_from_onnx(onnx_path, device=cfg.device,
                                          precision=cfg.precision, cuda_graph=cfg.cuda_graph)
    if cfg.backend != "auto":
        ok, why = avail[cfg.backend]
        if not ok:
            raise BackendUnavailable(
                f"backend '{cfg.backend}'{' on device cuda' if cfg.device == 'cuda' else ''} "
                f"is not available: {why}; choose another backend/device, or auto")
        order = [cfg.backend] + ([b for b in BACKENDS if b != cfg.backend] if cfg.fallback else [])
    else:
        order = list(BACKENDS)
        if cfg.device != "cpu" and avail["torch"][0] and _nvidia_device_present() \
                and not _ort_has_gpu():
            cuda_ok, cuda_why = cuda_available()
            if cuda_ok:
                order = ["tensorrt", "torch", "onnxruntime"]
                avail["torch"] = (True, f"ONNX Runtime has no GPU provider; {cuda_why}")
    errors = []
    for name in order:
        ok, why = avail[name]
        if not ok:
            LOG.debug("backend %s skipped: %s", name, why)
            errors.append(f"{name}: {why}")
            continue
        try:
            if name == "tensorrt":
                engine: Engine = TensorRTEngine(onnx_path, precision=cfg.precision,
                                                profiles=cfg.profiles, cache_dir=cfg.cache_dir)
            elif name == "onnxruntime":
                engine = OrtEngine(onnx_path, threads=cfg.threads, cache_dir=cfg.cache_dir,
                                   precision=cfg.precision, device=cfg.device)
            else:
                assert torch_factory is not None
                engine = torch_factory()
        except EngineError as exc:
            if not isinstance(exc, BackendUnavailable):
                # a file no backend can parse is not a backend problem: say so once, stop
                _raise_if_unparsable(onnx_path, exc)
            if not cfg.fallback or (name == cfg.backend and isinstance(exc, BackendUnavailable)):
                raise  # an explicit backend that cannot run here is refused, not replaced
            if name != order[-1]:
                LOG.warning("backend %s failed (%s); falling back", name, exc)
            errors.append(f"{name}: {exc}")
            continue
        if cfg.device == "cuda" and not str(getattr(engine, "device", "")).startswith("cuda"):
            engine.close()
            raise BackendUnavailable(f"device cuda was requested but {name} runs this model "
                                     f"on {engine.device}; use device auto or cpu")
        LOG.info("engine: %s chosen (%s)%s", name, why,
                 f"; skipped {'; '.join(errors)}" if errors else "")
        return engine
    on = " on device cuda" if cfg.device == "cuda" else ""
    raise BackendUnavailable(f"no backend could run this model{on}: " + "; ".join(errors))


def _cuda_capable(avail: dict[str, tuple[bool, str]]) -> dict[str, tuple[bool, str]]:
    """``available_backends()`` restricted to backends that can run on a CUDA GPU here."""
    out = dict(avail)
    cuda_ok, cuda_why = cuda_available()
    if out["onnxruntime"][0] and not _ort_has_gpu():
        out["onnxruntime"] = (False, "this onnxruntime has no CUDA/TensorRT provider "
                                     "(onnxruntime-gpu is not installed)")
    if out["torch"][0] and not cuda_ok:
        out["torch"] = (False, cuda_why)
    return out
