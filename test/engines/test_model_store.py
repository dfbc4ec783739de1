"""The shipped manifest's schema and the model store's rules (no network, no heavy imports)."""
from __future__ import annotations

import re
import shutil
import urllib.parse
from pathlib import Path

import pytest
import yaml

from perception2d_ros.engines import model_store as ms

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "models" / "manifest.yaml"
HEX64 = re.compile(r"^[0-9a-f]{64}$")
LICENCES = {"Apache-2.0", "MIT", "AGPL-3.0", "CC-BY-2.0", "BSD-3-Clause"}


def _raw() -> dict:
    return yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))["models"]


def test_every_entry_has_the_required_keys():
    raw = _raw()
    assert raw, "empty manifest"
    for name, spec in raw.items():
        for key in ("kind", "file", "licence", "source", "stages", "provision"):
            assert spec.get(key), f"{name}: '{key}' missing or empty"
        assert "sha256" in spec, f"{name}: sha256 must be given (null with sha256_note if unknown)"
        assert spec["provision"] in ms.PROVISIONS, name
        assert spec["licence"] in LICENCES, f"{name}: unexpected licence {spec['licence']}"
        assert isinstance(spec["stages"], list) and all(isinstance(s, str) for s in spec["stages"])
        ms.check_relative_file(spec["file"], name)


def test_sha256_format_and_notes():
    for name, spec in _raw().items():
        sha = spec["sha256"]
        if sha is None:
            assert spec.get("sha256_note"), f"{name}: null sha256 needs a sha256_note"
        else:
            assert HEX64.match(sha), f"{name}: sha256 {sha!r} is not 64 lowercase hex digits"


def test_fetchable_entries_have_https_urls_and_sizes():
    for name, spec in _raw().items():
        if spec["provision"] == "fetch":
            url = urllib.parse.urlsplit(spec["url"])
            assert url.scheme == "https" and url.netloc, name
            assert spec["sha256"], f"{name}: a fetched file must be verifiable"
            assert Path(url.path).name == spec["file"], f"{name}: URL file name != file"
        if spec["provision"] in ("manual", "user-export"):
            assert spec.get("note"), f"{name}: {spec['provision']} needs a note saying how"
            assert not spec.get("url"), name


def test_openai_clip_urls_carry_their_sha256():
    # clip/clip.py checks the download against the URL's directory name; so do we.
    for name, spec in _raw().items():
        if spec["kind"] == "clip":
            assert urllib.parse.urlsplit(spec["url"]).path.split("/")[-2] == spec["sha256"], name


def test_known_model_families_are_listed():
    raw = _raw()
    for name in ("yolox_nano", "yolov5n", "yolov8n", "yolov10n", "yolo11n", "clip_vit_b32",
                 "clip_vit_b16", "sam_vit_b", "sam_vit_l", "sam_vit_h", "mobile_sam",
                 "lseg_demo_e200", "sample_image"):
        assert name in raw, name
    for name in ("yolov5n", "yolov8n", "yolov10n", "yolo11n"):
        assert raw[name]["provision"] == "user-export" and raw[name]["licence"] == "AGPL-3.0"
    for name, spec in raw.items():
        if "export" in spec:
            assert set(spec["export"]) >= {"module", "arch"}, name


def test_present_files_verify():
    manifest = ms.load_manifest(MANIFEST.parent)
    present = 0
    for entry in manifest.values():
        path = ms.entry_path(entry, MANIFEST.parent)
        if path.is_file() and entry.sha256 and not entry.exported:
            ms.verify_file(path, entry.sha256, entry.name)
            present += 1
    assert present >= 4  # yolox_nano, coco_classes, bpe vocab, sample image are shipped


def test_sample_image_is_the_coco_image():
    manifest = ms.load_manifest(MANIFEST.parent)
    entry = manifest["sample_image"]
    coco = REPO / "test" / "data" / "coco" / "images" / "000000397133.jpg"
    if coco.is_file():
        assert ms.sha256_file(coco) == entry.sha256
    assert "397133" in entry.source and entry.licence == "CC-BY-2.0"
    assert len(entry.extra["boxes_xyxy"]) >= 1


# --------------------------------------------------------------------------- loader rules
def _write_manifest(d: Path, models: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / ms.MANIFEST).write_text(yaml.safe_dump({"models": models}), encoding="utf-8")
    return d


@pytest.mark.parametrize("bad", ["../escape.onnx", "/etc/passwd", "a/../../b", "~/x.onnx",
                                 "x.onnx.part", ""])
def test_loader_rejects_paths_outside_the_models_dir(tmp_path, bad):
    d = _write_manifest(tmp_path / "m", {"x": {"kind": "detector", "file": bad,
                                               "licence": "MIT", "source": "s"}})
    with pytest.raises(ValueError):
        ms.load_manifest(d)


def test_loader_rejects_malformed_sha256(tmp_path):
    d = _write_manifest(tmp_path / "m", {"x": {"kind": "detector", "file": "x.onnx",
                                               "licence": "MIT", "source": "s",
                                               "sha256": "ABC"}})
    with pytest.raises(ValueError, match="sha256"):
        ms.load_manifest(d)


def test_partial_files_are_never_resolved(tmp_path):
    data = b"model bytes" * 100
    import hashlib
    d = _write_manifest(tmp_path / "m", {"x": {"kind": "detector", "file": "x.onnx",
                                               "licence": "MIT", "source": "s",
                                               "sha256": hashlib.sha256(data).hexdigest()}})
    (d / "x.onnx.part").write_bytes(data)  # complete bytes, but still a part file
    with pytest.raises(ms.ModelFileError, match="not found"):
        ms.resolve("x", d)
    with pytest.raises(ms.ModelFileError, match="incomplete download"):
        ms.resolve(str(d / "x.onnx.part"), d)
    with pytest.raises(ms.ModelFileError, match="incomplete download"):
        ms.resolve("x.onnx.part", d, allow_outside=True)
    (d / "x.onnx.part").rename(d / "x.onnx")
    path, entry = ms.resolve("x", d)
    assert path == (d / "x.onnx").resolve() and entry.name == "x"


def test_overlay_is_merged_and_never_shadows_shipped(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(MANIFEST, d / ms.MANIFEST)
    (d / "enc.onnx").write_bytes(b"onnx")
    import hashlib
    sha = hashlib.sha256(b"onnx").hexdigest()
    ms.write_overlay_entries(d, {"clip_vit_b32_image": {
        "kind": "clip", "file": "enc.onnx", "licence": "MIT", "source": "exported",
        "sha256": sha, "stages": ["clip"]}})
    manifest = ms.load_manifest(d)
    assert manifest["clip_vit_b32_image"].exported
    assert not manifest["yolox_nano"].exported
    assert ms.resolve("clip_vit_b32_image", d)[0].name == "enc.onnx"
    assert ms.resolve(str(d / "enc.onnx"), d)[1].name == "clip_vit_b32_image"  # verified by path
    (d / "enc.onnx").write_bytes(b"onnX")
    with pytest.raises(ms.ModelFileError, match="sha256 mismatch"):
        ms.resolve(str(d / "enc.onnx"), d)
    with pytest.raises(ValueError, match="shadow"):
        ms.write_overlay_entries(d, {"yolox_nano": {"kind": "detector", "file": "enc.onnx",
                                                    "licence": "MIT", "source": "x"}})
    # a hand-edited overlay that shadows a shipped entry is ignored
    raw = yaml.safe_load((d / ms.OVERLAY).read_text())
    raw["models"]["yolox_nano"] = {"kind": "detector", "file": "enc.onnx", "licence": "MIT",
                                   "source": "evil", "sha256": None}
    (d / ms.OVERLAY).write_text(yaml.safe_dump(raw))
    shipped = ms.load_manifest(d)["yolox_nano"]
    assert shipped.file == "yolox_nano.onnx" and shipped.source != "evil"
    assert shipped.sha256 == ms.load_manifest(MANIFEST.parent)["yolox_nano"].sha256


def test_models_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(ms.ENV_VAR, raising=False)
    assert ms.models_dir() == (REPO / "models").resolve()
    monkeypatch.setenv(ms.ENV_VAR, str(tmp_path / "env"))
    assert ms.models_dir() == (tmp_path / "env").resolve()
    assert ms.models_dir(tmp_path / "flag") == (tmp_path / "flag").resolve()
    # a models dir without its own manifest uses the package's
    assert ms.manifest_path(tmp_path / "flag") == MANIFEST.resolve()


def test_check_entry(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(REPO / "models" / "coco_classes.txt", d)
    manifest = ms.load_manifest(d)
    assert ms.check_entry(manifest["coco_classes"], d) == (True, True)
    assert ms.check_entry(manifest["sam_vit_b"], d) == (False, None)
    (d / "yolov8n.onnx").write_bytes(b"user export")
    assert ms.check_entry(manifest["yolov8n"], d) == (True, None)  # never "verified"
    data = bytearray((d / "coco_classes.txt").read_bytes())
    data[0] ^= 0xFF
    (d / "coco_classes.txt").write_bytes(bytes(data))
    assert ms.check_entry(manifest["coco_classes"], d) == (True, False)
