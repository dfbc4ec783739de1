"""Shared test fixtures. Test data lives in test/data (see test/data/ATTRIBUTION.md)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

# launch_testing's pytest plugin (the real launch stack, installed by `make test`) imports
# `launch`, which makes every logger created afterwards a non-propagating LaunchLogger. Our
# nodes forward core warnings through the `perception2d` logger's handlers (propagation), as
# they do in a node process, which never imports launch: restore the standard class here.
if logging.getLoggerClass() is not logging.Logger:
    logging.setLoggerClass(logging.Logger)

TEST_DIR = Path(__file__).resolve().parent
DATA_DIR = TEST_DIR / "data"
REPO_DIR = TEST_DIR.parent
MODELS_DIR = REPO_DIR / "models"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS_DIR


def _configure_ros_env() -> None:
    """Sandbox-safe DDS settings, applied before any test imports rclpy.

    Localhost-only discovery, a ROS_DOMAIN_ID unique to this test run (so parallel runs on
    one machine never see each other), and the SHM transport profile without which Fast DDS
    drops best-effort images between processes.
    """
    import os

    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))
    os.environ.setdefault(
        "FASTDDS_DEFAULT_PROFILES_FILE", str(REPO_DIR / "config" / "fastdds_localhost_shm.xml")
    )
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")


_configure_ros_env()


@pytest.fixture(scope="session")
def sam_random_export(tmp_path_factory):
    """The official SAM ViT-B architecture with seeded random weights, saved as an official
    .pth and exported through our path once per session: (checkpoint, export dict, out dir).
    Shared by the SAM parity tests and the SAM pipeline-stage test."""
    pytest.importorskip("segment_anything", reason="SAM export needs segment-anything (test extra)")
    from perception2d_ros.models.sam import checkpoint as sam_checkpoint
    from perception2d_ros.models.sam import export as sam_export

    import os

    # scripts/run_tests.sh runs each slow file in its own process (memory) and shares one
    # export between them through PERCEPTION2D_TEST_CACHE (export_onnx caches by sha256)
    cache = os.environ.get("PERCEPTION2D_TEST_CACHE")
    root = Path(cache) / "sam" if cache else tmp_path_factory.mktemp("sam")
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "sam_vit_b_random.pth"
    if not ckpt.is_file():
        sam_checkpoint.save_checkpoint(sam_checkpoint.random_state_dict("vit_b", seed=0), ckpt)
    out = root / "exports"
    return ckpt, sam_export.export_onnx(None, ckpt, out), out


# ----------------------------------------------------------------- peak memory per test process
# Every pytest process must stay under PERCEPTION2D_TEST_RSS_LIMIT_GB (default 8) peak RSS —
# CI machines run other work beside the suite. The kernel's high-water marks (getrusage
# ru_maxrss) are read after each test: the tests that raised the peak are listed at the end, a
# process above the limit fails the session, and PERCEPTION2D_TEST_RSS_LOG=FILE appends one
# JSON line per process (scripts/run_tests.sh collects them).
_RSS: dict = {"raised": []}


def _maxrss_gb(who: int) -> float:
    import resource

    return resource.getrusage(who).ru_maxrss / 2**20   # Linux: KiB


def _rss_limit_gb() -> float:
    import os

    return float(os.environ.get("PERCEPTION2D_TEST_RSS_LIMIT_GB", "8"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import resource

    before = _maxrss_gb(resource.RUSAGE_SELF)
    yield
    after = _maxrss_gb(resource.RUSAGE_SELF)
    if after > before + 0.25:
        _RSS["raised"].append((after, after - before, item.nodeid))


def pytest_sessionfinish(session, exitstatus):
    import json
    import os
    import resource
    import sys

    peak = _maxrss_gb(resource.RUSAGE_SELF)
    child = _maxrss_gb(resource.RUSAGE_CHILDREN)
    limit = _rss_limit_gb()
    _RSS.update(peak=peak, child=child, limit=limit)
    log = os.environ.get("PERCEPTION2D_TEST_RSS_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({
                "args": sys.argv[1:], "peak_rss_gb": round(peak, 2),
                "largest_child_rss_gb": round(child, 2), "limit_gb": limit,
                "raised_by": [{"test": n, "peak_gb": round(a, 2), "by_gb": round(d, 2)}
                              for a, d, n in _RSS["raised"]][-8:]}) + "\n")
    if max(peak, child) > limit and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if "peak" not in _RSS:
        return
    tr = terminalreporter
    over = max(_RSS["peak"], _RSS["child"]) > _RSS["limit"]
    tr.write_line(f"peak RSS: this pytest process {_RSS['peak']:.2f} GB, largest child process "
                  f"{_RSS['child']:.2f} GB (limit {_RSS['limit']:g} GB"
                  f"{'; EXCEEDED: the session fails' if over else ''})", red=over, bold=over)
    for after, delta, nodeid in sorted(_RSS["raised"], reverse=True)[:5]:
        tr.write_line(f"  peak reached {after:.2f} GB (+{delta:.2f}) during {nodeid}")
