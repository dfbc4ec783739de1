"""Per-frame cost of LSeg's resampling (host path) before and after the official lang-seg
resampling (issue 20), measured interleaved in one run, plus what the multi-scale mode costs.

    .venv/bin/python benchmarks/bench_lseg_resample.py [--before 06f6682] [--repeat 15]
        [--out docs/results/lseg_resample_cpu.json]

* ``preprocess``: BGR image -> normalised, letterboxed 480x480 input tensor
  (before: cv2 resize of the uint8 image; after: align_corners=True bilinear, lang-seg's way).
* ``head``: pixel embeddings (512, 240, 240) + N text embeddings -> label map at the image size
  (before: one half-pixel-centre resize; after: x2 align_corners upsample, crop, align_corners
  resize to the image), both with the boundary-only argmax.
* ``multiscale``: the host multi-scale evaluator's own work for ``--scales`` + flip (resizing,
  windows, stitching, argmax) with the network replaced by a stub returning fixed embeddings,
  and the number of network passes per frame (the real cost: passes x one inference).

The "before" implementation is ``perception2d_ros/core/lseg.py`` (its path before the package
layout of issue 16) at ``--before``, read with ``git show``. Inputs: a real ADE20K photo
(test/data) resized to each size; embeddings derived from the photo (pixels softly assigned to
N colour/position clusters, each cluster a random unit vector), so label regions follow the
image as with real weights.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTO = ROOT / "test" / "data" / "segmentation" / "ADE_train_00016869.jpg"


def _load_before(commit: str):  # noqa: ANN202
    src = subprocess.run(["git", "show", f"{commit}:perception2d_ros/core/lseg.py"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    d = Path(tempfile.mkdtemp()) / "a" / "b"
    d.mkdir(parents=True)
    (d / "lseg_before.py").write_text(src)
    spec = importlib.util.spec_from_file_location("lseg_before", d / "lseg_before.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lseg_before"] = mod            # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def image_embeddings(img_bgr: np.ndarray, n: int, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(512, 240, 240) unit pixel embeddings + (n, 512) text: pixels of the letterboxed photo
    softly assigned to n k-means clusters of (Lab colour, position)."""
    import cv2

    small = cv2.resize(img_bgr, (240, int(round(240 * img_bgr.shape[0] / img_bgr.shape[1]))))
    lab = cv2.cvtColor(cv2.GaussianBlur(small, (0, 0), 1.5), cv2.COLOR_BGR2LAB).astype(np.float32)
    h, w = lab.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    feat = np.dstack([lab, yy[..., None] * 0.5, xx[..., None] * 0.5]).reshape(-1, 5)
    crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5)
    cv2.setRNGSeed(seed)
    _, _, centres = cv2.kmeans(feat, n, None, crit, 2, cv2.KMEANS_PP_CENTERS)
    d2 = ((feat[:, None, :] - centres[None]) ** 2).sum(-1)
    wgt = np.exp(-(d2 - d2.min(1, keepdims=True)) / 50.0)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(512, n)))
    text = q.T.astype(np.float32)
    emb = (wgt @ text).reshape(h, w, 512)
    emb /= np.linalg.norm(emb, axis=2, keepdims=True)
    full = np.repeat(emb[-1:], 240, axis=0)          # pad rows: the last row repeated
    full[:h] = emb
    return np.ascontiguousarray(full.transpose(2, 0, 1)), text


class _StubEngine:
    def __init__(self, emb: np.ndarray) -> None:
        self.out = {"pixel_embeds": emb[None]}

    def infer(self, feeds):  # noqa: ANN001, ANN201
        return self.out


def _ms(fn, repeat: int) -> float:  # noqa: ANN001
    from perception2d_ros.bench.common import time_calls

    return statistics.median(time_calls(fn, repeat, warmup=0)) * 1e3


def main() -> int:
    import cv2

    from perception2d_ros.models.lseg.labeler import LSegSegmenter
    from perception2d_ros.models.lseg.labelmap import label_map_from_embeddings
    from perception2d_ros.models.lseg.meta import LSegMeta
    from perception2d_ros.models.lseg.resample import parse_scales, preprocess, scale_plans

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="06f6682", help="commit of the 'before' lseg.py")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--sizes", default="1280x720,1920x1080")
    ap.add_argument("--vocab", default="20,150", help="phrase counts N")
    ap.add_argument("--scales", default="official")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "lseg_resample_cpu.json"))
    args = ap.parse_args()

    before = _load_before(args.before)
    photo = cv2.imread(str(PHOTO))
    rows = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        img = cv2.resize(photo, (w, h), interpolation=cv2.INTER_AREA)
        for n in (int(v) for v in args.vocab.split(",")):
            emb, text = image_embeddings(img, n)
            meta_a, meta_b = LSegMeta(), before.LSegMeta()
            _, box_a = preprocess(img, meta_a)
            _, box_b = before.preprocess(img, meta_b)
            res_a = label_map_from_embeddings(emb, text, meta_a, box_a)
            res_b = before.label_map_from_embeddings(emb, text, meta_b, box_b)
            pre_a, pre_b, head_a, head_b = [], [], [], []
            for _ in range(args.repeat):        # interleaved: both see the same load
                pre_b.append(_ms(lambda: before.preprocess(img, meta_b), 1))
                pre_a.append(_ms(lambda: preprocess(img, meta_a), 1))
                head_b.append(_ms(lambda: before.label_map_from_embeddings(
                    emb, text, meta_b, box_b), 1))
                head_a.append(_ms(lambda: label_map_from_embeddings(
                    emb, text, meta_a, box_a), 1))
            med = statistics.median
            row = {"size": size, "phrases": n, "labels_present": int(len(np.unique(
                res_a.label_map))),
                "label_agreement_before_after": float(np.mean(res_a.label_map
                                                              == res_b.label_map)),
                "preprocess_ms": {"before": med(pre_b), "after": med(pre_a),
                                  "ratio": med(pre_a) / med(pre_b)},
                "head_ms": {"before": med(head_b), "after": med(head_a),
                            "ratio": med(head_a) / med(head_b)}}
            if rows:             # the multi-scale host work once (first size, first N)
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            seg = LSegSegmenter(_StubEngine(emb), meta_a)
            scales = parse_scales(args.scales)
            plans = scale_plans(img.shape[:2], meta_a.input_size, scales)
            passes = 2 * sum(len(p.windows) for p in plans)
            ms = _ms(lambda: seg.segment(img, text, scales=scales, flip=True), 2)
            row["multiscale"] = {"scales": list(scales), "flip": True,
                                 "network_passes": passes,
                                 "host_ms_without_network": ms,
                                 "windows_per_scale": [len(p.windows) for p in plans]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    doc = {"benchmark": "lseg_resample", "commit": commit, "before_commit": args.before,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"cpu": cpu, "cores": os.cpu_count(), "load_1min": os.getloadavg()[0]},
           "versions": {"python": platform.python_version(), "numpy": np.__version__,
                        "opencv": cv2.__version__},
           "repeat": args.repeat, "photo": str(PHOTO.relative_to(ROOT)), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
