"""``perception2d models export``: an official checkpoint -> ONNX through the export recipe
of its manifest entry (``export: {module, arch}``; only the suite's own modules are imported),
then an ONNX Runtime smoke run, the parity check on the shipped real image, and the exported
files recorded in the models dir's local overlay.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

from perception2d_ros.cli.models_common import (EXIT_FAIL, EXIT_OK, EXIT_UNAVAILABLE,
                                                EXIT_USAGE, err)

RANDOM_DIR = "random-weights"
# A manifest names the module that exports a model; only the suite's own modules are
# imported (a models directory handed over by someone else cannot run arbitrary code).
EXPORT_MODULE_PREFIXES = ("perception2d_ros.models.",)


def _sample(models_dir: str | None) -> tuple[Path, Any, Any]:
    """The shipped real image (from the models dir, else the package's) and its boxes."""
    import cv2
    import numpy as np

    from perception2d_ros.engines import model_store as ms

    entry = ms.load_manifest(models_dir)["sample_image"]
    candidates = [ms.entry_path(entry, models_dir), ms._source_models_dir() / entry.file]
    for path in candidates:
        if path.is_file():
            ms.verify_file(path, entry.sha256, entry.name, entry)
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise ms.ModelFileError(f"cannot decode {path}")
            boxes = np.asarray(entry.extra.get("boxes_xyxy") or [], dtype=np.float32)
            return path, image, boxes.reshape(-1, 4)
    raise ms.ModelFileError(f"sample image {entry.file} not found in {candidates}")


class SmokeWarning(Exception):
    """The model ran only with shapes other than the ones its signature declares."""


def _smoke_run(path: Path, image_hw: tuple[int, int]) -> str:
    """Load the ONNX in ONNX Runtime (CPU) and run it once on synthetic inputs (zeros,
    dynamic dims 1). Raises on failure; :class:`SmokeWarning` when the failure is only a
    dynamic non-batch axis that does not accept 1 (a signature defect, not a broken model:
    the parity check on the real image decides)."""
    import numpy as np

    from perception2d_ros.engines.onnxruntime_backend import OrtEngine

    engine = OrtEngine(path, device="cpu", threads=2)
    try:
        feeds = {}
        for spec in engine.inputs:
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape)
            arr = np.zeros(shape, dtype=spec.dtype)
            if arr.ndim == 1 and arr.shape[0] == 2 and "size" in spec.name.lower():
                arr[:] = image_hw  # e.g. SAM decoder orig_im_size
            feeds[spec.name] = arr
        try:
            outs = engine.infer(feeds)
        except Exception as exc:
            dynamic = [f"{s.name}{s.shape_str}" for s in engine.inputs
                       if any(not (isinstance(d, int) and d > 0) for d in s.shape[1:])]
            if dynamic:
                raise SmokeWarning(
                    f"inputs {', '.join(dynamic)} declare dynamic axes beyond the batch but "
                    f"the model does not run with size 1 there ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:300]})") from exc
            raise
        bad = [k for k, v in outs.items()
               if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
        if bad:
            raise RuntimeError(f"non-finite outputs {bad}")
        return ", ".join(f"{k}{list(v.shape)}" for k, v in outs.items())
    finally:
        engine.close()


def _parity_ok(result: Any) -> bool:
    if isinstance(result, dict):
        for key in ("ok", "passed", "pass"):
            if key in result:
                return bool(result[key])
    return True  # the module raises on failure otherwise


def _plain(value: Any) -> Any:
    """YAML-safe copy of a parity report (numpy scalars, paths, nested)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None:
        return None
    for plain in (bool, int, float, str):  # numpy float64 is a float: make it a plain one
        if isinstance(value, plain):
            return plain(value)
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def cmd_export(args: argparse.Namespace) -> int:
    from perception2d_ros.engines import model_store as ms

    root = ms.models_dir(args.models_dir)
    manifest = ms.load_manifest(args.models_dir)
    entry = manifest.get(args.name)
    if entry is None:
        err(f"unknown model '{args.name}'; known: {', '.join(manifest)}")
        return EXIT_USAGE
    recipe = None if entry.exported else entry.extra.get("export")
    if not isinstance(recipe, dict) or not recipe.get("module") or not recipe.get("arch"):
        exportable = [n for n, e in manifest.items() if isinstance(e.extra.get("export"), dict)]
        err(f"'{args.name}' has no export recipe; exportable: {', '.join(exportable)}")
        return EXIT_USAGE
    if args.random_weights and args.checkpoint:
        err("--random-weights and --checkpoint exclude each other")
        return EXIT_USAGE
    if not str(recipe["module"]).startswith(EXPORT_MODULE_PREFIXES):
        err(f"'{args.name}': export module '{recipe['module']}' is not one of the suite's "
             f"({', '.join(EXPORT_MODULE_PREFIXES)}*); refusing to import it")
        return EXIT_USAGE
    from perception2d_ros.engines.extras import MissingExtra, require_torch

    try:
        require_torch(f"`perception2d models export {args.name}`")
    except MissingExtra as exc:
        err(str(exc))
        return EXIT_UNAVAILABLE
    try:
        module = importlib.import_module(recipe["module"])
        export_onnx, parity_check = module.export_onnx, module.parity_check
    except (ImportError, AttributeError) as exc:
        err(f"export of {entry.kind} models is not available in this build "
             f"({recipe['module']}: {exc})")
        return EXIT_UNAVAILABLE
    arch = recipe["arch"]
    checkpoint: Path | None
    ckpt_sha: str | None = None
    official = False
    if args.random_weights:
        seed = 0 if args.seed is None else args.seed
        checkpoint = None
        out_dir = root / RANDOM_DIR
        print(f"*** RANDOM WEIGHTS (seed {seed}): tests the export path only; the ONNX files "
              f"are NOT usable models. Written to {out_dir}, never used by default. ***",
              file=sys.stderr)
    else:
        seed = args.seed
        out_dir = root
        try:
            if args.checkpoint:
                checkpoint = Path(args.checkpoint).expanduser().resolve()
                if not checkpoint.is_file():
                    raise ms.ModelFileError(f"checkpoint not found: {checkpoint}")
                ckpt_sha = ms.sha256_file(checkpoint)
                official = bool(entry.sha256) and ckpt_sha == entry.sha256
                if entry.sha256 and not official:
                    print(f"warning: {checkpoint} is not the official {entry.file} (sha256 "
                          f"{ckpt_sha} != {entry.sha256}); exporting it anyway",
                          file=sys.stderr)
            else:
                checkpoint, _ = ms.resolve(args.name, args.models_dir)
                ckpt_sha = ms.sha256_file(checkpoint)
                official = bool(entry.sha256)
        except ms.ModelFileError as exc:
            err(str(exc))
            return EXIT_FAIL
    try:
        sample_path, image, boxes = _sample(args.models_dir)
    except (ms.ModelFileError, KeyError, ImportError) as exc:
        err(f"no real image for the parity check: {exc}")
        return EXIT_FAIL
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err(f"cannot write to {out_dir} ({exc}); choose a writable --models-dir")
        return EXIT_FAIL

    t0 = time.monotonic()
    print(f"exporting {args.name} ({arch}) from "
          f"{'random weights' if checkpoint is None else checkpoint} -> {out_dir}",
          file=sys.stderr)
    try:
        outputs = export_onnx(arch, checkpoint, out_dir, seed=seed)
    except Exception as exc:  # noqa: BLE001 - report any export failure cleanly
        err(f"export of {args.name} failed: {type(exc).__name__}: {exc}")
        return EXIT_FAIL
    outputs = {str(k): Path(v).resolve() for k, v in dict(outputs).items()}
    t_export = time.monotonic() - t0
    for key, path in outputs.items():
        if not path.is_file() or (root not in path.parents):
            err(f"export produced '{key}' at {path}, which is not a file inside {root}")
            return EXIT_FAIL

    smoke: dict[str, str] = {}
    for key, path in outputs.items():
        if path.suffix != ".onnx":
            continue
        try:
            smoke[key] = _smoke_run(path, image.shape[:2])
        except SmokeWarning as exc:
            smoke[key] = f"warning: {exc}"
            print(f"WARNING: smoke run of {path.name}: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # noqa: BLE001
            err(f"ONNX Runtime smoke run of {path.name} failed: {type(exc).__name__}: {exc}")
            return EXIT_FAIL
        print(f"smoke run ok: {path.name} -> {smoke[key]}", file=sys.stderr)

    params = list(inspect.signature(parity_check).parameters.values())
    names = {p.name for p in params}
    positional = [image]
    kwargs: dict[str, Any] = {}
    if "boxes" in names:
        kwargs["boxes"] = boxes
    elif "boxes_xyxy" in names:
        kwargs["boxes_xyxy"] = boxes  # CLIP: crops of the sample's objects too
    elif (len(params) > 4 and params[4].default is inspect.Parameter.empty
          and params[4].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                 inspect.Parameter.POSITIONAL_OR_KEYWORD)):
        positional.append(boxes)  # parity_check(arch, checkpoint, exported, image, boxes)
    if "seed" in names:
        kwargs["seed"] = seed
    try:
        report = parity_check(arch, checkpoint, outputs, *positional, **kwargs)
    except Exception as exc:  # noqa: BLE001
        err(f"parity check of {args.name} failed: {type(exc).__name__}: {exc}")
        return EXIT_FAIL
    passed = _parity_ok(report)
    print(f"parity on {sample_path.name} ({'PASS' if passed else 'FAIL'}): "
          f"{json.dumps(_plain(report), default=str)}", file=sys.stderr)

    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    suffix = "_random" if checkpoint is None else ""
    overlay: dict[str, dict[str, Any]] = {}
    for key, path in outputs.items():
        overlay[f"{args.name}_{key}{suffix}"] = {
            "kind": entry.kind,
            "file": path.relative_to(root).as_posix(),
            "format": "onnx" if path.suffix == ".onnx" else path.suffix.lstrip(".") or None,
            "sha256": ms.sha256_file(path),
            "size": path.stat().st_size,
            "licence": entry.licence,
            "source": (f"RANDOM WEIGHTS (seed {seed}, {arch}), for testing the export path "
                       "only; by `perception2d models export --random-weights`"
                       if checkpoint is None else
                       f"exported from {checkpoint.name} ({arch}) by `perception2d models "
                       "export`"),
            "stages": list(entry.stages or []),
            "input_size": entry.input_size,
            "exported_from": args.name,
            "output": key,
            "arch": arch,
            "checkpoint_sha256": ckpt_sha,
            "official_checkpoint": official,
            "random_weights": checkpoint is None,
            "seed": seed,
            "parity": _plain(report),
            "parity_passed": passed,
            "smoke": smoke.get(key),
            "created": created,
        }
    try:
        ov = ms.write_overlay_entries(args.models_dir, overlay)
    except (OSError, ValueError) as exc:
        err(f"cannot record the exported files: {exc}")
        return EXIT_FAIL
    for name, spec in overlay.items():
        print(f"{name}: {root / spec['file']} sha256 {spec['sha256']}")
    print(f"recorded in {ov} ({t_export:.1f} s export, {time.monotonic() - t0:.1f} s total)")
    if not passed:
        err(f"parity check of {args.name} did not pass (files kept, marked "
             "parity_passed: false)")
        return EXIT_FAIL
    return EXIT_OK

