"""``perception2d detect`` (YOLO on image files) and ``perception2d eval detect`` (COCO mAP).

``detect --json`` prints a list of ``{"image": path, "detections": [{"class_name", "score",
"xyxy": [x1, y1, x2, y2]}]}`` with boxes in the original image's pixels (a contract other
tools rely on). ``eval detect --json`` prints ``{"map", "map50", "per_class", "images",
"images_per_s", ...}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from perception2d_ros.engines.base import BACKEND_CHOICES

DEFAULT_MODEL = "yolox_nano"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"manifest model name or ONNX path (default {DEFAULT_MODEL})")
    p.add_argument("--format", default=None,
                   help="yolox|yolov5|yolov8|yolov10 (default: manifest, else inferred)")
    p.add_argument("--labels", default=None, help="class-name file, one per line")
    p.add_argument("--backend", default="auto",
                   choices=BACKEND_CHOICES)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (onnxruntime)")
    p.add_argument("--models-dir", default=None, help="models directory (default: search)")
    p.add_argument("--classes", default=None, metavar="A,B,...",
                   help="keep only these classes: comma-separated names or ids")


def add_parser(subparsers: Any) -> None:
    """Register ``perception2d detect``."""
    p = subparsers.add_parser("detect", help="detect objects in images (YOLO)",
                              description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _add_model_args(p)
    p.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    p.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    p.add_argument("--max-det", type=int, default=100, help="max detections per image")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_detect)


def add_eval_parser(eval_subparsers: Any) -> None:
    """Register ``perception2d eval detect``."""
    from_doc = "COCO box mAP of a detector on an annotated image folder (pycocotools)"
    p = eval_subparsers.add_parser("detect", help=from_doc, description=from_doc)
    p.add_argument("--images", required=True, help="directory with the images")
    p.add_argument("--annotations", required=True, help="COCO instances JSON")
    _add_model_args(p)
    p.add_argument("--conf", type=float, default=0.001, help="score threshold (default 0.001)")
    p.add_argument("--iou", type=float, default=0.65, help="NMS IoU threshold (default 0.65)")
    p.add_argument("--max-det", type=int, default=100, help="max detections per image")
    p.add_argument("--multi-label", action="store_true",
                   help="score every class above --conf per box (Ultralytics val style)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_eval)


def _load(args: argparse.Namespace, **kw: Any) -> Any:
    from perception2d_ros.engines.factory import EngineConfig
    from perception2d_ros.models.yolo.detector import YoloDetector

    cfg = EngineConfig(backend=args.backend, device=args.device, precision=args.precision,
                       threads=args.threads)
    classes = None
    if args.classes:
        classes = [int(c) if c.isdigit() else c
                   for c in (x.strip() for x in args.classes.split(",")) if c]
    return YoloDetector.from_model(args.model, cfg, format=args.format, labels=args.labels,
                                   conf=args.conf, iou=args.iou, max_det=args.max_det,
                                   classes=classes, models_dir=args.models_dir, **kw)


def run_detect(args: argparse.Namespace) -> int:
    from perception2d_ros.io.image_files import ImageFileError, read_image

    try:
        det = _load(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"perception2d detect: {exc}", file=sys.stderr)
        return 2
    results, failed = [], 0
    for path in args.images:
        try:
            image = read_image(path)
        except ImageFileError as exc:  # skipped with one line; the other images still run
            print(f"perception2d detect: {exc}", file=sys.stderr)
            failed += 1
            continue
        dets = det.detect(image)
        results.append((path, image.shape, dets, dict(det.timings)))
    if args.json:
        print(json.dumps([{"image": path, "detections": dets.to_json()}
                          for path, _, dets, _ in results], indent=2))
    else:
        print(f"model {det.model_name or args.model}: {det.describe()}")
        for path, shape, dets, t in results:
            print(f"\n{path} ({shape[1]}x{shape[0]}): {len(dets)} detections  "
                  f"[pre {t['preprocess']:.1f} ms, infer {t['infer']:.1f} ms, "
                  f"post {t['postprocess']:.1f} ms]")
            if len(dets):
                print(f"  {'class':<16} {'score':>6}  {'x1':>7} {'y1':>7} {'x2':>7} {'y2':>7}")
            for d in dets.to_json(ndigits=1):
                x1, y1, x2, y2 = d["xyxy"]
                print(f"  {d['class_name']:<16} {d['score']:>6.3f}  "
                      f"{x1:>7.1f} {y1:>7.1f} {x2:>7.1f} {y2:>7.1f}")
    return 1 if failed else 0


def run_eval(args: argparse.Namespace) -> int:
    from perception2d_ros.eval.coco import evaluate_detector

    try:
        det = _load(args, multi_label=args.multi_label)
        result = evaluate_detector(det, args.images, args.annotations, limit=args.limit)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"perception2d eval detect: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    print(f"model {det.model_name or args.model}: {det.describe()}")
    print(f"images {result.images}, detections {result.detections}, "
          f"{result.images_per_s:.1f} images/s (preprocess+infer+postprocess)")
    print(f"mAP@[.5:.95] {result.map:.4f}   mAP@.5 {result.map50:.4f}")
    print(f"\n{'class':<16} {'AP':>6}")
    for name, ap in sorted(result.per_class.items(), key=lambda kv: -kv[1]):
        print(f"{name:<16} {ap:>6.3f}")
    return 0
