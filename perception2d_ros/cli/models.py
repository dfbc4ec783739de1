"""``perception2d models``: list / fetch / export / build / verify the suite's models.

Every command takes ``--models-dir DIR`` (else ``$PERCEPTION2D_MODELS_DIR``, else the source
checkout's ``models/``, else the installed share). Heavy modules (onnxruntime, torch, the
export modules, tensorrt) are imported inside the commands.
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

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
RANDOM_DIR = "random-weights"
# A manifest names the module that exports a model; only the suite's own modules are
# imported (a models directory handed over by someone else cannot run arbitrary code).
EXPORT_MODULE_PREFIXES = ("perception2d_ros.models.",)


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------- parser
def add_parser(subparsers: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--models-dir", metavar="DIR", default=None,
                        help="models directory (default: $PERCEPTION2D_MODELS_DIR, the source "
                             "checkout's models/, the installed share)")
    p = subparsers.add_parser("models", help="list/fetch/export/build/verify models",
                              description=__doc__.splitlines()[0])
    p.set_defaults(func=lambda args: (p.print_help(), EXIT_USAGE)[1])
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")

    ls = sub.add_parser("list", parents=[common], help="every model the suite knows")
    ls.add_argument("--json", action="store_true",
                    help='machine-readable: [{"name","kind","present","sha256_ok","licence",'
                         '"path",...}]')
    ls.set_defaults(func=cmd_list)

    fe = sub.add_parser("fetch", parents=[common],
                        help="download models (resumable, sha256-verified)")
    fe.add_argument("names", nargs="+", metavar="NAME")
    fe.add_argument("--url", default=None, help="download from this URL instead of the "
                    "manifest's (one NAME only; still verified against the manifest sha256)")
    fe.add_argument("--allow-unverified", action="store_true",
                    help="fetch a model whose sha256 is unknown (reported as unverified)")
    fe.add_argument("--timeout", type=float, default=30.0, help="socket timeout, s")
    fe.add_argument("--retries", type=int, default=5,
                    help="reconnects in a row without progress before giving up")
    fe.add_argument("--quiet", action="store_true", help="no progress bar")
    fe.set_defaults(func=cmd_fetch)

    ex = sub.add_parser("export", parents=[common],
                        help="official checkpoint -> ONNX, smoke run + parity check")
    ex.add_argument("name", metavar="NAME")
    ex.add_argument("--checkpoint", default=None, metavar="PATH",
                    help="checkpoint file (default: the manifest file in the models dir)")
    ex.add_argument("--random-weights", action="store_true",
                    help="TESTING ONLY: export randomly initialised weights (no checkpoint); "
                         f"written to <models-dir>/{RANDOM_DIR}/, never used by default")
    ex.add_argument("--seed", type=int, default=None, help="seed for --random-weights")
    ex.set_defaults(func=cmd_export)

    bu = sub.add_parser("build", parents=[common],
                        help="build the TensorRT engine of an ONNX model into the cache")
    bu.add_argument("name", metavar="NAME")
    bu.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                    help="engine precision (default fp32, the nodes' detect.precision default; "
                         "TensorRT 11: fp16 needs an fp16 ONNX export, int8 a Q/DQ ONNX)")
    bu.add_argument("--workspace", type=int, default=2048, metavar="MB",
                    help="TensorRT workspace, MiB")
    bu.add_argument("--check", action="store_true",
                    help="only report whether a cached engine matches this GPU/TensorRT")
    bu.add_argument("--calibration-cache", default=None, metavar="FILE",
                    help="int8 calibration cache")
    bu.add_argument("--cache-dir", default=None, metavar="DIR",
                    help="engine cache (default: $PERCEPTION2D_CACHE_DIR or "
                         "~/.cache/perception2d)")
    bu.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    bu.add_argument("--profile", action="append", default=[], metavar="INPUT=MIN/OPT/MAX",
                    help="shape profile of a dynamic input, e.g. point_coords=1x1x2/8x3x2/"
                         "32x16x2 (repeatable; default: the manifest entry's `profiles`). Use "
                         "the stage's profiles so the cached engine matches what it asks for")
    bu.set_defaults(func=cmd_build)

    ve = sub.add_parser("verify", parents=[common],
                        help="check every present file against the manifest sha256")
    ve.add_argument("names", nargs="*", metavar="NAME", help="only these (default: all)")
    ve.set_defaults(func=cmd_verify)


# --------------------------------------------------------------------------- list
def _rows(models_dir: str | None) -> list[dict[str, Any]]:
    from perception2d_ros.engines import fetch, model_store as ms

    root = ms.models_dir(models_dir)
    rows = []
    for entry in ms.load_manifest(models_dir).values():
        path = ms.entry_path(entry, root)
        present, ok = ms.check_entry(entry, root)
        part = fetch.part_path(path)
        rows.append({
            "name": entry.name,
            "kind": entry.kind,
            "present": present,
            "sha256_ok": ok,
            "licence": entry.licence,
            "path": str(path),
            "provision": "export" if entry.exported else entry.provision,
            "size": path.stat().st_size if present else entry.size,
            "sha256": entry.sha256,
            "stages": list(entry.stages or []),
            "format": entry.format,
            "url": entry.url,
            "random_weights": bool(entry.extra.get("random_weights", False)),
            "partial_bytes": part.stat().st_size if (not present and part.is_file()) else None,
            "note": entry.note or None,
            "sha256_note": (str(entry.extra["sha256_note"]).strip()
                            if entry.extra.get("sha256_note") else None),
        })
    return rows


def _status(row: dict[str, Any]) -> str:
    if row["present"]:
        return {True: "ok", False: "BAD SHA256", None: "present (unverified)"}[row["sha256_ok"]]
    if row["partial_bytes"]:
        return f"partial {_human(row['partial_bytes'])}"
    return {"user-export": "missing (user export)", "manual": "missing (manual)",
            "fetch": "missing (fetch)"}.get(row["provision"], "missing")


def cmd_list(args: argparse.Namespace) -> int:
    from perception2d_ros.engines import model_store as ms

    try:
        rows = _rows(args.models_dir)
    except (OSError, ValueError) as exc:
        _err(f"cannot read the manifest: {exc}")
        return EXIT_FAIL
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    header = ("NAME", "KIND", "STATUS", "SIZE", "LICENCE", "STAGES", "GET")
    table = [header] + [(r["name"] + (" [random]" if r["random_weights"] else ""), r["kind"],
                         _status(r), _human(r["size"]) if r["size"] else "?", r["licence"],
                         ",".join(r["stages"]) or "-", r["provision"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    root = ms.models_dir(args.models_dir)
    print(f"\nmodels directory: {root}")
    print(f"manifest: {ms.manifest_path(args.models_dir)}"
          + (f" (+ local exports {ms.overlay_path(args.models_dir)})"
             if ms.overlay_path(args.models_dir).is_file() else ""))
    missing = [r for r in rows if not r["present"]]
    if missing:
        print("\nhow to get the missing ones:")
        for r in missing:
            if r["provision"] == "fetch":
                how = f"perception2d models fetch {r['name']}"
            else:
                how = (r["note"] or "put the file at the path").replace("\n", " ")
            print(f"  {r['name']}: {how}")
            if r["provision"] != "fetch":
                print(f"    -> {r['path']}")
    bad = [r["name"] for r in rows if r["sha256_ok"] is False]
    if bad:
        print(f"\nWARNING: sha256 mismatch for {', '.join(bad)} (run `perception2d models "
              "verify`, then re-fetch)")
    return EXIT_OK


# --------------------------------------------------------------------------- fetch
def cmd_fetch(args: argparse.Namespace) -> int:
    from perception2d_ros.engines import fetch, model_store as ms

    manifest = ms.load_manifest(args.models_dir)
    unknown = [n for n in args.names if n not in manifest]
    if unknown:
        _err(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(manifest)}")
        return EXIT_USAGE
    if args.url and len(args.names) != 1:
        _err("--url needs exactly one NAME")
        return EXIT_USAGE
    failed = 0
    for name in args.names:
        entry = manifest[name]
        t0 = time.monotonic()
        try:
            res = fetch.fetch_model(entry, args.models_dir, url=args.url,
                                    progress=not args.quiet, timeout=args.timeout,
                                    retries=args.retries,
                                    allow_unverified=args.allow_unverified)
        except fetch.FetchError as exc:
            _err(str(exc))
            failed += 1
            continue
        except ValueError as exc:
            _err(f"{name}: {exc}")
            failed += 1
            continue
        state = "verified" if res.verified else "UNVERIFIED (no sha256 in the manifest)"
        if res.already_present:
            print(f"{name}: already present at {res.path} ({state})")
        else:
            extra = f", resumed from {res.resumed_from} bytes" if res.resumed_from else ""
            extra += f", {res.reconnects} reconnect(s)" if res.reconnects else ""
            print(f"{name}: {res.path} ({state}, sha256 {res.sha256}, "
                  f"{_human(res.downloaded_bytes)} in {time.monotonic() - t0:.1f} s{extra})")
    return EXIT_FAIL if failed else EXIT_OK


# --------------------------------------------------------------------------- verify
def cmd_verify(args: argparse.Namespace) -> int:
    from perception2d_ros.engines import fetch, model_store as ms

    root = ms.models_dir(args.models_dir)
    try:
        manifest = ms.load_manifest(args.models_dir)
    except (OSError, ValueError) as exc:
        _err(f"cannot read the manifest: {exc}")
        return EXIT_FAIL
    names = args.names or list(manifest)
    unknown = [n for n in names if n not in manifest]
    if unknown:
        _err(f"unknown model(s) {', '.join(unknown)}")
        return EXIT_USAGE
    counts = {"ok": 0, "bad": 0, "unverified": 0, "missing": 0}
    print(f"models directory: {root}")
    for name in names:
        entry = manifest[name]
        path = ms.entry_path(entry, root)
        if not path.is_file():
            counts["missing"] += 1
            part = fetch.part_path(path)
            if part.is_file():
                print(f"  partial  {name}: {part} ({_human(part.stat().st_size)}, never used; "
                      f"resume with `perception2d models fetch {name}`)")
            continue
        got = ms.sha256_file(path)
        if not entry.sha256:
            counts["unverified"] += 1
            print(f"  UNVERIFIED {name}: {path} has no sha256 in the manifest "
                  f"(sha256 of this file: {got})")
        elif got == entry.sha256.lower():
            counts["ok"] += 1
            print(f"  ok       {name}: {path}")
        else:
            counts["bad"] += 1
            print(f"  FAIL     {name}: {path}: sha256 mismatch (expected {entry.sha256}, got "
                  f"{got})")
    print(f"{counts['ok']} ok, {counts['bad']} failed, {counts['unverified']} unverified, "
          f"{counts['missing']} not present")
    if counts["bad"]:
        _err(f"{counts['bad']} file(s) do not match their sha256; re-fetch or re-export them")
        return EXIT_FAIL
    return EXIT_OK


# --------------------------------------------------------------------------- export
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
        _err(f"unknown model '{args.name}'; known: {', '.join(manifest)}")
        return EXIT_USAGE
    recipe = None if entry.exported else entry.extra.get("export")
    if not isinstance(recipe, dict) or not recipe.get("module") or not recipe.get("arch"):
        exportable = [n for n, e in manifest.items() if isinstance(e.extra.get("export"), dict)]
        _err(f"'{args.name}' has no export recipe; exportable: {', '.join(exportable)}")
        return EXIT_USAGE
    if args.random_weights and args.checkpoint:
        _err("--random-weights and --checkpoint exclude each other")
        return EXIT_USAGE
    if not str(recipe["module"]).startswith(EXPORT_MODULE_PREFIXES):
        _err(f"'{args.name}': export module '{recipe['module']}' is not one of the suite's "
             f"({', '.join(EXPORT_MODULE_PREFIXES)}*); refusing to import it")
        return EXIT_USAGE
    from perception2d_ros.engines.extras import MissingExtra, require_torch

    try:
        require_torch(f"`perception2d models export {args.name}`")
    except MissingExtra as exc:
        _err(str(exc))
        return EXIT_UNAVAILABLE
    try:
        module = importlib.import_module(recipe["module"])
        export_onnx, parity_check = module.export_onnx, module.parity_check
    except (ImportError, AttributeError) as exc:
        _err(f"export of {entry.kind} models is not available in this build "
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
            _err(str(exc))
            return EXIT_FAIL
    try:
        sample_path, image, boxes = _sample(args.models_dir)
    except (ms.ModelFileError, KeyError, ImportError) as exc:
        _err(f"no real image for the parity check: {exc}")
        return EXIT_FAIL
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _err(f"cannot write to {out_dir} ({exc}); choose a writable --models-dir")
        return EXIT_FAIL

    t0 = time.monotonic()
    print(f"exporting {args.name} ({arch}) from "
          f"{'random weights' if checkpoint is None else checkpoint} -> {out_dir}",
          file=sys.stderr)
    try:
        outputs = export_onnx(arch, checkpoint, out_dir, seed=seed)
    except Exception as exc:  # noqa: BLE001 - report any export failure cleanly
        _err(f"export of {args.name} failed: {type(exc).__name__}: {exc}")
        return EXIT_FAIL
    outputs = {str(k): Path(v).resolve() for k, v in dict(outputs).items()}
    t_export = time.monotonic() - t0
    for key, path in outputs.items():
        if not path.is_file() or (root not in path.parents):
            _err(f"export produced '{key}' at {path}, which is not a file inside {root}")
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
            _err(f"ONNX Runtime smoke run of {path.name} failed: {type(exc).__name__}: {exc}")
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
        _err(f"parity check of {args.name} failed: {type(exc).__name__}: {exc}")
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
        _err(f"cannot record the exported files: {exc}")
        return EXIT_FAIL
    for name, spec in overlay.items():
        print(f"{name}: {root / spec['file']} sha256 {spec['sha256']}")
    print(f"recorded in {ov} ({t_export:.1f} s export, {time.monotonic() - t0:.1f} s total)")
    if not passed:
        _err(f"parity check of {args.name} did not pass (files kept, marked "
             "parity_passed: false)")
        return EXIT_FAIL
    return EXIT_OK


# --------------------------------------------------------------------------- build
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
        _err(f"cannot build a TensorRT engine on this machine: {why}. Build on the target "
             f"machine (CUDA GPU + TensorRT 10+): `perception2d models build {args.name} "
             f"--precision {args.precision}`. Here the stages run with ONNX Runtime.")
        return EXIT_UNAVAILABLE
    try:
        path, entry = ms.resolve(args.name, args.models_dir)
    except ms.ModelFileError as exc:
        _err(str(exc))
        return EXIT_FAIL
    if path.suffix != ".onnx":
        _err(f"{path} is not an ONNX model; export it first (`perception2d models export`)")
        return EXIT_USAGE
    try:
        profiles = (_parse_profiles(args.profile) if args.profile
                    else (entry.extra.get("profiles") if entry else None) or {})
    except ValueError as exc:
        _err(str(exc))
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
        _err("int8 needs --calibration-cache FILE")
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
        _err(str(exc))
        return EXIT_FAIL
    print(f"engine: {engine.engine_path} ({time.monotonic() - t0:.1f} s)")
    engine.close()
    return EXIT_OK
