"""A small ONNX → torch graph interpreter, enough for YOLOX-family detectors.

Used by ``benchmarks/gpu_bench.py`` to run the *real* ``models/yolox_nano.onnx`` (its own
weights, its own graph) with torch on a GPU machine where neither onnx2torch nor the YOLOX
sources are installed. Only ``onnx`` (to read the file) and ``torch`` are needed.

Supported ops (those of the YOLOX exports, opset 11–17): Conv, Sigmoid, Mul, Add, Sub, Div,
Concat, Slice (constant starts/ends/axes/steps), MaxPool, Reshape (constant shape),
Resize (nearest, constant scales or sizes), Transpose, Relu, SiLU-as-Sigmoid·Mul, Identity,
Exp, Constant. Every weight becomes a registered buffer, so ``.half()`` / ``.to(device)``
work and the forward pass has no host sync (CUDA-graph capturable). Unsupported ops raise
``NotImplementedError`` naming the op at construction time.
"""
from __future__ import annotations

from typing import Any

import numpy as np

SUPPORTED = ("Conv", "Sigmoid", "Mul", "Add", "Sub", "Div", "Concat", "Slice", "MaxPool",
             "Reshape", "Resize", "Transpose", "Relu", "Identity", "Exp", "Constant")


def load_onnx_module(path: str) -> Any:
    """``torch.nn.Module`` running the ONNX graph at ``path`` (first input → all outputs)."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    inits[node.output[0]] = numpy_helper.to_array(a.t)
    bad = sorted({n.op_type for n in graph.node if n.op_type not in SUPPORTED})
    if bad:
        raise NotImplementedError(f"onnx_torch: unsupported ONNX ops {bad} in {path}")
    init_names = set(inits)
    inputs = [i.name for i in graph.input if i.name not in init_names]
    outputs = [o.name for o in graph.output]

    def attrs(node: Any) -> dict[str, Any]:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    class OnnxGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_names = inputs
            self.output_names = outputs
            self._const: dict[str, Any] = {}  # small int constants: python values
            self._buf: dict[str, str] = {}    # onnx name -> buffer attribute name
            self.plan: list[tuple[str, list[str], list[str], dict[str, Any]]] = []
            used_as_weight = set()
            for node in graph.node:
                if node.op_type == "Constant":
                    continue
                a = attrs(node)
                if node.op_type in ("Conv", "Mul", "Add", "Sub", "Div"):
                    used_as_weight.update(i for i in node.input if i in inits)
                self.plan.append((node.op_type, list(node.input), list(node.output), a))
            for name, arr in inits.items():
                if name in used_as_weight and arr.dtype.kind == "f":
                    attr = f"w{len(self._buf)}"
                    self.register_buffer(attr, torch.from_numpy(np.array(arr)))
                    self._buf[name] = attr
                else:
                    self._const[name] = arr

        def _val(self, env: dict[str, Any], name: str) -> Any:
            if name in env:
                return env[name]
            if name in self._buf:
                return getattr(self, self._buf[name])
            return self._const[name]

        def forward(self, *args: Any) -> Any:
            import torch.nn.functional as F

            env: dict[str, Any] = dict(zip(self.input_names, args))
            for op, ins, outs, a in self.plan:
                v = [self._val(env, i) if i else None for i in ins]
                if op == "Conv":
                    pads = a.get("pads", [0, 0, 0, 0])
                    if pads[0] != pads[2] or pads[1] != pads[3]:
                        x = F.pad(v[0], (pads[1], pads[3], pads[0], pads[2]))
                        pad = 0
                    else:
                        x, pad = v[0], (pads[0], pads[1])
                    y = F.conv2d(x, v[1], v[2] if len(v) > 2 else None,
                                 stride=tuple(a.get("strides", [1, 1])), padding=pad,
                                 dilation=tuple(a.get("dilations", [1, 1])),
                                 groups=int(a.get("group", 1)))
                elif op == "Sigmoid":
                    y = torch.sigmoid(v[0])
                elif op == "Relu":
                    y = torch.relu(v[0])
                elif op == "Exp":
                    y = torch.exp(v[0])
                elif op == "Identity":
                    y = v[0]
                elif op in ("Mul", "Add", "Sub", "Div"):
                    p, q = (self._as_tensor(x, v) for x in v[:2])
                    y = {"Mul": torch.mul, "Add": torch.add, "Sub": torch.sub,
                         "Div": torch.div}[op](p, q)
                elif op == "Concat":
                    y = torch.cat(v, dim=int(a["axis"]))
                elif op == "Slice":
                    x = v[0]
                    starts, ends = np.asarray(v[1]).tolist(), np.asarray(v[2]).tolist()
                    axes = np.asarray(v[3]).tolist() if len(v) > 3 and v[3] is not None \
                        else list(range(len(starts)))
                    steps = np.asarray(v[4]).tolist() if len(v) > 4 and v[4] is not None \
                        else [1] * len(starts)
                    idx = [slice(None)] * x.dim()
                    for s, e, ax, st in zip(starts, ends, axes, steps):
                        n = x.shape[ax]
                        e = min(e, n) if e >= 0 else e
                        idx[ax] = slice(s, e, st)
                    y = x[tuple(idx)]
                elif op == "MaxPool":
                    pads = a.get("pads", [0, 0, 0, 0])
                    y = F.max_pool2d(v[0], kernel_size=tuple(a["kernel_shape"]),
                                     stride=tuple(a.get("strides", [1, 1])),
                                     padding=(pads[0], pads[1]),
                                     ceil_mode=bool(a.get("ceil_mode", 0)))
                elif op == "Reshape":
                    shape = [int(s) for s in np.asarray(v[1]).tolist()]
                    shape = [v[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
                    y = v[0].reshape(shape)
                elif op == "Resize":
                    mode = a.get("mode", b"nearest")
                    mode = mode.decode() if isinstance(mode, bytes) else mode
                    if mode != "nearest":
                        raise NotImplementedError(f"onnx_torch: Resize mode {mode}")
                    scales = v[2] if len(v) > 2 else None
                    sizes = v[3] if len(v) > 3 else None
                    if sizes is not None and np.asarray(sizes).size:
                        y = F.interpolate(v[0], size=tuple(int(s) for s in
                                                           np.asarray(sizes)[2:]),
                                          mode="nearest")
                    else:
                        sf = [float(s) for s in np.asarray(scales)[2:]]
                        y = F.interpolate(v[0], scale_factor=tuple(sf), mode="nearest")
                elif op == "Transpose":
                    y = v[0].permute(*a["perm"])
                else:  # pragma: no cover - rejected at construction
                    raise NotImplementedError(op)
                env[outs[0]] = y
            res = tuple(env[o] for o in self.output_names)
            return res[0] if len(res) == 1 else res

        @staticmethod
        def _as_tensor(x: Any, v: list[Any]) -> Any:
            if isinstance(x, torch.Tensor):
                return x
            ref = next(t for t in v if isinstance(t, torch.Tensor))
            return torch.as_tensor(np.asarray(x), dtype=ref.dtype, device=ref.device)

    return OnnxGraph()
