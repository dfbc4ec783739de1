"""SAM runtime pieces against segment-anything's own code, on real COCO images (fast tests).

The export / ONNX parity tests are in test_sam_parity.py (slow)."""
from __future__ import annotations

import json
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from perception2d_ros.models.sam import prompts as sam_prompts
from perception2d_ros.models.sam import results as sam_results
from perception2d_ros.models.sam import spec as sam_spec
from perception2d_ros.models.sam import transforms as sam_transforms

COCO = Path(__file__).resolve().parents[1] / "data" / "coco"
IMAGES = sorted((COCO / "images").glob("*.jpg"))


def _rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1])


def _sam_stub() -> types.SimpleNamespace:
    """What ``Sam.preprocess`` / ``Sam.postprocess_masks`` read from ``self``: the official
    constants (the methods themselves are segment-anything's, unmodified)."""
    torch = pytest.importorskip("torch")
    return types.SimpleNamespace(
        pixel_mean=torch.tensor(sam_spec.PIXEL_MEAN).view(-1, 1, 1),
        pixel_std=torch.tensor(sam_spec.PIXEL_STD).view(-1, 1, 1),
        image_encoder=types.SimpleNamespace(img_size=sam_spec.IMAGE_SIZE))


# --------------------------------------------------------------------------- preprocessing
def test_resize_bit_identical_to_segment_anything_on_all_coco_images() -> None:
    """ResizeLongestSide.apply_image (PIL via torchvision) == ours, every pixel, on every test
    image, plus 3x upscaled (shrinking path, antialias) and tall (> 2:1, Pillow's vertical-
    first order) versions of real images."""
    ref_mod = pytest.importorskip("segment_anything.utils.transforms")
    ref = ref_mod.ResizeLongestSide(1024)
    ours = sam_transforms.ResizeLongestSide(1024)
    assert len(IMAGES) >= 30
    checked = 0
    for path in IMAGES:
        rgb = _rgb(path)
        variants = [rgb]
        if checked < 6:
            variants.append(cv2.resize(rgb, None, fx=3.1, fy=2.9, interpolation=cv2.INTER_LINEAR))
            variants.append(cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] * 3)))
            variants.append(np.ascontiguousarray(rgb[: rgb.shape[0] // 3, :97]))
        for img in variants:
            a = ours.apply_image(img)
            b = ref.apply_image(img)
            assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
            assert np.array_equal(a, b), f"{path.name} {img.shape}: {(a != b).sum()} px differ"
        checked += 1


def test_pil_resize_arbitrary_sizes_bit_identical() -> None:
    """Non-aspect-preserving sizes (each pass order, up and down) against Pillow itself."""
    pytest.importorskip("PIL")
    from PIL import Image

    rgb = _rgb(IMAGES[0])
    rng = np.random.default_rng(0)
    for _ in range(40):
        y, x = rng.integers(0, 100, 2)
        h, w = rng.integers(20, 400, 2)
        crop = np.ascontiguousarray(rgb[y:y + h, x:x + w])
        oh, ow = (int(v) for v in rng.integers(5, 700, 2))
        ref = np.asarray(Image.fromarray(crop).resize((ow, oh), Image.BILINEAR))
        assert np.array_equal(sam_transforms.pil_bilinear_resize(crop, (oh, ow)), ref), \
            (crop.shape, oh, ow)


def test_preprocess_equals_sam_preprocess() -> None:
    """Our [1,3,1024,1024] float32 tensor vs segment-anything's ``Sam.preprocess`` of its
    ``apply_image`` output: bit-identical (tolerance 0; the parity test allows 1e-5)."""
    torch = pytest.importorskip("torch")
    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    stub = _sam_stub()
    ref_t = ResizeLongestSide(1024)
    seg_t = sam_transforms.ResizeLongestSide()
    for path in IMAGES[:4]:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        x = torch.as_tensor(ref_t.apply_image(rgb)).permute(2, 0, 1).contiguous()[None]
        ref = Sam.preprocess(stub, x).numpy()
        ours = seg_t.preprocess(rgb)
        assert ours.shape == (1, 3, 1024, 1024) and ours.dtype == np.float32
        assert float(np.abs(ours - ref).max()) == 0.0
        h, w = seg_t.input_size(rgb.shape[:2])
        assert max(h, w) == 1024 and not ours[..., h:, :].any() and not ours[..., :, w:].any()


def test_coords_and_boxes_transform_match_segment_anything() -> None:
    from segment_anything.utils.transforms import ResizeLongestSide

    ref = ResizeLongestSide(1024)
    ours = sam_transforms.ResizeLongestSide()
    rng = np.random.default_rng(1)
    for size in [(480, 640), (640, 427), (230, 352), (1080, 1920)]:
        pts = rng.uniform(0, 600, (5, 3, 2))
        boxes = rng.uniform(0, 600, (7, 4))
        assert np.array_equal(ours.apply_coords(pts, size), ref.apply_coords(pts, size))
        assert np.array_equal(ours.apply_boxes(boxes, size), ref.apply_boxes(boxes, size))
        assert ours.input_size(size) == ref.get_preprocess_shape(*size, 1024)


# --------------------------------------------------------------------------- postprocessing
def test_postprocess_masks_matches_sam_postprocess_masks() -> None:
    """Upscale 256 → 1024, crop, resize to the original size: vs ``Sam.postprocess_masks``
    (torch F.interpolate) on smooth logits of SAM's magnitude: max abs diff ≤ 1e-4 and
    the thresholded masks agree on all but a handful of pixels."""
    torch = pytest.importorskip("torch")
    from segment_anything.modeling import Sam

    stub = _sam_stub()
    rng = np.random.default_rng(2)
    coarse = rng.standard_normal((3, 2, 16, 16)).astype(np.float32) * 12
    low = np.stack([[cv2.resize(c, (256, 256), interpolation=cv2.INTER_CUBIC) for c in m]
                    for m in coarse]) + rng.standard_normal((3, 2, 256, 256)).astype(np.float32)
    tr = sam_transforms.ResizeLongestSide()
    for size in [(480, 640), (640, 427), (230, 352), (500, 375), (1080, 1920)]:
        ours = tr.postprocess_masks(low, size)
        ref = Sam.postprocess_masks(stub, torch.from_numpy(low), tr.input_size(size),
                                    size).numpy()
        assert ours.shape == ref.shape == (3, 2) + size
        assert float(np.abs(ours - ref).max()) <= 1e-4, size
        assert int(((ours > 0) != (ref > 0)).sum()) <= 2, size


def test_stability_score_matches_segment_anything() -> None:
    torch = pytest.importorskip("torch")
    from segment_anything.utils.amg import calculate_stability_score

    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((4, 3, 60, 80)) * 3).astype(np.float32)
    logits[0, 0, :5] = 1.0   # exactly at threshold + offset: counts as outside (strict >)
    logits[1, 1] = -5.0      # empty: 0/0 → NaN as segment-anything
    ours = sam_results.stability_score(logits, 0.0, 1.0)
    ref = calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    assert ours.shape == (4, 3)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, equal_nan=True)
    assert np.isnan(ours[1, 1])


def test_instance_id_image_overlap_rule() -> None:
    h, w = 40, 50
    masks = np.zeros((4, h, w), bool)
    masks[0, 0:20, 0:30] = True
    masks[1, 10:30, 10:40] = True     # overlaps 0
    masks[2, 25:40, 30:50] = True     # overlaps 1
    masks[3, 0:5, 45:50] = True       # alone
    scores = np.float32([0.5, 0.9, 0.9, np.nan])
    res = sam_results.SamResult(masks=masks, scores=scores, stability=np.ones(4, np.float32),
                        chosen=np.zeros(4, np.int64),
                        low_res_logits=np.zeros((4, 1, 256, 256), np.float32),
                        iou_predictions=scores[:, None], image_size=(h, w))
    ids = sam_results.instance_id_image(res)
    assert ids.dtype == np.uint16 and ids.shape == (h, w)
    assert ids[15, 15] == 2               # 1 (0.9) beats 0 (0.5)
    assert ids[5, 5] == 1
    assert ids[27, 35] == 2               # tie 0.9 vs 0.9: lower prompt index wins
    assert ids[35, 45] == 3
    assert ids[2, 47] == 4                # NaN score still painted where nobody else is
    assert ids[39, 0] == 0
    assert set(np.unique(ids)) == {0, 1, 2, 3, 4}
    # explicit scores: the order follows them
    ids2 = sam_results.instance_id_image(res, scores=np.float32([1.0, 0.1, 0.2, 0.0]))
    assert ids2[15, 15] == 1 and ids2[27, 35] == 3


def test_mask_bboxes_and_areas() -> None:
    masks = np.zeros((3, 10, 12), bool)
    masks[0, 2:5, 3:7] = True
    masks[1, 9, 11] = True
    res = sam_results.SamResult(masks=masks, scores=np.zeros(3, np.float32),
                        stability=np.zeros(3, np.float32), chosen=np.zeros(3, np.int64),
                        low_res_logits=np.zeros((3, 1, 256, 256), np.float32),
                        iou_predictions=np.zeros((3, 1), np.float32), image_size=(10, 12))
    assert res.bboxes.tolist() == [[3, 2, 7, 5], [11, 9, 12, 10], [0, 0, 0, 0]]
    assert res.areas.tolist() == [12, 1, 0]


# --------------------------------------------------------------------------- prompts
def test_build_prompts_layout_matches_prompt_encoder() -> None:
    coords, labels = sam_prompts.build_prompts(boxes=[[1, 2, 30, 40], [5, 6, 7, 8]])
    assert coords.shape == (2, 2, 2) and labels.tolist() == [[2, 3], [2, 3]]
    assert coords[0].tolist() == [[1, 2], [30, 40]]
    # points alone: one (0,0) padding point with label -1, as PromptEncoder(pad=True)
    coords, labels = sam_prompts.build_prompts(points=[[[10, 11], [12, 13]]], point_labels=[[1, 0]])
    assert coords.shape == (1, 3, 2) and labels.tolist() == [[1, 0, -1]]
    assert coords[0, 2].tolist() == [0, 0]
    # [P,2] is one prompt of P points
    coords, labels = sam_prompts.build_prompts(points=[[10, 11], [12, 13]], point_labels=[1, 1])
    assert coords.shape == (1, 3, 2)
    # points + box: points first, then the corners, no padding (PromptEncoder(pad=False))
    coords, labels = sam_prompts.build_prompts(boxes=[[1, 2, 3, 4]], points=[[[5, 6]]],
                                       point_labels=[[1]])
    assert labels.tolist() == [[1, 2, 3]] and coords[0].tolist() == [[5, 6], [1, 2], [3, 4]]
    with pytest.raises(sam_spec.SamError, match="point_labels"):
        sam_prompts.build_prompts(points=[[1, 2]])
    with pytest.raises(sam_spec.SamError, match="boxes"):
        sam_prompts.build_prompts(boxes=[[1, 2, 3]])
    with pytest.raises(sam_spec.SamError, match="2 point prompts but 1 boxes"):
        sam_prompts.build_prompts(boxes=[[1, 2, 3, 4]], points=np.zeros((2, 1, 2)),
                          point_labels=np.ones((2, 1)))
    with pytest.raises(sam_spec.SamError, match="must be 1"):
        sam_prompts.build_prompts(points=[[1, 2]], point_labels=[2])


# --------------------------------------------------------------------------- loading / CLI
def test_weights_only_loader_rejects_pickles_and_infers_arch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from perception2d_ros.models.sam import checkpoint as sam_checkpoint
    from perception2d_ros.models.sam import export as sam_export

    bad = tmp_path / "evil.pth"
    torch.save({"x": types.SimpleNamespace(a=1)}, bad)   # arbitrary object: needs pickle
    with pytest.raises(ValueError, match="weights-only"):
        sam_checkpoint.load_state_dict(bad)
    sd = {"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 16, 16)}
    assert sam_checkpoint.infer_arch(sd) == "vit_l"
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": sd}, wrapped)
    assert sam_checkpoint.infer_arch(sam_checkpoint.load_state_dict(wrapped)) == "vit_l"
    with pytest.raises(ValueError, match="not a SAM"):
        sam_checkpoint.infer_arch({"encoder.weight": torch.zeros(2)})
    with pytest.raises(FileNotFoundError):
        sam_checkpoint.load_state_dict(tmp_path / "missing.pth")
    # MobileSAM's TinyViT layout is vit_t (alias mobile_sam); other TinyViT widths and
    # unknown arch names are refused
    tiny = {"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3),
            "image_encoder.layers.0.blocks.0.conv1.c.weight": torch.zeros(256, 64, 1, 1)}
    assert sam_checkpoint.infer_arch(tiny) == "vit_t"
    assert sam_checkpoint.canonical_arch("mobile_sam") == "vit_t"
    with pytest.raises(ValueError, match="width 48"):
        sam_checkpoint.infer_arch({"image_encoder.patch_embed.seq.0.c.weight":
                                   torch.zeros(48, 3, 3, 3)})
    with pytest.raises(ValueError, match="unknown SAM arch 'vit_x'.*vit_t.*mobile_sam"):
        sam_export.export_onnx("vit_x", None, tmp_path, seed=0)


def test_cli_without_weights_says_how_to_get_them(tmp_path: Path, capsys) -> None:
    from perception2d_ros.cli.main import main

    rc = main(["segment", "--models-dir", str(tmp_path), "--cache-dir", str(tmp_path / "c"),
               str(IMAGES[0]), "--box", "1,2,30,40", "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "perception2d models fetch sam_vit_b" in err and "--checkpoint" in err
    assert not (tmp_path / "o.png").exists()
    rc = main(["segment", "--checkpoint", str(tmp_path / "nope.pth"), str(IMAGES[0]),
               "--point", "5,5", "-o", str(tmp_path / "o.png")])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err


def test_cli_argument_validation(tmp_path: Path, capsys) -> None:
    from perception2d_ros.cli import segment
    from perception2d_ros.cli.main import main

    with pytest.raises(SystemExit):
        main(["segment", str(IMAGES[0]), "--box", "1,2,3", "-o", "x.png"])
    with pytest.raises(SystemExit):
        main(["segment", str(IMAGES[0]), "--box", "5,5,1,1", "-o", "x.png"])
    with pytest.raises(SystemExit):
        main(["segment", str(IMAGES[0]), "--point", "1,2,7", "-o", "x.png"])
    capsys.readouterr()
    assert main(["segment", str(IMAGES[0]), "-o", str(tmp_path / "x.png")]) == 2
    assert "at least one" in capsys.readouterr().err
    prompts = segment.build_cli_prompts([[1, 2, 3, 4]], [[5, 6, 1], [7, 8, 0]], False)
    assert prompts == [{"box": [1, 2, 3, 4]}, {"points": [[5, 6, 1], [7, 8, 0]]}]
    assert len(segment.build_cli_prompts([], [[5, 6, 1], [7, 8, 0]], True)) == 2


def test_model_files_errors(tmp_path: Path) -> None:
    with pytest.raises(sam_spec.SamError, match="metadata not found"):
        sam_spec.SamModelFiles.load(tmp_path)
    (tmp_path / sam_spec.META_FILE).write_text(json.dumps({"files": {"encoder": {"path": "e"}}}))
    with pytest.raises(sam_spec.SamError, match="decoder"):
        sam_spec.SamModelFiles.load(tmp_path)


def test_large_model_export_uses_one_external_data_file(tmp_path: Path, monkeypatch) -> None:
    """The > 2 GB path (ViT-H encoder): weights go to one ``.onnx.data`` file that ONNX
    Runtime loads and the sidecar entry hashes (threshold lowered on a small module)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from perception2d_ros.models.sam import export as sam_export
    from perception2d_ros.engines.onnxruntime_backend import OrtEngine
    from perception2d_ros.engines.model_store import sha256_file

    monkeypatch.setattr(sam_export, "EXTERNAL_DATA_THRESHOLD", 0)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                 torch.nn.Linear(128, 8)).eval()
    path = tmp_path / "m.onnx"
    sam_export._export_one(module, (torch.zeros(1, 64),), path, ["x"], ["y"], None, {"y": [1, 8]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    out = OrtEngine(path, device="cpu").infer({"x": x})["y"]
    np.testing.assert_allclose(out, module(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    entry = sam_export._file_entry(tmp_path, "m.onnx")
    assert entry["external_data"] == {"path": "m.onnx.data",
                                      "sha256": sha256_file(tmp_path / "m.onnx.data"),
                                      "size": (tmp_path / "m.onnx.data").stat().st_size}
