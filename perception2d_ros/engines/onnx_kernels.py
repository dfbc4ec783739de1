"""The op kernels of the ONNX graph run by torch (:mod:`perception2d_ros.engines.onnx_torch`):
one function per ONNX op type, following the ONNX operator specs at the opsets our exports use
(11–18), and :func:`supported_ops`. torch is imported when the table is made.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

# ONNX TensorProto data type → numpy dtype
NP_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16,
             6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64,
             12: np.uint32, 13: np.uint64}
_FLOAT_CODES = (1, 10, 11, 16)


def _ints(x: Any) -> list[int]:
    return [int(v) for v in np.asarray(x).reshape(-1).tolist()]


# --------------------------------------------------------------------------- op kernels
# Every kernel takes (torch, F, inputs, attrs, ctx) and returns a tensor or a tuple of
# tensors. Host nodes run the same kernel on CPU tensors made from the numpy inputs.
def make_kernels() -> dict[str, Callable[..., Any]]:
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
        return v[0].to(getattr(torch, np.dtype(NP_DTYPES[to]).name
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

    def shape(v: list, a: dict, c: Any) -> Any:  # runs on the host only (see onnx_torch._Graph)
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
    return sorted(set(make_kernels()) | {"Constant"})


SUPPORTED = tuple(supported_ops())
