"""``perception2d models`` list/fetch/export/build/verify.

Downloads go only to a loopback HTTP server started here (127.0.0.1, port 0, with ``Range``
support implemented below; it stops by itself). Nothing touches the network.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from perception2d_ros.engines import fetch, model_store as ms

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
CONTRACT_KEYS = {"name", "kind", "present", "sha256_ok", "licence", "path"}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `perception2d models ...` in-process with only this command family registered."""
    from perception2d_ros.cli import models as cli

    parser = argparse.ArgumentParser(prog="perception2d")
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", *argv])
    rc = args.func(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --------------------------------------------------------------------------- loopback server
class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        srv.requests.append(self.headers.get("Range"))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if srv.drops:  # drop the connection mid-file (once per queued drop)
            cut = srv.drops.pop(0)
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class LoopbackServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[str | None] = []
        self.drops: list[int] = []
        self.ignore_range = False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server():
    srv = LoopbackServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    watchdog = threading.Timer(120, srv.shutdown)  # bounded even if a test hangs
    watchdog.daemon = True
    watchdog.start()
    yield srv
    watchdog.cancel()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def _blob(n: int = 3 * (1 << 20) + 12345, seed: int = 7) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _models_dir(tmp_path: Path, data: bytes, *, sha: str | None = "auto",
                size: int | None = None, url: str | None = None) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    spec = {"kind": "detector", "file": "blob.onnx", "licence": "MIT", "source": "test",
            "sha256": hashlib.sha256(data).hexdigest() if sha == "auto" else sha,
            "stages": ["detect"], "provision": "fetch"}
    if size is not None:
        spec["size"] = size
    if url:
        spec["url"] = url
    if spec["sha256"] is None:
        spec["sha256_note"] = "test"
    (d / ms.MANIFEST).write_text(yaml.safe_dump({"models": {"blob": spec}}), encoding="utf-8")
    return d


# --------------------------------------------------------------------------- fetch
def test_fetch_resumes_after_the_server_drops_the_connection(server, tmp_path, capsys):
    data = _blob()
    server.files["/blob.onnx"] = data
    server.drops = [1_500_000]
    d = _models_dir(tmp_path, data, size=len(data), url=server.url("/blob.onnx"))
    rc, out, err = run_cli(capsys, "fetch", "blob", "--models-dir", str(d), "--quiet")
    assert rc == 0, err
    assert (d / "blob.onnx").read_bytes() == data
    assert not (d / "blob.onnx.part").exists()
    assert server.requests == [None, "bytes=1500000-"]
    assert "verified" in out and "1 reconnect" in out and "resuming" in err
    assert ms.resolve("blob", d)[0] == (d / "blob.onnx").resolve()


def test_fetch_continues_a_part_file_left_by_an_earlier_run(server, tmp_path, capsys):
    data = _blob()
    server.files["/b"] = data
    d = _models_dir(tmp_path, data)
    (d / "blob.onnx.part").write_bytes(data[:1_000_000])  # e.g. the process was killed
    rc, out, err = run_cli(capsys, "fetch", "blob", "--models-dir", str(d), "--url",
                           server.url("/b"))
    assert rc == 0, err
    assert server.requests == ["bytes=1000000-"]
    assert (d / "blob.onnx").read_bytes() == data
    assert "resumed from 1000000 bytes" in out


def test_fetch_restarts_when_the_server_ignores_range(server, tmp_path, capsys):
    data = _blob()
    server.files["/b"] = data
    server.ignore_range = True
    d = _models_dir(tmp_path, data)
    (d / "blob.onnx.part").write_bytes(b"garbage" * 1000)
    rc, _, err = run_cli(capsys, "fetch", "blob", "--models-dir", str(d), "--url",
                         server.url("/b"), "--quiet")
    assert rc == 0, err
    assert (d / "blob.onnx").read_bytes() == data
    assert "ignored the Range" in err


def test_sha_mismatch_is_rejected_and_nothing_is_left_in_place(server, tmp_path, capsys):
    data = _blob()
    server.files["/b"] = data
    d = _models_dir(tmp_path, data, sha=hashlib.sha256(b"the official file").hexdigest())
    rc, _, err = run_cli(capsys, "fetch", "blob", "--models-dir", str(d), "--url",
                         server.url("/b"), "--quiet")
    assert rc == 1
    assert "sha256 mismatch" in err and "nothing was put in place" in err
    assert not (d / "blob.onnx").exists() and not (d / "blob.onnx.part").exists()
    with pytest.raises(ms.ModelFileError):
        ms.resolve("blob", d)


def test_a_corrupt_resumed_part_is_rejected(server, tmp_path, capsys):
    data = _blob()
    server.files["/b"] = data
    d = _models_dir(tmp_path, data)
    (d / "blob.onnx.part").write_bytes(b"\0" * 1000)  # wrong prefix: resume yields bad bytes
    rc, _, err = run_cli(capsys, "fetch", "blob", "--models-dir", str(d), "--url",
                         server.url("/b"), "--quiet")
    assert rc == 1 and "sha256 mismatch" in err
    assert not (d / "blob.onnx").exists() and not (d / "blob.onnx.part").exists()
    # the next run starts clean and succeeds
    rc, _, err = run_cli(capsys, "fetch", "blob", "--models-dir", str(d), "--url",
                         server.url("/b"), "--quiet")
    assert rc == 0, err


def test_partial_download_is_kept_and_never_used(server, tmp_path, capsys):
    data = _blob()
    server.files["/b"] = data
    server.drops = [700_000, 0, 0, 0]  # one cut mid-file, then no progress at all
    d = _models_dir(tmp_path, data)
    with pytest.raises(fetch.FetchError, match="run the same command again to resume"):
        fetch.fetch_model(ms.load_manifest(d)["blob"], d, url=server.url("/b"),
                          progress=False, retries=2, backoff_s=0.01, log=lambda m: None)
    part = d / "blob.onnx.part"
    assert part.stat().st_size == 700_000 and not (d / "blob.onnx").exists()
    with pytest.raises(ms.ModelFileError, match="not found"):
        ms.resolve("blob", d)
    rc, out, _ = run_cli(capsys, "list", "--json", "--models-dir", str(d))
    row = json.loads(out)[0]
    assert row["present"] is False and row["sha256_ok"] is None
    assert row["partial_bytes"] == 700_000
    rc, out, _ = run_cli(capsys, "verify", "--models-dir", str(d))
    assert rc == 0 and "partial" in out
    res = fetch.fetch_model(ms.load_manifest(d)["blob"], d, url=server.url("/b"),
                            progress=False, log=lambda m: None)
    assert res.verified and res.resumed_from == 700_000
    assert (d / "blob.onnx").read_bytes() == data


def test_one_download_per_file_at_a_time(server, tmp_path, capsys):
    import fcntl

    data = _blob(10_000)
    server.files["/b"] = data
    d = _models_dir(tmp_path, data)
    with open(d / "blob.onnx.part", "ab") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        rc, _, err = run_cli(capsys, "fetch", "blob", "--models-dir", str(d), "--url",
                             server.url("/b"), "--quiet")
    assert rc == 1 and "in progress" in err and server.requests == []


def test_offline_error_names_the_path_and_sha256(tmp_path, capsys):
    data = b"x" * 100
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = _models_dir(tmp_path, data, url=f"http://127.0.0.1:{port}/blob.onnx")
    rc, _, err = run_cli(capsys, "fetch", "blob", "--models-dir", str(d), "--quiet")
    assert rc == 1
    sha = hashlib.sha256(data).hexdigest()
    assert f"no network: put the file at {d / 'blob.onnx'} (sha256 {sha})" in err


def test_fetch_refuses_what_it_cannot_verify_or_download(server, tmp_path, capsys):
    data = b"y" * 1000
    server.files["/b"] = data
    d = _models_dir(tmp_path, data, sha=None)
    rc, _, err = run_cli(capsys, "fetch", "blob", "--models-dir", str(d), "--url",
                         server.url("/b"))
    assert rc == 1 and "no sha256 known" in err and server.requests == []
    rc, out, err = run_cli(capsys, "fetch", "blob", "--models-dir", str(d), "--url",
                           server.url("/b"), "--allow-unverified", "--quiet")
    assert rc == 0 and "UNVERIFIED" in out
    rc, out, _ = run_cli(capsys, "list", "--json", "--models-dir", str(d))
    assert json.loads(out)[0]["sha256_ok"] is None  # never reported as verified
    # manual / user-export entries have no URL: a clear message with the path
    d2 = tmp_path / "m2"
    rc, _, err = run_cli(capsys, "fetch", "lseg_demo_e200", "--models-dir", str(d2))
    assert rc == 1 and str(d2 / "demo_e200.ckpt") in err
    rc, _, err = run_cli(capsys, "fetch", "nope", "--models-dir", str(d2))
    assert rc == 2 and "unknown model" in err


def test_fetch_of_a_present_verified_file_does_nothing(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(MODELS / "coco_classes.txt", d)
    rc, out, _ = run_cli(capsys, "fetch", "coco_classes", "--models-dir", str(d))
    assert rc == 0 and "already present" in out


def test_size_announced_by_server_must_match_the_manifest(server, tmp_path, capsys):
    data = _blob(50_000)
    server.files["/b"] = data + b"extra"
    d = _models_dir(tmp_path, data, size=len(data))
    rc, _, err = run_cli(capsys, "fetch", "blob", "--models-dir", str(d), "--url",
                         server.url("/b"), "--quiet")
    assert rc == 1 and "manifest says" in err and not (d / "blob.onnx").exists()


# --------------------------------------------------------------------------- list / verify
def _copy_models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for p in MODELS.iterdir():
        if p.is_file() and p.name != ms.OVERLAY and p.stat().st_size < 10 << 20:
            shutil.copy(p, d / p.name)
    return d


def test_list_json_contract(tmp_path, capsys):
    d = _copy_models(tmp_path)
    rc, out, _ = run_cli(capsys, "list", "--json", "--models-dir", str(d))
    assert rc == 0
    rows = json.loads(out)
    assert isinstance(rows, list) and rows
    names = {r["name"] for r in rows}
    assert {"yolox_nano", "yolov8n", "clip_vit_b32", "sam_vit_b", "mobile_sam",
            "lseg_demo_e200"} <= names
    for r in rows:
        assert CONTRACT_KEYS <= set(r), r
        assert isinstance(r["name"], str) and isinstance(r["kind"], str)
        assert isinstance(r["present"], bool) and r["sha256_ok"] in (True, False, None)
        assert isinstance(r["licence"], str) and r["licence"]
        assert Path(r["path"]).is_absolute() and Path(r["path"]).parent == d.resolve()
        if not r["present"]:
            assert r["sha256_ok"] is None
    by = {r["name"]: r for r in rows}
    assert by["yolox_nano"]["present"] and by["yolox_nano"]["sha256_ok"] is True
    assert by["yolov8n"]["present"] is False and by["yolov8n"]["provision"] == "user-export"
    rc, out, _ = run_cli(capsys, "list", "--models-dir", str(d))
    assert rc == 0 and "yolox_nano" in out and "AGPL-3.0" in out and "user" in out


def test_verify_detects_a_flipped_byte(tmp_path, capsys):
    d = _copy_models(tmp_path)
    rc, out, _ = run_cli(capsys, "verify", "--models-dir", str(d))
    assert rc == 0 and "0 failed" in out
    target = d / "yolox_nano.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    rc, out, err = run_cli(capsys, "verify", "--models-dir", str(d))
    assert rc == 1
    assert f"FAIL     yolox_nano: {target}" in out and "sha256 mismatch" in out
    assert "1 failed" in out and "do not match" in err
    rc, out, _ = run_cli(capsys, "list", "--json", "--models-dir", str(d))
    assert {r["name"]: r for r in json.loads(out)}["yolox_nano"]["sha256_ok"] is False


def test_models_dir_from_flag_and_environment(tmp_path, capsys, monkeypatch):
    d = tmp_path / "mine"
    d.mkdir()
    shutil.copy(MODELS / "yolox_nano.onnx", d)  # no manifest here: the package's is used
    monkeypatch.delenv(ms.ENV_VAR, raising=False)
    rc, out, _ = run_cli(capsys, "list", "--json", "--models-dir", str(d))
    by = {r["name"]: r for r in json.loads(out)}
    assert by["yolox_nano"]["path"] == str(d.resolve() / "yolox_nano.onnx")
    assert by["yolox_nano"]["present"] and not by["coco_classes"]["present"]
    monkeypatch.setenv(ms.ENV_VAR, str(d))
    rc, out2, _ = run_cli(capsys, "list", "--json")
    assert json.loads(out2) == json.loads(out)
    rc, out3, _ = run_cli(capsys, "verify")
    assert rc == 0 and f"models directory: {d.resolve()}" in out3 and "1 ok" in out3


def test_console_entry_point_wiring(tmp_path):
    d = _copy_models(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "perception2d_ros.cli.main", "models", "list",
                           "--json", "--models-dir", str(d)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert CONTRACT_KEYS <= set(json.loads(proc.stdout)[0])


# --------------------------------------------------------------------------- build
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here: the no-TensorRT message is not shown")
def test_build_without_tensorrt_fails_clearly(capsys):
    rc, _, err = run_cli(capsys, "build", "yolox_nano", "--precision", "fp16")
    assert rc == 3
    assert "cannot build a TensorRT engine on this machine" in err and "tensorrt" in err
    rc, _, err = run_cli(capsys, "build", "yolox_nano", "--precision", "int8", "--check")
    assert rc == 3 and "TensorRT" in err


# --------------------------------------------------------------------------- export
def test_export_argument_errors(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "export", "nope")
    assert rc == 2 and "unknown model" in err
    rc, _, err = run_cli(capsys, "export", "yolox_nano")
    assert rc == 2 and "no export recipe" in err and "clip_vit_b32" in err
    rc, _, err = run_cli(capsys, "export", "clip_vit_b32", "--random-weights", "--checkpoint",
                         "x.pt")
    assert rc == 2


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_export_without_checkpoint_says_how_to_get_it(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    rc, _, err = run_cli(capsys, "export", "clip_vit_b32", "--models-dir", str(d))
    if not _has("perception2d_ros.models.clip.parity"):
        assert rc == 3 and "not available" in err
        return
    assert rc == 1 and "models fetch clip_vit_b32" in err


@pytest.mark.slow
@pytest.mark.skipif(not _has("perception2d_ros.models.clip.parity"),
                    reason="perception2d_ros.models.clip.parity (CLIP export) not in this build")
def test_export_clip_random_weights_records_sha256(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    rc, out, err = run_cli(capsys, "export", "clip_vit_b32", "--random-weights", "--seed", "3",
                           "--models-dir", str(d))
    assert rc == 0, err
    assert "RANDOM WEIGHTS" in err and "smoke run ok" in err and "parity" in err
    overlay = yaml.safe_load((d / ms.OVERLAY).read_text())["models"]
    assert overlay, "nothing recorded"
    for name, spec in overlay.items():
        assert name.startswith("clip_vit_b32_") and name.endswith("_random")
        assert spec["random_weights"] is True and spec["seed"] == 3
        path = d / spec["file"]
        assert path.parent == d / "random-weights"  # never where stages look by default
        assert ms.sha256_file(path) == spec["sha256"]
    # recorded files verify like shipped ones, and verify catches tampering
    manifest = ms.load_manifest(d)
    name = next(iter(overlay))
    assert manifest[name].exported and ms.resolve(name, d)[0].is_file()
    rc, out, _ = run_cli(capsys, "verify", "--models-dir", str(d))
    assert rc == 0 and f"ok       {name}" in out
    rc, out, _ = run_cli(capsys, "list", "--json", "--models-dir", str(d))
    row = {r["name"]: r for r in json.loads(out)}[name]
    assert row["present"] and row["sha256_ok"] is True and row["random_weights"] is True


# --------------------------------------------------------------------------- export CLI path
FAKE_EXPORT = '''
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

CALLS = []
PASS = True


def export_onnx(arch, checkpoint, out_dir, *, seed=None):
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])
    y = helper.make_tensor_value_info("embed", TensorProto.FLOAT, None)
    node = helper.make_node("Relu", ["image"], ["embed"])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = Path(out_dir)
    onnx.save(model, out / f"fake_{arch}.onnx")
    (out / "fake.json").write_text(json.dumps({"arch": arch, "seed": seed}))
    return {"image": out / f"fake_{arch}.onnx", "meta": out / "fake.json"}


def parity_check(arch, checkpoint, exported, image_bgr, boxes):
    CALLS.append(dict(arch=arch, checkpoint=checkpoint, exported=exported,
                      shape=image_bgr.shape, boxes=np.asarray(boxes).tolist()))
    return {"passed": PASS, "max_abs_diff": np.float32(0.0), "cosine_min": np.float64(1.0)}
'''


@pytest.fixture
def fake_export(tmp_path, monkeypatch):
    """A models dir whose manifest has one entry exported by a tiny stand-in module that
    follows the stage modules' export_onnx/parity_check contract."""
    from perception2d_ros.cli import models_export

    monkeypatch.setattr(models_export, "EXPORT_MODULE_PREFIXES",
                        models_export.EXPORT_MODULE_PREFIXES + ("p2d_fake_export",))
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "p2d_fake_export.py").write_text(FAKE_EXPORT)
    monkeypatch.syspath_prepend(str(mod_dir))
    sys.modules.pop("p2d_fake_export", None)
    d = tmp_path / "models"
    d.mkdir()
    raw = yaml.safe_load((MODELS / ms.MANIFEST).read_text())
    ckpt = b"pretend official checkpoint"
    raw["models"]["fake_model"] = {
        "kind": "sam", "file": "fake.pt", "licence": "MIT", "source": "test",
        "sha256": hashlib.sha256(ckpt).hexdigest(), "stages": ["sam"], "provision": "fetch",
        "export": {"module": "p2d_fake_export", "arch": "tiny"}}
    (d / ms.MANIFEST).write_text(yaml.safe_dump(raw))
    yield d, ckpt
    sys.modules.pop("p2d_fake_export", None)


def test_export_random_weights_cli_path(fake_export, capsys):
    d, _ = fake_export
    rc, out, err = run_cli(capsys, "export", "fake_model", "--random-weights", "--seed", "5",
                           "--models-dir", str(d))
    assert rc == 0, err
    import p2d_fake_export as fake

    call = fake.CALLS[-1]
    assert call["checkpoint"] is None and call["shape"] == (427, 640, 3)  # the real image
    assert call["boxes"] == [[389, 70, 498, 348], [1, 240, 348, 427]]
    assert "RANDOM WEIGHTS (seed 5)" in err and "smoke run ok: fake_tiny.onnx" in err
    assert "parity on sample.jpg (PASS)" in err
    overlay = yaml.safe_load((d / ms.OVERLAY).read_text())["models"]
    assert set(overlay) == {"fake_model_image_random", "fake_model_meta_random"}
    spec = overlay["fake_model_image_random"]
    assert spec["file"] == "random-weights/fake_tiny.onnx" and spec["random_weights"] is True
    assert spec["seed"] == 5 and spec["parity_passed"] is True
    assert spec["parity"]["max_abs_diff"] == 0.0
    assert spec["sha256"] == ms.sha256_file(d / spec["file"])
    assert not (d / "fake_tiny.onnx").exists()  # never where a stage looks by default
    # shipped manifest untouched; recorded files verify; tampering is caught
    assert "fake_model_image_random" not in yaml.safe_load((d / ms.MANIFEST).read_text())
    rc, out, _ = run_cli(capsys, "verify", "--models-dir", str(d))
    assert rc == 0 and "ok       fake_model_image_random" in out
    (d / "random-weights" / "fake.json").write_text("{}")
    rc, out, _ = run_cli(capsys, "verify", "--models-dir", str(d))
    assert rc == 1 and "FAIL     fake_model_meta_random" in out


def test_export_official_checkpoint_cli_path(fake_export, capsys):
    d, ckpt = fake_export
    rc, _, err = run_cli(capsys, "export", "fake_model", "--models-dir", str(d))
    assert rc == 1 and "models fetch fake_model" in err  # checkpoint missing: how to get it
    (d / "fake.pt").write_bytes(ckpt)
    rc, out, err = run_cli(capsys, "export", "fake_model", "--models-dir", str(d))
    assert rc == 0, err
    import p2d_fake_export as fake

    assert Path(fake.CALLS[-1]["checkpoint"]) == (d / "fake.pt").resolve()
    assert "RANDOM" not in err
    spec = ms.load_manifest(d)["fake_model_image"]
    assert spec.exported and spec.file == "fake_tiny.onnx"
    assert spec.extra["official_checkpoint"] is True
    assert spec.extra["checkpoint_sha256"] == hashlib.sha256(ckpt).hexdigest()
    assert ms.resolve("fake_model_image", d)[0] == (d / "fake_tiny.onnx").resolve()
    # a user checkpoint outside the models dir: allowed, flagged as not official
    other = d.parent / "mine.pt"
    other.write_bytes(b"fine-tuned")
    rc, _, err = run_cli(capsys, "export", "fake_model", "--checkpoint", str(other),
                         "--models-dir", str(d))
    assert rc == 0 and "not the official" in err
    assert ms.load_manifest(d)["fake_model_image"].extra["official_checkpoint"] is False


def test_export_only_imports_the_suites_modules(tmp_path, capsys):
    d = tmp_path / "models"
    d.mkdir()
    raw = yaml.safe_load((MODELS / ms.MANIFEST).read_text())
    raw["models"]["evil"] = {"kind": "sam", "file": "e.pt", "licence": "MIT", "source": "x",
                             "sha256": None, "export": {"module": "os", "arch": "x"}}
    (d / ms.MANIFEST).write_text(yaml.safe_dump(raw))
    rc, _, err = run_cli(capsys, "export", "evil", "--random-weights", "--models-dir", str(d))
    assert rc == 2 and "refusing to import" in err


def test_export_parity_failure_fails_the_command(fake_export, capsys):
    d, _ = fake_export
    import p2d_fake_export as fake

    fake.PASS = False
    rc, _, err = run_cli(capsys, "export", "fake_model", "--random-weights",
                         "--models-dir", str(d))
    assert rc == 1 and "parity check of fake_model did not pass" in err
    spec = ms.load_manifest(d)["fake_model_image_random"]
    assert spec.extra["parity_passed"] is False


def test_build_profile_parsing():
    from perception2d_ros.cli.models_build import _parse_profiles

    assert _parse_profiles(["x=1x3/4x3/8x3", "y=1/2/3"]) == {
        "x": [[1, 3], [4, 3], [8, 3]], "y": [[1], [2], [3]]}
    for bad in ("x=1x3/4x3", "x", "=1/2/3", "x=1x3/4/8x3", "x=a/b/c"):
        with pytest.raises(ValueError):
            _parse_profiles([bad])


@pytest.mark.slow
def test_export_lseg_small_random_weights_with_the_real_module(tmp_path, capsys):
    """The CLI path end to end with a real stage module: lseg_net's reduced test
    architecture (random weights), ONNX Runtime smoke run, parity on the shipped image."""
    pytest.importorskip("torch")
    if not _has("perception2d_ros.models.lseg.parity"):
        pytest.skip("perception2d_ros.models.lseg.parity not in this build")
    from perception2d_ros.models.lseg import net as lseg_net

    if "lseg_test_small" not in getattr(lseg_net, "ARCHS", {}):
        pytest.skip("lseg_net has no reduced test architecture")
    d = tmp_path / "models"
    d.mkdir()
    raw = yaml.safe_load((MODELS / ms.MANIFEST).read_text())
    spec = dict(raw["models"]["lseg_demo_e200"])
    spec["export"] = {"module": "perception2d_ros.models.lseg.parity", "arch": "lseg_test_small"}
    raw["models"]["lseg_small"] = spec
    (d / ms.MANIFEST).write_text(yaml.safe_dump(raw))
    rc, out, err = run_cli(capsys, "export", "lseg_small", "--random-weights", "--seed", "0",
                           "--models-dir", str(d))
    assert rc == 0, err
    assert "smoke run ok" in err and "(PASS)" in err
    text = (d / ms.OVERLAY).read_text()
    assert "&id" not in text  # plain YAML, no anchors
    entry = ms.load_manifest(d)["lseg_small_image_random"]
    assert entry.file.startswith("random-weights/") and entry.file.endswith(".onnx")
    assert entry.extra["parity_passed"] is True and "RANDOM WEIGHTS" in entry.source
    assert ms.resolve("lseg_small_image_random", d)[0].is_file()
