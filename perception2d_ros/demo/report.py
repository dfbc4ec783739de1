"""What ``make demo`` shows a person: annotated frames (raw and rectified side by side),
a contact sheet, a latency/detections plot, a one-screen text summary and a self-contained
``report.html``. ROS-free; drawn with OpenCV only (no plotting library in the lean install).
"""
from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from perception2d_ros.io.debug_draw import class_color, draw_detections, draw_label

__all__ = ["FrameView", "annotate_frame", "contact_sheet", "html_report", "plot_summary",
           "text_summary"]

GT_COLOR = (255, 255, 255)
GRID_COLOR = (0, 255, 255)


@dataclass
class FrameView:
    """One frame's pictures and results, all in the pixels named.

    ``xyxy``/``names``/``scores``/``labels`` are the published detections (pixels of
    ``rect``, the image the detector saw); ``xyxy_raw`` the same boxes mapped to raw pixels;
    ``gt_raw`` / ``gt_rect`` the ground-truth boxes (raw pixels / mapped to rectified).
    """

    index: int
    stamp_ns: int
    raw: np.ndarray
    rect: np.ndarray | None
    xyxy: np.ndarray
    names: list[str]
    scores: list[float]
    labels: list[str] = field(default_factory=list)
    xyxy_raw: np.ndarray | None = None
    gt_raw: np.ndarray | None = None
    gt_rect: np.ndarray | None = None


def _grid_lines(width: int, height: int, step: int, samples: int = 64
                ) -> list[np.ndarray]:
    """Straight lines (rectified pixels) of a grid, as (samples, 2) point arrays."""
    lines = []
    ys = np.linspace(0, height - 1, samples)
    xs = np.linspace(0, width - 1, samples)
    for x in range(step // 2, width, step):
        lines.append(np.stack([np.full(samples, float(x)), ys], axis=1))
    for y in range(step // 2, height, step):
        lines.append(np.stack([xs, np.full(samples, float(y))], axis=1))
    return lines


def _polylines(img: np.ndarray, lines: Sequence[np.ndarray], color: tuple[int, int, int],
               thickness: int, alpha: float) -> None:
    overlay = img.copy()
    for pts in lines:
        ok = np.all(np.isfinite(pts), axis=1)
        if ok.sum() >= 2:
            cv2.polylines(overlay, [np.round(pts[ok]).astype(np.int32)], False, color,
                          thickness, cv2.LINE_AA)
    cv2.addWeighted(overlay, alpha, img, 1 - alpha, 0, dst=img)


def _boxes(img: np.ndarray, xyxy: np.ndarray | None, color: tuple[int, int, int],
           thickness: int) -> None:
    if xyxy is None:
        return
    for b in np.asarray(xyxy, np.float64).reshape(-1, xyxy.shape[-1] if len(xyxy) else 4):
        if np.all(np.isfinite(b[:4])):
            cv2.rectangle(img, (int(round(b[0])), int(round(b[1]))),
                          (int(round(b[2])), int(round(b[3]))), color, thickness, cv2.LINE_AA)


def annotate_frame(view: FrameView, camera: Any | None = None, grid_step: int = 240
                   ) -> np.ndarray:
    """Raw | rectified side by side at native resolution (a new BGR image).

    Left: the raw frame with a grid of lines that are straight after rectification, drawn
    through the lens model (they bend with the scene), the GT boxes (white) and the
    detections mapped back to raw pixels. Right: the rectified frame with the same grid
    (straight), the GT boxes mapped through the calibration (white) and the detections with
    class, score and ``labels`` (track id, ground distance). Without a rectified image only
    the annotated raw frame is returned.
    """
    raw = np.ascontiguousarray(view.raw).copy()
    h, w = raw.shape[:2]
    thick = max(1, round(h / 540))
    if view.rect is None:
        _boxes(raw, view.gt_raw, GT_COLOR, thick)
        draw_detections(raw, view.xyxy, view.names, view.scores, view.labels or None)
        return raw
    rect = np.ascontiguousarray(view.rect).copy()
    if camera is not None:
        lines = _grid_lines(w, h, grid_step)
        _polylines(rect, lines, GRID_COLOR, thick, 0.35)
        _polylines(raw, [camera.distort_points(p) for p in lines], GRID_COLOR, thick, 0.35)
    _boxes(raw, view.gt_raw, GT_COLOR, thick)
    _boxes(rect, view.gt_rect, GT_COLOR, thick)
    if view.xyxy_raw is not None:
        for i, b in enumerate(np.asarray(view.xyxy_raw).reshape(-1, 4)):
            _boxes(raw, b[None], class_color(view.names[i]), thick + 1)
    draw_detections(rect, view.xyxy, view.names, view.scores, view.labels or None)
    draw_label(raw, f"raw #{view.index}  (lens distortion: the grid bends with the scene)",
               (10, 10 + 40 * thick), (40, 40, 40))
    draw_label(rect, f"rectified #{view.index}  (straight grid; white = ground truth)",
               (10, 10 + 40 * thick), (40, 40, 40))
    sep = np.full((h, 8, 3), 255, np.uint8)
    return np.hstack([raw, sep, rect])


def contact_sheet(images: Sequence[np.ndarray], columns: int = 3, width: int = 960,
                  captions: Sequence[str] | None = None) -> np.ndarray:
    """All frames as thumbnails ``width`` px wide on a grid of ``columns``."""
    if not images:
        return np.full((100, width, 3), 255, np.uint8)
    thumbs = []
    for i, img in enumerate(images):
        scale = width / img.shape[1]
        t = cv2.resize(img, (width, max(1, round(img.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA)
        if captions is not None:
            draw_label(t, captions[i], (4, 28), (40, 40, 40))
        thumbs.append(t)
    th = max(t.shape[0] for t in thumbs)
    pad = 6
    rows = math.ceil(len(thumbs) / columns)
    sheet = np.full((rows * (th + pad) + pad, columns * (width + pad) + pad, 3), 255, np.uint8)
    for i, t in enumerate(thumbs):
        r, c = divmod(i, columns)
        y, x = pad + r * (th + pad), pad + c * (width + pad)
        sheet[y:y + t.shape[0], x:x + width] = t
    return sheet


def _text(img: np.ndarray, s: str, org: tuple[int, int], scale: float = 0.5,
          color: tuple[int, int, int] = (30, 30, 30), thick: int = 1) -> None:
    cv2.putText(img, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)


def _axes(img: np.ndarray, x0: int, y0: int, w: int, h: int, ymax: float, title: str,
          unit: str) -> float:
    """Frame, title and y ticks of a panel; returns pixels per unit."""
    cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), (120, 120, 120), 1)
    _text(img, title, (x0, y0 - 12), 0.6, thick=1)
    ymax = ymax if ymax > 0 else 1.0
    step = 10 ** math.floor(math.log10(ymax))
    if ymax / step > 5:
        step *= 2
    v = 0.0
    while v <= ymax + 1e-9:
        y = int(y0 + h - v / ymax * h)
        cv2.line(img, (x0, y), (x0 + w, y), (225, 225, 225), 1)
        _text(img, f"{v:g}", (x0 - 44, y + 4), 0.42, (90, 90, 90))
        v += step
    _text(img, unit, (x0 - 44, y0 - 12), 0.42, (90, 90, 90))
    return h / ymax


def plot_summary(latency: Mapping[str, tuple[float, float]],
                 detections_per_frame: Sequence[Mapping[str, int]],
                 distances: Mapping[str, Sequence[tuple[int, float]]] | None = None,
                 ) -> np.ndarray:
    """One image with up to three panels: per-stage latency (p50 bar, p95 tick), detections
    per frame (stacked by class) and ground distance per track over the frames."""
    panels = 3 if distances else 2
    pw, ph, m = 520, 300, 70
    img = np.full((ph + 2 * m, panels * (pw + m) + m, 3), 255, np.uint8)
    # latency
    x0, y0 = m, m
    ymax = max([p95 for _, p95 in latency.values()] + [1.0]) * 1.15
    k = _axes(img, x0, y0, pw, ph, ymax, "per-stage latency (bar p50, line p95)", "ms")
    n = max(1, len(latency))
    bw = pw / n
    for i, (stage, (p50, p95)) in enumerate(latency.items()):
        bx = int(x0 + i * bw + bw * 0.2)
        cv2.rectangle(img, (bx, int(y0 + ph - p50 * k)), (int(bx + bw * 0.6), y0 + ph),
                      (200, 140, 60), -1)
        cv2.line(img, (bx - 4, int(y0 + ph - p95 * k)), (int(bx + bw * 0.6) + 4,
                                                          int(y0 + ph - p95 * k)),
                 (40, 40, 200), 2)
        _text(img, f"{p50:.1f}/{p95:.1f}", (bx - 6, int(y0 + ph - p95 * k) - 6), 0.42)
        _text(img, stage, (bx, y0 + ph + 18), 0.45)
    # detections per frame
    x0 = 2 * m + pw
    totals = [sum(d.values()) for d in detections_per_frame]
    classes = sorted({c for d in detections_per_frame for c in d})
    k = _axes(img, x0, y0, pw, ph, max(totals + [1]) * 1.15, "detections per frame", "count")
    nf = max(1, len(detections_per_frame))
    bw = pw / nf
    for i, d in enumerate(detections_per_frame):
        base = 0
        for c in classes:
            v = d.get(c, 0)
            if v:
                bx = int(x0 + i * bw + 1)
                cv2.rectangle(img, (bx, int(y0 + ph - (base + v) * k)),
                              (int(bx + bw - 2), int(y0 + ph - base * k)), class_color(c), -1)
                base += v
    for j, c in enumerate(classes[:8]):
        cv2.rectangle(img, (x0 + 8, y0 + 8 + 18 * j), (x0 + 20, y0 + 20 + 18 * j),
                      class_color(c), -1)
        _text(img, c, (x0 + 26, y0 + 19 + 18 * j), 0.42)
    _text(img, "frame", (x0 + pw // 2 - 20, y0 + ph + 18), 0.45)
    # distance per track
    if distances:
        x0 = 3 * m + 2 * pw
        dmax = max([d for pts in distances.values() for _, d in pts] + [1.0]) * 1.15
        k = _axes(img, x0, y0, pw, ph, dmax, "ground distance per track", "m")
        for j, (tid, pts) in enumerate(distances.items()):
            color = class_color(f"track {tid}")
            xy = np.array([[x0 + (f + 0.5) * bw, y0 + ph - d * k] for f, d in pts], np.int32)
            if len(xy) > 1:
                cv2.polylines(img, [xy], False, color, 2, cv2.LINE_AA)
            for p in xy:
                cv2.circle(img, tuple(int(v) for v in p), 3, color, -1)
            if len(xy):
                _text(img, str(tid), (int(xy[-1][0]) + 5, int(xy[-1][1])), 0.42, color)
        _text(img, "frame", (x0 + pw // 2 - 20, y0 + ph + 18), 0.45)
    return img


def text_summary(s: Mapping[str, Any]) -> str:
    """The one-screen summary printed at the end of the demo (also ``summary.txt``)."""
    out = ["=== perception2d demo summary ==="]
    out.append(f"input                  : {s['input_bag']} ({s.get('input_kind', '')})")
    out.append(f"frames in / out        : {s['frames_in']} / {s['frames_out']} (image_rect "
               f"{s['image_rect']}, ground {s.get('ground_frames', 0)}, newest-wins drops "
               f"{s['dropped']})")
    if s.get("play"):
        out.append(f"played                 : {s['play']}")
    out.append(f"detector               : {s.get('model', '?')} on {s['backend']}")
    out.append(f"stages                 : {', '.join(s['stages_run'])}")
    dets = ", ".join(f"{k} {v}" for k, v in s["detections_per_class"].items()) or "none"
    out.append(f"detections per class   : {dets}")
    lat = s.get("latency_ms", {})
    if lat:
        out.append("latency p50/p95 (ms)   : " + ", ".join(
            f"{k} {v['p50']:.1f}/{v['p95']:.1f}" for k, v in lat.items()))
    gt = s.get("gt_recall")
    if gt:
        out.append(f"GT recall @IoU {gt['iou_threshold']:.1f}     : {gt['recall']:.0%} of "
                   f"{gt['gt_boxes']} vehicle boxes ({gt['compared_in'].split(':')[0]})")
        for o in gt["per_object"]:
            out.append(f"  GT object {o['row']}          : {o['mean_size_px'][0]:.0f}x"
                       f"{o['mean_size_px'][1]:.0f} px, found in {o['matched']}/{o['frames']} "
                       "frames")
    for t in s.get("tracks", [])[:6]:
        d = t.get("distance_m")
        dist = f", ground distance {d[0]:.1f} -> {d[1]:.1f} m" if d else ""
        out.append(f"track {t['id']:<17}: {t['class']}, {t['frames']} frames{dist}")
    if s.get("extrinsics"):
        e = s["extrinsics"]
        out.append(f"camera pose            : {e['source']}: {e['parent_frame']} -> "
                   f"{e['child_frame']} t = [{', '.join(f'{v:.3f}' for v in e['translation'])}] m")
    for note in s.get("notes", []):
        out.append(f"note                   : {note}")
    for stage, hint in s.get("stages_without_weights", {}).items():
        out.append(f"{stage} (no weights here) : {hint}")
    out.append(f"outputs                : {s['output_dir']}/ (output.mcap, annotated/*.png, "
               f"contact_sheet.png, plot.png, summary.json, report.html) in {s['seconds']} s")
    return "\n".join(out)


def _img_tag(img: np.ndarray, width: int | None = None, quality: int = 85,
             alt: str = "") -> str:
    if width is not None and img.shape[1] > width:
        img = cv2.resize(img, (width, round(img.shape[0] * width / img.shape[1])),
                         interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    data = base64.b64encode(buf.tobytes()).decode()
    return (f'<img alt="{html.escape(alt)}" src="data:image/jpeg;base64,{data}" '
            'style="max-width:100%">')


def html_report(summary: Mapping[str, Any], plot: np.ndarray, sheet: np.ndarray,
                frames: Sequence[tuple[str, np.ndarray]], text: str) -> str:
    """A self-contained HTML page (images embedded as JPEG data URIs; links to the
    native-resolution PNGs next to it)."""
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(str(k))}</td><td>{v}</td></tr>"
                   for k, v in summary["detections_per_class"].items())
    lat = "".join(f"<tr><td>{esc(k)}</td><td>{v['p50']:.1f}</td><td>{v['p95']:.1f}</td></tr>"
                  for k, v in summary.get("latency_ms", {}).items())
    figs = "".join(
        f'<figure><a href="annotated/{esc(name)}">{_img_tag(img, 1600, 80, name)}</a>'
        f"<figcaption>{esc(name)} (click for native resolution)</figcaption></figure>"
        for name, img in frames)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>perception2d demo report</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1700px;color:#222}}
table{{border-collapse:collapse;margin:8px 0}}td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:left}}pre{{background:#f4f4f4;padding:12px;overflow-x:auto}}
figure{{margin:12px 0}}figcaption{{color:#555;font-size:90%}}</style></head><body>
<h1>perception2d demo report</h1>
<pre>{esc(text)}</pre>
<h2>Latency and detections</h2>{_img_tag(plot, None, 92, "plot")}
<table><tr><th>stage</th><th>p50 ms</th><th>p95 ms</th></tr>{lat}</table>
<table><tr><th>class</th><th>detections</th></tr>{rows}</table>
<h2>All frames</h2>{_img_tag(sheet, 1700, 80, "contact sheet")}
<h2>Frames: raw | rectified</h2>{figs}
</body></html>
"""
