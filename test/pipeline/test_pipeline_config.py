"""Pipeline configuration: defaults, validation naming the parameter, extrinsics forms."""
from __future__ import annotations

import numpy as np
import pytest

from perception2d_ros.geometry.extrinsics import Extrinsics
from perception2d_ros.pipeline.build import build_pipeline
from perception2d_ros.pipeline.config import merge_config, validate_config


def _extr(pipeline):
    return next(s for s in pipeline.stages if s.name == "detect").extrinsics


def test_quaternion_and_rpy_extrinsics_agree():
    pitch = 0.5
    q = [0.0, np.sin(pitch / 2), 0.0, np.cos(pitch / 2)]  # body pitched down by 0.5 rad
    base = {"stages": ["detect"], "extrinsics": {"enabled": True,
                                                  "translation": [0.1, 0.0, 1.2]}}
    a = _extr(build_pipeline(merge_config({**base, "extrinsics": {
        **base["extrinsics"], "rotation_rpy": [0.0, pitch, 0.0]}})))
    b = _extr(build_pipeline(merge_config({**base, "extrinsics": {
        **base["extrinsics"], "rotation_quaternion": q}})))
    np.testing.assert_allclose(a.rotation, b.rotation, atol=1e-12)
    np.testing.assert_allclose(a.rotation, Extrinsics.from_body_pose(
        [0.1, 0.0, 1.2], [0.0, pitch, 0.0]).rotation, atol=1e-12)
    # the optical axis (z) of a camera pitched down points forward and down in base
    z = a.rotation[:, 2]
    assert z[0] > 0 and z[2] < 0


@pytest.mark.parametrize("override,field", [
    ({"stages": ["detect", "teleport"]}, "stages"),
    ({"interpolation": "bicubic"}, "interpolation"),
    ({"output_encoding": "yuv444"}, "output_encoding"),
    ({"detect": {"conf_threshold": 1.5}}, "detect.conf_threshold"),
    ({"detect": {"max_detections": 0}}, "detect.max_detections"),
    ({"extrinsics": {"rotation_quaternion": [0, 0, 1]}}, "extrinsics.rotation_quaternion"),
])
def test_invalid_config_names_the_parameter(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate_config(merge_config(override))


def test_defaults_cover_every_stage_group():
    cfg = merge_config(None)
    for group in ("detect", "extrinsics", "sam", "clip", "lseg"):
        assert isinstance(cfg[group], dict) and cfg[group]
    assert cfg["stages"] == ["rectify", "detect"]
