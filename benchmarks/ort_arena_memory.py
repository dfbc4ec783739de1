"""Peak RSS of an ONNX Runtime CPU session with and without its CPU memory arena.

    python benchmarks/ort_arena_memory.py --onnx ENCODER.onnx [--runs 3]
        [--out docs/results/ort_arena_memory.json]

Each setting runs in a fresh process: load the session, run it ``--runs`` times on one random
input (dynamic dims = 1), report the process's peak RSS (getrusage ru_maxrss) after loading
and after each run, and the run times. Without ``--onnx`` the official SAM ViT-B encoder
architecture with seeded random weights is exported first (needs the torch extra; a minute or
more on a CPU). Why: engines.onnxruntime_backend.OrtEngine turns the arena off for big models
(``BIG_MODEL_BYTES``), which keeps the SAM parity tests under the 8 GB per-process limit.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, resource, sys, time
import numpy as np, onnxruntime as ort
path, arena, runs = sys.argv[1], sys.argv[2] == "on", int(sys.argv[3])
rss = lambda: round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
o = ort.SessionOptions()
o.enable_cpu_mem_arena = arena
o.add_session_config_entry("session.intra_op.allow_spinning", "0")
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
out = {"arena": arena, "peak_rss_gb_after_load": rss(), "runs": []}
feeds = {i.name: np.random.default_rng(0).random(
    [d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
    for i in s.get_inputs()}
for _ in range(runs):
    t = time.perf_counter()
    s.run(None, feeds)
    out["runs"].append({"seconds": round(time.perf_counter() - t, 2), "peak_rss_gb": rss()})
    print(json.dumps(out["runs"][-1]), file=sys.stderr, flush=True)
print(json.dumps(out))
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", default=None, help="ONNX model (default: SAM ViT-B random export)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "ort_arena_memory.json"))
    args = ap.parse_args(argv)
    model = args.onnx
    tmp = None
    if model is None:
        sys.path.insert(0, str(ROOT))
        from perception2d_ros.models.sam import export as sam_export

        tmp = tempfile.TemporaryDirectory()
        print("exporting SAM ViT-B (random weights, seed 0) ...", file=sys.stderr, flush=True)
        model = str(sam_export.export_onnx("vit_b", None, tmp.name, seed=0)["encoder"])
    import onnxruntime as ort

    result = {"script": "benchmarks/ort_arena_memory.py",
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                                       capture_output=True).stdout.strip(),
              "machine": {"host": platform.node(), "cpu_count": os.cpu_count(),
                          "python": platform.python_version(),
                          "load_average_1min": round(os.getloadavg()[0], 1)},
              "onnxruntime": ort.__version__,
              "model": Path(model).name if args.onnx else "SAM ViT-B encoder (random weights)",
              "model_mb": round(Path(model).stat().st_size / 2**20),
              "settings": []}
    for arena in ("on", "off"):
        print(f"arena {arena}:", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-c", CHILD, model, arena, str(args.runs)],
                           capture_output=True, text=True, check=True)
        result["settings"].append(json.loads(r.stdout.strip().splitlines()[-1]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for s in result["settings"]:
        print(f"arena {'on ' if s['arena'] else 'off'}: peak RSS "
              f"{s['runs'][-1]['peak_rss_gb']} GB after {len(s['runs'])} runs, "
              f"runs {[r['seconds'] for r in s['runs']]} s")
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
