"""Issue 15: a user error is one line naming the problem and what to do, exit code 1 or 2, no
traceback — for every command a user types (``perception2d …``, ``perception2d bringup``,
``make demo BAG=…``). The cases are the ones of ``scripts/user_errors.py`` (which also writes
the table in docs/RELIABILITY.md), run here as subprocesses the way a user runs them.

Also here: corrupt model files (no backend fallback), explicit device/backend requests,
truncated images, fetch advice and ``.part`` leftovers, model-path confinement of every
stage, and the TensorRT 10/11 build dispatch (checked against fake ``tensorrt`` modules: no
TensorRT can be installed here, so these check *our* version logic, not TensorRT itself).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("user_errors", REPO / "scripts" / "user_errors.py")
user_errors = importlib.util.module_from_spec(_spec)
sys.modules["user_errors"] = user_errors  # dataclasses look their module up
_spec.loader.exec_module(user_errors)  # type: ignore[union-attr]

GPU = user_errors.gpu_visible()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("user_errors")
    user_errors.build_fixtures(d)
    return d


@pytest.mark.parametrize("case", user_errors.CASES, ids=[c.name for c in user_errors.CASES])
def test_user_error_is_one_line_without_traceback(case, fixtures):
    if case.gpu_free and GPU:
        pytest.skip("a CUDA GPU is visible here, so the cuda request is honoured, not refused")
    res = user_errors.run_case(case, fixtures)
    lines = user_errors.error_lines(res.stderr)
    assert res.returncode in case.codes, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    assert len(lines) == 1, res.stderr  # exactly one line for the user to read
    for word in case.expect:
        assert word in lines[0], (word, lines[0])
    for word in case.stdout_expect:
        assert word in res.stdout, res.stdout


def _cli(*argv: str, env: dict | None = None, stdout=subprocess.PIPE):
    e = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "perception2d_ros.cli.main", *argv], cwd=REPO,
                          env=e, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)


@pytest.mark.parametrize("how", [("--debug",), ()], ids=["--debug", "PERCEPTION2D_DEBUG=1"])
def test_debug_shows_the_traceback(how, fixtures):
    env = {} if how else {"PERCEPTION2D_DEBUG": "1"}
    res = _cli("process", str(fixtures / "garbage.mcap"), "-o", str(fixtures / "o.mcap"), *how,
               env=env)
    assert res.returncode == 1
    assert "Traceback" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("perception2d process: error: ")


def test_process_checks_the_bag_before_loading_the_model(fixtures):
    """A missing bag is reported even when the detector model could not load at all."""
    res = _cli("process", str(fixtures / "missing.mcap"), "-o", str(fixtures / "o.mcap"),
               "--params-file", str(fixtures / "unknown_model.yaml"))
    assert res.returncode == 1 and "missing.mcap does not exist" in res.stderr
    assert "yolo_nonexistent" not in res.stderr


def test_bag_info_json_into_a_closed_pipe_is_quiet(fixtures):
    """``perception2d bag info --json BAG | head -0``: the reader is gone before we write."""
    r, w = os.pipe()
    os.close(r)
    try:
        res = _cli("bag", "info", "--json", str(fixtures / "good.mcap"), stdout=w)
    finally:
        os.close(w)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.returncode == 141  # as a tool killed by SIGPIPE (what `head` users expect)


# --------------------------------------------------------------------------- item 2
def test_corrupt_model_file_stops_without_trying_other_backends(fixtures, caplog):
    from perception2d_ros.engines import model_store as ms
    from perception2d_ros.engines.factory import EngineConfig, create_engine

    calls = []

    def torch_factory():
        calls.append(1)
        raise AssertionError("a corrupt file must not fall back to another backend")

    path = fixtures / "corrupt.onnx"
    with pytest.raises(ms.ModelFileError) as err:
        create_engine(path, EngineConfig(backend="auto"), torch_factory=torch_factory)
    text = str(err.value)
    assert str(path) in text and ms.sha256_file(path) in text and "models verify" in text
    assert not calls


def test_a_corrupt_manifest_model_names_its_expected_sha256(tmp_path, monkeypatch, models_dir):
    from perception2d_ros.engines import factory, model_store as ms

    monkeypatch.setenv(ms.ENV_VAR, str(tmp_path))
    entry = ms.load_manifest()["yolox_nano"]
    bad = tmp_path / entry.file
    bad.write_bytes((models_dir / entry.file).read_bytes()[:50_000])
    assert factory.model_file_problem(models_dir / entry.file) is None  # the real one parses
    with pytest.raises(ms.ModelFileError) as err:
        factory._raise_if_unparsable(bad, RuntimeError("onnxruntime failed"))
    text = str(err.value)
    assert f"expected {entry.sha256}" in text
    assert "perception2d models verify yolox_nano" in text


# --------------------------------------------------------------------------- item 3
@pytest.mark.skipif(GPU, reason="a CUDA GPU is visible: cuda requests are honoured here")
@pytest.mark.parametrize("backend", ["auto", "onnxruntime", "torch"])
def test_explicit_cuda_is_refused_not_run_on_the_cpu(backend, models_dir):
    from perception2d_ros.engines.base import BackendUnavailable
    from perception2d_ros.engines.factory import EngineConfig, create_engine

    with pytest.raises(BackendUnavailable, match="cuda"):
        create_engine(models_dir / "yolox_nano.onnx", EngineConfig(backend=backend,
                                                                   device="cuda"))


def test_an_explicit_backend_that_cannot_run_is_not_replaced(models_dir):
    """``backend: torch`` whose engine reports it cannot run here is refused, not swapped for
    ONNX Runtime with a warning (fallback is for build failures)."""
    from perception2d_ros.engines.base import BackendUnavailable
    from perception2d_ros.engines.factory import EngineConfig, create_engine

    def torch_factory():
        raise BackendUnavailable("torch backend on 'cuda' requested but no CUDA GPU visible")

    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        create_engine(models_dir / "yolox_nano.onnx",
                      EngineConfig(backend="torch", fallback=True), torch_factory=torch_factory)


@pytest.mark.parametrize("command", ["detect", "label", "segment", "seglabels"])
def test_every_command_accepts_the_same_backends(command):
    from perception2d_ros.cli.main import build_parser
    from perception2d_ros.engines.base import BACKEND_CHOICES

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    backend = next(a for a in sub._actions if a.dest == "backend")
    assert tuple(backend.choices) == BACKEND_CHOICES


def test_auto_on_a_non_torch_gpu_detector_says_why_frames_stay_on_the_host():
    from perception2d_ros.pipeline.build import device_frames_for

    engine = types.SimpleNamespace(backend="tensorrt", device="cuda")  # what TensorRT reports
    lines: list[str] = []
    assert device_frames_for(types.SimpleNamespace(engine=engine), "auto", lines.append) is None
    assert any("device_frames" in ln and "tensorrt" in ln for ln in lines), lines


# --------------------------------------------------------------------------- item 4
def test_truncated_images_are_detected(fixtures, tmp_path):
    import cv2

    from perception2d_ros.io.image_files import ImageFileError, read_image, truncation

    good = (fixtures / "image.jpg").read_bytes()
    assert truncation(good) is None and truncation(good + b"\0\0") is None
    assert "JPEG" in truncation(good[:-2])
    ok, png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
    assert ok and truncation(png.tobytes()) is None
    assert "PNG" in truncation(png.tobytes()[:-12])
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.tobytes()[:-12])
    with pytest.raises(ImageFileError, match="truncated PNG"):
        read_image(cut)
    assert read_image(fixtures / "image.jpg").shape[2] == 3


# --------------------------------------------------------------------------- item 6
@pytest.mark.parametrize("name,want,never", [
    ("yolov8n", "yolo export", "models fetch yolov8n"),          # user export
    ("lseg_demo_e200", "the path is", "models fetch lseg_demo_e200"),  # manual
    ("sam_vit_b", "perception2d models fetch sam_vit_b", None),  # downloadable
])
def test_missing_model_advice_names_a_command_that_works(tmp_path, name, want, never):
    from perception2d_ros.engines import model_store as ms

    with pytest.raises(ms.ModelFileError) as err:
        ms.resolve(name, tmp_path)
    assert want in str(err.value)
    if never:
        assert never not in str(err.value)


def test_offline_fetch_leaves_no_empty_part_file(fixtures):
    case = next(c for c in user_errors.CASES if c.name == "models fetch: offline")
    res = user_errors.run_case(case, fixtures)
    assert res.returncode != 0
    assert not list((fixtures / "models").glob("*.part")), list((fixtures / "models").iterdir())


# --------------------------------------------------------------------------- item 10
MODEL_PARAMETERS = [("detect", "model"), ("sam", "model"), ("sam", "checkpoint"),
                    ("clip", "model"), ("clip", "checkpoint"), ("lseg", "model"),
                    ("lseg", "checkpoint"), ("lseg", "text_model")]


def test_the_confined_parameters_are_every_model_parameter():
    from perception2d_ros.engines.model_params import MODEL_PARAMS

    assert sorted((s, k) for s, ks in MODEL_PARAMS.items() for k in ks) == \
        sorted(MODEL_PARAMETERS)


@pytest.mark.parametrize("stage,key", MODEL_PARAMETERS)
def test_every_model_parameter_is_confined_to_models_dir(tmp_path, stage, key):
    from perception2d_ros.engines.model_params import confine_model_params
    from perception2d_ros.pipeline.config import merge_config

    outside = tmp_path / "elsewhere" / "weights.pt"
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    models = tmp_path / "models"
    models.mkdir()
    (models / "inside.pt").write_bytes(b"x")
    cfg = merge_config({"stages": ["detect", stage], "models_dir": str(models),
                        stage: {key: str(outside)}})
    from perception2d_ros.engines.model_store import ModelFileError

    with pytest.raises(ModelFileError,
                       match=f"{stage}.{key}.*{stage}.allow_outside_models_dir"):
        confine_model_params(cfg)
    cfg[stage]["allow_outside_models_dir"] = True
    confine_model_params(cfg)  # the same switch for every stage
    cfg[stage].update({"allow_outside_models_dir": False, key: "inside.pt"})
    confine_model_params(cfg)  # inside the models dir: fine


# --------------------------------------------------------------------------- item 11
class _Recorder:
    """Stands in for the ``tensorrt`` module (not installable here) to check which calls our
    build makes per version. ``removed``: attribute names this version no longer has."""

    def __init__(self, version: str, removed: set[str], fail_build: bool = False) -> None:
        self.calls: list[str] = []
        rec = self
        self.__version__ = version

        class _Flags:
            STRONGLY_TYPED = 0

        class _BuilderFlag:
            pass

        for name in ("FP16", "INT8", "TF32"):
            if name not in removed:
                setattr(_BuilderFlag, name, name)

        class _Cache:
            def serialize(self):
                return b"timing"

        class _Config:
            def set_memory_pool_limit(self, *a):
                rec.calls.append("set_memory_pool_limit")

            def set_flag(self, flag):
                rec.calls.append(f"set_flag:{flag}")

            def create_timing_cache(self, data):
                rec.calls.append(f"create_timing_cache:{len(data)}")
                return _Cache()

            def set_timing_cache(self, cache, ignore):
                rec.calls.append("set_timing_cache")
                return True

            def __setattr__(self, name, value):
                if name in removed:
                    raise AttributeError(name)
                rec.calls.append(f"setattr:{name}")
                object.__setattr__(self, name, value)

        class _Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                rec.calls.append("parse_from_file")
                return True

        class _Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.calls.append(f"create_network:{flags}")
                return object()

            def create_builder_config(self):
                return _Config()

            def build_serialized_network(self, network, config):
                rec.calls.append("build_serialized_network")
                if fail_build:
                    raise MemoryError("out of GPU memory")
                return b"plan"

            def __getattr__(self, name):
                if name in removed:
                    raise AttributeError(name)
                return True

        self.NetworkDefinitionCreationFlag = _Flags
        self.BuilderFlag = _BuilderFlag
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.Builder = _Builder
        self.OnnxParser = _Parser


TRT11_REMOVED = {"FP16", "INT8", "platform_has_fast_fp16", "int8_calibrator"}


def test_tensorrt_11_build_uses_no_removed_api(tmp_path, models_dir):
    from perception2d_ros.engines.tensorrt_backend import build_serialized_engine

    trt = _Recorder("11.4.0", TRT11_REMOVED)
    cache = tmp_path / "timing.cache"
    plan = build_serialized_engine(trt, models_dir / "yolox_nano.onnx", precision="fp32",
                                   profiles={}, logger=None, timing_cache=cache)
    assert plan == b"plan"
    assert not any(c.startswith("set_flag") for c in trt.calls), trt.calls
    assert "create_network:0" in trt.calls  # strongly typed is always on in 11
    assert cache.read_bytes() == b"timing" and "set_timing_cache" in trt.calls
    # a second build reads the cache it wrote
    build_serialized_engine(trt, models_dir / "yolox_nano.onnx", precision="fp32",
                            profiles={}, logger=None, timing_cache=cache)
    assert "create_timing_cache:6" in trt.calls


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_11_refuses_precisions_an_fp32_onnx_cannot_give(models_dir, precision):
    from perception2d_ros.engines.base import EngineError
    from perception2d_ros.engines.tensorrt_backend import build_serialized_engine

    trt = _Recorder("11.0.1", TRT11_REMOVED)
    with pytest.raises(EngineError, match="ONNX"):
        build_serialized_engine(trt, models_dir / "yolox_nano.onnx", precision=precision,
                                profiles={}, logger=None)
    assert "build_serialized_network" not in trt.calls


def test_tensorrt_10_fp16_uses_the_builder_flag(models_dir):
    from perception2d_ros.engines.tensorrt_backend import build_serialized_engine

    trt = _Recorder("10.3.0", set())
    build_serialized_engine(trt, models_dir / "yolox_nano.onnx", precision="fp16",
                            profiles={}, logger=None)
    assert "set_flag:FP16" in trt.calls and "create_network:0" in trt.calls


def test_any_exception_in_an_engine_build_is_an_engine_error(models_dir):
    from perception2d_ros.engines.base import EngineError
    from perception2d_ros.engines.tensorrt_backend import build_serialized_engine

    trt = _Recorder("10.3.0", set(), fail_build=True)
    with pytest.raises(EngineError, match="MemoryError: out of GPU memory"):
        build_serialized_engine(trt, models_dir / "yolox_nano.onnx", precision="fp32",
                                profiles={}, logger=None)


def test_models_build_defaults_to_fp32():
    from perception2d_ros.cli.main import build_parser

    args = build_parser().parse_args(["models", "build", "yolox_nano"])
    assert args.precision == "fp32"
