"""``perception2d segment`` (SAM masks for box / point prompts) and ``perception2d eval masks``.

Prompts: every ``--box x1,y1,x2,y2`` is one prompt; the ``--point x,y[,label]`` flags
(label 1 = foreground, the default; 0 = background) together form one more prompt, after the
boxes (foreground/background clicks on one object) — or one prompt each with
``--point-prompts``. Prompt i gets id i + 1 in the output image (16-bit PNG, 0 = background,
same size as the input); where masks overlap the higher predicted IoU wins.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from perception2d_ros.engines.base import BACKEND_CHOICES


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} '{text}': numbers separated by commas") from None
    if len(vals) not in n:
        raise argparse.ArgumentTypeError(f"{what} '{text}': expected "
                                         f"{' or '.join(map(str, n))} numbers")
    return vals


def parse_box(text: str) -> list[float]:
    x1, y1, x2, y2 = _floats(text, (4,), "--box")
    if x2 <= x1 or y2 <= y1:
        raise argparse.ArgumentTypeError(f"--box '{text}': need x1 < x2 and y1 < y2 (xyxy)")
    return [x1, y1, x2, y2]


def parse_point(text: str) -> list[float]:
    vals = _floats(text, (2, 3), "--point")
    if len(vals) == 2:
        vals.append(1.0)
    if vals[2] not in (0.0, 1.0):
        raise argparse.ArgumentTypeError(f"--point '{text}': label must be 1 (fg) or 0 (bg)")
    return vals


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="sam_vit_b",
                   help="manifest name of a SAM model (default sam_vit_b), or an export "
                        "directory / sam.json")
    g.add_argument("--checkpoint", help="official segment-anything or MobileSAM .pth "
                   "(weights-only load); exported to ONNX on first use, cached by sha256")
    g.add_argument("--arch", choices=("vit_b", "vit_l", "vit_h", "vit_t", "mobile_sam"),
                   help="SAM architecture (default: inferred from the checkpoint)")
    g.add_argument("--models-dir", help="models directory (default: $PERCEPTION2D_MODELS_DIR "
                   "or the package's)")
    g.add_argument("--cache-dir", help="where checkpoints are exported (default "
                   "$PERCEPTION2D_CACHE_DIR/sam)")
    g.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    g.add_argument("--threads", type=int, help="CPU threads for onnxruntime")
    g.add_argument("--select", default="iou", choices=("iou", "stability"),
                   help="how to pick among the 3 multimask candidates")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "segment", help="SAM instance masks for box / point prompts on one image",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="input image (any format OpenCV reads)")
    p.add_argument("--box", action="append", type=parse_box, default=[], metavar="X1,Y1,X2,Y2",
                   help="box prompt in pixels (repeatable; one prompt each)")
    p.add_argument("--point", action="append", type=parse_point, default=[],
                   metavar="X,Y[,LABEL]", help="point in pixels, label 1 fg (default) / 0 bg "
                   "(repeatable; all points form one prompt)")
    p.add_argument("--point-prompts", action="store_true",
                   help="each --point is its own prompt")
    p.add_argument("-o", "--output", required=True, help="instance-id mask, 16-bit PNG")
    p.add_argument("--json", action="store_true",
                   help="print per prompt {prompt, id, score, stability, area, bbox} as JSON")
    p.add_argument("--multimask", default="auto", choices=("auto", "on", "off"),
                   help="3 candidates per prompt, best kept (auto: on when every prompt is "
                        "a single point, the ambiguous case)")
    _add_model_args(p)
    p.set_defaults(func=run_segment)


def add_eval_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "masks", help="SAM mask mIoU on COCO with GT boxes as prompts",
        description="Every non-crowd COCO GT box is a prompt; each predicted mask is compared "
                    "with its GT instance mask (polygons / RLE via pycocotools). Reports mIoU "
                    "over instances.")
    p.add_argument("--images", required=True, help="directory with the COCO images")
    p.add_argument("--annotations", required=True, help="COCO instances JSON")
    p.add_argument("--max-images", type=int, help="evaluate at most this many images")
    p.add_argument("--multimask", action="store_true",
                   help="3 candidates per box, best predicted IoU kept (default: single mask)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("-o", "--output", help="also write the JSON report here")
    _add_model_args(p)
    p.set_defaults(func=run_eval_masks)


def _open_segmenter(args: argparse.Namespace) -> Any:
    from perception2d_ros.engines.factory import EngineConfig
    from perception2d_ros.models.sam.runtime import SamSegmenter, resolve_model_files

    files = resolve_model_files(args.model, checkpoint=args.checkpoint, arch=args.arch,
                                models_dir=args.models_dir, cache_dir=args.cache_dir)
    cfg = EngineConfig(backend=args.backend, device=args.device, precision=args.precision,
                       threads=args.threads)
    return SamSegmenter.from_exported(files, cfg, select=args.select)


def _fail(msg: str, code: int = 2) -> int:
    print(f"perception2d: error: {msg}", file=sys.stderr)
    return code


def build_cli_prompts(boxes: list[list[float]], points: list[list[float]],
                      point_prompts: bool) -> list[dict[str, Any]]:
    """CLI flags → ordered prompt list: boxes first, then the point prompt(s)."""
    prompts: list[dict[str, Any]] = [{"box": b} for b in boxes]
    if points:
        groups = [[p] for p in points] if point_prompts else [points]
        prompts += [{"points": [[x, y, int(lab)] for x, y, lab in g]} for g in groups]
    return prompts


def run_segment(args: argparse.Namespace) -> int:
    import cv2
    import numpy as np

    from perception2d_ros.models.sam.runtime import SamError, instance_id_image, mask_bboxes

    if not args.box and not args.point:
        return _fail("give at least one --box or --point prompt")
    from perception2d_ros.io.image_files import ImageFileError, read_image

    try:
        image = read_image(args.image)
    except ImageFileError as exc:
        return _fail(str(exc))
    prompts = build_cli_prompts(args.box, args.point, args.point_prompts)
    if args.multimask == "auto":
        multimask = all("points" in p and len(p["points"]) == 1 for p in prompts)
    else:
        multimask = args.multimask == "on"
    try:
        seg = _open_segmenter(args)
    except SamError as exc:
        return _fail(str(exc))
    seg.set_image(image)
    boxes = [p["box"] for p in prompts if "box" in p]
    point_groups = [p["points"] for p in prompts if "points" in p]
    results = []
    if boxes:
        results.append(seg.predict(boxes=np.array(boxes), multimask=multimask))
    if point_groups:
        width = max(len(g) for g in point_groups)   # ragged groups: pad with label -1
        pts = np.zeros((len(point_groups), width, 2))
        labs = np.full((len(point_groups), width), -1.0)
        for i, g in enumerate(point_groups):
            pts[i, :len(g)] = [q[:2] for q in g]
            labs[i, :len(g)] = [q[2] for q in g]
        results.append(seg.predict(points=pts, point_labels=labs, multimask=multimask))
    masks = np.concatenate([r.masks for r in results])
    scores = np.concatenate([r.scores for r in results])
    stability = np.concatenate([r.stability for r in results])
    merged = type(results[0])(masks=masks, scores=scores, stability=stability,
                              chosen=np.concatenate([r.chosen for r in results]),
                              low_res_logits=np.concatenate([r.low_res_logits for r in results]),
                              iou_predictions=np.concatenate([r.iou_predictions
                                                              for r in results]),
                              image_size=results[0].image_size)
    ids = instance_id_image(merged)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), ids):
        return _fail(f"cannot write {out} (use a .png name)")
    if args.json:
        bboxes = mask_bboxes(masks)
        print(json.dumps([
            {"prompt": p, "id": i + 1, "score": round(float(scores[i]), 6),
             "stability": round(float(stability[i]), 6), "area": int(masks[i].sum()),
             "bbox": [int(v) for v in bboxes[i]]}
            for i, p in enumerate(prompts)]))
    return 0


def run_eval_masks(args: argparse.Namespace) -> int:
    from perception2d_ros.models.sam.runtime import SamError, evaluate_coco_masks

    if not Path(args.images).is_dir():
        return _fail(f"--images {args.images}: not a directory")
    if not Path(args.annotations).is_file():
        return _fail(f"--annotations {args.annotations}: file not found")
    try:
        seg = _open_segmenter(args)
        report = evaluate_coco_masks(
            seg, args.images, args.annotations, max_images=args.max_images,
            multimask=args.multimask,
            progress=None if args.json else (lambda m: print(m, file=sys.stderr)))
    except SamError as exc:
        return _fail(str(exc))
    report["model"] = seg.meta.get("arch")
    report["encoder_calls"] = seg.encoder_calls
    report["decoder_calls"] = seg.decoder_calls
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        print(f"mask mIoU {report['miou']:.4f} over {report['instances']} instances in "
              f"{report['images']} images (GT boxes as prompts, "
              f"{'multimask' if args.multimask else 'single mask'})")
    return 0
