"""Choosing and creating an engine: :class:`EngineConfig` (what a stage asks for),
:func:`available_backends` and :func:`create_engine`, which picks the best available backend,
logs why, falls back when a GPU backend fails, and stops on a model file no backend can parse.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from perception2d_ros.engines.base import (BACKENDS, BackendUnavailable, Engine, EngineError,
                                           cuda_available)
from perception2d_ros.engines.onnxruntime_backend import OrtEngine
from perception2d_ros.engines.tensorrt_backend import TensorRTEngine, tensorrt_available
from perception2d_ros.engines.torch_backend import torch_engine_from_onnx

LOG = logging.getLogger("perception2d.engines")


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
