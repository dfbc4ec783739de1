"""Shared helpers of the benchmark harness: statistics, machine description, real frames,
process CPU / RSS sampling, ROS environment defaults, and the node under test with its input
messages (shared by the in-node stage benchmark and its ``--dds`` runs)."""
from __future__ import annotations

import os
import platform
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "test" / "data"
CALIBRATION = DATA / "camera_info" / "camerav1_1280x720.yaml"
COCO_IMAGES = DATA / "coco" / "images"


# --------------------------------------------------------------------------- environment
def ros_env_defaults() -> None:
    """The sandbox-safe DDS settings of ``scripts/ros_env.sh`` (localhost discovery, a domain
    of our own, the Fast DDS SHM profile), applied before rclpy is imported unless set."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    profile = REPO / "config" / "fastdds_localhost_shm.xml"
    if profile.is_file():
        os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(profile))
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")


def set_threads(threads: int | None) -> int:
    """OpenCV worker threads (None/0: leave OpenCV's default). Returns the count in use."""
    import cv2

    if threads:
        cv2.setNumThreads(int(threads))
    return int(cv2.getNumThreads())


# --------------------------------------------------------------------------- statistics
def summarize_ms(values_s: Sequence[float]) -> dict[str, float]:
    """Seconds → {p50, p95, max, mean, n} in milliseconds (empty → zeros)."""
    if len(values_s) == 0:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0, "mean": 0.0, "n": 0}
    a = np.asarray(values_s, np.float64) * 1e3
    return {"p50": round(float(np.percentile(a, 50)), 3),
            "p95": round(float(np.percentile(a, 95)), 3),
            "max": round(float(a.max()), 3), "mean": round(float(a.mean()), 3),
            "n": int(a.size)}


def time_calls(fn: Callable[[], Any], n: int, warmup: int = 3) -> list[float]:
    """Seconds of ``n`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def linear_slope(t: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope dy/dt (0 with fewer than 3 points)."""
    if len(t) < 3:
        return 0.0
    tt = np.asarray(t, np.float64)
    yy = np.asarray(y, np.float64)
    tt = tt - tt.mean()
    den = float((tt * tt).sum())
    return float((tt * (yy - yy.mean())).sum() / den) if den > 0 else 0.0


# --------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def gpu_name() -> str | None:
    """The CUDA GPU name when torch is already imported and sees one (never imports torch)."""
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # a broken CUDA install must not break a CPU benchmark
        pass
    return None


def _commit() -> str:
    """The git commit of the checkout this package runs from ('unknown' for an install)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"],
                             cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        # results files written by the benchmarks themselves do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":(top,exclude)docs/results"],
                               cwd=Path(__file__).resolve().parent, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 \
            else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("numpy", "opencv-python-headless", "onnxruntime", "ros-rclpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: CPU, cores, load (other processes share them!),
    the code's commit and the main libraries' versions."""
    return {"host_arch": platform.machine(), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "load_avg_1_5_15": load_average(), "python": platform.python_version(),
            "gpu": gpu_name() or "none", "date": datetime.now(timezone.utc).isoformat(
                timespec="seconds"), "commit": _commit(), "versions": _versions()}


# --------------------------------------------------------------------------- process stats
def rss_mb() -> float:
    """Resident set size of this process in MB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class LatencyHistogram:
    """Latencies in fixed memory: 0.05 ms bins up to 10 s (+ exact max), so a soak of any
    length adds nothing per frame to the process whose RSS it measures."""

    BIN_S = 50e-6
    SPAN_S = 10.0

    def __init__(self) -> None:
        self.bins = np.zeros(int(self.SPAN_S / self.BIN_S) + 1, np.int64)
        self.count = 0
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        self.bins[min(max(int(seconds / self.BIN_S), 0), len(self.bins) - 1)] += 1
        self.count += 1
        if seconds > self.max_s:
            self.max_s = seconds

    def summary_ms(self) -> dict[str, float]:
        """p50 / p95 (bin centres, 0.05 ms resolution) and max, ms; zeros when empty."""
        if not self.count:
            return {"p50": 0.0, "p95": 0.0, "max": 0.0}
        cum = np.cumsum(self.bins)

        def pct(q: float) -> float:
            i = int(np.searchsorted(cum, q / 100.0 * self.count, side="left"))
            return round(min((i + 0.5) * self.BIN_S, self.max_s) * 1e3, 2)
        return {"p50": pct(50), "p95": pct(95), "max": round(self.max_s * 1e3, 2)}


class ProcessSampler:
    """Samples RSS (and GPU memory where torch has a CUDA device) every ``period`` seconds in
    a background thread; ``result()`` gives CPU %, RSS start/end/max and the RSS slope."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._t0 = self._cpu0 = 0.0

    def __enter__(self) -> "ProcessSampler":
        self._t0, self._cpu0 = time.monotonic(), cpu_seconds()
        self.samples.append((0.0, rss_mb()))
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._wall = time.monotonic() - self._t0
        self._cpu = cpu_seconds() - self._cpu0
        self.samples.append((self._wall, rss_mb()))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append((time.monotonic() - self._t0, rss_mb()))

    def result(self, skip_s: float = 0.0) -> dict[str, Any]:
        """``skip_s``: leave the first seconds (warm-up allocations) out of the RSS slope."""
        t = [s[0] for s in self.samples if s[0] >= skip_s]
        r = [s[1] for s in self.samples if s[0] >= skip_s]
        rss = [s[1] for s in self.samples]
        out = {"cpu_percent_of_one_core": round(100.0 * self._cpu / max(self._wall, 1e-9), 1),
               "cores": os.cpu_count(),
               "rss_mb_start": round(rss[0], 1), "rss_mb_end": round(rss[-1], 1),
               "rss_mb_max": round(max(rss), 1),
               "rss_slope_mb_per_min": round(linear_slope(t, r) * 60.0, 3),
               "rss_slope_after_s": skip_s, "rss_samples": len(r),
               "rss_series_s_mb": [[round(a, 1), round(b, 2)] for a, b in self.samples]}
        gpu = gpu_memory_mb()
        out["gpu_memory_mb"] = gpu if gpu is not None else "n/a (no CUDA device in use)"
        return out


def gpu_memory_mb() -> float | None:
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except Exception:
        pass
    return None


# --------------------------------------------------------------------------- real frames
def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise ValueError(f"--size must look like WIDTHxHEIGHT (e.g. 1280x720), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def real_frames(size: tuple[int, int], count: int = 8) -> list[np.ndarray]:
    """``count`` real COCO test images resized to ``size`` (w, h), bgr8."""
    import cv2

    files = sorted(COCO_IMAGES.glob("*.jpg"))
    if not files:
        raise FileNotFoundError(f"no test images in {COCO_IMAGES}")
    out = []
    for f in files[: max(1, count)]:
        img = cv2.imread(str(f))
        if img is None:
            raise ValueError(f"cannot read {f}")
        out.append(np.ascontiguousarray(cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)))
    return out


def camera_info_fields(size: tuple[int, int]) -> dict[str, Any]:
    """The real 1280×720 calibration (camerav1) as CameraInfo fields, scaled to ``size``
    (K and P scaled per axis; distortion unchanged), so any --size has a real-looking model."""
    from perception2d_ros.geometry.camera import CameraModel

    cam = CameraModel.from_yaml(CALIBRATION)
    info = cam.to_camera_info_dict()
    w, h = size
    sx, sy = w / float(info["width"]), h / float(info["height"])
    k = list(map(float, info["k"]))
    p = list(map(float, info["p"]))
    for arr, row_len in ((k, 3), (p, 4)):
        for c in range(row_len):
            arr[c] *= sx
            arr[row_len + c] *= sy
    info.update(width=w, height=h, k=k, p=p)
    return info


def camera_model(size: tuple[int, int]) -> Any:
    from perception2d_ros.geometry.camera import CameraModel

    f = camera_info_fields(size)
    return CameraModel(f["width"], f["height"], f["k"], f["d"],
                       distortion_model=f["distortion_model"], r=f["r"], p=f["p"])


# --------------------------------------------------------------------------- node under test
# which node runs a stage, and the topic it publishes last for a frame
NODE_FOR = {"rectify": "rectify_node", "detect": "detector_node", "pipeline": "pipeline_node"}
LAST_TOPIC = {"rectify": "camera_info_rect", "detect": "detections", "pipeline": "detections"}


def make_node(stage: str, ctx: Any, threads: int | None, backend: str, model: str,
              models_dir: str | None, extra: dict[str, Any] | None = None) -> Any:
    """The configured ``PerceptionNode`` that runs ``stage`` (see ``NODE_FOR``) in ``ctx``."""
    from rclpy.parameter import Parameter

    from perception2d_ros.ros.perception_node import PerceptionNode

    params: dict[str, Any] = {"detect.backend": backend, "detect.model": model,
                              "diagnostics_period_s": 3600.0}
    if threads:
        params["detect.threads"] = int(threads)
    if models_dir:
        params["models_dir"] = models_dir
    params.update(extra or {})
    node = PerceptionNode(NODE_FOR[stage], node_name=f"bench_{stage}", context=ctx,
                          namespace="/bench", parameter_overrides=[
                              Parameter(k, value=v) for k, v in params.items()])
    if node.pipeline is None:
        node.destroy_node()
        raise RuntimeError(f"{NODE_FOR[stage]} failed to configure (see the log above)")
    return node


def input_messages(stage: str, size: tuple[int, int], count: int) -> tuple[list[Any], Any,
                                                                           list[np.ndarray]]:
    """Image messages of real frames + the CameraInfo for the node's input.

    Rectified-input stages (detect) get the frames rectified by the same calibration and the
    rectified camera_info, as a rectify node upstream would publish them."""
    from std_msgs.msg import Header

    from perception2d_ros.geometry.camera import CameraModel
    from perception2d_ros.ros import conversions as conv

    imgs = real_frames(size, count)
    fields = camera_info_fields(size)
    cam = CameraModel.from_camera_info(fields)
    if NODE_FOR[stage] == "detector_node":
        imgs = [cam.rectify(i) for i in imgs]
        fields = cam.rectified_camera_info_dict()
    hdr = Header(frame_id="camera_optical")
    msgs = [conv.array_to_image_msg(i, "bgr8", hdr) for i in imgs]
    info = conv.camera_info_msg(fields, hdr)
    return msgs, info, imgs


def set_stamp(msg: Any, ns: int) -> None:
    """Stamp ``msg.header`` with ``ns`` nanoseconds."""
    msg.header.stamp.sec = ns // 1_000_000_000
    msg.header.stamp.nanosec = ns % 1_000_000_000

