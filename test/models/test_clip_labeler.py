"""ClipLabeler, Vocabulary, TextEmbeddingCache, box crops and the `label` / `eval clip` CLI,
on real COCO images with an exported (seeded random weights) ViT-B-32 running on ONNX
Runtime. Numerical parity with open_clip is in test_clip_parity.py."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from perception2d_ros.models.clip.labeler import ClipLabeler, softmax
from perception2d_ros.models.clip.preprocess import (
    MEAN_RGB_U8, preprocess_bgr, square_box, square_crop, to_rgb)
from perception2d_ros.models.clip.vocabulary import (
    DEFAULT_TEMPLATES, TextEmbeddingCache, Vocabulary, normalize_templates)
from perception2d_ros.engines.factory import EngineConfig

COCO_IMAGES = sorted((Path(__file__).resolve().parents[1] / "data" / "coco" / "images").glob("*.jpg"))
CPU = EngineConfig(backend="onnxruntime", device="cpu")
PHRASES = ["person", "bicycle", "car", "bus", "dog", "cat", "pizza", "umbrella", "train",
           "giraffe"]


# --------------------------------------------------------------------------- no model needed
def test_vocabulary_versions_and_label_info():
    v = Vocabulary("a cat, a dog ,a car")
    assert v.phrases == ("a cat", "a dog", "a car") and v.version == 1
    assert v.templates == DEFAULT_TEMPLATES
    assert v.label_info() == {0: "a cat", 1: "a dog", 2: "a car"}
    assert v.set(["a cat", "a dog", "a car"]) == 1          # no change, no bump
    assert v.set(["a cat", "a bus"]) == 2 and v[1] == "a bus"
    assert v.set(templates=["{}"]) == 3 and v.templates == ("{}",)
    assert v.add("a tree") == 4 and v.index("a tree") == 2
    assert v.remove(["a cat"]) == 5 and v.label_info() == {0: "a bus", 1: "a tree"}
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary(["a", "b", "a"])
    with pytest.raises(ValueError, match="empty"):
        Vocabulary(" , ")
    with pytest.raises(ValueError, match="exactly one"):
        normalize_templates(["a photo"])
    assert normalize_templates("{}") == ("{}",)


def test_square_crop_geometry_clamps_and_pads():
    img = np.arange(100 * 200 * 3, dtype=np.uint32).reshape(100, 200, 3).astype(np.uint8)
    # interior box: square, centred, grown by padding
    x0, y0, x1, y1 = square_box([50, 40, 90, 60], padding=0.25, frame_hw=(100, 200))
    assert x1 - x0 == y1 - y0 == 60 and (x0 + x1) / 2 == 70
    # near the left border: shifted into the frame (no padding pixels)
    x0, y0, x1, y1 = square_box([0, 10, 20, 90], padding=0.0, frame_hw=(100, 200))
    assert x0 == 0 and x1 - x0 == 80 and y0 == 10
    crop = square_crop(img, [0, 10, 20, 90], padding=0.0)
    assert crop.shape == (80, 80, 3) and np.array_equal(crop, img[10:90, 0:80])
    # larger than the frame height: centred vertically, rows outside filled with the mean
    crop = square_crop(img, [10, 0, 190, 100], padding=0.0)
    assert crop.shape == (180, 180, 3)
    assert (crop[:40] == np.array(MEAN_RGB_U8, np.uint8)).all()
    assert np.array_equal(crop[40:140], img[:, 10:190])


# --------------------------------------------------------------------------- fixtures
def clip_bundle(tmp_path_factory, arch: str, fmt: str, suffix: str) -> dict:
    """Same helper as in test_clip_parity.py: the session's seeded checkpoint + export
    (created by whichever CLIP test file runs first, reused by the other)."""
    from perception2d_ros.models.clip.checkpoint import make_test_checkpoint
    from perception2d_ros.models.clip.export import export_dir_for, export_onnx

    base = tmp_path_factory.getbasetemp() / f"clip-{arch}-{fmt}"
    ckpt = base / f"{arch}{suffix}"
    if not ckpt.is_file():
        make_test_checkpoint(arch, ckpt, seed=0, fmt=fmt, logit_scale=100.0)
    cache = base / "cache"
    exported = export_onnx(arch, ckpt, export_dir_for(arch, ckpt, cache / "clip"))
    return {"arch": arch, "ckpt": ckpt, "exported": exported, "cache": cache}


@pytest.fixture(scope="session")
def b32(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    return clip_bundle(tmp_path_factory, "ViT-B-32", "openai-torchscript", ".pt")


@pytest.fixture(scope="session")
def labeler(b32):
    lab = ClipLabeler(b32["exported"], CPU, text_cache_dir=None)
    lab.set_vocabulary(PHRASES, ["{}"])
    yield lab
    lab.close()


@pytest.fixture()
def image():
    return cv2.imread(str(COCO_IMAGES[1]))


# --------------------------------------------------------------------------- text cache
def test_text_cache_ensemble_memory_and_disk(labeler, tmp_path):
    engine = labeler.text_engine
    cache = TextEmbeddingCache(engine, "model-a", cache_dir=tmp_path)
    temps = ["a photo of a {}.", "a drawing of a {}.", "{}"]
    emb = cache.encode(PHRASES[:4], temps)
    assert emb.shape == (4, 512) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert cache.stats.computed == 12 and cache.stats.memory_hits == 0
    # ensemble = mean of the normalised per-template embeddings, renormalised
    per = cache.encode_texts([(p, t) for p in PHRASES[:4] for t in temps]).reshape(4, 3, -1)
    mean = per.mean(1)
    assert np.allclose(emb, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)
    assert cache.stats.computed == 12 and cache.stats.memory_hits == 12
    # on disk: a new cache (new process) over the same dir + model id computes nothing
    again = TextEmbeddingCache(engine, "model-a", cache_dir=tmp_path)
    assert np.array_equal(again.encode(PHRASES[:4], temps), emb)
    assert again.stats.disk_hits == 12 and again.stats.computed == 0
    assert len(list((tmp_path / "model-a").glob("*.npy"))) == 12
    # another model id never reuses them
    other = TextEmbeddingCache(engine, "model-b", cache_dir=tmp_path)
    other.encode(PHRASES[:1], ["{}"])
    assert other.stats.computed == 1 and other.stats.disk_hits == 0


def test_text_cache_trimmed_batches_equal_full_context(labeler):
    """Feeding ids trimmed to the longest eot+1 of a batch (what the cache does) gives the
    embeddings of the canonical [B,77] feed."""
    cache = TextEmbeddingCache(labeler.text_engine, "t", cache_dir=None, batch_size=3)
    texts = ["a", "a photo of a traffic light.", "x " * 100, "🐱", "a giraffe"]
    got = cache.encode(texts, ["{}"])
    ids = cache.tokenizer(texts)
    full = labeler.text_engine.infer({"input_ids": ids})["text_embeds"]
    assert ((got * full).sum(1)).min() >= 0.99999


# --------------------------------------------------------------------------- labeler
def test_label_image_result(labeler, image):
    r = labeler.label_image(image, top_k=3)
    assert len(r.labels) == 3 and r.box is None
    assert r.probs.shape == (len(PHRASES),) and abs(float(r.probs.sum()) - 1.0) < 1e-5
    scores = [lab.score for lab in r.labels]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(r.probs.max())
    assert all(lab.name == PHRASES[lab.index] for lab in r.labels)
    assert np.allclose(r.probs, softmax(r.logits), atol=1e-6)
    assert np.allclose(r.logits, labeler.logit_scale * (labeler._text[2] @ r.embedding),
                       atol=1e-3)
    assert r.vocabulary_version == labeler.vocabulary.version
    assert len(labeler.label_image(image, top_k=100).labels) == len(PHRASES)


def test_vocabulary_change_bumps_version(labeler, image):
    v0 = labeler.vocabulary.version
    labeler.set_vocabulary(["a dog", "a cat"], ["{}"])
    r = labeler.label_image(image, top_k=5)
    assert r.vocabulary_version == v0 + 1 and {lab.name for lab in r.labels} == {"a dog",
                                                                                  "a cat"}
    # verbatim template: the text rows are exactly the cache's plain phrase embeddings
    assert np.allclose(labeler._text[2], labeler.text_cache.encode(["a dog", "a cat"], ["{}"]))
    labeler.set_vocabulary(PHRASES, ["{}"])
    assert labeler.vocabulary.version == v0 + 2


def test_label_boxes_one_engine_call_per_frame(labeler, image):
    h, w = image.shape[:2]
    boxes = np.array([[10, 20, 120, 200], [300, 100, 500, 400], [w - 30, h - 50, w, h],
                      [0, 0, w, h], [200.5, 150.2, 260.7, 175.9]])
    calls = []
    real_infer = labeler.image_engine.infer
    labeler.image_engine.infer = lambda feeds: calls.append(len(feeds["image"])) or \
        real_infer(feeds)
    try:
        results = labeler.label_boxes(image, boxes, top_k=2)
        assert calls == [5]
        labeler.max_batch = 2  # chunked at the engine's maximum batch
        chunked = labeler.label_boxes(image, boxes, top_k=2)
        assert calls == [5, 2, 2, 1]
    finally:
        labeler.max_batch = 32
        del labeler.image_engine.infer
    assert [r.box for r in results] == [tuple(b) for b in boxes.tolist()]
    for a, b in zip(results, chunked):
        assert np.allclose(a.probs, b.probs, atol=1e-5)
    for r in results:
        x0, y0, x1, y1 = r.crop_box
        assert x1 - x0 == y1 - y0 and len(r.labels) == 2
    assert labeler.label_boxes(image, np.zeros((0, 4))) == []


def test_box_label_equals_label_of_its_crop(labeler, image):
    """A box's label is the whole-image label of its square crop (same transform)."""
    box = [300, 100, 500, 400]
    r = labeler.label_boxes(image, [box], top_k=3, padding=0.2)[0]
    crop_bgr = np.ascontiguousarray(square_crop(to_rgb(image), box, 0.2)[:, :, ::-1])
    assert np.array_equal(preprocess_bgr(crop_bgr), labeler.preprocess(image, [box], 0.2)[0][0])
    whole = labeler.label_image(crop_bgr, top_k=3)
    assert np.abs(r.probs - whole.probs).max() <= 1e-6


# --------------------------------------------------------------------------- CLI
def _cli(*argv: str) -> int:
    from perception2d_ros.cli import label

    parser = argparse.ArgumentParser(prog="perception2d")
    sub = parser.add_subparsers()
    label.add_parser(sub)
    label.add_eval_parser(sub.add_parser("eval").add_subparsers())
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture()
def cache_env(b32, monkeypatch):
    monkeypatch.setenv("PERCEPTION2D_CACHE_DIR", str(b32["cache"]))
    return b32["cache"]


def test_cli_label_json_with_boxes(b32, labeler, cache_env, capsys):
    imgs = [str(p) for p in COCO_IMAGES[:2]]
    rc = _cli("label", "--model", str(b32["exported"]["meta"]), "--vocab", ",".join(PHRASES),
              "--template", "{}", "--top-k", "3", "--boxes", "10,20,120,200;300,100,500,400",
              "--json", *imgs)
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and [e["image"] for e in out] == imgs
    for entry in out:
        assert len(entry["labels"]) == 3 and len(entry["boxes"]) == 2
        scores = [lab["score"] for lab in entry["labels"]]
        assert scores == sorted(scores, reverse=True) and sum(scores) <= 1.0 + 1e-6
        assert {lab["label"] for lab in entry["labels"]} <= set(PHRASES)
        assert entry["boxes"][0]["box"] == [10.0, 20.0, 120.0, 200.0]
    ref = labeler.label_image(cv2.imread(imgs[0]), top_k=3)
    assert [lab["label"] for lab in out[0]["labels"]] == [lab.name for lab in ref.labels]
    assert [lab["score"] for lab in out[0]["labels"]] == pytest.approx(
        [lab.score for lab in ref.labels], abs=1e-5)
    assert any((cache_env / "clip_text").rglob("*.npy"))  # text embeddings cached on disk


def test_cli_checkpoint_uses_cached_export(b32, cache_env, capsys):
    meta = b32["exported"]["meta"]
    before = meta.stat().st_mtime_ns
    rc = _cli("label", "--checkpoint", str(b32["ckpt"]), "--arch", "ViT-B-32",
              "--vocab", "a cat,a dog", str(COCO_IMAGES[0]))
    assert rc == 0 and meta.stat().st_mtime_ns == before  # found in the cache, no re-export
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(COCO_IMAGES[0])) and ("a cat" in line and "a dog" in line)


def test_cli_without_model_says_how_to_get_one(tmp_path, capsys, monkeypatch):
    from perception2d_ros.cli.main import main

    models = tmp_path / "models"
    models.mkdir()
    (models / "manifest.yaml").write_text(
        (Path(__file__).parents[2] / "models" / "manifest.yaml").read_text())
    monkeypatch.setenv("PERCEPTION2D_CACHE_DIR", str(tmp_path / "cache"))
    rc = main(["label", "--models-dir", str(models), "--vocab", "a cat", str(COCO_IMAGES[0])])
    err = capsys.readouterr().err
    assert rc == 1
    assert "perception2d models fetch clip_vit_b32" in err and "--checkpoint PATH" in err
    rc = _cli("label", "--model", str(tmp_path / "nothing.json"), "--vocab", "a",
              str(COCO_IMAGES[0]))
    assert rc == 1


def test_cli_eval_clip(b32, labeler, cache_env, tmp_path, capsys):
    classes = ["car", "pizza", "giraffe", "person"]
    rows = [(p.name, classes[i % len(classes)]) for i, p in enumerate(COCO_IMAGES[:6])]
    labels_csv = tmp_path / "labels.csv"
    with open(labels_csv, "w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), *rows])
    labels_json = tmp_path / "labels.json"
    labels_json.write_text(json.dumps([{"image": n, "label": c} for n, c in rows]))
    images = str(COCO_IMAGES[0].parent)
    reports = []
    for lf in (labels_csv, labels_json):
        rc = _cli("eval", "clip", "--images", images, "--labels", str(lf), "--model",
                  str(b32["exported"]["meta"]), "--vocab", ",".join(PHRASES), "--template",
                  "{}", "--json")
        assert rc == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["top1"] == reports[1]["top1"] and reports[0]["images"] == 6
    # the accuracy is what label_image says, image by image
    labeler.set_vocabulary(PHRASES, ["{}"])
    hits = sum(labeler.label_image(cv2.imread(str(COCO_IMAGES[0].parent / n)), 1)
               .top.name == c for n, c in rows)
    assert reports[0]["top1"] == pytest.approx(hits / 6)
    assert 0 <= reports[0]["top1"] <= reports[0]["top5"] <= 1
    assert set(reports[0]["per_class"]) == set(classes)
    rc = _cli("eval", "clip", "--images", images, "--labels", str(labels_csv), "--model",
              str(b32["exported"]["meta"]), "--vocab", "car,pizza")
    assert rc == 1 and "missing from --vocab" in capsys.readouterr().err
