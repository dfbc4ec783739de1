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

Semantics follow the ONNX operator specs at the opsets our exports use (11–18). Unsupported
ops raise ``NotImplementedError`` naming them when the module is built, never mid-stream.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

# ONNX TensorProto data type → numpy dtype
_NP_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16,
              6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64,
              12: np.uint32, 13: np.uint64}
_FLOAT_CODES = (1, 10, 11, 16)
# float initializers up to this many elements stay host constants (scalars for Mul/Div,
# Resize scales, Clip bounds); bigger ones are weights: registered buffers on the device
HOST_CONST_MAX = 4
SIGNATURE_CACHE = 16


def _t(torch: Any, x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x
    # np.array copies (writable, contiguous) and keeps 0-d arrays 0-d
    return torch.from_numpy(np.array(x))


def _ints(x: Any) -> list[int]:
    return [int(v) for v in np.asarray(x).reshape(-1).tolist()]


# --------------------------------------------------------------------------- op kernels
# Every kernel takes (torch, F, inputs, attrs, ctx) and returns a tensor or a tuple of
# tensors. Host nodes run the same kernel on CPU tensors made from the numpy inputs.
def _make_kernels() -> dict[str, Callable[..., Any]]:
    import torch
    import torch.nn.functional as F

    def unary(fn: Callable[[Any], Any]) -> Callable[..., Any]:
        return lambda v, a, c: fn(v[0])

    def binary(fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
        return lambda v, a, c: fn(v[0], v[1])

    def conv(v: list, a: dict, c: Any) -> Any:
        x, w = v[0], v[1]
        b = v[2] if len(v) > 2 else None
        nd = w.dim() - 2
        pads = a.get("pads", [0] * (2 * nd))
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise NotImplementedError("onnx_torch: Conv auto_pad")
        begin, end = pads[:nd], pads[nd:]
        if begin != end:
            x = F.pad(x, [p for i in reversed(range(nd)) for p in (begin[i], end[i])])
            begin = [0] * nd
        fn = F.conv1d if nd == 1 else F.conv2d if nd == 2 else F.conv3d
        return fn(x, w, b, stride=a.get("strides", [1] * nd), padding=begin,
                  dilation=a.get("dilations", [1] * nd), groups=int(a.get("group", 1)))

    def conv_transpose(v: list, a: dict, c: Any) -> Any:
        x, w = v[0], v[1]
        b = v[2] if len(v) > 2 else None
        nd = w.dim() - 2
        if "output_shape" in a:
            raise NotImplementedError("onnx_torch: ConvTranspose output_shape")
        pads = a.get("pads", [0] * (2 * nd))
        if pads[:nd] != pads[nd:]:
            raise NotImplementedError("onnx_torch: asymmetric ConvTranspose pads")
        fn = F.conv_transpose1d if nd == 1 else F.conv_transpose2d
        return fn(x, w, b, stride=a.get("strides", [1] * nd), padding=pads[:nd],
                  output_padding=a.get("output_padding", [0] * nd),
                  groups=int(a.get("group", 1)), dilation=a.get("dilations", [1] * nd))

    def maxpool(v: list, a: dict, c: Any) -> Any:
        k = a["kernel_shape"]
        nd = len(k)
        pads = a.get("pads", [0] * (2 * nd))
        x, pad = v[0], pads[:nd]
        if pads[:nd] != pads[nd:]:
            x = F.pad(x, [p for i in reversed(range(nd)) for p in (pads[i], pads[nd + i])],
                      value=float("-inf"))
            pad = [0] * nd
        return F.max_pool2d(x, k, stride=a.get("strides", [1] * nd), padding=pad,
                            dilation=a.get("dilations", [1] * nd),
                            ceil_mode=bool(a.get("ceil_mode", 0)))

    def gemm(v: list, a: dict, c: Any) -> Any:
        x, w = v[0], v[1]
        if a.get("transA", 0):
            x = x.t()
        if a.get("transB", 0):
            w = w.t()
        y = torch.matmul(x, w)
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        if alpha != 1.0:
            y = y * alpha
        if len(v) > 2 and v[2] is not None:
            y = y + (v[2] if beta == 1.0 else beta * v[2])
        return y

    def layer_norm(v: list, a: dict, c: Any) -> Any:
        x = v[0]
        axis = int(a.get("axis", -1)) % x.dim()
        shape = tuple(x.shape[axis:])
        w = v[1].reshape(shape) if v[1] is not None else None
        b = v[2].reshape(shape) if len(v) > 2 and v[2] is not None else None
        return F.layer_norm(x, shape, w, b, float(a.get("epsilon", 1e-5)))

    def softmax(v: list, a: dict, c: Any) -> Any:
        axis = int(a.get("axis", -1))
        if c.opset < 13:  # coerced to 2-D at axis
            x = v[0]
            flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
            return torch.softmax(flat, -1).reshape(x.shape)
        return torch.softmax(v[0], axis)

    def reduce(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(v: list, a: dict, c: Any) -> Any:
            axes = a.get("axes")
            if axes is None and len(v) > 1 and v[1] is not None:
                axes = _ints(v[1])
            keep = bool(a.get("keepdims", 1))
            x = v[0]
            if not axes:
                if a.get("noop_with_empty_axes", 0):
                    return x
                axes = list(range(x.dim()))
            return fn(x, [int(ax) % x.dim() for ax in axes], keep)
        return run

    def argmax(v: list, a: dict, c: Any) -> Any:
        x, axis = v[0], int(a.get("axis", 0))
        keep = bool(a.get("keepdims", 1))
        if a.get("select_last_index", 0):
            n = x.shape[axis]
            idx = n - 1 - torch.argmax(x.flip(axis), axis, keepdim=keep)
        else:
            idx = torch.argmax(x, axis, keepdim=keep)
        return idx.to(torch.int64)

    def cast(v: list, a: dict, c: Any) -> Any:
        to = int(a["to"])
        if to in _FLOAT_CODES:
            return v[0].to(c.float_dtype)
        return v[0].to(getattr(torch, np.dtype(_NP_DTYPES[to]).name
                               if to != 9 else "bool"))

    def clip(v: list, a: dict, c: Any) -> Any:
        lo = v[1] if len(v) > 1 else a.get("min")
        hi = v[2] if len(v) > 2 else a.get("max")
        lo = None if lo is None else (lo.item() if lo.numel() == 1 else lo)
        hi = None if hi is None else (hi.item() if hi.numel() == 1 else hi)
        return torch.clamp(v[0], lo, hi)

    def concat(v: list, a: dict, c: Any) -> Any:
        return torch.cat([x for x in v if x is not None], int(a["axis"]))

    def split(v: list, a: dict, c: Any) -> Any:
        x, axis = v[0], int(a.get("axis", 0))
        sizes = a.get("split")
        if sizes is None and len(v) > 1 and v[1] is not None:
            sizes = _ints(v[1])
        if sizes is None:
            n = c.n_outputs
            size = -(-x.shape[axis] // n)
            sizes = [min(size, x.shape[axis] - i * size) for i in range(n)]
        return tuple(torch.split(x, list(sizes), axis))

    def slice_(v: list, a: dict, c: Any) -> Any:
        x = v[0]
        if c.opset < 10:
            starts, ends = a["starts"], a["ends"]
            axes, steps = a.get("axes"), None
        else:
            starts, ends = _ints(v[1]), _ints(v[2])
            axes = _ints(v[3]) if len(v) > 3 and v[3] is not None else None
            steps = _ints(v[4]) if len(v) > 4 and v[4] is not None else None
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
        for s, e, ax, st in zip(starts, ends, axes, steps):
            ax = int(ax) % x.dim()
            n = x.shape[ax]
            if st > 0:
                s = max(0, min(n, s + n if s < 0 else s))
                e = max(0, min(n, e + n if e < 0 else e))
                x = x.narrow(ax, s, max(0, e - s)) if st == 1 else \
                    x[(slice(None),) * ax + (slice(s, e, st),)]
            else:  # negative step: walk the flipped axis
                s = max(-1, min(n - 1, s + n if s < 0 else s))
                e = max(-1, min(n - 1, e + n if e < 0 else e))
                idx = torch.arange(s, e, st, device=x.device)
                x = x.index_select(ax, idx)
        return x

    def gather(v: list, a: dict, c: Any) -> Any:
        x, idx = v[0], v[1]
        axis = int(a.get("axis", 0)) % x.dim()
        idx = idx.to(torch.int64)
        idx = torch.where(idx < 0, idx + x.shape[axis], idx)
        if idx.dim() == 0:
            if idx.device.type == "cpu" and x.device.type != "cpu":
                return x.select(axis, int(idx))  # a host index: no device sync
            return x.index_select(axis, idx.reshape(1)).squeeze(axis)
        out = x.index_select(axis, idx.reshape(-1))
        return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])

    def gather_elements(v: list, a: dict, c: Any) -> Any:
        x, idx = v[0], v[1].to(torch.int64)
        axis = int(a.get("axis", 0)) % x.dim()
        idx = torch.where(idx < 0, idx + x.shape[axis], idx)
        return torch.gather(x, axis, idx)

    def reshape(v: list, a: dict, c: Any) -> Any:
        shape = _ints(v[1])
        if not a.get("allowzero", 0):
            shape = [v[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return v[0].reshape(shape)

    def flatten(v: list, a: dict, c: Any) -> Any:
        x = v[0]
        axis = int(a.get("axis", 1)) % (x.dim() + 1) if x.dim() else 0
        return x.reshape(int(np.prod(x.shape[:axis])), -1)

    def transpose(v: list, a: dict, c: Any) -> Any:
        perm = a.get("perm") or list(reversed(range(v[0].dim())))
        return v[0].permute(*perm)

    def unsqueeze(v: list, a: dict, c: Any) -> Any:
        axes = a.get("axes") if "axes" in a else _ints(v[1])
        x = v[0]
        rank = x.dim() + len(axes)
        for ax in sorted(int(ax) % rank for ax in axes):
            x = x.unsqueeze(ax)
        return x

    def squeeze(v: list, a: dict, c: Any) -> Any:
        x = v[0]
        axes = a.get("axes") if "axes" in a else (
            _ints(v[1]) if len(v) > 1 and v[1] is not None else None)
        if axes is None:
            return x.squeeze()
        for ax in sorted((int(ax) % x.dim() for ax in axes), reverse=True):
            x = x.squeeze(ax)
        return x

    def expand(v: list, a: dict, c: Any) -> Any:
        shape = np.broadcast_shapes(tuple(v[0].shape), tuple(_ints(v[1])))
        return v[0].expand(shape)

    def tile(v: list, a: dict, c: Any) -> Any:
        return v[0].repeat(*_ints(v[1]))

    def constant_of_shape(v: list, a: dict, c: Any) -> Any:
        value = a.get("value")
        arr = np.zeros(1, np.float32) if value is None else value
        return torch.full(tuple(_ints(v[0])), arr.reshape(-1)[0].item(),
                          dtype=getattr(torch, arr.dtype.name if arr.dtype != np.bool_
                                        else "bool"))

    def range_(v: list, a: dict, c: Any) -> Any:
        start, limit, delta = (x.item() for x in v[:3])
        return torch.arange(start, limit, delta, dtype=v[0].dtype)

    def pad(v: list, a: dict, c: Any) -> Any:
        x = v[0]
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads = a["pads"] if "pads" in a else _ints(v[1])
        value = 0.0
        if len(v) > 2 and v[2] is not None and v[2].numel():
            value = v[2].item()
        axes = _ints(v[3]) if len(v) > 3 and v[3] is not None else list(range(x.dim()))
        n = len(axes)
        full = [0] * (2 * x.dim())
        for i, ax in enumerate(axes):
            ax = int(ax) % x.dim()
            full[ax], full[x.dim() + ax] = pads[i], pads[n + i]
        torch_pads = []
        for ax in reversed(range(x.dim())):
            torch_pads += [full[ax], full[x.dim() + ax]]
        if mode == "constant":
            return F.pad(x, torch_pads, value=value)
        # reflect / edge pad only the trailing spatial dims in torch
        lead = next((i for i in range(x.dim()) if full[i] or full[x.dim() + i]), x.dim())
        trimmed = torch_pads[:2 * (x.dim() - lead)]
        return F.pad(x, trimmed, mode={"reflect": "reflect", "edge": "replicate"}[mode])

    def resize(v: list, a: dict, c: Any) -> Any:
        x = v[0]
        mode = a.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        ctm = a.get("coordinate_transformation_mode", b"half_pixel")
        ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
        scales = v[2] if len(v) > 2 and v[2] is not None and v[2].numel() else None
        sizes = v[3] if len(v) > 3 and v[3] is not None and v[3].numel() else None
        if c.opset < 11:
            scales = v[1]
        if sizes is not None:
            out = tuple(_ints(sizes)[2:])
        else:
            sf = [float(s) for s in scales.reshape(-1).tolist()[2:]]
            out = tuple(int(np.floor(n * s)) for n, s in zip(x.shape[2:], sf))
        if mode == "nearest":
            nm = a.get("nearest_mode", b"round_prefer_floor")
            nm = nm.decode() if isinstance(nm, bytes) else nm
            if ctm == "asymmetric" and nm == "floor":
                return F.interpolate(x, size=out, mode="nearest")
            if ctm in ("half_pixel", "pytorch_half_pixel") and nm in ("round_prefer_ceil",
                                                                      "round_prefer_floor"):
                return F.interpolate(x, size=out, mode="nearest-exact")
            if c.opset < 11:
                return F.interpolate(x, size=out, mode="nearest")
            raise NotImplementedError(f"onnx_torch: Resize nearest {ctm}/{nm}")
        if mode in ("linear", "cubic"):
            tmode = ({3: "linear", 4: "bilinear", 5: "trilinear"}[x.dim()]
                     if mode == "linear" else "bicubic")
            if ctm == "align_corners":
                return F.interpolate(x, size=out, mode=tmode, align_corners=True)
            if ctm in ("half_pixel", "pytorch_half_pixel"):
                if mode == "cubic" and float(a.get("cubic_coeff_a", -0.75)) != -0.75:
                    raise NotImplementedError("onnx_torch: cubic_coeff_a")
                return F.interpolate(x, size=out, mode=tmode, align_corners=False)
        raise NotImplementedError(f"onnx_torch: Resize {mode}/{ctm}")

    def where(v: list, a: dict, c: Any) -> Any:
        return torch.where(v[0].to(torch.bool), v[1], v[2])

    def mod(v: list, a: dict, c: Any) -> Any:
        return (torch.fmod if a.get("fmod", 0) else torch.remainder)(v[0], v[1])

    def einsum(v: list, a: dict, c: Any) -> Any:
        eq = a["equation"]
        return torch.einsum(eq.decode() if isinstance(eq, bytes) else eq, *v)

    def variadic(fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
        def run(v: list, a: dict, c: Any) -> Any:
            out = v[0]
            for x in v[1:]:
                out = fn(out, x)
            return out
        return run

    def shape(v: list, a: dict, c: Any) -> Any:  # runs on the host only (see _Graph)
        dims = list(v[0].shape)
        start, end = a.get("start", 0), a.get("end", None)
        return torch.tensor(dims[start:end], dtype=torch.int64)

    return {
        "Add": binary(torch.add), "Sub": binary(torch.sub), "Mul": binary(torch.mul),
        "Div": lambda v, a, c: (torch.div(v[0], v[1], rounding_mode="trunc")
                                if not v[0].is_floating_point() else torch.div(v[0], v[1])),
        "Pow": binary(torch.pow), "Mod": mod, "Equal": binary(torch.eq),
        "Less": binary(torch.lt), "Greater": binary(torch.gt),
        "LessOrEqual": binary(torch.le), "GreaterOrEqual": binary(torch.ge),
        "And": binary(torch.logical_and), "Or": binary(torch.logical_or),
        "Not": unary(torch.logical_not), "Neg": unary(torch.neg), "Abs": unary(torch.abs),
        "Sqrt": unary(torch.sqrt), "Exp": unary(torch.exp), "Log": unary(torch.log),
        "Erf": unary(torch.erf), "Sin": unary(torch.sin), "Cos": unary(torch.cos),
        "Tanh": unary(torch.tanh), "Sigmoid": unary(torch.sigmoid), "Relu": unary(torch.relu),
        "Floor": unary(torch.floor), "Ceil": unary(torch.ceil),
        "Reciprocal": unary(torch.reciprocal), "Identity": unary(lambda x: x),
        "HardSigmoid": lambda v, a, c: torch.clamp(
            float(a.get("alpha", 0.2)) * v[0] + float(a.get("beta", 0.5)), 0, 1),
        "LeakyRelu": lambda v, a, c: F.leaky_relu(v[0], float(a.get("alpha", 0.01))),
        "Min": variadic(torch.minimum), "Max": variadic(torch.maximum),
        "Sum": variadic(torch.add),
        "MatMul": binary(torch.matmul), "Gemm": gemm, "Conv": conv,
        "ConvTranspose": conv_transpose, "MaxPool": maxpool,
        "LayerNormalization": layer_norm, "Softmax": softmax,
        "ReduceMean": reduce(lambda x, ax, k: x.mean(ax, keepdim=k)),
        "ReduceSum": reduce(lambda x, ax, k: x.sum(ax, keepdim=k)),
        "ReduceMax": reduce(lambda x, ax, k: x.amax(ax, keepdim=k)),
        "ReduceMin": reduce(lambda x, ax, k: x.amin(ax, keepdim=k)),
        "ReduceL2": reduce(lambda x, ax, k: torch.linalg.vector_norm(x, 2, ax, keepdim=k)),
        "ArgMax": argmax, "Cast": cast, "Clip": clip, "Concat": concat, "Split": split,
        "Slice": slice_, "Gather": gather, "GatherElements": gather_elements,
        "Reshape": reshape, "Flatten": flatten, "Transpose": transpose,
        "Unsqueeze": unsqueeze, "Squeeze": squeeze, "Expand": expand, "Tile": tile,
        "ConstantOfShape": constant_of_shape, "Range": range_, "Pad": pad,
        "Resize": resize, "Where": where, "Einsum": einsum, "Shape": shape,
    }


def supported_ops() -> list[str]:
    """The ONNX op types this interpreter runs (plus ``Constant``)."""
    return sorted(set(_make_kernels()) | {"Constant"})


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
        inputs.append((i.name, shape, np.dtype(_NP_DTYPES.get(tt.elem_type, np.float32))))
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
    kernels = _make_kernels()
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


SUPPORTED = tuple(supported_ops())
