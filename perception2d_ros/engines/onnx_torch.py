"""Run an ONNX graph with torch: the GPU backend where neither TensorRT nor ONNX Runtime's
CUDA build is installed (torch + CUDA is), and the engine behind ``backend: torch``.

``load_onnx_module(path)`` returns a ``torch.nn.Module`` that executes the graph node by node
with torch ops, on whatever device and dtype the module is moved to (``.to('cuda')``,
``.half()``). It is written for the graphs this project exports (YOLOX / YOLOv5-v11, the CLIP
towers, the SAM / MobileSAM encoder and prompt decoder, LSeg) and checked against ONNX
Runtime on each of them.

Host / device split. Values that depend only on constants and input *shapes* (``Shape``,
``Gather`` of a shape, ``Concat`` of sizes, ``Range``, ``ConstantOfShape`` ...) are computed
on the host as numpy arrays; only data flows through device tensors. A tensor's shape is host
metadata, so no step ever waits on the GPU, and the device part of the graph can be captured
in a CUDA graph. The host part is computed once per input-shape signature and cached
(with the small host constants the device ops need, already uploaded), so a steady-state
forward runs only the device ops.

The op kernels are in :mod:`perception2d_ros.engines.onnx_kernels`. Unsupported
ops raise ``NotImplementedError`` naming them when the module is built, never mid-stream.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from perception2d_ros.engines.onnx_kernels import NP_DTYPES, make_kernels

# float initializers up to this many elements stay host constants (scalars for Mul/Div,
# Resize scales, Clip bounds); bigger ones are weights: registered buffers on the device
HOST_CONST_MAX = 4
SIGNATURE_CACHE = 16


def _t(torch: Any, x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x
    # np.array copies (writable, contiguous) and keeps 0-d arrays 0-d
    return torch.from_numpy(np.array(x))


def graph_signature(path: str | Path) -> tuple[list[tuple[str, tuple, np.dtype]], list[str]]:
    """(inputs as (name, shape with None for dynamic dims, numpy dtype), output names)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        inputs.append((i.name, shape, np.dtype(NP_DTYPES.get(tt.elem_type, np.float32))))
    return inputs, [o.name for o in model.graph.output]


def load_onnx_module(path: str | Path) -> Any:
    """``torch.nn.Module`` running the ONNX graph at ``path``: ``forward(*inputs)`` in graph
    input order returns the single output, or a tuple of all outputs."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(path))  # external data (> 2 GB encoders) loads with it
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    kernels = make_kernels()
    bad = sorted({n.op_type for n in graph.node
                  if n.op_type not in kernels and n.op_type != "Constant"}
                 | {f"{n.domain}.{n.op_type}" for n in graph.node
                    if n.domain not in ("", "ai.onnx")})
    if bad:
        raise NotImplementedError(f"onnx_torch: unsupported ONNX ops {bad} in {path}")

    def attrs(node: Any) -> dict[str, Any]:
        out = {}
        for a in node.attribute:
            val = onnx.helper.get_attribute_value(a)
            if isinstance(val, onnx.TensorProto):
                val = numpy_helper.to_array(val)
            out[a.name] = val
        return out

    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    plan = []
    for node in graph.node:
        a = attrs(node)
        if node.op_type == "Constant":
            val = a.get("value")
            if val is None:
                for key in ("value_float", "value_int"):
                    if key in a:
                        val = np.array(a[key], np.float32 if "float" in key else np.int64)
                for key in ("value_floats", "value_ints"):
                    if key in a:
                        val = np.array(a[key], np.float32 if "float" in key else np.int64)
            if val is None:
                raise NotImplementedError(f"onnx_torch: Constant without value in {path}")
            consts[node.output[0]] = np.asarray(val)
            continue
        plan.append((node.op_type, list(node.input), list(node.output), a))
    inputs = [i.name for i in graph.input if i.name not in consts]
    return _Graph(torch, kernels, plan, consts, inputs, [o.name for o in graph.output],
                  opset, str(path))


def _graph_base() -> type:
    import torch
    return torch.nn.Module


class _Ctx:
    """What a kernel may ask about its node and the module: the opset, the number of outputs
    and the float dtype of the module (``Cast`` to float follows ``.half()``)."""

    __slots__ = ("opset", "n_outputs", "float_dtype")

    def __init__(self, opset: int, float_dtype: Any) -> None:
        self.opset, self.float_dtype, self.n_outputs = opset, float_dtype, 1


class _Graph(_graph_base()):  # type: ignore[misc]
    def __init__(self, torch: Any, kernels: dict, plan: list, consts: dict,
                 inputs: Sequence[str], outputs: Sequence[str], opset: int,
                 source: str) -> None:
        super().__init__()
        self._torch_mod = torch
        self._kernels = kernels
        self.input_names = list(inputs)
        self.output_names = list(outputs)
        self.opset = opset
        self.source = source
        self._host: dict[str, np.ndarray] = {}
        self._buf: dict[str, str] = {}
        for name, arr in consts.items():
            if arr.dtype.kind == "f" and arr.size > HOST_CONST_MAX:
                attr = f"w{len(self._buf)}"
                self.register_buffer(attr, torch.from_numpy(np.array(arr)), persistent=False)
                self._buf[name] = attr
            else:
                self._host[name] = arr
        self.plan = plan
        self._plans: OrderedDict[tuple, list] = OrderedDict()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:  # .to(), .half(), ...
        self._plans.clear()   # cached uploads follow the new device / dtype
        return super()._apply(fn, *args, **kwargs)

    # ------------------------------------------------------------------ execution
    def _float_dtype(self) -> Any:
        for b in self.buffers():
            if b.is_floating_point():
                return b.dtype
        return self._torch_mod.float32

    def _device(self, args: Sequence[Any]) -> Any:
        for t in args:
            return t.device
        for b in self.buffers():
            return b.device
        return self._torch_mod.device("cpu")

    def forward(self, *args: Any) -> Any:
        torch = self._torch_mod
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        compiled = self._plans.get(key)
        if compiled is None:
            compiled = self._compile(args)
            self._plans[key] = compiled
            if len(self._plans) > SIGNATURE_CACHE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        steps, host_outputs = compiled
        env: dict[str, Any] = dict(zip(self.input_names, args))
        for fn, ins, outs, a, ctx, free, _op in steps:
            y = fn([env[i] if isinstance(i, str) else i for i in ins], a, ctx)
            if isinstance(y, tuple):
                for o, t in zip(outs, y):
                    env[o] = t
            else:
                env[outs[0]] = y
            for name in free:
                del env[name]
        res = [env[o] if o in env else host_outputs[o] for o in self.output_names]
        return res[0] if len(res) == 1 else tuple(res)

    # ------------------------------------------------------------------ compile
    _HOST_OPERANDS = {  # operand positions that are sizes / axes / bounds: kept on the host
        "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4),
        "Unsqueeze": (1,), "Squeeze": (1,), "Split": (1,), "Pad": (1, 2, 3),
        "Resize": (1, 2, 3), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,),
        "ReduceMin": (1,), "ReduceL2": (1,), "Clip": (1, 2), "ConstantOfShape": (0,),
        "Range": (0, 1, 2)}

    def _compile(self, args: Sequence[Any]) -> tuple[list, dict]:
        """Walk the graph once for these input shapes: host nodes are evaluated now (numpy
        values, kept), device nodes become steps whose host operands are pre-converted to
        device tensors of the partner's dtype (uploaded once, reused by every later call and
        by a captured CUDA graph). Each step lists the values no later step needs."""
        torch = self._torch_mod
        device = self._device(args)
        fdt = self._float_dtype()
        host: dict[str, Any] = dict(self._host)
        bufs = {n: getattr(self, attr) for n, attr in self._buf.items()}
        dev: dict[str, Any] = {n: a for n, a in zip(self.input_names, args)}
        last_use: dict[str, int] = {}
        for k, (_, ins, _, _) in enumerate(self.plan):
            for i in ins:
                last_use[i] = k
        keep = set(self.output_names)
        steps = []
        with torch.no_grad():
            for k, (op, ins, outs, a) in enumerate(self.plan):
                ctx = _Ctx(self.opset, fdt)
                ctx.n_outputs = len(outs)
                fn = self._kernels[op]
                on_device = op != "Shape" and any(i in dev or i in bufs for i in ins if i)
                if not on_device:
                    vals = [None if not i else _t(torch, host[i]) if i in host
                            else dev[i] if i in dev else bufs[i] for i in ins]
                    hctx = _Ctx(self.opset, torch.float32)
                    hctx.n_outputs = len(outs)
                    y = fn(vals, a, hctx)
                    for o, t in zip(outs, y if isinstance(y, tuple) else (y,)):
                        host[o] = t.numpy()
                    continue
                ref = next(dev[i] if i in dev else bufs[i] for i in ins if i in dev or i in bufs)
                operands: list[Any] = []
                for pos, i in enumerate(ins):
                    if not i:
                        operands.append(None)
                    elif i in dev:
                        operands.append(i)
                    elif i in bufs:
                        operands.append(bufs[i])
                    elif pos in self._HOST_OPERANDS.get(op, ()) or (
                            op == "Gather" and pos == 1 and host[i].ndim == 0):
                        operands.append(_t(torch, host[i]))
                    else:
                        arr = np.array(host[i])
                        t = torch.as_tensor(arr, device=device)
                        if arr.dtype.kind == "f":
                            t = t.to(ref.dtype if ref.is_floating_point() else fdt)
                        operands.append(t)
                vals = [dev[o] if isinstance(o, str) else o for o in operands]
                y = fn(vals, a, ctx)
                for o, t in zip(outs, y if isinstance(y, tuple) else (y,)):
                    dev[o] = t
                free = [i for i in dict.fromkeys(x for x in operands if isinstance(x, str))
                        if last_use.get(i) == k and i not in keep]
                free += [o for o in outs if o not in last_use and o not in keep]
                for name in free:
                    dev.pop(name, None)
                steps.append((fn, operands, outs, a, ctx, free, op))
        host_outputs = {o: torch.as_tensor(np.asarray(host[o]), device=device)
                        for o in self.output_names if o in host}
        return steps, host_outputs
