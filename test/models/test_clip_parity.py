"""CLIP parity: our path (tokenizer + numpy preprocessing + exported ONNX on ONNX Runtime,
CPU fp32) against open_clip's torch forward with the same weights, on real COCO images.

No pretrained weights exist offline, so the official architectures get seeded random weights,
saved in the official checkpoint formats, read back through our loader and exported. The
checkpoint's logit_scale is set to 100 (where trained CLIP models sit) so the softmax over
the vocabulary is peaked and a probability tolerance means something.

Tolerances (fp32 CPU): embedding cosine >= 0.9999 (measured ~1 - 1e-7), logits (100 · cos)
max abs diff <= 1e-3, probabilities max abs diff <= 1e-4 (measured ~1e-6), top-1 identical;
preprocessing max abs diff <= 1e-6 (measured 0: same Pillow resize, same float32 math).
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from PIL import Image  # noqa: E402  (Pillow comes with torchvision)

from perception2d_ros.models.clip.checkpoint import (  # noqa: E402
    CheckpointError, load_clip, make_test_checkpoint, read_state_dict)
from perception2d_ros.models.clip.export import export_dir_for, export_onnx  # noqa: E402
from perception2d_ros.models.clip.labeler import ClipLabeler  # noqa: E402
from perception2d_ros.models.clip.parity import parity_check  # noqa: E402
from perception2d_ros.models.clip.preprocess import (  # noqa: E402
    preprocess_bgr, preprocess_crops_bgr, square_crop, to_rgb)
from perception2d_ros.models.clip.vocabulary import DEFAULT_TEMPLATES  # noqa: E402
from perception2d_ros.engines.factory import EngineConfig  # noqa: E402
from perception2d_ros.engines.model_store import sha256_file  # noqa: E402

pytestmark = pytest.mark.slow

COCO = Path(__file__).resolve().parents[1] / "data" / "coco"
IMAGES = sorted((COCO / "images").glob("*.jpg"))
ANNOTATIONS = COCO / "annotations" / "instances_tinycoco.json"
COS_MIN = 0.9999
PROB_TOL = 1e-4
LOGIT_TOL = 1e-3
CPU = EngineConfig(backend="onnxruntime", device="cpu")
PHRASES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "bench", "bird", "cat", "dog", "horse",
    "giraffe", "umbrella", "pizza",
]
TEMPLATES = list(DEFAULT_TEMPLATES[:2])  # an ensemble; two keep the torch reference quick
ODD_PHRASES = ["Café crème", "🐱 on a sofa!", "a STOP sign", "x" * 400,
               "&amp; entities", "日本の電車", "don't", "  spaces\tand\nnewlines "]


def clip_bundle(tmp_path_factory, arch: str, fmt: str, suffix: str, half: bool = False) -> dict:
    """Seeded checkpoint of ``arch`` in ``fmt`` + its export into the --checkpoint cache
    layout; shared by the CLIP test files of one session (created once)."""
    base = tmp_path_factory.getbasetemp() / f"clip-{arch}-{fmt}"
    ckpt = base / f"{arch}{suffix}"
    if not ckpt.is_file():
        make_test_checkpoint(arch, ckpt, seed=0, fmt=fmt, logit_scale=100.0, half=half)
    cache = base / "cache"
    exported = export_onnx(arch, ckpt, export_dir_for(arch, ckpt, cache / "clip"))
    return {"arch": arch, "ckpt": ckpt, "exported": exported, "cache": cache}


@pytest.fixture(scope="session")
def b32(tmp_path_factory):
    return clip_bundle(tmp_path_factory, "ViT-B-32", "openai-torchscript", ".pt")


@pytest.fixture(scope="session")
def ref_b32(b32):
    """The reference: open_clip's own loader for OpenAI archives (torch.jit.load — our test
    file, so fine here; our runtime never does this)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.load_openai_model(str(b32["ckpt"]), device="cpu", precision="fp32")
    return model.eval()


@pytest.fixture(scope="session")
def labeler_b32(b32):
    lab = ClipLabeler(b32["exported"], CPU, text_cache_dir=None)
    yield lab
    lab.close()


@pytest.fixture(scope="session")
def oc_preprocess():
    return open_clip.image_transform(224, is_train=False)


@pytest.fixture(scope="session")
def ref_classifier(ref_b32):
    """open_clip's own zero-shot classifier (prompt ensemble) for PHRASES: (D, V)."""
    with torch.no_grad():
        return open_clip.build_zero_shot_classifier(
            ref_b32, open_clip.get_tokenizer("ViT-B-32"), PHRASES, TEMPLATES,
            num_classes_per_batch=None).numpy()


def coco_boxes(max_per_image: int = 4, n_images: int = 4) -> list[tuple[Path, np.ndarray]]:
    """Real GT boxes (xyxy) of the first images that have some, incl. a border box."""
    data = json.loads(ANNOTATIONS.read_text())
    by_id = {im["id"]: im for im in data["images"]}
    boxes: dict[int, list[list[float]]] = {}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        if w * h >= 900 and not ann.get("iscrowd"):
            boxes.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
    out = []
    for image_id in sorted(boxes)[:n_images]:
        path = COCO / "images" / by_id[image_id]["file_name"]
        out.append((path, np.asarray(boxes[image_id][:max_per_image], np.float64)))
    return out


# --------------------------------------------------------------------------- loader
def test_loader_equals_open_clip_openai_loader(b32, ref_b32):
    ours = load_clip("ViT-B-32", b32["ckpt"])
    assert ours._p2d_quick_gelu is True  # OpenAI archives → QuickGELU, as open_clip does
    a, b = ours.state_dict(), ref_b32.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), k
    assert float(ours.logit_scale.exp()) == pytest.approx(100.0, rel=1e-3)


def test_state_dict_formats_read_identically(tmp_path, ref_b32):
    """OpenAI fp16 state dict (= HF-hub .bin layout), open_clip training checkpoint
    (module. prefix) and .safetensors give the same tensors (weights_only / safetensors)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().half().contiguous() for k, v in ref_b32.state_dict().items()}
    paths = {"openai.pt": tmp_path / "openai.pt", "open_clip.pt": tmp_path / "epoch_1.pt",
             "safetensors": tmp_path / "open_clip_model.safetensors"}
    torch.save(sd, paths["openai.pt"])  # = HF hub open_clip_pytorch_model.bin layout
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
               paths["open_clip.pt"])
    save_file(sd, str(paths["safetensors"]))
    for name, p in paths.items():
        got = read_state_dict(p)
        assert set(got) == set(sd), name
        assert all(torch.equal(got[k], sd[k]) for k in sd), name


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch BOOM_PICKLE_RAN",))


def test_malicious_checkpoints_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Boom()}, bad)
    with pytest.raises(CheckpointError, match="refused|pickled code"):
        read_state_dict(bad)
    # a TorchScript-looking archive whose data.pkl calls a global
    evil_zip = tmp_path / "evil_ts.pt"
    with zipfile.ZipFile(evil_zip, "w") as z:
        z.writestr("evil_ts/data.pkl", pickle.dumps(_Boom(), protocol=2))
        z.writestr("evil_ts/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil_ts/code/__torch__/m.py", "")
    with pytest.raises(CheckpointError, match="refusing global"):
        read_state_dict(evil_zip)
    assert not (tmp_path / "BOOM_PICKLE_RAN").exists()


def test_wrong_arch_is_reported(b32):
    with pytest.raises(CheckpointError, match="wrong --arch"):
        load_clip("ViT-B-16", b32["ckpt"])


# --------------------------------------------------------------------------- export
def test_export_files_signature_sidecar_and_cache(b32, labeler_b32):
    import onnx

    ex = b32["exported"]
    assert ex["image"].name == "clip_ViT-B-32_image.onnx"
    assert ex["text"].name == "clip_ViT-B-32_text.onnx"
    meta = json.loads(ex["meta"].read_text())
    assert meta["arch"] == "ViT-B-32" and meta["image_size"] == 224 and meta["embed_dim"] == 512
    assert meta["source_sha256"] == sha256_file(b32["ckpt"])
    assert meta["image_onnx"]["sha256"] == sha256_file(ex["image"])
    assert meta["text_onnx"]["sha256"] == sha256_file(ex["text"])
    assert meta["logit_scale"] == pytest.approx(100.0, rel=1e-3)
    assert meta["quick_gelu"] is True and meta["normalized_embeddings"] is True
    assert meta["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    for key in ("image", "text"):
        proto = onnx.load(str(ex[key]), load_external_data=False)
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    img_in, txt_in = labeler_b32.image_engine.inputs[0], labeler_b32.text_engine.inputs[0]
    assert img_in.name == "image" and img_in.shape[1:] == (3, 224, 224)
    assert not isinstance(img_in.shape[0], int) or img_in.shape[0] < 0  # dynamic batch
    assert txt_in.name == "input_ids" and np.dtype(txt_in.dtype) == np.int64
    for engine, name in ((labeler_b32.image_engine, "image_embeds"),
                         (labeler_b32.text_engine, "text_embeds")):
        assert engine.outputs[0].name == name and engine.outputs[0].shape[1] == 512
    assert labeler_b32.text_engine.inputs[0].shape[1] in ("seq", None)  # dynamic length
    # cached: a second export of the same checkpoint returns at once, files untouched
    mtimes = {k: p.stat().st_mtime_ns for k, p in ex.items()}
    again = export_onnx("ViT-B-32", b32["ckpt"], ex["meta"].parent)
    assert again == ex and {k: p.stat().st_mtime_ns for k, p in again.items()} == mtimes


# --------------------------------------------------------------------------- preprocessing
def test_preprocessing_equals_open_clip(oc_preprocess):
    """Every third COCO test image, full frame and square box crops: same tensor as open_clip's
    PIL transform (Resize(224, bicubic) + CenterCrop + ToTensor + Normalize)."""
    worst = 0.0
    for path in IMAGES[::3]:
        bgr = cv2.imread(str(path))
        ours = preprocess_bgr(bgr)
        ref = oc_preprocess(Image.open(path).convert("RGB")).numpy()
        assert ours.shape == ref.shape == (3, 224, 224) and ours.dtype == np.float32
        worst = max(worst, float(np.abs(ours - ref).max()))
        h, w = bgr.shape[:2]
        boxes = np.array([[0, 0, w / 3, h / 2], [w * 0.4, h * 0.3, w * 0.9, h * 0.5],
                          [w - 20, h - 90, w, h]])
        crops = preprocess_crops_bgr(bgr, boxes, padding=0.1)
        for box, crop in zip(boxes, crops):
            ref = oc_preprocess(Image.fromarray(square_crop(to_rgb(bgr), box, 0.1))).numpy()
            worst = max(worst, float(np.abs(crop - ref).max()))
    assert worst <= 1e-6, worst


# --------------------------------------------------------------------------- model parity
def test_crop_labels_match_open_clip(labeler_b32, ref_b32, ref_classifier, oc_preprocess):
    """ClipLabeler.label_boxes on real COCO GT boxes (one engine call per frame) with a
    template ensemble vs open_clip: preprocess + encode_image + its
    build_zero_shot_classifier, softmax(100 · cos)."""
    vocab = labeler_b32.set_vocabulary(PHRASES, TEMPLATES)
    assert len(PHRASES) >= 20
    classifier = ref_classifier
    _, _, text = labeler_b32._text_matrix(labeler_b32.vocabulary)
    text_cos = (text * classifier.T).sum(1)
    assert text_cos.min() >= COS_MIN, text_cos.min()

    ours_p, ref_p, ours_l, ref_l, img_cos = [], [], [], [], []
    scale = float(ref_b32.logit_scale.detach().exp())
    for path, boxes in coco_boxes():
        bgr = cv2.imread(str(path))
        results = labeler_b32.label_boxes(bgr, boxes, top_k=5)
        crops = [Image.fromarray(square_crop(to_rgb(bgr), b, labeler_b32.padding))
                 for b in boxes]
        with torch.no_grad():
            ref_emb = ref_b32.encode_image(torch.stack([oc_preprocess(c) for c in crops]),
                                           normalize=True).numpy()
        logits = scale * ref_emb @ classifier
        e = np.exp(logits - logits.max(1, keepdims=True))
        for r, emb, lg, p in zip(results, ref_emb, logits, e / e.sum(1, keepdims=True)):
            img_cos.append(float(r.embedding @ emb))
            ours_p.append(r.probs)
            ref_p.append(p)
            ours_l.append(r.logits)
            ref_l.append(lg)
            assert r.labels[0].index == int(p.argmax())
            assert r.vocabulary_version == vocab.version
    ours_p, ref_p = np.array(ours_p), np.array(ref_p)
    assert len(img_cos) >= 12
    assert min(img_cos) >= COS_MIN, min(img_cos)
    assert np.abs(np.array(ours_l) - np.array(ref_l)).max() <= LOGIT_TOL
    assert np.abs(ours_p - ref_p).max() <= PROB_TOL, np.abs(ours_p - ref_p).max()
    print(f"{len(img_cos)} crops x {len(PHRASES)} phrases: image cos min {min(img_cos):.8f}, "
          f"text cos min {text_cos.min():.8f}, max logit diff "
          f"{np.abs(np.array(ours_l) - np.array(ref_l)).max():.2e}, max prob diff "
          f"{np.abs(ours_p - ref_p).max():.2e}; reference top-1 p {np.round(ref_p.max(1), 3)}")
    # meaningful: the reference distributions are far from uniform (1/V = 0.05)
    assert ref_p.max(1).mean() > 3.0 / len(PHRASES), ref_p.max(1)


def test_full_image_and_odd_text_parity(labeler_b32, ref_b32, ref_classifier,
                                        oc_preprocess):
    """label_image on whole frames, and verbatim text for unicode/emoji/over-long phrases
    (truncated at 77 tokens), against open_clip's tokenizer + encode_text."""
    with torch.no_grad():
        ref_txt = ref_b32.encode_text(open_clip.tokenize(ODD_PHRASES), normalize=True).numpy()
    ours_txt = labeler_b32.text_cache.encode(ODD_PHRASES, ["{}"])
    assert ((ours_txt * ref_txt).sum(1)).min() >= COS_MIN
    labeler_b32.set_vocabulary(PHRASES, TEMPLATES)
    ref_cls = ref_classifier.T
    scale = float(ref_b32.logit_scale.detach().exp())
    for path in IMAGES[:3]:
        r = labeler_b32.label_image(cv2.imread(str(path)), top_k=3)
        with torch.no_grad():
            emb = ref_b32.encode_image(oc_preprocess(Image.open(path).convert("RGB"))[None],
                                       normalize=True).numpy()[0]
        logits = scale * ref_cls @ emb
        p = np.exp(logits - logits.max())
        p /= p.sum()
        assert float(r.embedding @ emb) >= COS_MIN
        assert np.abs(r.probs - p).max() <= PROB_TOL
        assert [lab.index for lab in r.labels] == list(np.argsort(-p)[:3])


def test_numpy_resize_fallback_keeps_embeddings(labeler_b32, oc_preprocess):
    """Without Pillow the numpy re-implementation (fixed-point bicubic, horizontal pass
    first) is used; where Pillow 13 orders the passes differently pixels move by a few LSB —
    the embedding cosine stays >= 0.9999."""
    xs, refs = [], []
    for path in IMAGES[:6]:
        xs.append(preprocess_bgr(cv2.imread(str(path)), backend="numpy"))
        refs.append(oc_preprocess(Image.open(path).convert("RGB")).numpy())
    xs, refs = np.stack(xs), np.stack(refs)
    assert np.abs(xs - refs).max() <= 8 / 255 / 0.26  # a few uint8 LSB after normalisation
    a, b = labeler_b32.embed_preprocessed(xs), labeler_b32.embed_preprocessed(refs)
    assert (a * b).sum(1).min() >= COS_MIN


# --------------------------------------------------------------------------- ViT-B-16
def test_vit_b16_export_and_parity(tmp_path_factory):
    """ViT-B-16 from an open_clip-format fp16 .safetensors (GELU): export + ``parity_check`` (the
    function `perception2d models export` calls) on one real image and one GT-box crop."""
    b16 = clip_bundle(tmp_path_factory, "ViT-B-16", "safetensors", ".safetensors", half=True)
    path, boxes = coco_boxes(max_per_image=1, n_images=1)[0]
    report = parity_check("ViT-B-16", b16["ckpt"], b16["exported"], cv2.imread(str(path)),
                            boxes_xyxy=boxes, phrases=PHRASES[:8])
    assert report["ok"], report
    assert report["n_images"] == 2 and report["n_phrases"] == 8
    assert report["image_cosine_min"] >= COS_MIN and report["text_cosine_min"] >= COS_MIN
    assert report["max_prob_diff"] <= PROB_TOL and report["preprocess_max_abs_diff"] <= 1e-6
    assert report["logit_scale"] == pytest.approx(100.0, rel=1e-3)


def test_torch_backend_matches_onnxruntime(b32, labeler_b32):
    """The CLIP towers run by torch (``backend: torch``, the GPU backend where only torch +
    CUDA exist; here on the CPU) give ORT's embeddings: crops of real images and phrases,
    including a dynamic batch and text length."""
    torch_cfg = EngineConfig(backend="torch", device="cpu", fallback=False)
    lab = ClipLabeler(b32["exported"], torch_cfg, text_cache_dir=None)
    assert lab.image_engine.backend == lab.text_engine.backend == "torch"
    vocab = PHRASES[:6]
    lab.set_vocabulary(vocab, TEMPLATES)
    labeler_b32.set_vocabulary(vocab, TEMPLATES)
    np.testing.assert_allclose(lab._text_matrix(lab.vocabulary)[2],
                               labeler_b32._text_matrix(labeler_b32.vocabulary)[2], atol=1e-5)
    for path, boxes in coco_boxes(max_per_image=3, n_images=2):
        bgr = cv2.imread(str(path))
        x, _ = labeler_b32.preprocess(bgr, boxes)
        np.testing.assert_allclose(lab.embed_preprocessed(x), labeler_b32.embed_preprocessed(x),
                                   atol=1e-5)
        ours = [r.top.name for r in lab.label_boxes(bgr, boxes)]
        assert ours == [r.top.name for r in labeler_b32.label_boxes(bgr, boxes)]
    lab.close()


def test_device_frame_crops_match_host_crops(b32, labeler_b32):
    """A frame kept on the device (``frame.device_bgr``): the CLIP stage cuts and resizes
    the crops there (torch CPU device here). Embeddings agree with the Pillow-exact host
    crops to cosine >= 0.999 on real COCO boxes."""
    import torch

    torch_cfg = EngineConfig(backend="torch", device="cpu", fallback=False)
    lab = ClipLabeler(b32["exported"], torch_cfg, text_cache_dir=None)
    assert lab.device == "cpu" and labeler_b32.device is None
    lab.set_vocabulary(PHRASES[:6], TEMPLATES)
    labeler_b32.set_vocabulary(PHRASES[:6], TEMPLATES)
    for path, boxes in coco_boxes(max_per_image=4, n_images=2):
        bgr = cv2.imread(str(path))
        xd, md = lab.preprocess(torch.from_numpy(bgr), boxes)
        xh, mh = labeler_b32.preprocess(bgr, boxes)
        assert isinstance(xd, torch.Tensor) and md["crop_boxes"] == mh["crop_boxes"]
        a, b = lab.infer(xd)["image_embeds"], labeler_b32.infer(xh)["image_embeds"]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() >= 0.999, cos
    lab.close()
