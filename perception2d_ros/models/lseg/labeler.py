"""LSeg runtime (ROS-free): image -> per-pixel CLIP embeddings (engine) -> label map (numpy).

The exported engine maps a letterboxed, normalised image to L2-normalised pixel embeddings at
stride 2 (see :mod:`perception2d_ros.models.lseg.export` for the export contract). The label map is
computed here from those and the vocabulary's CLIP text embeddings (N, 512), resampled exactly
as the official lang-seg evaluator does (``additional_utils/models.py``, ``lseg_net.py``):

    input:  normalised image resized bilinear, align_corners=True, long side = input side,
            short side int(x + 0.5); padded bottom/right with the value of a black pixel
    logits = logit_scale * <pixel, text>                     (N, h, w) at stride 2
    [optional lang-seg head blocks on the logits, 3x3 kernel from the sidecar]
    x2 bilinear upsample (align_corners=True), crop the padding, bilinear resize to the image
    (align_corners=True)
    label = argmax over N;  label = ``other_value`` where max(logits)/logit_scale < threshold

so changing the vocabulary (reordering, adding phrases) is an array change, never an engine
rebuild. Without head blocks max(logits)/logit_scale is the cosine similarity of the pixel to
its best phrase; the "other" threshold is on that value. ``scales`` / ``flip`` give lang-seg's
multi-size and mirrored evaluation (:func:`evaluate_multiscale`); the default is one scale.

Here: :class:`LSegSegmenter` and the multi-size evaluator (host numpy or torch on the engine's
device); the resampling lives in :mod:`~perception2d_ros.models.lseg.resample`, the host label
head in :mod:`~perception2d_ros.models.lseg.labelmap`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from perception2d_ros.models.lseg.labelmap import (DEFAULT_OTHER, LabelMapResult,
                                                   apply_head_block, finish_label_map,
                                                   label_map_from_logits, normalize_rows,
                                                   similarity_logits)
from perception2d_ros.models.lseg.meta import HeadBlock, LSegMeta
from perception2d_ros.models.lseg.resample import (Letterbox, ScalePlan, normalized_resize,
                                                   pad_to, pad_values, parse_scales, preprocess,
                                                   resize_align_corners, scale_plans)


# --------------------------------------------------------------------------- multi-scale
class _NumpyOps:
    """Array operations of :func:`evaluate_multiscale` on the host (numpy, engine.infer)."""

    chunk = 8

    def __init__(self, engine: Any, meta: LSegMeta) -> None:
        self.engine, self.meta = engine, meta
        self.pad = pad_values(meta)

    def prepare(self, image_bgr: np.ndarray) -> np.ndarray:
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
            raise ValueError(f"expected a BGR image (H, W, 3), got shape {image_bgr.shape}")
        return image_bgr

    def text(self, text_embeds: np.ndarray) -> np.ndarray:
        return normalize_rows(text_embeds)

    def image(self, image_bgr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return normalized_resize(image_bgr, size, self.meta)

    def pad_to(self, x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return pad_to(x, size, self.pad)

    def logits(self, x: np.ndarray, text: np.ndarray) -> np.ndarray:
        out = self.engine.infer({self.meta.input_name: np.ascontiguousarray(x[None])})
        emb = np.asarray(out[self.meta.output_name], np.float32)[0]
        return apply_head_block(similarity_logits(emb, text, self.meta.logit_scale),
                                self.meta.head_block)

    @staticmethod
    def flip(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[..., ::-1])

    @staticmethod
    def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return resize_align_corners(x, size)

    @staticmethod
    def zeros(shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32)

    @staticmethod
    def divide(x: np.ndarray, count: np.ndarray) -> np.ndarray:
        return x / count

    @staticmethod
    def reduce(scores: np.ndarray, offset: int, state: dict[str, Any], lse: bool) -> None:
        best = scores.max(axis=0)
        arg = scores.argmax(axis=0).astype(np.int64) + offset
        if "max" in state:
            better = best > state["max"]
            arg = np.where(better, arg, state["arg"])
            best = np.maximum(best, state["max"])
        if lse:
            part = scores.max(axis=0)
            part = part + np.log(np.exp(scores - part[None]).sum(axis=0))
            state["lse"] = part if "lse" not in state else np.logaddexp(state["lse"], part)
        state["max"], state["arg"] = best, arg

    @staticmethod
    def exp(x: np.ndarray) -> np.ndarray:
        return np.exp(x)

    @staticmethod
    def host(x: np.ndarray) -> np.ndarray:
        return np.asarray(x)


class _TorchOps:
    """The same operations with torch on the engine's device (``backend: torch``): the image,
    the logits and the full-resolution scores stay there, ``F.interpolate(...,
    align_corners=True)`` does every resize (as lang-seg), only the label map, the best score
    (and confidence) come back. Also runs on torch's CPU device."""

    chunk = 64

    def __init__(self, engine: Any, meta: LSegMeta, device: str) -> None:
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self.engine, self.meta, self.device = engine, meta, device
        self.pad = torch.from_numpy(pad_values(meta)).to(device)
        self.mean = torch.tensor(meta.mean, dtype=torch.float32, device=device)[:, None, None]
        self.std = torch.tensor(meta.std, dtype=torch.float32, device=device)[:, None, None]
        hb = meta.head_block
        self.kernel = None if hb is None else \
            torch.from_numpy(hb.weight.astype(np.float32)).to(device).view(1, 1, 3, 3)
        self.bias = None if hb is None else \
            torch.tensor([hb.bias], dtype=torch.float32, device=device)

    def prepare(self, image: Any) -> Any:
        """uint8 BGR (H, W, 3) array or device tensor -> normalised RGB (1, 3, H, W) float."""
        torch = self.torch
        t = image if isinstance(image, torch.Tensor) else \
            torch.from_numpy(np.ascontiguousarray(image))
        if t.ndim != 3 or t.shape[2] != 3:
            raise ValueError(f"expected a BGR image (H, W, 3), got shape {tuple(t.shape)}")
        t = t.to(self.device, non_blocking=True).permute(2, 0, 1).flip(0).float()
        return ((t / 255.0 - self.mean) / self.std)[None]

    def text(self, text_embeds: np.ndarray) -> Any:
        t = self.torch.from_numpy(normalize_rows(text_embeds)).to(self.device)
        return t * float(self.meta.logit_scale)

    def image(self, prepared: Any, size: tuple[int, int]) -> Any:
        return self.F.interpolate(prepared, size=tuple(int(v) for v in size), mode="bilinear",
                                  align_corners=True)[0]

    def pad_to(self, x: Any, size: tuple[int, int]) -> Any:
        out = self.pad[:, None, None].expand(x.shape[0], int(size[0]), int(size[1])).clone()
        out[:, : x.shape[1], : x.shape[2]] = x
        return out

    def logits(self, x: Any, text: Any) -> Any:
        torch = self.torch
        with torch.inference_mode():
            emb = self.engine.infer_tensors({self.meta.input_name: x[None].contiguous()})
            emb = emb[self.meta.output_name][0].float()
            out = torch.einsum("dhw,nd->nhw", emb, text)
            hb = self.meta.head_block
            if hb is not None:
                depth = max(1, hb.block_depth)
                for i in range(depth):
                    out = self._block(out, hb, act=i < depth - 1)
        return out

    def _block(self, x: Any, hb: HeadBlock, act: bool) -> Any:
        F = self.F
        out = F.conv2d(x[:, None], self.kernel, self.bias, padding=1)[:, 0]
        if hb.kind == "bottleneck":
            out = out + x.max(dim=0, keepdim=True)[0]
        if not act:
            return out
        if hb.activation == "relu":
            return F.relu(out)
        if hb.activation == "lrelu":
            return F.leaky_relu(out, 0.01)
        return self.torch.tanh(out)

    @staticmethod
    def flip(x: Any) -> Any:
        return x.flip(-1)

    def resize(self, x: Any, size: tuple[int, int]) -> Any:
        return self.F.interpolate(x[None], size=tuple(int(v) for v in size), mode="bilinear",
                                  align_corners=True)[0]

    def zeros(self, shape: tuple[int, ...]) -> Any:
        return self.torch.zeros(shape, dtype=self.torch.float32, device=self.device)

    def divide(self, x: Any, count: np.ndarray) -> Any:
        return x / self.torch.from_numpy(count).to(self.device)

    def reduce(self, scores: Any, offset: int, state: dict[str, Any], lse: bool) -> None:
        torch = self.torch
        best, arg = scores.max(dim=0)
        arg = arg + offset
        if "max" in state:
            better = best > state["max"]
            arg = torch.where(better, arg, state["arg"])
            best = torch.maximum(best, state["max"])
        if lse:
            part = torch.logsumexp(scores, dim=0)
            state["lse"] = part if "lse" not in state else torch.logaddexp(state["lse"], part)
        state["max"], state["arg"] = best, arg

    def exp(self, x: Any) -> Any:
        return self.torch.exp(x)

    @staticmethod
    def host(x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()


def window_logits(ops: Any, prepared: Any, text: Any, plan: ScalePlan,
                  input_hw: tuple[int, int], flip: bool) -> list[Any]:
    """The (N, h/2, w/2) logits of every window of one scale (with ``flip``: plus the
    mirrored window's, mirrored back; lang-seg sums the two passes)."""
    canvas = ops.pad_to(ops.image(prepared, plan.resized), plan.padded)
    out = []
    for (y0, y1, x0, x1) in plan.windows:
        x = ops.pad_to(canvas[:, y0:y1, x0:x1], input_hw)
        lg = ops.logits(x, text)
        if flip:
            lg = lg + ops.flip(ops.logits(ops.flip(x), text))
        out.append(lg)
    return out


def evaluate_multiscale(ops: Any, image: Any, text_embeds: np.ndarray,
                        input_hw: tuple[int, int], scales: Sequence[float] = (1.0,),
                        flip: bool = False, return_confidence: bool = False
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """lang-seg's multi-size evaluator (``LSeg_MultiEvalModule.forward``) with base size =
    crop size = the network input: per scale the image is resized (align_corners=True),
    padded and cut into input-size windows (:func:`scale_plans`); each window's stride-2
    logits (with ``flip`` plus the mirrored pass) are upsampled x2 (align_corners=True),
    stitched with overlaps averaged, cropped to the resized image and resized to the image
    (align_corners=True); the scores of all scales are summed (here: averaged over scales and
    passes, which keeps the argmax and makes the best score a mean logit). Returns (argmax
    int64, best averaged score, softmax probability of the argmax or None), at the image size,
    as host arrays. The network runs once per window and pass; the full-resolution scores
    are built ``ops.chunk`` classes at a time, so memory does not grow with the vocabulary."""
    prepared = ops.prepare(image)
    h, w = int(image.shape[0]), int(image.shape[1])
    ih, iw = int(input_hw[0]), int(input_hw[1])
    text = ops.text(text_embeds)
    plans = scale_plans((h, w), (ih, iw), scales)
    low = [window_logits(ops, prepared, text, plan, (ih, iw), flip) for plan in plans]
    inv = np.float32(1.0 / (len(plans) * (2 if flip else 1)))
    n = int(low[0][0].shape[0])
    state: dict[str, Any] = {}
    for c0 in range(0, n, ops.chunk):
        c1 = min(n, c0 + ops.chunk)
        scores = ops.zeros((c1 - c0, h, w))
        for plan, per in zip(plans, low):
            ph, pw = plan.padded
            acc = ops.zeros((c1 - c0, ph, pw))
            count = np.zeros((ph, pw), np.float32)
            for (y0, y1, x0, x1), lg in zip(plan.windows, per):
                up = ops.resize(lg[c0:c1], (ih, iw))
                acc[:, y0:y1, x0:x1] += up[:, : y1 - y0, : x1 - x0]
                count[y0:y1, x0:x1] += 1
            if len(plan.windows) > 1:
                acc = ops.divide(acc, count)
            rh, rw = plan.resized
            scores += ops.resize(acc[:, :rh, :rw], (h, w))
        ops.reduce(scores * inv, c0, state, return_confidence)
    conf = ops.host(ops.exp(state["max"] - state["lse"])) if return_confidence else None
    return ops.host(state["arg"]), ops.host(state["max"]), conf


# --------------------------------------------------------------------------- segmenter
class LSegSegmenter:
    """Image encoder engine + label head.

    ``LSegSegmenter.from_onnx(path, EngineConfig(...))`` reads the sidecar next to the ONNX;
    ``LSegSegmenter(engine, meta)`` takes any object with ``infer(dict) -> dict``.
    ``scales`` (default ``(1.0,)``; lang-seg's demo set is :data:`OFFICIAL_SCALES`) and
    ``flip`` select lang-seg's multi-size / mirrored evaluation (one network run per window,
    scale and pass: for offline use). On a torch engine (``backend: torch``) the whole label
    head runs on its device (:class:`_TorchOps`); else on the host, where one scale that fits
    the input takes the boundary-only fast path (:func:`label_map_from_logits`)."""

    def __init__(self, engine: Any, meta: LSegMeta, *, other_value: int = DEFAULT_OTHER,
                 scales: Any = (1.0,), flip: bool = False) -> None:
        from perception2d_ros.engines.device import torch_device_of

        self.engine = engine
        self.meta = meta
        self.other_value = int(other_value)
        self.scales = parse_scales(scales)
        self.flip = bool(flip)
        self.device = torch_device_of(engine)
        self._ops: Any = None

    @classmethod
    def from_onnx(cls, onnx_path: str | Path, config: Any = None, *,
                  other_value: int = DEFAULT_OTHER, scales: Any = (1.0,),
                  flip: bool = False) -> "LSegSegmenter":
        from perception2d_ros.engines.factory import create_engine

        path = Path(onnx_path)
        meta = LSegMeta.from_sidecar(path.with_suffix(".json"))
        return cls(create_engine(path, config), meta, other_value=other_value, scales=scales,
                   flip=flip)

    def embed(self, image_bgr: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        """Pixel embeddings (D, H_in/2, W_in/2) float32 for one BGR image + its letterbox."""
        tensor, box = preprocess(image_bgr, self.meta)
        out = self.engine.infer({self.meta.input_name: tensor})[self.meta.output_name]
        return np.asarray(out, np.float32)[0], box

    def _host_ops(self) -> _NumpyOps:
        return _NumpyOps(self.engine, self.meta)

    def segment(self, image_bgr: Any, text_embeds: np.ndarray,
                other_threshold: float | None = None, *, labels: Sequence[str] | None = None,
                return_confidence: bool = False, other_classes: Sequence[int] = (),
                scales: Any = None, flip: bool | None = None) -> LabelMapResult:
        """Label map (H, W) uint16 for ``image_bgr`` (uint8 BGR; on a torch engine also a
        device tensor) and the vocabulary's text embeddings (N, 512), vocabulary index per
        pixel, ``other_value`` below ``other_threshold`` (and where a catch-all phrase in
        ``other_classes`` wins). ``scales`` / ``flip`` override the segmenter's."""
        scales = self.scales if scales is None else parse_scales(scales)
        flip = self.flip if flip is None else bool(flip)
        text = normalize_rows(text_embeds)
        n = len(text)
        if n == 0:
            raise ValueError("empty vocabulary")
        if n > self.other_value:
            raise ValueError(f"{n} phrases do not fit label values below "
                             f"other_value={self.other_value}")
        hw = (int(image_bgr.shape[0]), int(image_bgr.shape[1]))
        kw = dict(other_threshold=other_threshold, other_value=self.other_value,
                  other_classes=other_classes, labels=labels)
        if self.device is not None:
            if self._ops is None:
                self._ops = _TorchOps(self.engine, self.meta, self.device)
            arg, best, conf = evaluate_multiscale(self._ops, image_bgr, text,
                                                  self.meta.input_size, scales, flip,
                                                  return_confidence)
            sim = (best * np.float32(1.0 / self.meta.logit_scale)).astype(np.float32)
            return finish_label_map(arg.astype(np.uint16), sim, conf, n, **kw)
        ops = self._host_ops()
        plans = scale_plans(hw, self.meta.input_size, scales)
        if len(plans) == 1 and len(plans[0].windows) == 1:
            # one scale that fits the input: the boundary-only head (exact argmax)
            (logits,) = window_logits(ops, ops.prepare(image_bgr), ops.text(text), plans[0],
                                      self.meta.input_size, flip)
            if flip:
                logits *= np.float32(0.5)
            return label_map_from_logits(logits, hw, content=plans[0].resized,
                                         stride=self.meta.embed_stride,
                                         logit_scale=self.meta.logit_scale,
                                         return_confidence=return_confidence, **kw)
        arg, best, conf = evaluate_multiscale(ops, image_bgr, text, self.meta.input_size,
                                              scales, flip, return_confidence)
        sim = best * np.float32(1.0 / self.meta.logit_scale)
        return finish_label_map(arg.astype(np.uint16), sim, conf, n, **kw)

    def close(self) -> None:
        self._ops = None
        close = getattr(self.engine, "close", None)
        if close:
            close()
