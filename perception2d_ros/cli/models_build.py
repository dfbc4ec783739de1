"""``perception2d models build``: the TensorRT engine of an ONNX model, built into the engine
cache (or ``--check``: does a cached engine match this GPU / TensorRT / ONNX)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from perception2d_ros.cli.models_common import (EXIT_FAIL, EXIT_OK, EXIT_UNAVAILABLE,
                                                EXIT_USAGE, err)


def _parse_profiles(items: list[str]) -> dict[str, list[list[int]]]:
    """``["x=1x3/4x3/8x3"]`` -> ``{"x": [[1, 3], [4, 3], [8, 3]]}``."""
    out: dict[str, list[list[int]]] = {}
    for item in items:
        name, _, spec = item.partition("=")
        shapes = spec.split("/")
        try:
            dims = [[int(d) for d in s.split("x")] for s in shapes]
        except ValueError:
            dims = []
        if not name or len(dims) != 3 or len({len(d) for d in dims}) != 1:
            raise ValueError(f"--profile '{item}': expected INPUT=MIN/OPT/MAX with shapes "
                             "like 1x3x224x224")
        out[name] = dims
    return out


def cmd_build(args: argparse.Namespace) -> int:
    from perception2d_ros.engines import model_store as ms
    from perception2d_ros.engines.base import EngineError, default_cache_dir, onnx_sha256
    from perception2d_ros.engines.tensorrt_backend import (TensorRTEngine, engine_cache_key,
                                                           tensorrt_available)

    ok, why = tensorrt_available()
    if not ok:
        err(f"cannot build a TensorRT engine on this machine: {why}. Build on the target "
             f"machine (CUDA GPU + TensorRT 10+): `perception2d models build {args.name} "
             f"--precision {args.precision}`. Here the stages run with ONNX Runtime.")
        return EXIT_UNAVAILABLE
    try:
        path, entry = ms.resolve(args.name, args.models_dir)
    except ms.ModelFileError as exc:
        err(str(exc))
        return EXIT_FAIL
    if path.suffix != ".onnx":
        err(f"{path} is not an ONNX model; export it first (`perception2d models export`)")
        return EXIT_USAGE
    try:
        profiles = (_parse_profiles(args.profile) if args.profile
                    else (entry.extra.get("profiles") if entry else None) or {})
    except ValueError as exc:
        err(str(exc))
        return EXIT_USAGE
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.check:
        import tensorrt as trt
        import torch

        props = torch.cuda.get_device_properties(0)
        key = engine_cache_key(
            onnx_sha256(path), args.precision,
            {k: [tuple(s) for s in v] for k, v in profiles.items()},
            trt.__version__, props.name, f"{props.major}.{props.minor}")
        engine_path = cache_dir / "trt" / f"{path.stem}-{args.precision}-{key}.engine"
        others = sorted(p for p in (cache_dir / "trt").glob(f"{path.stem}-{args.precision}-*"
                                                             ".engine") if p != engine_path)
        print(f"GPU {props.name} (sm {props.major}.{props.minor}), TensorRT {trt.__version__}")
        if engine_path.is_file():
            print(f"cached engine matches: {engine_path}")
            return EXIT_OK
        print(f"no cached engine for this ONNX/precision/GPU/TensorRT (would be {engine_path})")
        for p in others:
            print(f"  stale (other GPU, TensorRT or ONNX): {p}")
        return EXIT_FAIL
    if args.precision == "int8" and not args.calibration_cache:
        err("int8 needs --calibration-cache FILE")
        return EXIT_USAGE
    t0 = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    progress(f"building {args.precision} engine for {path.name} (workspace "
             f"{args.workspace} MiB) — this can take minutes")
    try:
        engine = TensorRTEngine(
            path, precision=args.precision, profiles=profiles, cache_dir=cache_dir,
            workspace_mb=args.workspace, rebuild=args.rebuild,
            int8_calibration_cache=args.calibration_cache, progress=progress)
    except EngineError as exc:
        err(str(exc))
        return EXIT_FAIL
    print(f"engine: {engine.engine_path} ({time.monotonic() - t0:.1f} s)")
    engine.close()
    return EXIT_OK
