#!/usr/bin/env python3
"""GPU benchmark of the perception2d building blocks — one prepared script, one call.

    python3 benchmarks/gpu_bench.py --out $OUT/gpu.json          # on the GPU machine
    python3 benchmarks/gpu_bench.py --device cpu --quick --out /tmp/gpu.json   # smoke test

Sections (each in its own try/except: a failure is recorded in the JSON, never fatal):

a) ``yolox_nano``: the real ``models/yolox_nano.onnx`` (its weights and graph) run by torch
   through ``perception2d_ros.engines.onnx_torch`` (a small ONNX→torch interpreter; onnx2torch
   and the YOLOX sources are not needed) inside our ``torch_backend.TorchEngine``: fp32 eager,
   fp16 eager, fp16 + CUDA graph, batch 1, 416×416. ``engine.infer`` = numpy in → numpy out
   (H2D + model + D2H); ``device_forward`` = the model on a device tensor only. Parity
   against ONNX Runtime (CPU) on a real frame. ONNX Runtime CPU on this machine for reference.
   ``clip_vit_b32_image``: CLIP ViT-B/32 image tower from open_clip (random init, no
   download) if importable, else timm ``vit_base_patch32_224`` (same ViT-B/32 geometry;
   random init), same three precisions.
b) ``preprocess``: one real 1280×720 frame → YOLOX 416×416 letterbox tensor: our CPU
   ``Letterbox`` vs pinned H2D + resize + pad + NCHW float on the GPU.
c) ``rectify``: our ``CameraModel`` maps (camerav1 1280×720 calibration): CPU ``cv2.remap``
   fixed point into a preallocated output vs ``torch.nn.functional.grid_sample`` on the GPU
   with the same (fixed-point exact) sample positions, fp32 and fp16.
d) ``nms``: real raw YOLOX-nano outputs (ONNX Runtime CPU on the COCO test images) decoded by
   our ``YoloDetector.decode``; our numpy class-aware NMS vs ``torchvision.ops.batched_nms``
   (or a pure-torch NMS when torchvision is absent), kept sets compared.

Every timing: warm-up, ``torch.cuda.synchronize()`` around each iteration, median (and p10 /
p90) over ``--iters`` (default 200, ≥ 100) iterations. Every result row names the GPU.
Imports: this repo + numpy, cv2, onnxruntime, onnx, torch (+ torchvision / timm / open_clip
when importable; skipped with the reason otherwise).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

MODEL = ROOT / "models" / "yolox_nano.onnx"
IMAGES = ROOT / "test" / "data" / "coco" / "images"
CALIB = ROOT / "test" / "data" / "camera_info" / "camerav1_1280x720.yaml"
SIZE = (1280, 720)

# camerav1_1280x720.yaml, used if the YAML cannot be read (no pyyaml)
CAMERAV1 = dict(
    k=[1269.205765765439, 0, 631.6460880969596, 0, 1265.019086414191, 372.7889469123216,
       0, 0, 1],
    d=[0.03034574724223343, -0.1510961279565394, 0.005326365853523378,
       -0.003855361950537075, 0],
    r=[1, 0, 0, 0, 1, 0, 0, 0, 1],
    p=[1265.966064453125, 0, 627.0156678383282, 0, 0, 1267.384887695312, 374.435156669635, 0,
       0, 0, 1, 0])


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.errors: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.torch = None
        self.device = "cpu"
        self.gpu = "none (cpu)"
        self.iters = args.iters
        self.warmup = args.warmup

    # ------------------------------------------------------------------ infrastructure
    def setup(self) -> dict[str, Any]:
        env: dict[str, Any] = {"python": platform.python_version(), "host": platform.node(),
                               "cpu_count": os.cpu_count(), "numpy": np.__version__}
        for mod in ("cv2", "onnxruntime", "onnx", "torch", "torchvision", "timm", "open_clip"):
            env[f"has_{mod}"] = importlib.util.find_spec(mod) is not None
        import cv2

        env["opencv"] = cv2.__version__
        env["opencv_threads"] = cv2.getNumThreads()
        try:
            import onnxruntime as ort

            env["onnxruntime"] = ort.__version__
            env["ort_providers"] = ort.get_available_providers()
        except Exception as exc:  # noqa: BLE001
            env["onnxruntime"] = f"unavailable: {exc}"
        try:
            import torch

            self.torch = torch
            env["torch"] = torch.__version__
            env["torch_cuda"] = torch.version.cuda
            want = self.args.device
            if want == "auto":
                want = "cuda" if torch.cuda.is_available() else "cpu"
            if want == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("--device cuda but torch sees no CUDA device")
            self.device = want
            if want == "cuda":
                self.gpu = torch.cuda.get_device_name(0)
                props = torch.cuda.get_device_properties(0)
                env["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
                env["gpu_sm_count"] = props.multi_processor_count
                env["compute_capability"] = f"{props.major}.{props.minor}"
                env["cudnn"] = torch.backends.cudnn.version()
                torch.backends.cudnn.benchmark = True
        except ImportError as exc:
            env["torch"] = f"unavailable: {exc}"
        env["device"] = self.device
        env["gpu"] = self.gpu
        return env

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def time_fn(self, fn: Callable[[], Any], iters: int | None = None,
                warmup: int | None = None, cuda: bool = True) -> dict[str, Any]:
        iters = iters or self.iters
        warmup = self.warmup if warmup is None else warmup
        sync = self.sync if cuda else (lambda: None)
        for _ in range(warmup):
            fn()
        sync()
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        a = np.asarray(ts) * 1e3
        return {"median_ms": round(float(np.median(a)), 4),
                "p10_ms": round(float(np.percentile(a, 10)), 4),
                "p90_ms": round(float(np.percentile(a, 90)), 4), "iters": iters,
                "warmup": warmup}

    def add(self, section: str, name: str, device: str, stats: dict[str, Any],
            **extra: Any) -> None:
        row = {"section": section, "name": name, "device": device,
               "gpu": self.gpu if device.startswith("cuda") else f"none (cpu; gpu in machine: "
                                                                   f"{self.gpu})",
               **stats, **extra}
        self.rows.append(row)
        print(f"  {section:<18} {name:<58} {device:<5} "
              f"{stats.get('median_ms', float('nan')):9.3f} ms", flush=True)

    def section(self, name: str, fn: Callable[[], None]) -> None:
        left = self.args.max_seconds - (time.monotonic() - self.t_start)
        if left <= 0:
            self.skipped[name] = f"time budget --max-seconds {self.args.max_seconds} spent"
            return
        print(f"[{name}]", flush=True)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - record and go on
            self.errors[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            print(f"  {name} FAILED: {type(exc).__name__}: {exc}", flush=True)

    def need_torch(self) -> Any:
        if self.torch is None:
            raise RuntimeError("torch is not importable")
        return self.torch

    # ------------------------------------------------------------------ data
    def frames(self, n: int = 8) -> list[np.ndarray]:
        import cv2

        files = sorted(IMAGES.glob("*.jpg"))[:n]
        if not files:
            raise FileNotFoundError(f"no test images in {IMAGES}")
        return [np.ascontiguousarray(cv2.resize(cv2.imread(str(f)), SIZE)) for f in files]

    def camera(self) -> Any:
        from perception2d_ros.geometry.camera import CameraModel

        try:
            return CameraModel.from_yaml(CALIB)
        except Exception:  # noqa: BLE001 - no pyyaml: the same numbers, typed in
            return CameraModel(1280, 720, CAMERAV1["k"], CAMERAV1["d"],
                               distortion_model="plumb_bob", r=CAMERAV1["r"], p=CAMERAV1["p"])

    def ort_detector(self, conf: float = 0.3) -> Any:
        from perception2d_ros.engines.onnxruntime_backend import OrtEngine
        from perception2d_ros.models.yolo.detector import YoloDetector

        engine = OrtEngine(MODEL, device="cpu")
        return YoloDetector(engine, format="yolox", input_size=(416, 416), conf=conf)

    # ------------------------------------------------------------------ (a) models
    def models_yolox(self) -> None:
        torch = self.need_torch()
        from perception2d_ros.engines.onnx_torch import load_onnx_module
        from perception2d_ros.engines.base import TensorSpec
        from perception2d_ros.engines.torch_backend import TorchEngine

        det = self.ort_detector()
        frame = self.frames(1)[0]
        x, _ = det.preprocess(frame)
        x = x.copy()
        ref = det.engine.infer({"images": x})["output"]
        self.add("yolox_nano", "onnxruntime CPU engine.infer (reference)", "cpu",
                 self.time_fn(lambda: det.engine.infer({"images": x}), cuda=False),
                 model="models/yolox_nano.onnx", backend="onnxruntime",
                 threads=det.engine.session.get_session_options().intra_op_num_threads)
        spec = [TensorSpec("images", (1, 3, 416, 416), np.dtype(np.float32))]
        variants = [("fp32 eager", "fp32", False), ("fp16 eager", "fp16", False),
                    ("fp16 + CUDA graph", "fp16", True)]
        for label, prec, graph in variants:
            if self.device != "cuda" and (prec == "fp16" or graph):
                self.skipped[f"yolox_nano {label}"] = "CUDA only"
                continue
            try:
                module = load_onnx_module(str(MODEL))
                eng = TorchEngine(module, spec, ["output"], device=self.device,
                                  precision=prec, cuda_graph=graph)
                out = eng.infer({"images": x})["output"]
                diff = float(np.abs(out - ref).max())
                name = (f"YOLOX-nano (models/yolox_nano.onnx weights via onnx_torch) "
                        f"{label} engine.infer")
                self.add("yolox_nano", name, self.device,
                         self.time_fn(lambda: eng.infer({"images": x})),
                         precision=prec, cuda_graph=graph, batch=1, input="1x3x416x416",
                         includes="numpy->device copy, model, device->numpy copy",
                         max_abs_diff_vs_onnxruntime=diff)
                xt = torch.from_numpy(x).to(self.device)
                if eng.half:
                    xt = xt.half()
                if graph and eng._graphs:
                    g, static_in, _ = next(iter(eng._graphs.values()))
                    static_in[0].copy_(xt)
                    fwd = g.replay
                    what = "CUDA graph replay only (input already in the static buffer)"
                else:
                    def fwd(m=eng.module, t=xt) -> Any:
                        with torch.inference_mode():
                            return m(t)
                    what = "module forward on a device tensor"
                self.add("yolox_nano", f"YOLOX-nano {label} device_forward", self.device,
                         self.time_fn(fwd), precision=prec, cuda_graph=graph, batch=1,
                         includes=what)
                eng.close()
            except Exception as exc:  # noqa: BLE001
                self.errors[f"yolox_nano {label}"] = f"{type(exc).__name__}: {exc}\n" \
                                                     f"{traceback.format_exc()}"
                print(f"  yolox_nano {label} FAILED: {exc}", flush=True)

    def models_clip(self) -> None:
        torch = self.need_torch()
        from perception2d_ros.engines.base import TensorSpec
        from perception2d_ros.engines.torch_backend import TorchEngine

        if importlib.util.find_spec("open_clip") is not None:
            import open_clip

            model = open_clip.create_model("ViT-B-32", pretrained=None).visual
            name = "CLIP ViT-B/32 image tower (open_clip ViT-B-32 .visual, random init)"
        elif importlib.util.find_spec("timm") is not None:
            import timm

            model = timm.create_model("vit_base_patch32_224", pretrained=False, num_classes=0)
            name = ("timm vit_base_patch32_224 (ViT-B/32 geometry of the CLIP image tower, "
                    "random init; open_clip not importable)")
        else:
            self.skipped["clip_vit_b32_image"] = "neither open_clip nor timm is importable"
            return
        spec = [TensorSpec("image", (1, 3, 224, 224), np.dtype(np.float32))]
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        for label, prec, graph in [("fp32 eager", "fp32", False), ("fp16 eager", "fp16", False),
                                   ("fp16 + CUDA graph", "fp16", True)]:
            if self.device != "cuda" and (prec == "fp16" or graph):
                self.skipped[f"clip_vit_b32_image {label}"] = "CUDA only"
                continue
            try:
                import copy

                eng = TorchEngine(copy.deepcopy(model), spec, ["embeds"], device=self.device,
                                  precision=prec, cuda_graph=graph)
                self.add("clip_vit_b32_image", f"{name} {label} engine.infer", self.device,
                         self.time_fn(lambda: eng.infer({"image": x})), precision=prec,
                         cuda_graph=graph, batch=1, input="1x3x224x224")
                xt = torch.from_numpy(x).to(self.device)
                if eng.half:
                    xt = xt.half()

                def fwd(m=eng.module, t=xt) -> Any:
                    with torch.inference_mode():
                        return m(t)
                if graph and eng._graphs:
                    fwd = next(iter(eng._graphs.values()))[0].replay
                self.add("clip_vit_b32_image", f"ViT-B/32 image {label} device_forward",
                         self.device, self.time_fn(fwd), precision=prec, cuda_graph=graph)
                eng.close()
            except Exception as exc:  # noqa: BLE001
                self.errors[f"clip_vit_b32_image {label}"] = f"{type(exc).__name__}: {exc}\n" \
                                                             f"{traceback.format_exc()}"
                print(f"  clip {label} FAILED: {exc}", flush=True)

    def models_sam(self) -> None:
        """SAM ViT-B image encoder (segment_anything, random init) at 1024, batch 1."""
        torch = self.need_torch()
        from perception2d_ros.engines.base import TensorSpec
        from perception2d_ros.engines.torch_backend import TorchEngine

        if importlib.util.find_spec("segment_anything") is None:
            self.skipped["sam_vit_b_encoder"] = "segment_anything not importable"
            return
        from segment_anything import sam_model_registry

        encoder = sam_model_registry["vit_b"](checkpoint=None).image_encoder
        spec = [TensorSpec("image", (1, 3, 1024, 1024), np.dtype(np.float32))]
        x = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
        for label, prec, graph in [("fp32 eager", "fp32", False), ("fp16 eager", "fp16", False),
                                   ("fp16 + CUDA graph", "fp16", True)]:
            if self.device != "cuda" and (prec == "fp16" or graph):
                self.skipped[f"sam_vit_b_encoder {label}"] = "CUDA only"
                continue
            try:
                import copy

                eng = TorchEngine(copy.deepcopy(encoder), spec, ["image_embeddings"],
                                  device=self.device, precision=prec, cuda_graph=graph)
                self.add("sam_vit_b_encoder", f"SAM ViT-B encoder {label} engine.infer",
                         self.device, self.time_fn(lambda: eng.infer({"image": x}),
                                                   iters=min(self.args.iters, 50)),
                         precision=prec, cuda_graph=graph, batch=1, input="1x3x1024x1024")
                eng.close()
            except Exception as exc:  # noqa: BLE001
                self.errors[f"sam_vit_b_encoder {label}"] = f"{type(exc).__name__}: {exc}"
                print(f"  sam {label} FAILED: {exc}", flush=True)
            finally:
                if self.device == "cuda":
                    torch.cuda.empty_cache()

    # ------------------------------------------------------------------ (b) preprocess
    def preprocess(self) -> None:
        torch = self.need_torch()
        import torch.nn.functional as F

        from perception2d_ros.models.yolo.preprocess import Letterbox

        frame = self.frames(1)[0]
        lb = Letterbox(416, align="topleft", color="bgr", scale=1.0, pad_value=114)
        self.add("preprocess", "CPU Letterbox 1280x720 -> 1x3x416x416 float32 (ours)", "cpu",
                 self.time_fn(lambda: lb(frame), cuda=False))
        cpu_tensor = lb(frame)[0].copy()
        meta = lb.geometry(frame.shape[:2])
        nh, nw = meta.resized_hw
        dev = self.device
        host = torch.from_numpy(frame)
        if dev == "cuda":
            host = host.pin_memory()
        out = torch.full((1, 3, 416, 416), 114.0, device=dev)
        dev_frame = torch.empty(frame.shape, dtype=torch.uint8, device=dev)

        def kernels() -> Any:
            x = dev_frame.permute(2, 0, 1).unsqueeze(0).float()
            r = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
            out[:, :, :nh, :nw] = r
            return out

        def total() -> Any:
            dev_frame.copy_(host, non_blocking=True)
            return kernels()

        total()
        self.sync()
        gpu = out.float().cpu().numpy()
        diff = np.abs(gpu - cpu_tensor)
        self.add("preprocess", f"torch[{dev}] pinned H2D + letterbox + NCHW float", dev,
                 self.time_fn(total), max_abs_diff_vs_cpu=float(diff.max()),
                 mean_abs_diff_vs_cpu=round(float(diff.mean()), 4))
        self.add("preprocess", f"torch[{dev}] H2D only (pinned 2.7 MB frame)", dev,
                 self.time_fn(lambda: dev_frame.copy_(host, non_blocking=True)))
        self.add("preprocess", f"torch[{dev}] letterbox kernels only (frame on device)", dev,
                 self.time_fn(kernels))

    # ------------------------------------------------------------------ (c) rectify
    def rectify(self) -> None:
        torch = self.need_torch()
        import cv2
        import torch.nn.functional as F

        cam = self.camera()
        frame = self.frames(1)[0]
        map1, map2 = cam.rectify_maps()
        out = np.empty_like(frame)
        self.add("rectify", f"CPU cv2.remap CV_16SC2 fixed point, preallocated "
                            f"({cv2.getNumThreads()} threads)", "cpu",
                 self.time_fn(lambda: cv2.remap(frame, map1, map2, cv2.INTER_LINEAR, dst=out,
                                                borderMode=cv2.BORDER_CONSTANT), cuda=False))
        ref = cv2.remap(frame, map1, map2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        mx, my = cv2.convertMaps(map1, map2, cv2.CV_32FC1)  # the same sample positions
        h, w = frame.shape[:2]
        grid = np.stack([mx * (2.0 / (w - 1)) - 1.0, my * (2.0 / (h - 1)) - 1.0], axis=-1)
        dev = self.device
        host = torch.from_numpy(frame)
        if dev == "cuda":
            host = host.pin_memory()
        for prec, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            if prec == "fp16" and dev != "cuda":
                self.skipped["rectify grid_sample fp16"] = "CUDA only"
                continue
            g = torch.from_numpy(grid).unsqueeze(0).to(dev, dtype)
            src = host.to(dev)
            res = torch.empty((h, w, 3), dtype=torch.uint8, device=dev)

            def kern(g=g, src=src, res=res, dtype=dtype) -> Any:
                x = src.permute(2, 0, 1).unsqueeze(0).to(dtype)
                y = F.grid_sample(x, g, mode="bilinear", padding_mode="zeros",
                                  align_corners=True)
                res.copy_(y[0].permute(1, 2, 0).round_().clamp_(0, 255))
                return res

            def total(src=src, res=res) -> Any:
                src.copy_(host, non_blocking=True)
                kern()
                return res.cpu()

            kern()
            self.sync()
            diff = np.abs(res.cpu().numpy().astype(np.int16) - ref.astype(np.int16))
            extra = {"max_abs_diff_vs_cv2": int(diff.max()),
                     "mean_abs_diff_vs_cv2": round(float(diff.mean()), 4),
                     "frac_pixels_diff_gt1": round(float((diff > 1).mean()), 5)}
            self.add("rectify", f"torch[{dev}] grid_sample {prec} kernels only (frame on device)", dev,
                     self.time_fn(kern), **extra)
            self.add("rectify", f"torch[{dev}] grid_sample {prec} incl. pinned H2D + D2H", dev,
                     self.time_fn(total), **extra)

    # ------------------------------------------------------------------ (d) NMS
    def nms(self) -> None:
        torch = self.need_torch()
        from perception2d_ros.models.yolo.nms import nms as np_nms

        frames = self.frames(8)
        for conf in (0.001, 0.3):
            det = self.ort_detector(conf=conf)
            cases = []
            for f in frames:
                x, _ = det.preprocess(f)
                pred = det.engine.infer({"images": x})["output"]
                boxes, scores, cls = det.decode(pred)
                cases.append((boxes, scores, cls))
            big = max(cases, key=lambda c: c[0].shape[0])
            boxes, scores, cls = big
            n = int(boxes.shape[0])
            iou = 0.45
            self.add("nms", f"numpy class-aware NMS (ours), conf {conf}, {n} candidates", "cpu",
                     self.time_fn(lambda: np_nms(boxes, scores, iou, class_ids=cls,
                                                 max_det=100), cuda=False),
                     candidates=n, source="real YOLOX-nano outputs (ONNX Runtime CPU)")
            keep_np = np_nms(boxes, scores, iou, class_ids=cls, max_det=100)
            dev = self.device
            if importlib.util.find_spec("torchvision") is not None:
                import torchvision

                def gpu_nms(b: Any, s: Any, c: Any) -> Any:
                    return torchvision.ops.batched_nms(b, s, c, iou)[:100]
                impl = "torchvision.ops.batched_nms"
            else:
                gpu_nms = _torch_batched_nms(torch, iou)
                impl = "pure-torch batched NMS (torchvision not importable)"
            bt = torch.from_numpy(boxes).to(dev)
            st = torch.from_numpy(scores).to(dev)
            ct = torch.from_numpy(cls).to(dev)
            keep_t = gpu_nms(bt, st, ct).cpu().numpy()
            agree = sorted(keep_t.tolist()) == sorted(keep_np.tolist())
            self.add("nms", f"{impl}, conf {conf}, {n} candidates (on device)", dev,
                     self.time_fn(lambda: gpu_nms(bt, st, ct)), candidates=n,
                     same_kept_set_as_numpy=agree, kept=int(keep_t.size))

            def with_copy() -> Any:
                b = torch.from_numpy(boxes).to(dev, non_blocking=True)
                s = torch.from_numpy(scores).to(dev, non_blocking=True)
                c = torch.from_numpy(cls).to(dev, non_blocking=True)
                return gpu_nms(b, s, c).cpu()
            self.add("nms", f"{impl}, conf {conf}, incl. H2D of candidates + D2H of keep",
                     dev, self.time_fn(with_copy), candidates=n)


def _torch_batched_nms(torch: Any, iou: float) -> Callable[..., Any]:
    def run(boxes: Any, scores: Any, cls: Any) -> Any:
        if boxes.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=boxes.device)
        off = cls.to(boxes.dtype) * (boxes.max() - boxes.min() + 1)
        b = boxes + off[:, None]
        order = scores.argsort(descending=True)
        b = b[order]
        x1, y1, x2, y2 = b.unbind(1)
        area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
        xx1 = torch.maximum(x1[:, None], x1[None])
        yy1 = torch.maximum(y1[:, None], y1[None])
        xx2 = torch.minimum(x2[:, None], x2[None])
        yy2 = torch.minimum(y2[:, None], y2[None])
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        ious = inter / (area[:, None] + area[None] - inter).clamp(min=1e-9)
        sup = (ious > iou).triu(1).cpu().numpy()
        keep, removed = [], np.zeros(sup.shape[0], bool)
        for i in range(sup.shape[0]):
            if not removed[i]:
                keep.append(i)
                removed |= sup[i]
        return order[torch.as_tensor(keep, device=boxes.device)]
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="write the JSON table here")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--quick", action="store_true", help="10 iterations (smoke test)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 200)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 20)")
    ap.add_argument("--max-seconds", type=float, default=270.0,
                    help="skip the remaining sections after this long (default 270)")
    ap.add_argument("--sections", default="yolox,clip,sam,preprocess,rectify,nms",
                    help="comma-separated subset")
    args = ap.parse_args(argv)
    if args.iters is None:
        args.iters = 10 if args.quick else 200
    if args.warmup is None:
        args.warmup = 2 if args.quick else 20
    b = Bench(args)
    env = b.setup()
    print(f"gpu_bench: device {b.device}, gpu {b.gpu}, torch {env.get('torch')}, "
          f"{args.iters} iterations", flush=True)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    table = {"yolox": b.models_yolox, "clip": b.models_clip, "sam": b.models_sam,
             "preprocess": b.preprocess,
             "rectify": b.rectify, "nms": b.nms}
    for name in wanted:
        if name not in table:
            b.errors[name] = f"unknown section (known: {sorted(table)})"
            continue
        b.section(name, table[name])
    result = {"script": "benchmarks/gpu_bench.py",
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "gpu": b.gpu, "device": b.device, "quick": args.quick,
              "timing": "warm-up, then per iteration: perf_counter around the call + "
                        "torch.cuda.synchronize(); median/p10/p90 in ms",
              "env": env, "results": b.rows, "skipped": b.skipped, "errors": b.errors,
              "elapsed_s": round(time.monotonic() - b.t_start, 1)}
    text = json.dumps(result, indent=2, default=str)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    print(f"gpu_bench: {len(b.rows)} rows, {len(b.errors)} errors, {len(b.skipped)} skipped, "
          f"{result['elapsed_s']} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
