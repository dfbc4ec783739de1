"""Measure the two set-ups on a fresh clone: `make setup-runtime` (what `make demo` installs)
and `make setup` (what `make test` adds: test and export extras) — wall time and `.venv` size.

    python3 benchmarks/install_size.py [--repo .] [--workdir /tmp/p2d-install] [--demo]
        [--out docs/results/install_size.json]

Clones ``--repo`` (HEAD, committed files only) into ``--workdir``, runs the two make targets one
after the other (the second only adds the extras, so `make test`'s set-up time is the sum),
records the venv size after each, the largest packages, whether torch is importable from the
runtime venv, and with ``--demo`` runs `make demo` on the runtime venv (proof that the runtime
alone runs it). Wheels come from pip's configured indexes and pip's cache, so a second
measurement on the same machine is faster than a first download: the JSON records the pip
configuration and whether the cache was warm. The clone (several GB) is deleted at the end
unless ``--keep``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def dir_bytes(path: Path) -> int:
    """Apparent size of every regular file under ``path`` (symlinks not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                try:
                    total += os.lstat(p).st_size
                except OSError:
                    pass
    return total


def largest_packages(venv: Path, n: int = 8) -> list[dict[str, Any]]:
    """The ``n`` largest top-level entries of the venv's site-packages, in MB."""
    sites = list(venv.glob("lib/python*/site-packages"))
    if not sites:
        return []
    sizes = []
    for entry in sites[0].iterdir():
        if entry.is_dir() and not entry.is_symlink():
            sizes.append((dir_bytes(entry), entry.name))
    sizes.sort(reverse=True)
    return [{"name": name, "mb": round(b / 2**20, 1)} for b, name in sizes[:n]]


def run_make(clone: Path, target: str, log: Path) -> float:
    """Run ``make TARGET`` in the clone, streaming its progress lines; return seconds."""
    print(f"==> make {target} (log: {log})", flush=True)
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(["make", target], cwd=clone, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if line.startswith(("==>", "    ")):
                print(f"    [{time.monotonic() - t0:6.0f} s] {line.rstrip()}", flush=True)
        rc = proc.wait()
    seconds = time.monotonic() - t0
    if rc != 0:
        sys.exit(f"make {target} failed (exit {rc}); see {log}")
    return seconds


def has_module(venv: Path, name: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec('{name}') is None)"
    return subprocess.run([str(venv / "bin" / "python"), "-c", code]).returncode == 0


def pip_info() -> dict[str, Any]:
    def out(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
        return r.stdout.strip()
    cache = out("cache", "dir")
    return {"config": out("config", "list").splitlines(), "cache_dir": cache,
            "cache_mb_before": round(dir_bytes(Path(cache)) / 2**20) if cache and
            Path(cache).is_dir() else 0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=str(ROOT), help="repository to clone (default: this one)")
    ap.add_argument("--workdir", default="/tmp/perception2d-install-measure")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "install_size.json"))
    ap.add_argument("--demo", action="store_true", help="also run `make demo` on the runtime venv")
    ap.add_argument("--keep", action="store_true", help="keep the clone and its venv")
    args = ap.parse_args(argv)

    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    clone = work / "perception2d"
    pip = pip_info()
    subprocess.run(["git", "clone", "-q", args.repo, str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True,
                            text=True, check=True).stdout.strip()
    venv = clone / ".venv"
    result: dict[str, Any] = {
        "script": "benchmarks/install_size.py", "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_1min_at_start": round(os.getloadavg()[0], 1)},
        "pip": pip,
        "method": "fresh git clone; `make setup-runtime` then `make setup` (adds the extras); "
                  "sizes: apparent bytes of all files under .venv",
    }
    try:
        t_rt = run_make(clone, "setup-runtime", work / "setup-runtime.log")
        result["runtime"] = {"target": "make setup-runtime (= set-up of make demo)",
                             "seconds": round(t_rt), "venv_mb": round(dir_bytes(venv) / 2**20),
                             "torch_installed": has_module(venv, "torch"),
                             "largest_packages": largest_packages(venv)}
        print(json.dumps(result["runtime"], indent=1), flush=True)
        if args.demo:
            t_demo = run_make(clone, "demo", work / "demo.log")
            result["runtime"]["demo_run_seconds"] = round(t_demo)
            result["runtime"]["demo_ok_without_torch"] = not has_module(venv, "torch")
        t_ex = run_make(clone, "setup", work / "setup.log")
        result["test"] = {"target": "make setup (= set-up of make test)",
                          "extras_seconds": round(t_ex), "seconds": round(t_rt + t_ex),
                          "venv_mb": round(dir_bytes(venv) / 2**20),
                          "torch_installed": has_module(venv, "torch"),
                          "largest_packages": largest_packages(venv)}
        print(json.dumps(result["test"], indent=1), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
