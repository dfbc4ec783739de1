"""The torch backend: :class:`TorchEngine`, a ``torch.nn.Module`` behind the engine interface
(CUDA graphs per input shape on GPU, device tensors in and out with ``infer_tensors``), and
:func:`torch_engine_from_onnx`, an ONNX file run by :mod:`perception2d_ros.engines.onnx_torch`.
torch is imported when an engine is made.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from perception2d_ros.engines.base import BackendUnavailable, Engine, EngineError, TensorSpec

LOG = logging.getLogger("perception2d.engines")


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
