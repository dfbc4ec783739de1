#!/usr/bin/env python3
"""End to end on a GPU: the live pipeline code (``pipeline.build.build_pipeline``, the stages
the nodes run) at 1280×720, paced at 30 Hz and flat out — one prepared script, one call.

    python3 benchmarks/gpu_pipeline.py --out $OUT/pipeline.json     # on the GPU machine
    python3 benchmarks/gpu_pipeline.py --device cpu --quick --out /tmp/p.json   # smoke test

Chains measured (every model on the torch backend = the exported ONNX graph run by
``engines/onnx_torch``, fp16, CUDA graphs; frames on the device, ``detect.device_frames``):

* ``rectify+detect``: camerav1 calibration, YOLOX-nano (the shipped weights);
* ``+sam_vit_t+clip``: + MobileSAM on every box + CLIP ViT-B/32 crop labels and frame label;
* ``+sam_vit_b+clip``: the same with SAM ViT-B;
* the first chain again with frames on the host (``device_frames: off``) and on ONNX Runtime
  CPU, for comparison.

SAM and CLIP have no offline weights: the official architectures with seeded random weights
are exported here first (latency does not depend on weight values; mask counts do not matter
because every detection box is a prompt). Frames: real COCO images resized to 1280×720.

Paced run: frame i arrives at t0 + i/rate; the pipeline takes the newest arrived frame when
it is free (newest wins, as the nodes); latency = output ready − arrival; skipped frames are
counted as drops. Also per stage p50/p95 from ``frame.timings``, and each model's floor
(the raw engine call on a device tensor, CUDA graph) for the stage / floor ratios.
Results land in the JSON after every section (a time-out keeps what was done).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_bench import CAMERAV1, CALIB, IMAGES  # noqa: E402

SIZE = (1280, 720)


def pct(a: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(a) * 1e3, q)), 3) if a else float("nan")


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.out: dict[str, Any] = {"script": "benchmarks/gpu_pipeline.py",
                                    "date": datetime.now(timezone.utc).isoformat(
                                        timespec="seconds"),
                                    "results": {}, "errors": {}, "skipped": {}}
        import torch

        self.torch = torch
        self.device = args.device if args.device != "auto" else (
            "cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device == "cuda"
        self.exports: dict[str, Any] = {}

    def save(self) -> None:
        self.out["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        Path(self.args.out).write_text(json.dumps(self.out, indent=1, default=str) + "\n")

    def section(self, name: str, fn: Callable[[], Any]) -> None:
        if time.monotonic() - self.t0 > self.args.max_seconds:
            self.out["skipped"][name] = f"time budget {self.args.max_seconds} s spent"
            self.save()
            return
        print(f"[{name}] t={time.monotonic() - self.t0:.0f}s", flush=True)
        try:
            res = fn()
            if res is not None:
                self.out["results"][name] = res
                print("  " + json.dumps(res, default=str)[:600], flush=True)
        except Exception as exc:  # noqa: BLE001 - record, go on
            self.out["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            print(f"  FAILED {type(exc).__name__}: {exc}", flush=True)
        self.save()

    # ------------------------------------------------------------------ setup
    def env(self) -> dict[str, Any]:
        torch = self.torch
        import cv2
        import onnxruntime as ort

        e = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
             "torch": torch.__version__, "cuda": torch.version.cuda, "opencv": cv2.__version__,
             "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
             "device": self.device}
        try:
            import torchvision

            e["torchvision"] = torchvision.__version__
        except Exception as exc:  # noqa: BLE001
            e["torchvision"] = f"unavailable: {exc}"
        if self.cuda:
            e["gpu"] = torch.cuda.get_device_name(0)
            torch.backends.cudnn.benchmark = True
        self.out["gpu"] = e.get("gpu", "none (cpu)")
        return e

    def export(self) -> dict[str, Any]:
        from perception2d_ros.models.sam import export as sam_export
        from perception2d_ros.models.clip import export as clip_export

        root = Path(tempfile.mkdtemp(prefix="p2d_exports_"))
        res = {}
        archs = ["vit_t"] if self.args.quick else ["vit_t", "vit_b"]
        for arch in archs:
            t = time.perf_counter()
            self.exports[f"sam_{arch}"] = sam_export.export_onnx(arch, None, root / "sam",
                                                                 seed=0)
            res[f"sam_{arch}_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        self.exports["clip"] = clip_export.export_onnx("ViT-B-32", None, root / "clip", seed=0)
        res["clip_b32_s"] = round(time.perf_counter() - t, 1)
        return res

    def frames(self) -> tuple[list[np.ndarray], Any]:
        import cv2

        from perception2d_ros.geometry.camera import CameraModel

        files = sorted(IMAGES.glob("*.jpg"))[:8]
        imgs = [np.ascontiguousarray(cv2.resize(cv2.imread(str(f)), SIZE)) for f in files]
        try:
            cam = CameraModel.from_yaml(CALIB)
        except Exception:  # noqa: BLE001
            cam = CameraModel(1280, 720, CAMERAV1["k"], CAMERAV1["d"],
                              distortion_model="plumb_bob", r=CAMERAV1["r"], p=CAMERAV1["p"])
        return imgs, cam

    # ------------------------------------------------------------------ pipelines
    def config(self, chain: str, backend: str, device_frames: str) -> dict[str, Any]:
        dev = self.device if backend == "torch" else "cpu"
        prec = "fp16" if (backend == "torch" and self.cuda) else "fp32"
        eng = {"backend": backend, "device": dev, "precision": prec}
        cfg: dict[str, Any] = {"stages": ["rectify", "detect"], "models_dir": str(ROOT / "models"),
                               "detect": {**eng, "device_frames": device_frames,
                                          "fallback": False}}
        if "sam" in chain:
            arch = "vit_t" if "vit_t" in chain else "vit_b"
            cfg["stages"].append("sam")
            cfg["sam"] = {**eng, "model": str(self.exports[f"sam_{arch}"]["meta"]),
                          "allow_outside_models_dir": True}
        if "clip" in chain:
            cfg["stages"].append("clip")
            cfg["clip"] = {**eng, "model": str(self.exports["clip"]["meta"]),
                           "templates": ["{}"], "allow_outside_models_dir": True}
        return cfg

    def pipeline(self, chain: str, backend: str = "torch", device_frames: str = "auto",
                 frames: int | None = None) -> dict[str, Any]:
        from perception2d_ros.pipeline.build import build_pipeline
        from perception2d_ros.pipeline.config import merge_config
        from perception2d_ros.pipeline.frame import Frame

        torch = self.torch
        imgs, cam = self.frames()
        cfg = merge_config(self.config(chain, backend, device_frames))
        t = time.perf_counter()
        pipe = build_pipeline(cfg)
        configure_s = time.perf_counter() - t
        det_stage = pipe.stages[1]
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

        def run(i: int) -> Any:
            f = Frame(imgs[i % len(imgs)], "bgr8", i, "cam", camera=cam)
            pipe.run(f)
            sync()
            return f

        parts: dict[str, list[float]] = {}

        def timed(obj: Any, attr: str, key: str) -> None:
            """Time a method (synchronised): the per-part breakdown of a stage."""
            fn = getattr(obj, attr)

            def wrapper(*a: Any, **k: Any) -> Any:
                sync()
                t = time.perf_counter()
                r = fn(*a, **k)
                sync()
                parts.setdefault(key, []).append(time.perf_counter() - t)
                return r
            setattr(obj, attr, wrapper)

        import perception2d_ros.models.sam.stage as sam_stage_mod

        for st in pipe.stages:
            if st.name == "sam":
                timed(st.segmenter, "set_image", "sam.set_image")
                timed(st.segmenter, "predict", "sam.predict")
                timed(sam_stage_mod, "combine", "sam.combine")
            if st.name == "clip":
                timed(st.labeler, "preprocess", "clip.preprocess")
                timed(st.labeler, "infer", "clip.infer")
                timed(st.labeler, "postprocess", "clip.postprocess")
        for i in range(len(imgs) if self.args.quick else 2 * len(imgs)):  # warm-up: every image
            run(i)
        n = frames or self.args.frames
        parts.clear()
        # flat out
        totals, stages, dets, masks = [], {}, [], []
        for i in range(n // 2):
            t = time.perf_counter()
            f = run(i)
            totals.append(time.perf_counter() - t)
            for k, v in f.timings.items():
                stages.setdefault(k, []).append(v)
            dets.append(len(f.detections) if f.detections is not None else 0)
            if f.masks is not None:
                masks.append(int((np.asarray(getattr(f.masks, "areas", [])) > 0).sum()))
        # paced, newest wins
        period = 1.0 / self.args.rate
        lat, drops, done = [], 0, 0
        t0 = time.perf_counter() + 0.05
        nxt = 0
        while nxt < n:
            now = time.perf_counter()
            arrived = int((now - t0) // period)
            if arrived < nxt:
                time.sleep(max(0.0, t0 + nxt * period - now))
                continue
            newest = min(arrived, n - 1)
            drops += newest - nxt
            run(newest)
            lat.append(time.perf_counter() - (t0 + newest * period))
            done += 1
            nxt = newest + 1
        res = {
            "chain": chain, "backend": backend, "precision": cfg["detect"]["precision"],
            "device_frames": det_stage.device_detector is not None,
            "configure_s": round(configure_s, 1),
            "flat_out": {"frames": len(totals), "p50_ms": pct(totals, 50),
                         "p95_ms": pct(totals, 95), "max_ms": pct(totals, 100),
                         "fps": round(len(totals) / sum(totals), 1)},
            "paced": {"rate_hz": self.args.rate, "frames_in": n, "processed": done,
                      "dropped": drops, "latency_p50_ms": pct(lat, 50),
                      "latency_p95_ms": pct(lat, 95), "latency_max_ms": pct(lat, 100)},
            "stages_p50_ms": {k: pct(v, 50) for k, v in stages.items()},
            "stages_p95_ms": {k: pct(v, 95) for k, v in stages.items()},
            "detections_per_frame": round(float(np.mean(dets)), 2) if dets else 0,
            "parts_p50_ms": {k: pct(v, 50) for k, v in parts.items()},
            "parts_p95_ms": {k: pct(v, 95) for k, v in parts.items()},
        }
        if masks:
            res["masks_per_frame"] = round(float(np.mean(masks)), 2)
        if self.cuda:
            res["gpu_peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        self.last = pipe
        return res

    # ------------------------------------------------------------------ floors
    def floors(self) -> dict[str, Any]:
        """Raw engine calls on device tensors (fp16, CUDA graph): the stage floors."""
        from perception2d_ros.engines.factory import EngineConfig, create_engine

        torch = self.torch
        cfg = EngineConfig(backend="torch", device=self.device,
                           precision="fp16" if self.cuda else "fp32", fallback=False)
        sync = torch.cuda.synchronize if self.cuda else (lambda: None)

        def time_engine(path: Any, feeds: dict[str, Any], iters: int = 50) -> float:
            eng = create_engine(path, cfg)
            dev = {k: torch.as_tensor(v).to(self.device) for k, v in feeds.items()}
            for _ in range(5):
                eng.infer_tensors(dev)
            sync()
            ts = []
            for _ in range(iters):
                t = time.perf_counter()
                eng.infer_tensors(dev)
                sync()
                ts.append(time.perf_counter() - t)
            eng.close()
            return pct(ts, 50)

        rng = np.random.default_rng(0)
        res = {"yolox_nano_416": time_engine(ROOT / "models" / "yolox_nano.onnx", {
            "images": rng.random((1, 3, 416, 416), np.float32) * 255})}
        for key in ("sam_vit_t", "sam_vit_b"):
            if key in self.exports:
                ex = self.exports[key]
                res[f"{key}_encoder"] = time_engine(ex["encoder"], {
                    "image": rng.standard_normal((1, 3, 1024, 1024)).astype(np.float32)})
                for n in (4, 8):
                    res[f"{key}_decoder_{n}_boxes"] = time_engine(ex["decoder"], {
                        "image_embeddings": rng.standard_normal((1, 256, 64, 64)).astype(
                            np.float32),
                        "point_coords": rng.uniform(0, 1000, (n, 2, 2)).astype(np.float32),
                        "point_labels": np.tile(np.array([[2, 3]], np.float32), (n, 1)),
                        "mask_input": np.zeros((n, 1, 256, 256), np.float32),
                        "has_mask_input": np.zeros(n, np.float32)})
        if "clip" in self.exports:
            for n in (1, 8):
                res[f"clip_b32_image_{n}"] = time_engine(self.exports["clip"]["image"], {
                    "image": rng.standard_normal((n, 3, 224, 224)).astype(np.float32)})
        return res

    # ------------------------------------------------------------------ parity on the GPU
    def parity(self) -> dict[str, Any]:
        """The fp16 CUDA path vs the fp32 host reference path on real frames: detections,
        SAM masks (MobileSAM), CLIP embeddings."""
        from perception2d_ros.models.clip.labeler import ClipLabeler
        from perception2d_ros.engines.factory import EngineConfig
        from perception2d_ros.models.sam.results import mask_iou
        from perception2d_ros.models.sam.runtime import SamSegmenter
        from perception2d_ros.models.yolo.detector import YoloDetector

        torch = self.torch
        cuda = EngineConfig(backend="torch", device=self.device,
                            precision="fp16" if self.cuda else "fp32", fallback=False)
        cpu = EngineConfig(backend="onnxruntime", device="cpu")
        imgs, _ = self.frames()
        res: dict[str, Any] = {}
        a = YoloDetector.from_model("yolox_nano", cuda, models_dir=ROOT / "models")
        b = YoloDetector.from_model("yolox_nano", cpu, models_dir=ROOT / "models")
        same, total, dmax = 0, 0, 0.0
        for img in imgs:
            da, db = a.detect(img), b.detect(img)
            total += len(db)
            for box, c in zip(db.xyxy, db.class_ids):
                if len(da):
                    d = np.abs(da.xyxy - box).max(1)
                    k = int(np.argmin(np.where(da.class_ids == c, d, np.inf)))
                    if da.class_ids[k] == c and d[k] < 4:
                        same += 1
                        dmax = max(dmax, float(d[k]))
        res["yolox_fp16_matched_boxes"] = f"{same}/{total}"
        res["yolox_fp16_max_px"] = round(dmax, 3)
        if "sam_vit_t" in self.exports:
            ex = self.exports["sam_vit_t"]
            sa = SamSegmenter.from_exported(ex, cuda)
            sb = SamSegmenter.from_exported(ex, cpu)
            ious, sd = [], []
            for img in imgs[:4]:
                boxes = b.detect(img).xyxy
                if not len(boxes):
                    continue
                sa.set_image(torch.from_numpy(img).to(self.device) if sa.device else img)
                sb.set_image(img)
                ra, rb = sa.predict(boxes=boxes), sb.predict(boxes=boxes)
                ious += [mask_iou(x, y) for x, y in zip(ra.masks, rb.masks)]
                sd.append(float(np.abs(ra.scores - rb.scores).max()))
            res["mobile_sam_device_path"] = sa.device
            res["mobile_sam_fp16_mask_iou_min"] = round(min(ious), 4) if ious else None
            res["mobile_sam_fp16_mask_iou_mean"] = round(float(np.mean(ious)), 4) if ious \
                else None
            res["mobile_sam_fp16_score_max_diff"] = round(max(sd), 4) if sd else None
        if "clip" in self.exports:
            la = ClipLabeler(self.exports["clip"], cuda, text_cache_dir=None)
            lb = ClipLabeler(self.exports["clip"], cpu, text_cache_dir=None)
            for lab in (la, lb):
                lab.set_vocabulary(["person", "car", "dog", "chair"], ["{}"])
            x, _ = lb.preprocess(imgs[0], b.detect(imgs[0]).xyxy[:8])
            ea, eb = la.embed_preprocessed(x), lb.embed_preprocessed(x)
            cos = (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
            res["clip_fp16_cos_min"] = round(float(cos.min()), 6) if len(cos) else None
        return res

    def cuda_tests(self) -> dict[str, Any]:
        import subprocess

        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
               "cuda", "test/engines/test_onnx_torch.py", "test/engines/test_engines.py",
               "test/pipeline/test_device_frames.py"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
        return {"rc": p.returncode, "tail": (p.stdout + p.stderr)[-1500:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_pipeline.json")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--rate", type=float, default=30.0)
    ap.add_argument("--quick", action="store_true", help="MobileSAM only, few frames")
    ap.add_argument("--max-seconds", type=float, default=420.0)
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.frames = min(args.frames, 16)
    r = Run(args)
    r.section("env", r.env)
    r.section("export", r.export)
    r.section("rectify+detect", lambda: r.pipeline("rectify+detect"))
    r.section("rectify+detect host frames", lambda: r.pipeline("rectify+detect",
                                                               device_frames="off"))
    r.section("+sam_vit_t+clip", lambda: r.pipeline("+sam_vit_t+clip"))
    r.section("+sam_vit_t+clip host frames", lambda: r.pipeline("+sam_vit_t+clip",
                                                                device_frames="off"))
    if not args.quick:
        r.section("+sam_vit_b+clip", lambda: r.pipeline("+sam_vit_b+clip"))
    r.section("floors", r.floors)
    r.section("parity", r.parity)
    r.section("rectify+detect ORT CPU", lambda: r.pipeline(
        "rectify+detect", backend="onnxruntime", device_frames="off",
        frames=min(args.frames, 120)))
    if not args.skip_tests:
        r.section("cuda tests", r.cuda_tests)
    r.save()
    print(f"done in {time.monotonic() - r.t0:.0f} s -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
