"""The YOLO output formats: their names and aliases, preprocess profiles and grid strides;
format inference from an output signature (+ Ultralytics metadata); class names from the
metadata or a labels file; the decode helpers shared by the host and device detectors."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

FORMATS = ("yolox", "yolov5", "yolov8", "yolov10")
ALIASES = {"yolov11": "yolov8", "yolo11": "yolov8", "yolov9": "yolov8", "ultralytics": "yolov8",
           "yolov5u": "yolov8", "end2end": "yolov10", "yolo26": "yolov10"}
STRIDES = (8, 16, 32)
STRIDES_P6 = (8, 16, 32, 64)

# preprocess profile per format: letterbox alignment, channel order, value scale
PREPROCESS = {
    "yolox": dict(align="topleft", color="bgr", scale=1.0, pad_value=114),
    "yolov5": dict(align="center", color="rgb", scale=1.0 / 255.0, pad_value=114),
    "yolov8": dict(align="center", color="rgb", scale=1.0 / 255.0, pad_value=114),
    "yolov10": dict(align="center", color="rgb", scale=1.0 / 255.0, pad_value=114),
}


class FormatError(ValueError):
    """The model output does not match (or does not reveal) a supported YOLO format."""


def normalize_format(fmt: str) -> str:
    """Canonical format name (``yolov11`` → ``yolov8`` ...); ``ValueError`` if unknown."""
    f = str(fmt).strip().lower()
    f = ALIASES.get(f, f)
    if f not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)} (or an alias "
                         f"{', '.join(sorted(ALIASES))}); got '{fmt}'")
    return f


def grid_cells(input_hw: Sequence[int], strides: Sequence[int] = STRIDES) -> int:
    """Number of anchor points of an anchor-free head over ``strides`` at ``input_hw``."""
    h, w = int(input_hw[0]), int(input_hw[1])
    return sum((h // s) * (w // s) for s in strides)


def grid_table(input_hw: Sequence[int], strides: Sequence[int] = STRIDES) -> np.ndarray:
    """(cells, 3) float64: grid x, grid y and stride of every anchor point of an anchor-free
    head over ``strides`` at ``input_hw``, in output-row order (YOLOX's decode grid)."""
    h, w = int(input_hw[0]), int(input_hw[1])
    cells = []
    for s in strides:
        xv, yv = np.meshgrid(np.arange(w // s), np.arange(h // s))
        cells.append(np.stack((xv, yv, np.full_like(xv, s)), 2).reshape(-1, 3))
    return np.concatenate(cells).astype(np.float64)


def infer_format(output_shape: Sequence[Any], input_hw: Sequence[int],
                 metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Infer the YOLO format from the (single) output shape, input size and ONNX metadata.

    Returns ``(format, reason)``; raises :class:`FormatError` when the output matches none.
    """
    shape = tuple(output_shape)
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[1:]):
        raise FormatError(f"cannot infer the YOLO format from output shape {tuple(output_shape)}"
                          "; pass format= one of " + ", ".join(FORMATS))
    a, b = int(shape[1]), int(shape[2])
    meta = dict(metadata or {})
    ultra = "names" in meta or "stride" in meta
    nc_meta = len(parse_names(meta)) if "names" in meta else None
    end2end = str(meta.get("end2end", "")).lower() == "true"
    cells = {grid_cells(input_hw, s) for s in (STRIDES, STRIDES_P6)}
    if end2end and b == 6:
        return "yolov10", "end-to-end model (metadata end2end=True), output [1, K, 6]"
    if b in cells and a >= 5 and a < b:
        return "yolov8", f"output [1, 4+nc, {b}] with {b} anchor points (channels first)"
    if a in cells and b >= 6:
        if ultra and nc_meta is not None and b == 4 + nc_meta:
            return "yolov8", f"output [1, {a}, 4+nc] (transposed Ultralytics head)"
        if not ultra or nc_meta is None or b == 5 + nc_meta:
            return "yolox", f"output [1, {a}, 5+nc] with {a} grid cells (anchor-free, raw grid)"
    if any(a == 3 * c for c in cells) and b >= 6:
        return "yolov5", f"output [1, {a}=3×grid, 5+nc] (anchor-based, decoded)"
    if b == 6:
        return "yolov10", f"output [1, {a}, 6] (x1, y1, x2, y2, score, class)"
    raise FormatError(
        f"output shape {tuple(output_shape)} at input {tuple(input_hw)} matches no supported "
        f"YOLO format (grid cells {sorted(cells)}); pass format= one of " + ", ".join(FORMATS))


def parse_names(metadata: Mapping[str, str]) -> list[str]:
    """Class names from Ultralytics ONNX metadata ``names`` ("{0: 'person', ...}")."""
    raw = metadata.get("names")
    if raw is None:
        return []
    try:
        value = ast.literal_eval(raw) if isinstance(raw, str) else raw
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"model metadata 'names' is not a dict/list literal: {exc}") from exc
    if isinstance(value, dict):
        return [str(value[k]) for k in sorted(value, key=int)]
    return [str(v) for v in value]


def load_labels(path: str | Path) -> list[str]:
    """One class name per line (blank lines ignored), in class-index order."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"labels file not found: {p}")
    names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"labels file {p} has no class names")
    return names


def cxcywh_to_xyxy(xy: np.ndarray, wh: np.ndarray) -> np.ndarray:
    """(M, 2) centres + (M, 2) sizes (float32) → (M, 4) float32 x1, y1, x2, y2."""
    out = np.empty((xy.shape[0], 4), np.float32)
    half = wh / np.float32(2.0)
    out[:, :2] = xy - half
    out[:, 2:] = xy + half
    return out
