"""``perception2d models``: list / fetch / export / build / verify the suite's models.

Every command takes ``--models-dir DIR`` (else ``$PERCEPTION2D_MODELS_DIR``, else the source
checkout's ``models/``, else the installed share). Heavy modules (onnxruntime, torch, the
export modules, tensorrt) are imported inside the commands. The parser and list / fetch /
verify live here; export in ``perception2d_ros.cli.models_export``, build in
``perception2d_ros.cli.models_build``.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

from perception2d_ros.cli.models_build import cmd_build
from perception2d_ros.cli.models_common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, err
from perception2d_ros.cli.models_export import RANDOM_DIR, cmd_export


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
        err(f"cannot read the manifest: {exc}")
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
        err(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(manifest)}")
        return EXIT_USAGE
    if args.url and len(args.names) != 1:
        err("--url needs exactly one NAME")
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
            err(str(exc))
            failed += 1
            continue
        except ValueError as exc:
            err(f"{name}: {exc}")
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
        err(f"cannot read the manifest: {exc}")
        return EXIT_FAIL
    names = args.names or list(manifest)
    unknown = [n for n in names if n not in manifest]
    if unknown:
        err(f"unknown model(s) {', '.join(unknown)}")
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
        err(f"{counts['bad']} file(s) do not match their sha256; re-fetch or re-export them")
        return EXIT_FAIL
    return EXIT_OK

