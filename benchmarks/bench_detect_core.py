"""Micro-benchmark of the detection core on this machine (no ROS).

    .venv/bin/python benchmarks/bench_detect_core.py [--model yolox_nano] [--backend auto]

Prints median ms of: letterbox (ours) vs ``cv2.dnn.blobFromImage`` at 640×640 on a
640×480 image, and YoloDetector preprocess / infer / postprocess over the tinycoco images.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _median_ms(fn, repeat: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    import cv2

    from perception2d_ros.engines.factory import EngineConfig
    from perception2d_ros.models.yolo.preprocess import Letterbox
    from perception2d_ros.models.yolo.detector import YoloDetector

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolox_nano")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()

    images = sorted((ROOT / "test" / "data" / "coco" / "images").glob("*.jpg"))
    img = cv2.resize(cv2.imread(str(images[0])), (640, 480))
    lb = Letterbox(640, align="center", color="rgb", scale=1 / 255)
    lb(img)
    padded = lb.padded.copy()
    print(f"letterbox+tensor 640 (ours)         {_median_ms(lambda: lb(img), args.repeat):6.2f} ms")
    blob_ms = _median_ms(lambda: cv2.dnn.blobFromImage(padded, 1 / 255, swapRB=True),
                         args.repeat)
    print(f"blobFromImage 640 (already padded)  {blob_ms:6.2f} ms")

    det = YoloDetector.from_model(args.model, EngineConfig(backend=args.backend))
    frames = [cv2.imread(str(p)) for p in images]
    for f in frames[:3]:
        det.detect(f)  # warm-up
    stages: dict[str, list[float]] = {"preprocess": [], "infer": [], "postprocess": []}
    for f in frames:
        det.detect(f)
        for k, v in det.timings.items():
            stages[k].append(v)
    print(f"{det.describe()}; {len(frames)} images")
    for k, v in stages.items():
        print(f"  {k:<12} median {statistics.median(v):6.2f} ms  max {max(v):6.2f} ms")
    total = [sum(t) for t in zip(*stages.values())]
    print(f"  {'total':<12} median {statistics.median(total):6.2f} ms "
          f"({1e3 / statistics.median(total):.1f} images/s)")


if __name__ == "__main__":
    main()
