"""LSeg: architecture vs the official layout, checkpoint loading, ONNX export/parity, the
label-map stage, the vocabulary, the CLI and segmentation metrics.

CI uses a reduced configuration of the same module code (``lseg_test_small``: ViT width 192,
4 blocks, 256x256 input) for export and parity; the full ViT-L/16 layout is checked by names
and shapes on the meta device (no allocation).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

from perception2d_ros.eval import segmentation as SE  # noqa: E402
from perception2d_ros.models.lseg import checkpoint as CK  # noqa: E402
from perception2d_ros.models.lseg import export as EX  # noqa: E402
from perception2d_ros.models.lseg import parity as PA  # noqa: E402
from perception2d_ros.models.lseg import labeler as L  # noqa: E402
from perception2d_ros.models.lseg import labelmap as LM  # noqa: E402
from perception2d_ros.models.lseg import meta as MT  # noqa: E402
from perception2d_ros.models.lseg import net as M  # noqa: E402
from perception2d_ros.models.lseg import palette as PAL  # noqa: E402
from perception2d_ros.models.lseg import resample as RS  # noqa: E402
from perception2d_ros.models.lseg import vocabulary as VO  # noqa: E402

SEG = Path(__file__).resolve().parents[1] / "data" / "segmentation"
SMALL = "lseg_test_small"
SMALL_SIZE = 256
SEED = 3


# =========================================================================== official layout
# The image side of the official LSeg state dict for LSegNet(backbone="clip_vitl16_384",
# features=256, arch_option=0) -- the configuration of lang-seg's demo_e200.ckpt, whose
# Lightning "state_dict" holds these under the prefix "net." (plus net.clip_pretrained.*, the
# whole CLIP ViT-B/32 model, not listed). Derived by reading the published code of
# github.com/isl-org/lang-seg (not from our module):
#   modules/models/lseg_net.py     LSegNet(..., use_bn=True); scratch.refinenet1..4 =
#       FeatureFusionBlock_custom(256, ReLU, bn=True); scratch.head1 = Conv2d(256, 512, 1);
#       scratch.output_conv = Interpolate(x2) (no parameters); logit_scale =
#       nn.Parameter(...).exp() is a plain tensor attribute (not saved); scratch.head_block
#       only for arch_option 1/2 (demo: 0).
#   modules/models/lseg_blocks.py  _make_scratch([256, 512, 1024, 1024], 256):
#       scratch.layer{1..4}_rn = Conv2d(in, 256, 3, padding=1, bias=False);
#       FeatureFusionBlock_custom: resConfUnit1, resConfUnit2, out_conv = Conv2d(256, 256, 1);
#       ResidualConvUnit_custom(bn=True): conv1/conv2 Conv2d(256, 256, 3, bias=False),
#       bn1/bn2 BatchNorm2d(256) (weight, bias, running_mean, running_var, num_batches_tracked).
#   modules/models/lseg_vit.py     _make_pretrained_clip_vitl16_384: pretrained.model = timm
#       vit_large_patch16_384 (patch 16, width 1024, 24 blocks, mlp 4096, 384 px -> 24x24+1
#       tokens, ImageNet head 1000); _make_vit_b16_backbone(features=[256, 512, 1024, 1024],
#       vit_features=1024, use_readout="project"): act_postprocessN = Sequential(
#       [0] ProjectReadout(project = Sequential(Linear(2048, 1024), GELU)), [1] Transpose,
#       [2] Unflatten, [3] Conv2d(1024, features[N], 1), [4] ConvTranspose2d(k=4, s=4) |
#       ConvTranspose2d(k=2, s=2) | (none) | Conv2d(3x3, stride 2, padding 1)).
def _official_layout_vitl16() -> dict[str, tuple[int, ...]]:
    t: dict[str, tuple[int, ...]] = {}
    vit = "pretrained.model."
    t[vit + "cls_token"] = (1, 1, 1024)
    t[vit + "pos_embed"] = (1, 577, 1024)
    t[vit + "patch_embed.proj.weight"] = (1024, 3, 16, 16)
    t[vit + "patch_embed.proj.bias"] = (1024,)
    for i in range(24):
        b = f"{vit}blocks.{i}."
        t[b + "norm1.weight"] = t[b + "norm1.bias"] = (1024,)
        t[b + "attn.qkv.weight"] = (3072, 1024)
        t[b + "attn.qkv.bias"] = (3072,)
        t[b + "attn.proj.weight"] = (1024, 1024)
        t[b + "attn.proj.bias"] = (1024,)
        t[b + "norm2.weight"] = t[b + "norm2.bias"] = (1024,)
        t[b + "mlp.fc1.weight"] = (4096, 1024)
        t[b + "mlp.fc1.bias"] = (4096,)
        t[b + "mlp.fc2.weight"] = (1024, 4096)
        t[b + "mlp.fc2.bias"] = (1024,)
    t[vit + "norm.weight"] = t[vit + "norm.bias"] = (1024,)
    t[vit + "head.weight"] = (1000, 1024)          # timm's classifier: unused by LSeg
    t[vit + "head.bias"] = (1000,)
    feats = [256, 512, 1024, 1024]
    for n, f in enumerate(feats, start=1):
        a = f"pretrained.act_postprocess{n}."
        t[a + "0.project.0.weight"] = (1024, 2048)
        t[a + "0.project.0.bias"] = (1024,)
        t[a + "3.weight"] = (f, 1024, 1, 1)
        t[a + "3.bias"] = (f,)
    t["pretrained.act_postprocess1.4.weight"] = (256, 256, 4, 4)    # ConvTranspose: (in, out, k, k)
    t["pretrained.act_postprocess1.4.bias"] = (256,)
    t["pretrained.act_postprocess2.4.weight"] = (512, 512, 2, 2)
    t["pretrained.act_postprocess2.4.bias"] = (512,)
    t["pretrained.act_postprocess4.4.weight"] = (1024, 1024, 3, 3)
    t["pretrained.act_postprocess4.4.bias"] = (1024,)
    for n, f in enumerate(feats, start=1):
        t[f"scratch.layer{n}_rn.weight"] = (256, f, 3, 3)
        r = f"scratch.refinenet{n}."
        for unit in ("resConfUnit1", "resConfUnit2"):
            for c in ("conv1", "conv2"):
                t[f"{r}{unit}.{c}.weight"] = (256, 256, 3, 3)
            for bn in ("bn1", "bn2"):
                for p in ("weight", "bias", "running_mean", "running_var"):
                    t[f"{r}{unit}.{bn}.{p}"] = (256,)
                t[f"{r}{unit}.{bn}.num_batches_tracked"] = ()
        t[r + "out_conv.weight"] = (256, 256, 1, 1)
        t[r + "out_conv.bias"] = (256,)
    t["scratch.head1.weight"] = (512, 256, 1, 1)
    t["scratch.head1.bias"] = (512,)
    return t


def test_full_vitl16_matches_official_layout():
    official = _official_layout_vitl16()
    ignored = {k for k in official if k.startswith(CK.IGNORED_PREFIXES)}
    assert ignored == {"pretrained.model.head.weight", "pretrained.model.head.bias"}
    ours = CK.official_state_dict_shapes("lseg_vitl16_384")        # meta device
    expected = {k: v for k, v in official.items() if k not in ignored}
    assert set(ours) - set(expected) == set(), "names we have that the official model lacks"
    assert set(expected) - set(ours) == set(), "official names we do not have"
    bad = {k: (ours[k], v) for k, v in expected.items() if tuple(ours[k]) != v}
    assert not bad
    n_params = sum(int(np.prod(s)) for k, s in expected.items() if "running" not in k
                   and "num_batches" not in k)
    assert 330e6 < n_params < 345e6           # ViT-L/16 (~303M) + DPT neck/head


def test_backbone_matches_timm_vit_large_patch16_384():
    import timm

    with torch.device("meta"):
        ref = timm.create_model("vit_large_patch16_384", pretrained=False)
    net = M.build_model("lseg_vitl16_384", device="meta")
    ref_sd = {k: tuple(v.shape) for k, v in ref.state_dict().items()
              if not k.startswith("head.")}
    ours = {k[len("backbone."):]: tuple(v.shape) for k, v in net.state_dict().items()
            if k.startswith("backbone.")}
    assert ours == ref_sd


def test_key_map_is_explicit_and_bijective():
    km = CK.official_key_map("lseg_vitl16_384")
    assert len(km) == len(set(km.values())) == len(_official_layout_vitl16()) - 2
    for official, ours in km.items():
        assert CK.official_to_ours(official) == ours
        assert CK.ours_to_official(ours) == official
    spot = {
        "pretrained.model.blocks.23.mlp.fc2.weight": "backbone.blocks.23.mlp.fc2.weight",
        "pretrained.act_postprocess1.0.project.0.weight": "reassemble.0.readout.project.0.weight",
        "pretrained.act_postprocess4.4.bias": "reassemble.3.resample.bias",
        "scratch.layer3_rn.weight": "fusion.2.layer_rn.weight",
        "scratch.refinenet2.resConfUnit1.bn2.running_var": "fusion.1.skip_unit.bn2.running_var",
        "scratch.refinenet4.resConfUnit2.conv1.weight": "fusion.3.unit.conv1.weight",
        "scratch.refinenet1.out_conv.bias": "fusion.0.out_conv.bias",
        "scratch.head1.weight": "head.proj.weight",
    }
    for official, ours in spot.items():
        assert km[official] == ours
    assert CK.official_to_ours("clip_pretrained.visual.conv1.weight") is None
    assert CK.official_to_ours("pretrained.model.head.weight") is None
    # head block (arch_option 1/2) maps too
    km_hb = CK.official_key_map(M.get_arch("lseg_vitl16_384", arch_option=1, block_depth=2))
    assert km_hb["scratch.head_block.depthwise.depthwise.weight"] == "head_block.conv.weight"


def test_arch_aliases():
    assert M.get_arch("lseg_vit_l16_384") is M.get_arch("lseg_vitl16_384")
    assert M.get_arch("clip_vitl16_384").hooks == (5, 11, 17, 23)
    with pytest.raises(KeyError):
        M.get_arch("lseg_vitb32_nope")


# =========================================================================== fixtures
def _image(name: str) -> np.ndarray:
    img = cv2.imread(str(SEG / name), cv2.IMREAD_COLOR)
    assert img is not None, name
    return img


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("lseg_export")
    t0 = time.perf_counter()
    files = EX.export_onnx(SMALL, None, out, seed=SEED, input_size=SMALL_SIZE)
    files["seconds"] = time.perf_counter() - t0
    return files


@pytest.fixture(scope="module")
def small_net():
    return M.build_model(SMALL, seed=SEED)


@pytest.fixture(scope="module")
def small_segmenter(small_export):
    from perception2d_ros.engines.factory import EngineConfig

    seg = L.LSegSegmenter.from_onnx(small_export["image"],
                                    EngineConfig(backend="onnxruntime", device="cpu"))
    yield seg
    seg.close()


# =========================================================================== export + parity
def test_export_files_and_sidecar(small_export):
    import onnx

    onnx_path, sidecar = small_export["image"], small_export["sidecar"]
    assert onnx_path.is_file() and sidecar == onnx_path.with_suffix(".json")
    model = onnx.load(str(onnx_path))
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, dims(inp)) == ("image", [1, 3, SMALL_SIZE, SMALL_SIZE])
    assert (out.name, dims(out)) == ("pixel_embeds", [1, 512, SMALL_SIZE // 2, SMALL_SIZE // 2])
    meta = json.loads(sidecar.read_text())
    assert meta["arch"]["name"] == SMALL and meta["input_size"] == [SMALL_SIZE, SMALL_SIZE]
    assert meta["embed_stride"] == 2 and meta["embed_dim"] == 512
    assert meta["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-6)
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5]
    assert meta["seed"] == SEED and meta["head_block"] is None
    assert meta["text_model"] == "ViT-B-32"
    rt = MT.LSegMeta.from_sidecar(sidecar)
    assert rt.input_size == (SMALL_SIZE, SMALL_SIZE) and rt.head_block is None


def test_export_without_weights_is_refused(tmp_path):
    with pytest.raises(CK.CheckpointError, match="demo_e200"):
        EX.export_onnx(SMALL, None, tmp_path)


def test_onnx_torch_parity_on_real_images(small_export):
    """Torch module vs ONNX Runtime on real ADE20K and VOC images (same preprocessed tensor).
    Tolerances: pixel-embedding max abs diff <= 1e-4 (unit vectors), per-pixel cosine >=
    0.9999, stride-2 label-map agreement >= 99.9% for 8 image-derived prototype phrases."""
    images = [_image("ADE_train_00016869.jpg"), _image("23_image.png"), _image("114_image.png")]
    rep = PA.parity_check(SMALL, None, small_export, images, seed=SEED,
                         tolerances={"max_abs": 1e-4, "min_cos": 0.9999,
                                     "label_agreement": 0.999})
    print("parity", json.dumps({k: rep[k] for k in ("max_abs", "min_cos",
                                                    "min_label_agreement")}))
    assert rep["passed"], rep
    assert rep["images"] == 3
    # the prototype labelling is a real segmentation (several labels, not one)
    assert all(r["num_labels"] >= 6 for r in rep["per_image"])


def test_runtime_label_map_matches_torch_official_forward(small_net, small_segmenter):
    """Full runtime path (ORT embeddings -> numpy logits -> resize -> argmax) vs the torch
    model's official forward (logits at input resolution) on a real VOC image whose size
    equals the network input side (no letterbox): the same x2 upsample (align_corners=True),
    so only near-ties between ORT and torch may differ."""
    img = _image("23_image.png")[:SMALL_SIZE, :SMALL_SIZE]
    tensor, box = RS.preprocess(img, small_segmenter.meta)
    assert box.resized == (SMALL_SIZE, SMALL_SIZE)
    with torch.no_grad():
        emb = small_net.pixel_embeddings(torch.from_numpy(tensor))
        text = torch.from_numpy(PA.prototype_embeddings(emb[0].numpy(), 6))
        ref = small_net(torch.from_numpy(tensor), text)[0].argmax(0).numpy()
    res = small_segmenter.segment(img, text.numpy())
    assert res.label_map.shape == img.shape[:2] and res.label_map.dtype == np.uint16
    agree = float(np.mean(res.label_map == ref))
    print("runtime vs torch forward agreement", agree)
    assert agree >= 0.999
    assert len(np.unique(ref)) >= 4


# =========================================================================== checkpoints
def _lightning_checkpoint(net, path, extra_keys=None):
    sd = CK.to_official_state_dict(net)                     # "net." + official names
    sd["net.pretrained.model.head.weight"] = torch.zeros(1000, net.arch.embed_dim)
    sd["net.pretrained.model.head.bias"] = torch.zeros(1000)
    sd["net.clip_pretrained.positional_embedding"] = torch.randn(77, 512)
    sd["net.clip_pretrained.text_projection"] = torch.randn(512, 512)
    sd["net.clip_pretrained.visual.conv1.weight"] = torch.randn(768, 3, 32, 32)
    sd.update(extra_keys or {})
    torch.save({"epoch": 199, "global_step": 12345, "pytorch-lightning_version": "1.3.5",
                "state_dict": sd, "hyper_parameters": {"backbone": "clip_vitl16_384",
                                                       "num_features": 256, "arch_option": 0}},
               path)
    return sd


def test_lightning_checkpoint_roundtrip(tmp_path):
    src = M.build_model(SMALL, seed=11)
    ckpt = tmp_path / "lseg_small.ckpt"
    _lightning_checkpoint(src, ckpt)
    dst = M.build_model(SMALL, seed=99)
    x = torch.from_numpy(RS.preprocess(_image("1_image.png"),
                                      MT.LSegMeta(input_size=(SMALL_SIZE, SMALL_SIZE)))[0])
    with torch.no_grad():
        before = dst.pixel_embeddings(x)
        report = CK.load_checkpoint(dst, ckpt)
        a, b = src.pixel_embeddings(x), dst.pixel_embeddings(x)
    assert report == {"loaded": len(src.state_dict()), "clip": 3, "ignored": 2}
    assert torch.equal(a, b)
    assert not torch.allclose(before, b)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    parts = CK.split_official_state_dict(CK.read_checkpoint(ckpt))
    assert set(parts["clip"]) == {"positional_embedding", "text_projection", "visual.conv1.weight"}


def test_checkpoint_errors(tmp_path):
    net = M.build_model(SMALL, seed=1)
    # an unknown key
    bad = tmp_path / "bad.ckpt"
    _lightning_checkpoint(net, bad, {"net.something.else": torch.zeros(3)})
    with pytest.raises(CK.CheckpointError, match="not LSeg"):
        CK.load_checkpoint(M.build_model(SMALL, seed=1), bad)
    # a head block the architecture does not have
    hb = tmp_path / "hb.ckpt"
    _lightning_checkpoint(net, hb, {"net.scratch.head_block.depthwise.depthwise.weight":
                                    torch.zeros(1, 1, 3, 3),
                                    "net.scratch.head_block.depthwise.depthwise.bias":
                                    torch.zeros(1)})
    with pytest.raises(CK.CheckpointError, match="arch_option"):
        CK.load_checkpoint(M.build_model(SMALL, seed=1), hb)
    # the wrong architecture (shapes)
    ok = tmp_path / "ok.ckpt"
    _lightning_checkpoint(net, ok)
    other = M.get_arch(SMALL, features=32)
    with pytest.raises(CK.CheckpointError, match="shape mismatch"):
        CK.load_checkpoint(M.build_model(other, seed=1), ok)
    # weights_only: a pickled object is refused, not executed
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "obj": Path("/tmp")}, evil)
    with pytest.raises(CK.CheckpointError, match="weights_only"):
        CK.read_checkpoint(evil)
    with pytest.raises(CK.CheckpointError, match="not found"):
        CK.read_checkpoint(tmp_path / "missing.ckpt")


# =========================================================================== head blocks
@pytest.mark.parametrize("option,activation", [(1, "lrelu"), (2, "relu"), (1, "tanh")])
def test_head_block_numpy_matches_torch(option, activation):
    arch = M.get_arch(SMALL, arch_option=option, block_depth=3, activation=activation)
    net = M.build_model(arch, seed=5)
    spec = MT.HeadBlock.from_dict(EX.head_block_spec(net))
    logits = torch.randn(1, 7, 20, 24) * 5
    with torch.no_grad():
        ref = logits
        for _ in range(arch.block_depth - 1):
            ref = net.head_block(ref)
        ref = net.head_block(ref, False)[0].numpy()
    got = LM.apply_head_block(logits[0].numpy(), spec)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-5)


def test_head_block_export_sidecar_and_runtime(tmp_path):
    arch = M.get_arch(SMALL, arch_option=1, block_depth=2, activation="lrelu")
    files = EX.export_onnx(arch, None, tmp_path, seed=7, input_size=128)
    meta = MT.LSegMeta.from_sidecar(files["sidecar"])
    assert meta.head_block is not None and meta.head_block.kind == "bottleneck"
    net = M.build_model(arch, seed=7)
    assert np.allclose(meta.head_block.weight,
                       net.head_block.conv.weight.detach().numpy().reshape(3, 3))


# =========================================================================== label-map logic
def _orthonormal(n: int, d: int = 512, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, n)))
    return q.T.astype(np.float32)                                         # (n, d)


class _FixedEngine:
    """Engine stub returning given pixel embeddings (records what it was fed)."""

    def __init__(self, embeds: np.ndarray) -> None:
        self.embeds = embeds[None].astype(np.float32)
        self.fed = []

    def infer(self, feeds):
        self.fed.append(feeds)
        return {"pixel_embeds": self.embeds}


def _region_embeddings(regions: np.ndarray, text: np.ndarray) -> np.ndarray:
    """(h, w) region ids -> (D, h, w) embeddings equal to the regions' text embeddings."""
    return np.ascontiguousarray(text[regions].transpose(2, 0, 1))


def _official_upsampled_regions(regions: np.ndarray, n: int) -> np.ndarray:
    """Argmax of one-hot region logits after lang-seg's x2 upsample (align_corners=True)."""
    import torch.nn.functional as F

    onehot = torch.from_numpy(np.eye(n, dtype=np.float32)[regions].transpose(2, 0, 1))[None]
    up = F.interpolate(onehot, scale_factor=2, mode="bilinear", align_corners=True)
    return up[0].argmax(0).numpy()


def test_constructed_regions_give_exact_label_map():
    text = _orthonormal(4)
    meta = MT.LSegMeta(input_size=(96, 128))
    regions = np.zeros((48, 64), np.int64)                # stride-2 grid
    regions[:, 20:] = 1
    regions[30:, :40] = 2
    regions[10:20, 50:60] = 3
    seg = L.LSegSegmenter(_FixedEngine(_region_embeddings(regions, text)), meta)
    img = np.zeros((96, 128, 3), np.uint8)
    res = seg.segment(img, text, return_confidence=True, labels=["a", "b", "c", "d"])
    expected = _official_upsampled_regions(regions, 4)
    np.testing.assert_array_equal(res.label_map, expected)
    # the x2 align_corners upsample keeps every region; only region corners are cut
    assert np.mean(expected == np.repeat(np.repeat(regions, 2, 0), 2, 1)) > 0.999
    # region interiors: cosine 1 with their phrase
    assert res.similarity[0, 0] == pytest.approx(1.0, abs=1e-5)
    # softmax of [14.29, 0, 0, 0]: confidence of the winner
    p = 1 / (1 + 3 * np.exp(-M.LOGIT_SCALE))
    assert res.confidence[0, 0] == pytest.approx(p, rel=1e-5)
    shares = res.shares()
    assert shares["b"] == pytest.approx(np.mean(expected == 1))
    assert sum(shares.values()) == pytest.approx(1.0)
    cc = res.class_confidence()
    assert cc.shape == (4,) and np.all(cc <= p + 1e-6) and np.all(cc > 0.5)


def test_letterbox_maps_back_to_image_exactly():
    """A 60x128 image in a 128x128 input: content in the top 60 rows; the label map comes
    back at 60x128 with the regions where they were drawn (pad rows ignored)."""
    text = _orthonormal(3, seed=1)
    meta = MT.LSegMeta(input_size=(128, 128))
    regions = np.full((64, 64), 2, np.int64)              # pad area: class 2 (must vanish)
    regions[:30, :32] = 0
    regions[:30, 32:] = 1
    engine = _FixedEngine(_region_embeddings(regions, text))
    seg = L.LSegSegmenter(engine, meta)
    img = np.full((60, 128, 3), 200, np.uint8)
    res = seg.segment(img, text)
    assert res.label_map.shape == (60, 128)
    expected = np.zeros((60, 128), np.uint16)
    expected[:, 64:] = 1
    np.testing.assert_array_equal(res.label_map, expected)
    fed = engine.fed[0]["image"]
    assert fed.shape == (1, 3, 128, 128) and fed.dtype == np.float32
    assert np.allclose(fed[0, :, :60], (200 / 255 - 0.5) / 0.5)
    assert np.allclose(fed[0, :, 60:], -1.0)                # black padding, normalised


def test_other_threshold_and_catch_all():
    basis = _orthonormal(4, seed=2)
    text = basis[:3]
    meta = MT.LSegMeta(input_size=(32, 32))
    emb = _region_embeddings(np.zeros((16, 16), np.int64), text)
    # right half: a unit vector with cosine 0.3 to phrase 0 and 0 to the others
    weak = 0.3 * text[0] + np.sqrt(1 - 0.09) * basis[3]
    emb[:, :, 8:] = weak[:, None, None]
    seg = L.LSegSegmenter(_FixedEngine(emb), meta)
    img = np.zeros((32, 32, 3), np.uint8)
    plain = seg.segment(img, text).label_map
    assert np.all(plain == 0)                                 # argmax alone: phrase 0
    res = seg.segment(img, text, other_threshold=0.5)
    assert np.all(res.label_map[:, :16] == 0) and np.all(res.label_map[:, 16:] == 255)
    assert res.similarity[0, 20] == pytest.approx(0.3, abs=1e-4)
    assert res.shares()["other"] == pytest.approx(0.5)
    assert np.all(seg.segment(img, text, other_threshold=0.2).label_map == 0)
    # configurable other value; catch-all phrase index -> other
    seg65 = L.LSegSegmenter(_FixedEngine(emb), meta, other_value=65535)
    assert np.all(seg65.segment(img, text, 0.5).label_map[:, 16:] == 65535)
    assert np.all(seg.segment(img, text, other_classes=[0]).label_map == 255)


def test_vocabulary_change_needs_no_reexport(small_segmenter):
    """Same ONNX engine, three vocabularies: reordering permutes the labels exactly; a new
    phrase equal to a region's embedding takes exactly that region's pixels."""
    img = _image("ADE_train_00016900.jpg")
    emb, box = small_segmenter.embed(img)
    protos = PA.prototype_embeddings(emb, 5)
    base = LM.label_map_from_embeddings(emb, protos, small_segmenter.meta, box).label_map
    assert base.shape == img.shape[:2] and len(np.unique(base)) >= 4
    perm = np.array([3, 0, 4, 1, 2])
    permuted = LM.label_map_from_embeddings(emb, protos[perm], small_segmenter.meta, box).label_map
    inv = np.argsort(perm)
    # identical logits per phrase; only exact ties between two interpolated logits (both
    # labels equally good, a handful of boundary pixels) may resolve to the other index
    assert np.mean(permuted != inv[base]) < 1e-5
    # add a phrase: the embedding of another pixel -> it wins at least where it is best
    extra = emb[:, emb.shape[1] // 3, emb.shape[2] // 5][None]
    grown = LM.label_map_from_embeddings(emb, np.concatenate([protos, extra]),
                                        small_segmenter.meta, box).label_map
    new = grown == 5
    assert 0 < new.mean() < 1
    assert np.mean(grown[~new] != base[~new]) < 1e-5         # other pixels keep their label


def test_constructed_end_to_end_module(tmp_path):
    """A module whose head outputs a known embedding (head1 weight 0, bias = phrase 2's
    embedding) exported to ONNX: every pixel of a real image is phrase 2; reordering the
    vocabulary moves the index, the engine is untouched."""
    from perception2d_ros.engines.factory import EngineConfig

    text = _orthonormal(4, seed=4)
    net = M.build_model(SMALL, seed=1)
    with torch.no_grad():
        net.head.proj.weight.zero_()
        net.head.proj.bias.copy_(torch.from_numpy(3.0 * text[2]))
    ckpt = tmp_path / "constructed.pt"
    torch.save(net.state_dict(), ckpt)                       # our own names also load
    files = EX.export_onnx(SMALL, ckpt, tmp_path / "x", input_size=128)
    seg = L.LSegSegmenter.from_onnx(files["image"], EngineConfig(backend="onnxruntime",
                                                                 device="cpu"))
    img = _image("114_image.png")
    emb, _ = seg.embed(img)
    np.testing.assert_allclose(emb, np.broadcast_to(text[2][:, None, None], emb.shape),
                               atol=1e-5)
    assert np.all(seg.segment(img, text).label_map == 2)
    assert np.all(seg.segment(img, text[[2, 0, 1, 3]]).label_map == 0)
    seg.close()


@pytest.mark.parametrize("out_size,content", [((333, 517), None), ((480, 640), (90, 120)),
                                              ((95, 130), (95, 127)), ((40, 51), (96, 128))])
def test_label_map_is_argmax_of_officially_resampled_logits(out_size, content):
    """The boundary-only evaluation equals the brute force done as lang-seg does it: every
    logit channel upsampled x2 and resized to the output with torch's
    F.interpolate(align_corners=True), padding cropped in between, then the argmax."""
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    n, h, w = 9, 48, 64
    logits = cv2.GaussianBlur(rng.normal(size=(h, w, n)).astype(np.float32), (0, 0), 3)
    logits = np.ascontiguousarray(logits.transpose(2, 0, 1)) * 10
    res = LM.label_map_from_logits(logits, out_size, content=content, logit_scale=2.0,
                                  return_confidence=True)
    ch, cw = content or (2 * h, 2 * w)
    up = F.interpolate(torch.from_numpy(logits)[None], scale_factor=2, mode="bilinear",
                       align_corners=True)[:, :, :ch, :cw]
    full = F.interpolate(up, size=out_size, mode="bilinear", align_corners=True)[0].numpy()
    np.testing.assert_array_equal(res.label_map, full.argmax(0))
    np.testing.assert_allclose(res.similarity, full.max(0) / 2.0, atol=1e-5)
    assert len(np.unique(res.label_map)) >= 5
    assert res.confidence.shape == tuple(out_size)
    assert np.all((res.confidence > 1 / n - 1e-6) & (res.confidence <= 1 + 1e-6))


def test_large_vocabulary_and_uint16():
    n = 300                                                   # > 255 phrases
    text = _orthonormal(n, seed=5)
    regions = (np.arange(20 * 20).reshape(20, 20) % n).astype(np.int64)
    meta = MT.LSegMeta(input_size=(40, 40))
    seg = L.LSegSegmenter(_FixedEngine(_region_embeddings(regions, text)), meta,
                          other_value=65535)
    res = seg.segment(np.zeros((40, 40, 3), np.uint8), text, return_confidence=True)
    np.testing.assert_array_equal(res.label_map, _official_upsampled_regions(regions, n))
    assert res.label_map.max() > 255
    assert res.confidence.shape == (40, 40)
    with pytest.raises(ValueError, match="other_value"):
        LM.label_map_from_logits(np.zeros((300, 4, 4), np.float32), (4, 4))
    with pytest.raises(ValueError, match="512"):
        LM.similarity_logits(np.zeros((512, 2, 2), np.float32), np.ones((2, 768)), 1.0)


# =========================================================================== vocabulary + drawing
def test_indoor_vocabulary_file():
    v = VO.LSegVocabulary.from_yaml()
    for p in ("floor", "wall", "ceiling", "door", "window", "person", "chair", "table", "sofa",
              "bed", "stairs", "cabinet", "shelf", "plant"):
        assert p in v.phrases
    assert v.templates == ("{}",) and v.other_threshold is None
    assert v.text_phrases[-1] == "other" and v.other_classes == (len(v.phrases),)
    assert VO.LSegVocabulary.from_phrases(" floor, wall ,,door").phrases == ("floor", "wall",
                                                                              "door")
    with pytest.raises(ValueError):
        VO.LSegVocabulary.from_phrases("a,a")


def test_palette_colorize_and_legend():
    pal = PAL.phrase_palette(["floor", "wall", "door"])
    assert np.array_equal(PAL.phrase_palette(["door", "floor"]), pal[[2, 0]])   # stable per phrase
    assert len({tuple(c) for c in PAL.make_palette(40)}) == 40
    lm = np.array([[0, 1], [2, 255]], np.uint16)
    col = PAL.colorize(lm, pal)
    assert np.array_equal(col[0, 0], pal[0]) and np.array_equal(col[1, 0], pal[2])
    assert np.array_equal(col[1, 1], PAL.OTHER_COLOR)
    img = np.full((200, 300, 3), 128, np.uint8)
    res = LM.LabelMapResult(np.zeros((200, 300), np.uint16), 255, ("floor", "wall", "door"),
                           num_classes=3)
    res.label_map[:, 150:] = 1
    out = PAL.overlay(img, res, pal)
    assert out.shape == img.shape and not np.array_equal(out, img)
    legend = PAL.draw_legend(img, ["floor", "wall", "door"], pal, [0.5, 0.5, 0.0])
    # swatches for the two present labels, none for the absent one
    assert np.any(np.all(legend == pal[0], axis=2)) and np.any(np.all(legend == pal[1], axis=2))
    assert not np.any(np.all(legend == pal[2], axis=2))


# =========================================================================== ground truth + metrics
def test_read_voc_and_ade_ground_truth():
    gt = SE.read_voc_label(SEG / "1_target.png")
    assert gt.shape == (513, 513)
    assert set(np.unique(gt)) == {0, 1, 255}                  # background, aeroplane, border
    assert set(np.unique(SE.read_voc_label(SEG / "23_target.png"))) == {0, 17, 255}  # sheep
    assert set(np.unique(SE.read_voc_label(SEG / "114_target.png"))) == {0, 3, 255}  # bird
    idx, names = SE.read_ade20k_label(SEG / "ADE_train_00016869_seg.png")
    assert names[2420] == "sky" and names[2131].startswith("road")
    mapped = SE.map_names_to_classes(idx, names, ["sky", "road", "car", "person"])
    assert np.sum(mapped == 0) == np.sum(idx == 2420) == 437203
    assert np.sum(mapped == 2) == np.sum(idx == 401)          # "car, auto, ..." synonym match
    assert np.sum(mapped == 255) == np.sum(~np.isin(idx, [2420, 2131, 401, 1831]))


def test_confusion_and_metrics():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 255, 0, 1]], np.uint8)
    conf = SE.confusion_matrix(pred, gt, 3)
    assert conf.sum() == 7 and conf[2, 3] == 1                # "other" column
    m = SE.segmentation_metrics(conf, ["a", "b", "c"])
    # IoU a = 1/2, b = 3/4, c = 1/2 ; accuracy 5/7
    assert m["per_class_iou"] == pytest.approx({"a": 0.5, "b": 0.75, "c": 0.5})
    assert m["miou"] == pytest.approx((0.5 + 0.75 + 0.5) / 3)
    assert m["pixel_accuracy"] == pytest.approx(5 / 7)


# =========================================================================== CLI
def _main(argv):
    from perception2d_ros.cli.main import main

    return main(argv)


def test_cli_seglabels(small_export, tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    for name in ("ADE_train_00016964.jpg", "1_image.png"):
        (src / name).write_bytes((SEG / name).read_bytes())
    vocab = ["floor", "wall", "person", "tree", "other"]
    text = _orthonormal(len(vocab), seed=9)
    np.save(tmp_path / "text.npy", text)
    out = tmp_path / "out"
    rc = _main(["seglabels", "--model", str(small_export["image"]), "--vocab", ",".join(vocab),
                "--other-phrase", "other", "--text-embeds", str(tmp_path / "text.npy"),
                str(src), "-o", str(out), "--json", "--backend", "onnxruntime",
                "--device", "cpu"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 2
    for doc in lines:
        stem = Path(doc["image"]).stem
        img = cv2.imread(doc["image"])
        lm = cv2.imread(str(out / f"{stem}_labels.png"), cv2.IMREAD_UNCHANGED)
        assert lm.dtype == np.uint8 and lm.shape == img.shape[:2]
        assert set(np.unique(lm)) <= {0, 1, 2, 3, 255}       # "other" phrase -> 255
        ov = cv2.imread(str(out / f"{stem}_overlay.png"))
        assert ov.shape == img.shape
        saved = json.loads((out / f"{stem}_labels.json").read_text())
        assert saved["shares"] == doc["shares"] and doc["vocabulary"] == vocab
        assert sum(doc["shares"].values()) == pytest.approx(1.0, abs=1e-4)
        for i, phrase in enumerate(vocab[:4]):
            assert doc["shares"][phrase] == pytest.approx(np.mean(lm == i), abs=1e-5)
        assert doc["shares"]["other"] == pytest.approx(np.mean(lm == 255), abs=1e-5)


def test_cli_without_weights_says_how_to_get_them(tmp_path, capsys):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.zeros((8, 8, 3), np.uint8))
    rc = _main(["seglabels", "--models-dir", str(tmp_path / "models"), "--vocab", "floor,wall",
                str(img), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0
    assert "demo_e200.ckpt" in err and "perception2d models export lseg_demo_e200" in err
    assert "--checkpoint" in err
    rc = _main(["seglabels", "--checkpoint", str(tmp_path / "nope.ckpt"), "--vocab", "floor",
                str(img), "-o", str(tmp_path / "o")])
    assert rc != 0 and "not found" in capsys.readouterr().err


def test_cli_eval_seg_on_voc_and_ade(tmp_path, capsys):
    imgs, labs, pred = tmp_path / "images", tmp_path / "labels", tmp_path / "pred"
    for d in (imgs, labs, pred):
        d.mkdir()
    for base in ("1", "23"):
        (imgs / f"{base}_image.png").write_bytes((SEG / f"{base}_image.png").read_bytes())
        (labs / f"{base}_target.png").write_bytes((SEG / f"{base}_target.png").read_bytes())
        gt = SE.read_voc_label(SEG / f"{base}_target.png")
        p = np.where(gt == 255, 0, gt).astype(np.uint8)
        if base == "23":
            p[:, :100] = 0                                     # lose some sheep pixels
        cv2.imwrite(str(pred / f"{base}_image_labels.png"), p)
    rc = _main(["eval", "seg", "--images", str(imgs), "--labels", str(labs), "--classes",
                "voc", "--pred", str(pred), "--json"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    gt1, gt23 = (SE.read_voc_label(SEG / f"{b}_target.png") for b in ("1", "23"))
    lost = int(np.sum(gt23[:, :100] == 17))
    sheep = int(np.sum(gt23 == 17))
    assert lost > 0
    assert m["images"] == 2 and m["pixels"] == int(np.sum(gt1 != 255) + np.sum(gt23 != 255))
    assert m["per_class_iou"]["aeroplane"] == 1.0
    assert m["per_class_iou"]["sheep"] == pytest.approx((sheep - lost) / sheep)
    bg_gt = int(np.sum(gt1 == 0) + np.sum(gt23 == 0))
    assert m["per_class_iou"]["background"] == pytest.approx(bg_gt / (bg_gt + lost))
    assert m["pixel_accuracy"] == pytest.approx(1 - lost / m["pixels"])

    # ADE20K: names from the JSON, scored for the classes asked for
    imgs2, pred2 = tmp_path / "ade_images", tmp_path / "ade_pred"
    imgs2.mkdir()
    pred2.mkdir()
    name = "ADE_train_00016869"
    (imgs2 / f"{name}.jpg").write_bytes((SEG / f"{name}.jpg").read_bytes())
    idx, names = SE.read_ade20k_label(SEG / f"{name}_seg.png")
    classes = ["sky", "road", "tree", "building"]
    gt = SE.map_names_to_classes(idx, names, classes)
    p = np.where(gt == 255, 3, gt).astype(np.uint8)
    p[gt == 2] = 3                                              # trees predicted as building
    cv2.imwrite(str(pred2 / f"{name}_labels.png"), p)
    rc = _main(["eval", "seg", "--images", str(imgs2), "--labels", str(SEG), "--classes",
                ",".join(classes), "--pred", str(pred2), "--json"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["per_class_iou"]["sky"] == 1.0 and m["per_class_iou"]["tree"] == 0.0
    assert m["pixel_accuracy"] == pytest.approx(1 - np.sum(gt == 2) / np.sum(gt != 255))


def test_cli_eval_seg_with_model(small_export, tmp_path, capsys):
    imgs, labs = tmp_path / "images", tmp_path / "labels"
    imgs.mkdir()
    labs.mkdir()
    (imgs / "114_image.png").write_bytes((SEG / "114_image.png").read_bytes())
    (labs / "114_target.png").write_bytes((SEG / "114_target.png").read_bytes())
    np.save(tmp_path / "t.npy", _orthonormal(21, seed=3))
    rc = _main(["eval", "seg", "--images", str(imgs), "--labels", str(labs), "--classes", "voc",
                "--model", str(small_export["image"]), "--text-embeds", str(tmp_path / "t.npy"),
                "--backend", "onnxruntime", "--device", "cpu", "--json"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    gt = SE.read_voc_label(SEG / "114_target.png")
    assert m["pixels"] == int(np.sum(gt != 255)) and 0.0 <= m["miou"] <= 1.0


# =========================================================================== CLIP in checkpoints
def test_clip_in_lseg_checkpoint_loads_in_clip_module(tmp_path):
    """lang-seg checkpoints carry the CLIP ViT-B/32 (OpenAI names, fp16) under
    net.clip_pretrained.*: extracted, it loads strictly into our CLIP module as
    ViT-B-32-quickgelu (OpenAI weights use QuickGELU) with identical weights."""
    open_clip = pytest.importorskip("open_clip")
    from perception2d_ros.models.clip.checkpoint import load_clip

    with torch.device("meta"):                               # names and shapes only
        layout = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None,
                                        device="meta").state_dict()
    gen = torch.Generator().manual_seed(0)
    ref_sd = {k: torch.randn(v.shape, generator=gen).half() for k, v in layout.items()}
    net = M.build_model(SMALL, seed=2)
    sd = CK.to_official_state_dict(net)
    sd.update({"net.clip_pretrained." + k: v for k, v in ref_sd.items()})
    ckpt = tmp_path / "lseg.ckpt"
    torch.save({"state_dict": sd, "epoch": 1}, ckpt)
    out = CK.extract_clip_checkpoint(ckpt, tmp_path / "clip.pt")
    clip = load_clip(CK.CLIP_ARCH_OF_CHECKPOINT, out)
    got = clip.state_dict()
    assert set(got) == set(ref_sd)
    assert all(torch.equal(ref_sd[k].float(), got[k]) for k in ref_sd)
    assert clip.text_projection.shape == (512, 512)       # LSeg's 512-d text space
    # a checkpoint without CLIP: nothing to extract
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": CK.to_official_state_dict(net)}, bare)
    assert CK.extract_clip_checkpoint(bare, tmp_path / "none.pt") is None


class _FakeTextCache:
    calls: list = []

    def __init__(self, dim=512):
        self.dim = dim

    @classmethod
    def from_model(cls, model, **kw):
        cls.calls.append((model, kw))
        return cls()

    def encode(self, phrases, templates):
        return _orthonormal(len(phrases), self.dim, seed=len(phrases))


def test_cli_checkpoint_uses_its_own_clip(small_export, tmp_path, monkeypatch, capsys):
    """--checkpoint: the LSeg export is cached by checkpoint sha256 and reused; the text side
    is the CLIP stored in the same checkpoint (extracted once)."""
    from perception2d_ros.engines import model_store as ms
    from perception2d_ros.models.clip import vocabulary

    net = M.build_model(SMALL, seed=SEED)
    ckpt = tmp_path / "mine.ckpt"
    _lightning_checkpoint(net, ckpt)
    cache = tmp_path / "cache"
    # pre-populate the export cache with the module's export (same arch/size) -> no re-export
    target = cache / ms.sha256_file(ckpt)[:16]
    target.mkdir(parents=True)
    for key in ("image", "sidecar"):
        (target / small_export[key].name).write_bytes(small_export[key].read_bytes())
    monkeypatch.setattr(EX, "export_onnx", lambda *a, **k: pytest.fail("re-exported"))
    _FakeTextCache.calls.clear()
    monkeypatch.setattr(vocabulary, "TextEmbeddingCache", _FakeTextCache)
    img = tmp_path / "a.png"
    img.write_bytes((SEG / "1_image.png").read_bytes())
    rc = _main(["seglabels", "--model", SMALL, "--checkpoint", str(ckpt), "--cache-dir",
                str(cache), "--input-size", str(SMALL_SIZE), "--vocab", "floor,wall,sky",
                str(img), "-o", str(tmp_path / "out"), "--backend", "onnxruntime",
                "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    (model, kw), = _FakeTextCache.calls
    assert kw["arch"] == "ViT-B-32-quickgelu"
    assert Path(kw["checkpoint"]) == target / "clip_from_lseg.pt"
    extracted = torch.load(kw["checkpoint"], weights_only=True)
    assert set(extracted) == {"positional_embedding", "text_projection", "visual.conv1.weight"}
    lm = cv2.imread(str(tmp_path / "out" / "a_labels.png"), cv2.IMREAD_UNCHANGED)
    assert lm.shape == (513, 513) and lm.max() <= 2


def test_cli_refuses_a_clip_of_the_wrong_architecture(small_export, tmp_path, monkeypatch,
                                                      capsys):
    from perception2d_ros.models.clip import resolve as clip_resolve

    sidecar = tmp_path / "clip_ViT-B-16.json"
    sidecar.write_text(json.dumps({"arch": "ViT-B-16", "image_onnx": {}, "text_onnx": {},
                                   "logit_scale": 100.0, "image_size": 224}))
    monkeypatch.setattr(clip_resolve, "resolve_export", lambda *a, **k: sidecar)
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.zeros((16, 16, 3), np.uint8))
    rc = _main(["seglabels", "--model", str(small_export["image"]), "--text-model",
                "clip_vit_b16", "--vocab", "floor", str(img), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and "ViT-B-16" in err and "ViT-B-32" in err


def test_torch_backend_matches_onnxruntime_on_real_images(small_export, small_segmenter):
    """The LSeg image graph run by torch (``backend: torch``, the GPU backend where only
    torch + CUDA exist; here on the CPU) gives ORT's pixel embeddings on real images."""
    from perception2d_ros.engines.factory import EngineConfig
    from perception2d_ros.engines.torch_backend import TorchEngine

    seg = L.LSegSegmenter.from_onnx(small_export["image"],
                                    EngineConfig(backend="torch", device="cpu", fallback=False))
    assert isinstance(seg.engine, TorchEngine)
    for name in ("ADE_train_00016869.jpg", "23_image.png"):
        ours, _ = seg.embed(_image(name))
        ref, _ = small_segmenter.embed(_image(name))
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    seg.close()
