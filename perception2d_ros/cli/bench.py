"""``perception2d bench``: stage benchmarks against their floors, bag replay, overload, compare.

    perception2d bench STAGE [--json] [--frames N] [--size 1280x720] [--threads T] [--dds]
        STAGE: rectify | detect | pipeline | sam | clip | lseg | all
        message-in -> message-out of a real in-process PerceptionNode vs the bare primitive
        (cv2.remap / engine.infer) measured in the same run; prints floor, stage and ratio.
    perception2d bench --bag IN.mcap --rates 10,30,60,max [--mode pipeline|nodes]
        [--duration S] [--json]
        replay over DDS through the real nodes: max sustainable fps, latency p50/p95/max
        (input stamp -> output received) per stage and end to end, drops, CPU %, RSS.
        Without --bag the real test images are replayed.
    perception2d bench --overload [--bag IN.mcap] --rate 30 --duration 600 [--size 1920x1080]
        [--slow-ms MS]
        feed a stage slower than the input: latency p95 vs stage time, RSS slope, drops.
    perception2d bench --compare A.json B.json
        ratios B/A of every number the two result files share.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

STAGE_CHOICES = ("rectify", "detect", "pipeline", "sam", "clip", "lseg", "all")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmarks: stage vs floor, bag replay, overload, compare",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", nargs="?", choices=STAGE_CHOICES,
                   help="stage to benchmark message-in -> message-out against its floor")
    p.add_argument("--json", action="store_true", help="print JSON only (to stdout)")
    p.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    p.add_argument("--frames", type=int, default=100, help="timed frames per stage (default 100)")
    p.add_argument("--warmup", type=int, default=5, help="untimed frames first (default 5)")
    p.add_argument("--size", default=None,
                   help="frame size WxH (default 1280x720; 1920x1080 for --overload)")
    p.add_argument("--threads", type=int, default=0,
                   help="OpenCV and ONNX Runtime threads (default: their defaults)")
    p.add_argument("--dds", action="store_true",
                   help="stage bench: also measure over real DDS and report the transport share")
    p.add_argument("--backend", default="auto", help="detector backend (default auto)")
    p.add_argument("--model", default="yolox_nano", help="detector model (default yolox_nano)")
    p.add_argument("--models-dir", default=None, help="models directory")
    p.add_argument("--bag", metavar="IN.mcap", help="replay this bag (image_raw + camera_info)")
    p.add_argument("--rates", metavar="LIST",
                   help="replay rates in Hz, comma separated; 'max' = flat out (closed loop)")
    p.add_argument("--mode", choices=("pipeline", "nodes"), default="pipeline",
                   help="replay through one pipeline_node or rectify_node -> detector_node")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds per rate (default 10) / of the overload run (default 600)")
    p.add_argument("--overload", action="store_true",
                   help="soak: feed --rate Hz into a stage slower than that")
    p.add_argument("--rate", type=float, default=30.0, help="overload input rate (default 30)")
    p.add_argument("--warmup-s", type=float, default=None,
                   help="overload: seconds left out of the RSS slope (default min(300, "
                        "duration/5): malloc's warm-up plateau)")
    p.add_argument("--slow-ms", type=float, default=0.0,
                   help="replay/overload: the harness adds this sleep to the last stage")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print B/A ratios of two result files")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- output
def _emit(result: Any, args: argparse.Namespace, text: str) -> None:
    data = json.dumps(result, indent=2, default=str)
    if args.out:
        Path(args.out).write_text(data + "\n")
    if args.json:
        sys.stdout.write(data + "\n")
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _fmt_stage(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"{r['stage']:<9} skipped: {r['skipped']}"
    target = r.get("target_ratio")
    verdict = ""
    if target:
        verdict = "  (target <= %.2fx: %s)" % (target, "met" if r["ratio"] <= target else "NOT met")
    lines = [f"{r['stage']:<9} floor {r['floor_ms']:8.3f} ms  stage {r['stage_ms']:8.3f} ms  "
             f"ratio {r['ratio']:.3f}x{verdict}",
             f"          stage p95 {r['p95_ms']:.3f} ms, {r['frames']} frames {r['size']}, "
             f"backend {r['backend']}, model {r['model']}",
             f"          floor = {r['floor']}",
             *([f"          floor + rclpy publish {r['floor_with_publish_ms']:.3f} ms "
                f"(ratio {r['ratio_vs_floor_with_publish']:.3f}x): {r['floor_with_publish']}"]
               if "floor_with_publish_ms" in r else []),
             f"          stage = {r['stage_measures']}",
             "          breakdown p50 ms: " + ", ".join(
                 f"{k} {v}" for k, v in r["breakdown_ms_p50"].items())]
    if "dds" in r:
        d = r["dds"]
        lines.append(f"          over DDS: p50 {d['p50_ms']} ms p95 {d['p95_ms']} ms "
                     f"(transport share p50 {d.get('transport_share_ms_p50')} ms)")
    return "\n".join(lines)


def _fmt_replay(r: dict[str, Any]) -> str:
    lines = [f"replay {r['chain']} ({r['mode']}), {r['size']} {r['source']}",
             f"backend {r['backend']}, model {r['model']}; latency = {r['latency_measures']}",
             f"{'rate':>6} {'in fps':>7} {'out fps':>8} {'rect p50':>9} {'e2e p50':>8} "
             f"{'e2e p95':>8} {'e2e max':>8} {'drops':>6} {'lost':>5} {'cpu%':>6} {'rss MB':>7}"]
    for run in r["runs"]:
        e = run["end_to_end"]
        lines.append(f"{str(run['rate']):>6} {run['in_fps']:>7.1f} {e['out_fps']:>8.1f} "
                     f"{run['stages']['rectify']['latency_ms']['p50']:>9.1f} "
                     f"{e['latency_ms']['p50']:>8.1f} {e['latency_ms']['p95']:>8.1f} "
                     f"{e['latency_ms']['max']:>8.1f} {run['dropped_total']:>6} "
                     f"{run['lost_other']:>5} {run['process']['cpu_percent_of_one_core']:>6.1f} "
                     f"{run['process']['rss_mb_end']:>7.1f}")
    lines.append(f"max sustainable fps: {r['max_sustainable_fps']}")
    return "\n".join(lines)


def _fmt_overload(r: dict[str, Any]) -> str:
    return (f"overload {r['mode']} {r['size']} at {r['rate_hz']} Hz for {r['duration_s']} s "
            f"(+{r['slow_ms_added']} ms slow): stage p50 {r['stage_ms_p50']} ms "
            f"(input period {r['input_period_ms']} ms, overloaded: {r['overloaded']})\n"
            f"latency p50 {r['latency_p50_ms']} ms p95 {r['latency_p95_ms']} ms "
            f"max {r['latency_max_ms']} ms = {r['latency_p95_over_stage']}x stage time; "
            f"out {r['out_fps']} fps of {r['in_fps']}; dropped {r['dropped_newest_wins']} "
            f"({r['drop_fraction']:.1%}), lost {r['lost_other']}; RSS {r['rss_mb_start']} -> "
            f"{r['rss_mb_end']} MB, slope {r['rss_slope_mb_per_min']} MB/min after "
            f"{r['rss_slope_after_s']:g} s; "
            f"CPU {r['cpu_percent_of_one_core']}% of one core")


# --------------------------------------------------------------------------- compare
def _flatten(obj: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("machine",):
                continue
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            key = v.get("stage") or v.get("rate") if isinstance(v, dict) else None
            out.update(_flatten(v, f"{prefix}[{key if key is not None else i}]"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def compare(a_path: str, b_path: str) -> dict[str, Any]:
    a = json.loads(Path(a_path).read_text())
    b = json.loads(Path(b_path).read_text())
    fa, fb = _flatten(a), _flatten(b)
    rows = {}
    for k in fa:
        if k in fb and fa[k] != 0:
            rows[k] = {"a": fa[k], "b": fb[k], "b_over_a": round(fb[k] / fa[k], 3)}
    return {"a": a_path, "b": b_path, "ratios": rows,
            "machine_a": a.get("machine") if isinstance(a, dict) else None,
            "machine_b": b.get("machine") if isinstance(b, dict) else None}


def _fmt_compare(c: dict[str, Any]) -> str:
    lines = [f"B/A with A = {c['a']}, B = {c['b']}",
             f"{'metric':<60} {'A':>12} {'B':>12} {'B/A':>8}"]
    interesting = ("_ms", "ratio", "fps", "p50", "p95", "max", "rss", "cpu", "drop", "latency")
    for k, v in c["ratios"].items():
        if any(s in k for s in interesting):
            lines.append(f"{k:<60} {v['a']:>12.3f} {v['b']:>12.3f} {v['b_over_a']:>8.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry
def run(args: argparse.Namespace) -> int:
    from perception2d_ros.bench.common import parse_size

    try:
        if args.compare:
            c = compare(*args.compare)
            _emit(c, args, _fmt_compare(c))
            return 0
        threads = args.threads or None
        if args.overload:
            from perception2d_ros.bench.replay import run_overload

            size = parse_size(args.size or "1920x1080")
            r = run_overload(bag=args.bag, rate=args.rate, duration=args.duration or 600.0,
                             mode=args.mode, size=size, threads=threads, backend=args.backend,
                             model=args.model, models_dir=args.models_dir,
                             slow_ms=args.slow_ms, warmup_s=args.warmup_s)
            _emit(r, args, _fmt_overload(r))
            return 0
        if args.bag or args.rates:
            from perception2d_ros.bench.replay import run_rates

            size = parse_size(args.size or "1280x720")
            r = run_rates(bag=args.bag, rates=args.rates or "10,30,60,max", mode=args.mode,
                          duration=args.duration or 10.0, size=size, threads=threads,
                          backend=args.backend, model=args.model,
                          models_dir=args.models_dir, slow_ms=args.slow_ms)
            _emit(r, args, _fmt_replay(r))
            return 0
        if not args.stage:
            print("perception2d bench: give a STAGE, --bag/--rates, --overload or --compare "
                  "(see --help)", file=sys.stderr)
            return 2
        if args.frames < 1:
            raise ValueError(f"--frames must be >= 1; got {args.frames}")
        from perception2d_ros.bench.stages import STAGES, run_stage

        size = parse_size(args.size or "1280x720")
        stages = [s for s in STAGES] if args.stage == "all" else [args.stage]
        results = []
        for s in stages:
            results.append(run_stage(s, frames=args.frames, size=size, threads=threads,
                                     warmup=max(0, args.warmup), dds=args.dds,
                                     backend=args.backend, model=args.model,
                                     models_dir=args.models_dir))
        out: Any = results[0] if len(results) == 1 else {"stages": results,
                                                          "machine": results[0]["machine"]}
        _emit(out, args, "\n".join(_fmt_stage(r) for r in results))
        return 0
    except (ValueError, FileNotFoundError, TimeoutError, RuntimeError, KeyError) as exc:
        print(f"perception2d bench: error: {exc}", file=sys.stderr)
        return 1
