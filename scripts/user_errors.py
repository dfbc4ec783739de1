#!/usr/bin/env python3
"""Every user-error case we try, run the way a user runs it, and the line each one prints.

    python scripts/user_errors.py            # run all cases, print the table
    python scripts/user_errors.py --write    # ... and put it in docs/RELIABILITY.md

Each case is a real command (``perception2d …``, ``make demo BAG=…``) run as a subprocess
on inputs built here from the repo's test data (a 2-frame bag, then empty / garbage /
truncated copies, params files with one mistake each, a truncated JPEG, a corrupt ONNX).
``test/cli/test_user_errors.py`` runs the same cases and asserts: exit code 1 or 2, exactly one
line on stderr naming the problem, no traceback. Run it from the repo root with the ROS
environment (``bash scripts/run_with_ros_env.sh .venv/bin/python scripts/user_errors.py``).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE_BEGIN = "<!-- user-errors:begin (scripts/user_errors.py --write) -->"
TABLE_END = "<!-- user-errors:end -->"


@dataclass(frozen=True)
class Case:
    """One mistake. ``argv``: the command, ``{d}`` = the fixture folder. ``expect``: words
    the one error line must contain. ``gpu_free``: only meaningful without a CUDA GPU."""

    name: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    codes: tuple[int, ...] = (1, 2)
    gpu_free: bool = False
    stdout_expect: tuple[str, ...] = field(default_factory=tuple)

    def command(self, d: Path) -> list[str]:
        return [a.replace("{d}", str(d)) for a in self.argv]

    def shown(self) -> str:
        """The command as a user types it (fixture paths shortened)."""
        return " ".join(a.replace("{d}/", "") for a in self.argv)


P = ("perception2d",)
CASES: list[Case] = [
    # item 1: bags, outputs, params files
    Case("process: missing bag", P + ("process", "{d}/missing.mcap", "-o", "{d}/out.mcap"),
         ("missing.mcap", "does not exist")),
    Case("process: empty bag", P + ("process", "{d}/empty.mcap", "-o", "{d}/out.mcap"),
         ("empty.mcap", "empty")),
    Case("process: garbage bag", P + ("process", "{d}/garbage.mcap", "-o", "{d}/out.mcap"),
         ("garbage.mcap", "cannot read bag")),
    Case("process: truncated bag", P + ("process", "{d}/truncated.mcap", "-o", "{d}/out.mcap"),
         ("truncated.mcap", "truncated")),
    Case("process: output exists", P + ("process", "{d}/good.mcap", "-o", "{d}/good.mcap"),
         ("exists already", "--overwrite")),
    Case("process: output directory missing",
         P + ("process", "{d}/good.mcap", "-o", "{d}/no_such_dir/out.mcap"),
         ("no_such_dir", "does not exist")),
    Case("process: params file missing",
         P + ("process", "{d}/good.mcap", "-o", "{d}/out.mcap", "--params-file",
              "{d}/missing.yaml"), ("missing.yaml", "not found")),
    Case("process: params file not YAML",
         P + ("process", "{d}/good.mcap", "-o", "{d}/out.mcap", "--params-file",
              "{d}/not_yaml.yaml"), ("not valid YAML", "line")),
    Case("process: unknown stage",
         P + ("process", "{d}/good.mcap", "-o", "{d}/out.mcap", "--params-file",
              "{d}/unknown_stage.yaml"), ("stages", "segment")),
    Case("process: conf_threshold 5.0",
         P + ("process", "{d}/good.mcap", "-o", "{d}/out.mcap", "--params-file",
              "{d}/conf_threshold.yaml"), ("detect.conf_threshold", "[0, 1]")),
    Case("process: unknown model",
         P + ("process", "{d}/good.mcap", "-o", "{d}/out.mcap", "--params-file",
              "{d}/unknown_model.yaml"), ("yolo_nonexistent", "models list")),
    Case("process: sam without weights",
         P + ("process", "{d}/good.mcap", "-o", "{d}/out.mcap", "--params-file",
              "{d}/sam_no_weights.yaml"), ("sam_vit_b", "models fetch sam_vit_b")),
    Case("process: unknown backend",
         P + ("process", "{d}/good.mcap", "-o", "{d}/out.mcap", "--params-file",
              "{d}/bad_backend.yaml"), ("detect.backend", "tensorrt, onnxruntime, torch")),
    Case("process: bag without the camera topic",
         P + ("process", "{d}/good.mcap", "-o", "{d}/out.mcap", "--namespace", "/other"),
         ("/other", "--image-topic")),
    Case("bringup: params file missing",
         P + ("bringup", "--params-file", "{d}/missing.yaml"), ("missing.yaml", "not found")),
    Case("bringup: unknown stage",
         P + ("bringup", "--params-file", "{d}/unknown_stage.yaml"), ("stages", "segment")),
    Case("bringup: conf_threshold 5.0",
         P + ("bringup", "--params-file", "{d}/conf_threshold.yaml"),
         ("detect.conf_threshold",)),
    Case("bringup: unknown model",
         P + ("bringup", "--params-file", "{d}/unknown_model.yaml"), ("yolo_nonexistent",)),
    Case("bringup: sam without weights",
         P + ("bringup", "--params-file", "{d}/sam_no_weights.yaml"),
         ("sam.model", "models fetch sam_vit_b")),
    Case("make demo: missing bag", ("make", "-s", "demo", "BAG={d}/missing.mcap"),
         ("missing.mcap", "does not exist")),
    Case("make demo: garbage bag", ("make", "-s", "demo", "BAG={d}/garbage.mcap"),
         ("garbage.mcap", "cannot read bag")),
    # item 2: a model file that cannot be parsed
    Case("detect: corrupt --model file",
         P + ("detect", "{d}/image.jpg", "--model", "{d}/corrupt.onnx"),
         ("corrupt.onnx", "cannot be parsed", "sha256", "models verify")),
    # item 3: explicit device / backend requests
    Case("detect: --device cuda without a GPU", P + ("detect", "{d}/image.jpg", "--device",
                                                     "cuda"),
         ("device cuda",), gpu_free=True),
    Case("detect: --backend torch --device cuda without a GPU",
         P + ("detect", "{d}/image.jpg", "--backend", "torch", "--device", "cuda"),
         ("'torch' on device cuda", "not available"), gpu_free=True),
    Case("process: detect.device cuda without a GPU",
         P + ("process", "{d}/good.mcap", "-o", "{d}/out.mcap", "--params-file",
              "{d}/device_cuda.yaml"), ("device cuda",), gpu_free=True),
    # item 4: truncated images are skipped, the others still run
    Case("detect: a truncated JPEG in the batch",
         P + ("detect", "{d}/truncated.jpg", "{d}/image.jpg"),
         ("truncated.jpg", "truncated JPEG", "skipped"), codes=(1,),
         stdout_expect=("image.jpg",)),
    # item 6: advice that works
    Case("detect: a user-export model that is not there", P + ("detect", "{d}/image.jpg",
                                                               "--model", "yolov8n"),
         ("yolov8n", "yolo export")),
    Case("models fetch: offline", P + ("models", "fetch", "clip_vit_b32", "--models-dir",
                                       "{d}/models", "--url", "http://127.0.0.1:9/ViT-B-32.pt",
                                       "--retries", "0", "--quiet"),
         ("no network", "ViT-B-32.pt", "sha256")),
    # item 10: every model parameter confined to models_dir
    Case("process: sam.checkpoint outside models_dir",
         P + ("process", "{d}/good.mcap", "-o", "{d}/out.mcap", "--params-file",
              "{d}/outside.yaml"), ("sam.checkpoint", "allow_outside_models_dir")),
]


def build_fixtures(d: Path) -> None:
    """The inputs every case needs, from the repo's own test data."""
    import cv2

    d.mkdir(parents=True, exist_ok=True)
    images = d / "images"
    images.mkdir(exist_ok=True)
    src = sorted((ROOT / "test" / "data" / "coco" / "images").glob("*.jpg"))[:2]
    for f in src:
        (images / f.name).write_bytes(f.read_bytes())
    (d / "image.jpg").write_bytes(src[0].read_bytes())
    data = src[0].read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    if not (d / "good.mcap").exists():
        subprocess.run([sys.executable, "-m", "perception2d_ros.cli.main", "bag", "make",
                        "--images", str(images), "--camera-info",
                        str(ROOT / "test" / "data" / "camera_info" / "left_plumb_bob.yaml"),
                        "--rate", "4", "--resize", "640x480", "--namespace", "/camera",
                        str(d / "good.mcap")], check=True, capture_output=True)
    good = (d / "good.mcap").read_bytes()
    (d / "truncated.mcap").write_bytes(good[: len(good) // 2])
    (d / "empty.mcap").write_bytes(b"")
    (d / "garbage.mcap").write_bytes(bytes(range(256)) * 12)
    onnx = (ROOT / "models" / "yolox_nano.onnx").read_bytes()
    (d / "corrupt.onnx").write_bytes(onnx[: len(onnx) // 5])
    (d / "models").mkdir(exist_ok=True)
    (d / "sam.pth").write_bytes(b"not a checkpoint")
    params = {
        "not_yaml": "a: [b\n",
        "unknown_stage": "stages: [rectify, detect, segment]",
        "conf_threshold": "detect.conf_threshold: 5.0",
        "unknown_model": "detect.model: yolo_nonexistent",
        "sam_no_weights": "stages: [rectify, detect, sam]\n    sam.model: sam_vit_b",
        "bad_backend": "detect.backend: tensorrtt",
        "device_cuda": "detect.device: cuda",
        "outside": f"stages: [rectify, detect, sam]\n    sam.checkpoint: {d / 'sam.pth'}",
    }
    for name, body in params.items():
        text = body if name == "not_yaml" else f"/**:\n  ros__parameters:\n    {body}\n"
        (d / f"{name}.yaml").write_text(text)


def run_case(case: Case, d: Path, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run ``case`` as a user does: ``perception2d`` is the package's console entry point."""
    argv = case.command(d)
    if argv[0] == "perception2d":
        argv = [sys.executable, "-m", "perception2d_ros.cli.main"] + argv[1:]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PERCEPTION2D_DEBUG", None)
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """The lines a user reads on stderr (make's own 'Error 1' trailer left out)."""
    return [ln for ln in stderr.splitlines()
            if ln.strip() and not re.match(r"make(\[\d+\])?: \*\*\*", ln)]


def gpu_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def table(rows: list[tuple[Case, int, str]]) -> str:
    out = [TABLE_BEGIN, "", "| case | command | exit | the line printed |", "|---|---|---|---|"]
    for case, rc, line in rows:
        cell = line.replace("|", "\\|")
        out.append(f"| {case.name} | `{case.shown()}` | {rc} | {cell} |")
    out += ["", TABLE_END]
    return "\n".join(out)


def main() -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="update docs/RELIABILITY.md")
    args = ap.parse_args()
    gpu = gpu_visible()
    rows = []
    with tempfile.TemporaryDirectory(prefix="p2d_user_errors_") as tmp:
        d = Path(tmp)
        build_fixtures(d)
        for case in CASES:
            if case.gpu_free and gpu:
                continue
            res = run_case(case, d)
            lines = error_lines(res.stderr)
            line = lines[-1] if lines else ""
            line = line.replace(str(d) + "/", "").replace(str(ROOT), "<repo>")
            rows.append((case, res.returncode, line))
            print(f"{res.returncode:>3}  {case.name}: {line}", flush=True)
    text = table(rows)
    if args.write:
        doc = ROOT / "docs" / "RELIABILITY.md"
        body = doc.read_text()
        if TABLE_BEGIN in body:
            head, rest = body.split(TABLE_BEGIN, 1)
            body = head + text + rest.split(TABLE_END, 1)[1]
        else:
            body = body.rstrip() + "\n\n" + text + "\n"
        doc.write_text(body)
        print(f"wrote the table to {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
