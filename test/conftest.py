"""Shared test fixtures. Test data lives in test/data (see test/data/ATTRIBUTION.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

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
    from perception2d_ros.core import sam_export

    root = tmp_path_factory.mktemp("sam")
    ckpt = sam_export.save_checkpoint(sam_export.random_state_dict("vit_b", seed=0),
                                      root / "sam_vit_b_random.pth")
    out = root / "exports"
    return ckpt, sam_export.export_onnx(None, ckpt, out), out
