"""LSeg image side in torch: architecture, key map, checkpoint loading, ONNX export, parity.

LSeg (Li et al., "Language-driven Semantic Segmentation", ICLR 2022; official code
github.com/isl-org/lang-seg) is a DPT dense-prediction network whose head projects every pixel
into CLIP's joint embedding space; a pixel's class is the phrase whose CLIP text embedding has
the largest dot product with it. Our own implementation of the published architecture:

* backbone: timm ``vit_large_patch16_384`` (ViT-L/16, 24 blocks, width 1024), position
  embedding resized bilinearly to the input grid; token sequences taken after blocks
  ``[5, 11, 17, 23]`` (the block outputs, before the final norm, as lang-seg's forward hooks);
* reassemble ("act_postprocess1..4"): readout ``project`` (concat(token, cls) -> Linear -> GELU),
  tokens -> grid, 1x1 conv to [256, 512, 1024, 1024] channels, then resample to strides
  4 / 8 / 16 / 32 (4x4 s4 transposed conv, 2x2 s2 transposed conv, identity, 3x3 s2 conv);
* fusion ("scratch"): 3x3 convs (no bias) to 256 channels, four RefineNet-style
  ``FeatureFusionBlock_custom`` with batch norm (LSegNet sets ``use_bn=True``), each ending in a
  x2 bilinear upsample (align_corners=True) and a 1x1 conv -> stride 2;
* head: ``head1`` 1x1 conv 256 -> 512 (CLIP ViT-B/32 text space), per-pixel L2 normalisation,
  logits = logit_scale * <pixel, text> with logit_scale = 1/0.07 (a constant, not trained and
  not in the checkpoint), optional spatial regularisation blocks on the logits
  (``arch_option`` 1: bottleneck block, 2: depthwise block, ``block_depth`` times), then x2
  bilinear upsampling (align_corners=True) to the input resolution.

The text side is CLIP ViT-B/32's text tower (frozen during LSeg training, so the stock OpenAI
weights give the same embeddings; the checkpoint's ``net.clip_pretrained.*`` copy can be
extracted with :func:`split_official_state_dict`).

Export contract (what the runtime in :mod:`perception2d_ros.models.lseg.labeler` consumes)
--------------------------------------------------------------------------------
ONNX input ``image`` float32 [1, 3, H, W]: RGB, ``(x / 255 - 0.5) / 0.5`` (lang-seg's
normalisation), H and W multiples of 32, fixed at export (default 480x480). Output
``pixel_embeds`` float32 [1, 512, H/2, W/2]: the ``head1`` output L2-normalised per pixel, at
the head's native stride 2 (the official x2 upsample happens on the logits; bilinear
interpolation commutes with the per-pixel dot product, so the runtime computes logits at
stride 2 for the N phrases and resizes those instead of 512 embedding channels). The head
block (if any) acts on the logits, so its 3x3 kernel goes into the sidecar JSON and the runtime
applies it; the vocabulary never touches the engine.

Torch is needed here only for export and parity tests; the runtime uses ONNX Runtime/TensorRT.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from perception2d_ros.engines.model_store import sha256_file

# lang-seg: self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07)).exp() -- the
# .exp() turns it into a plain float32 tensor, so it is a constant (not trained, not saved).
LOGIT_SCALE = float(torch.exp(torch.ones([]) * float(np.log(1 / 0.07))))
NORM_MEAN = (0.5, 0.5, 0.5)
NORM_STD = (0.5, 0.5, 0.5)
INPUT_NAME = "image"
OUTPUT_NAME = "pixel_embeds"
EMBED_STRIDE = 2
SIDECAR_FORMAT = "perception2d.lseg/1"


# --------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class LSegArch:
    """One LSeg configuration. ``resample`` per reassemble level: ``deconv4`` / ``deconv2``
    (transposed conv k=s), ``none``, ``conv_s2`` (3x3 stride-2 conv)."""

    name: str
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 16
    pretrain_size: int = 384          # position-embedding grid = pretrain_size / patch_size
    hooks: tuple[int, ...] = (5, 11, 17, 23)
    reassemble: tuple[int, ...] = (256, 512, 1024, 1024)
    resample: tuple[str, ...] = ("deconv4", "deconv2", "none", "conv_s2")
    features: int = 256
    out_dim: int = 512
    use_bn: bool = True
    arch_option: int = 0              # 0: no head block, 1: bottleneck, 2: depthwise
    block_depth: int = 0
    activation: str = "lrelu"         # head-block activation: relu | lrelu | tanh
    text_model: str = "ViT-B-32"      # CLIP text tower whose space head1 projects into
    timm_name: str | None = None      # the timm model the backbone layout matches

    def __post_init__(self) -> None:
        if len(self.hooks) != 4 or len(self.reassemble) != 4 or len(self.resample) != 4:
            raise ValueError("LSegArch needs 4 hooks, 4 reassemble widths and 4 resample ops")
        if max(self.hooks) >= self.depth:
            raise ValueError(f"hooks {self.hooks} exceed depth {self.depth}")
        if self.arch_option not in (0, 1, 2):
            raise ValueError("arch_option must be 0, 1 or 2")
        if self.activation not in ("relu", "lrelu", "tanh"):
            raise ValueError("activation must be relu, lrelu or tanh")

    @property
    def stride_multiple(self) -> int:
        """Input sides must be multiples of this (the stride-32 level must be integral)."""
        return self.patch_size * 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LSegArch":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in d.items() if k in known})


ARCHS: dict[str, LSegArch] = {
    # lang-seg LSegNet(backbone="clip_vitl16_384", features=256, arch_option=0) -- the
    # configuration of the released demo_e200.ckpt (the manifest's lseg_demo_e200).
    "lseg_vitl16_384": LSegArch(name="lseg_vitl16_384", timm_name="vit_large_patch16_384"),
    # Reduced configuration of the same module code for CI export/parity tests (random
    # weights only; no released checkpoint).
    "lseg_test_small": LSegArch(
        name="lseg_test_small", embed_dim=192, depth=4, num_heads=3, pretrain_size=224,
        hooks=(0, 1, 2, 3), reassemble=(32, 64, 128, 128), features=64),
}


ARCH_ALIASES = {"lseg_vit_l16_384": "lseg_vitl16_384", "clip_vitl16_384": "lseg_vitl16_384"}


def get_arch(arch: str | LSegArch, **overrides: Any) -> LSegArch:
    """An :class:`LSegArch` by name (or as given) with field overrides, e.g.
    ``get_arch("lseg_vitl16_384", arch_option=1, block_depth=2)``."""
    if isinstance(arch, LSegArch):
        base = arch
    else:
        name = ARCH_ALIASES.get(arch, arch)
        if name not in ARCHS:
            raise KeyError(f"unknown LSeg architecture '{arch}'; known: {', '.join(ARCHS)}")
        base = ARCHS[name]
    return dataclasses.replace(base, **overrides) if overrides else base


class ProjectReadout(nn.Module):
    """readout='project': concat(patch token, cls token) -> Linear(2D, D) -> GELU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:]
        readout = tokens[:, :1].expand_as(patches)
        return self.project(torch.cat((patches, readout), dim=-1))


class Reassemble(nn.Module):
    """One DPT reassemble level: readout -> grid -> 1x1 conv -> resample."""

    def __init__(self, dim: int, out_ch: int, resample: str) -> None:
        super().__init__()
        self.readout = ProjectReadout(dim)
        self.proj = nn.Conv2d(dim, out_ch, kernel_size=1)
        if resample == "deconv4":
            self.resample: nn.Module = nn.ConvTranspose2d(out_ch, out_ch, kernel_size=4, stride=4)
        elif resample == "deconv2":
            self.resample = nn.ConvTranspose2d(out_ch, out_ch, kernel_size=2, stride=2)
        elif resample == "conv_s2":
            self.resample = nn.Conv2d(out_ch, out_ch, kernel_size=3, stride=2, padding=1)
        elif resample == "none":
            self.resample = nn.Identity()
        else:
            raise ValueError(f"unknown resample op '{resample}'")

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.readout(tokens)                                  # B, gh*gw, D
        b, _, d = x.shape
        x = x.transpose(1, 2).reshape(b, d, grid[0], grid[1])
        return self.resample(self.proj(x))


class ResidualConvUnit(nn.Module):
    """DPT ResidualConvUnit_custom: x + bn2(conv2(relu(bn1(conv1(relu(x))))))."""

    def __init__(self, features: int, use_bn: bool) -> None:
        super().__init__()
        self.use_bn = use_bn
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        if use_bn:
            self.bn1 = nn.BatchNorm2d(features)
            self.bn2 = nn.BatchNorm2d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(x))
        if self.use_bn:
            out = self.bn1(out)
        out = self.conv2(F.relu(out))
        if self.use_bn:
            out = self.bn2(out)
        return out + x


class FusionLevel(nn.Module):
    """One pyramid level: ``layer_rn`` (3x3 conv to ``features``) and the fusion block
    (FeatureFusionBlock_custom: [+ skip_unit(lateral)] -> unit -> x2 bilinear -> 1x1 conv)."""

    def __init__(self, in_ch: int, features: int, use_bn: bool) -> None:
        super().__init__()
        self.layer_rn = nn.Conv2d(in_ch, features, 3, padding=1, bias=False)
        self.skip_unit = ResidualConvUnit(features, use_bn)
        self.unit = ResidualConvUnit(features, use_bn)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)

    def forward(self, lateral: torch.Tensor, top: torch.Tensor | None) -> torch.Tensor:
        lat = self.layer_rn(lateral)
        out = lat if top is None else top + self.skip_unit(lat)
        out = self.unit(out)
        out = F.interpolate(out, scale_factor=2.0, mode="bilinear", align_corners=True)
        return self.out_conv(out)


class HeadBlock(nn.Module):
    """lang-seg's spatial regularisation on the logits: one 3x3 single-channel conv shared by
    all classes; ``bottleneck`` adds the per-pixel max over classes before the activation."""

    def __init__(self, kind: str, activation: str) -> None:
        super().__init__()
        self.kind = kind
        self.activation = activation
        self.conv = nn.Conv2d(1, 1, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, act: bool = True) -> torch.Tensor:
        b, c, h, w = x.shape
        out = self.conv(x.reshape(b * c, 1, h, w)).reshape(b, c, h, w)
        if self.kind == "bottleneck":
            out = out + x.max(dim=1, keepdim=True)[0]
        if act:
            out = _activation(out, self.activation)
        return out


def _activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu":
        return F.relu(x)
    if name == "lrelu":
        return F.leaky_relu(x, 0.01)
    return torch.tanh(x)


class LSegNet(nn.Module):
    """The LSeg network (image side + label head). ``forward(image, text_embeds)`` returns
    the official output (logits at input resolution); :meth:`pixel_embeddings` is what we
    export."""

    def __init__(self, arch: str | LSegArch = "lseg_vitl16_384") -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.arch = get_arch(arch)
        a = self.arch
        self.backbone = VisionTransformer(
            img_size=a.pretrain_size, patch_size=a.patch_size, embed_dim=a.embed_dim,
            depth=a.depth, num_heads=a.num_heads, mlp_ratio=a.mlp_ratio, qkv_bias=True,
            num_classes=0, class_token=True, global_pool="token")
        self.reassemble = nn.ModuleList(
            Reassemble(a.embed_dim, ch, rs) for ch, rs in zip(a.reassemble, a.resample))
        self.fusion = nn.ModuleList(FusionLevel(ch, a.features, a.use_bn) for ch in a.reassemble)
        self.head = nn.Module()
        self.head.proj = nn.Conv2d(a.features, a.out_dim, kernel_size=1)
        if a.arch_option:
            self.head_block = HeadBlock("bottleneck" if a.arch_option == 1 else "depthwise",
                                        a.activation)
        self.logit_scale = LOGIT_SCALE

    # ---- backbone -------------------------------------------------------------------------
    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.backbone.pos_embed
        tok, grid = pos[:, :1], pos[0, 1:]
        old = int(math.sqrt(grid.shape[0]))
        grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([tok, grid], dim=1)

    def hook_tokens(self, image: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        p = self.arch.patch_size
        gh, gw = image.shape[-2] // p, image.shape[-1] // p
        vit = self.backbone
        x = vit.patch_embed.proj(image).flatten(2).transpose(1, 2)
        x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self._pos_embed(gh, gw)
        hooks = set(self.arch.hooks)
        out = []
        for i, blk in enumerate(vit.blocks):
            x = blk(x)
            if i in hooks:
                out.append(x)
            if i == self.arch.hooks[-1]:
                break            # later blocks and the final norm do not reach the head
        return out, (gh, gw)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """``head1`` output before normalisation: [B, out_dim, H/2, W/2]."""
        m = self.arch.stride_multiple
        if image.shape[-1] % m or image.shape[-2] % m:
            raise ValueError(f"input H, W must be multiples of {m}; got {tuple(image.shape)}")
        tokens, grid = self.hook_tokens(image)
        levels = [r(t, grid) for r, t in zip(self.reassemble, tokens)]
        path = None
        for lvl in (3, 2, 1, 0):
            path = self.fusion[lvl](levels[lvl], path)
        return self.head.proj(path)

    def pixel_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised per-pixel embeddings [B, out_dim, H/2, W/2] (the exported output)."""
        feats = self.features(image)
        return feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def logits(self, embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Official head from normalised pixel embeddings: scaled dot product with the
        normalised text embeddings, head blocks, x2 bilinear (align_corners=True)."""
        text = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        out = self.logit_scale * torch.einsum("bdhw,nd->bnhw", embeds, text.to(embeds.dtype))
        if self.arch.arch_option:
            for _ in range(self.arch.block_depth - 1):
                out = self.head_block(out)
            out = self.head_block(out, False)
        return F.interpolate(out, scale_factor=2.0, mode="bilinear", align_corners=True)

    def forward(self, image: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.logits(self.pixel_embeddings(image), text_embeds)


class PixelEmbedder(nn.Module):
    """Export wrapper: image -> pixel_embeds."""

    def __init__(self, net: LSegNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net.pixel_embeddings(image)


def build_model(arch: str | LSegArch = "lseg_vitl16_384", *, seed: int | None = None,
                device: str | torch.device | None = None) -> LSegNet:
    """An LSegNet in eval mode. With ``seed``: reproducible random weights for tests --
    timm's ViT init, Kaiming-normal convolutions with zero bias (torch's default conv init
    makes the head output nearly the same vector at every pixel, which would make label-map
    tests meaningless) and randomised batch-norm statistics."""
    if seed is not None:
        torch.manual_seed(seed)
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            return LSegNet(arch).eval()
    net = LSegNet(arch)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for mod in net.modules():
                if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)) and mod is not getattr(
                        net.backbone.patch_embed, "proj", None):
                    w = torch.randn(mod.weight.shape, generator=gen)
                    # transposed convs here have kernel == stride: one tap per output
                    fan_in = w[0].numel() if isinstance(mod, nn.Conv2d) else w.shape[0]
                    mod.weight.copy_(w * math.sqrt(2.0 / fan_in))
                    if mod.bias is not None:
                        mod.bias.zero_()
                elif isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.normal_(0.0, 0.1, generator=gen)
                    mod.running_var.uniform_(0.5, 1.5, generator=gen)
                    mod.weight.uniform_(0.5, 1.5, generator=gen)
                    mod.bias.normal_(0.0, 0.1, generator=gen)
                    mod.num_batches_tracked.fill_(1000)
    if device is not None:
        net = net.to(device)
    return net.eval()


# --------------------------------------------------------------------------- key map
# Official lang-seg names (LSegModule.net.*, prefix "net." stripped) -> our names.
# {L}: 1-based pyramid level in the official names, {l} = L - 1 in ours; {rest}: any suffix.
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("pretrained.model.{rest}", "backbone.{rest}"),
    ("pretrained.act_postprocess{L}.0.project.0.{rest}", "reassemble.{l}.readout.project.0.{rest}"),
    ("pretrained.act_postprocess{L}.3.{rest}", "reassemble.{l}.proj.{rest}"),
    ("pretrained.act_postprocess{L}.4.{rest}", "reassemble.{l}.resample.{rest}"),
    ("scratch.layer{L}_rn.{rest}", "fusion.{l}.layer_rn.{rest}"),
    ("scratch.refinenet{L}.resConfUnit1.{rest}", "fusion.{l}.skip_unit.{rest}"),
    ("scratch.refinenet{L}.resConfUnit2.{rest}", "fusion.{l}.unit.{rest}"),
    ("scratch.refinenet{L}.out_conv.{rest}", "fusion.{l}.out_conv.{rest}"),
    ("scratch.head1.{rest}", "head.proj.{rest}"),
    ("scratch.head_block.depthwise.depthwise.{rest}", "head_block.conv.{rest}"),
)
# Official keys the image side does not use: the CLIP model (text tower used separately, the
# CLIP visual tower unused by LSeg) and timm's ImageNet classifier.
IGNORED_PREFIXES: tuple[str, ...] = ("clip_pretrained.", "pretrained.model.head.")
CHECKPOINT_PREFIXES: tuple[str, ...] = ("net.", "model.", "module.")


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    pattern = pattern.replace(re.escape("{L}"), r"(?P<L>[1-9])")
    pattern = pattern.replace(re.escape("{l}"), r"(?P<l>[0-9])")
    pattern = pattern.replace(re.escape("{rest}"), r"(?P<rest>.+)")
    return re.compile(f"^{pattern}$")


_OFFICIAL_RX = [(_template_regex(o), o, ours) for o, ours in KEY_RULES]
_OURS_RX = [(_template_regex(ours), o, ours) for o, ours in KEY_RULES]


def official_to_ours(name: str) -> str | None:
    """Our parameter name for an official one; ``None`` for ignored/unknown keys."""
    if name.startswith(IGNORED_PREFIXES):
        return None
    for rx, _, ours in _OFFICIAL_RX:
        m = rx.match(name)
        if m:
            g = m.groupdict()
            return ours.format(l=int(g.get("L", 1)) - 1, rest=g.get("rest", ""))
    return None


def ours_to_official(name: str) -> str:
    for rx, official, _ in _OURS_RX:
        m = rx.match(name)
        if m:
            g = m.groupdict()
            return official.format(L=int(g.get("l", 0)) + 1, rest=g.get("rest", ""))
    raise KeyError(f"no official name for '{name}'")


def official_key_map(arch: str | LSegArch = "lseg_vitl16_384") -> dict[str, str]:
    """The explicit map official name -> our name for every tensor of ``arch``'s state dict
    (built on the meta device, no allocation)."""
    net = build_model(arch, device="meta")
    return {ours_to_official(k): k for k in net.state_dict()}


def official_state_dict_shapes(arch: str | LSegArch = "lseg_vitl16_384") -> dict[str, tuple]:
    """Our module's state dict under official names (without the ignored keys): name -> shape."""
    net = build_model(arch, device="meta")
    return {ours_to_official(k): tuple(v.shape) for k, v in net.state_dict().items()}


# --------------------------------------------------------------------------- checkpoints
class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the architecture."""


def _strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in CHECKPOINT_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw state dict of a Lightning (``state_dict``) or plain checkpoint, loaded with
    ``weights_only=True`` (no code from the file is executed)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"LSeg checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with non-tensor objects
        raise CheckpointError(
            f"{p}: cannot be loaded with torch.load(weights_only=True) ({exc}). Re-save its "
            "state_dict from a trusted environment: torch.save({'state_dict': "
            "torch.load(path, weights_only=False)['state_dict']}, 'lseg_state.ckpt')") from exc
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("state_dict"), Mapping):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{p}: not a state dict or Lightning checkpoint")
    return {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}


def split_official_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Split an official (or our) state dict: ``lseg`` (our names), ``clip`` (the checkpoint's
    CLIP model, OpenAI names, e.g. for a text-tower export), ``ignored``, ``unknown``."""
    sd = _strip_prefixes(sd)
    out: dict[str, dict[str, Any]] = {"lseg": {}, "clip": {}, "ignored": {}, "unknown": {}}
    ours_format = any(k.startswith(("backbone.", "fusion.", "reassemble.")) for k in sd)
    for k, v in sd.items():
        if k.startswith("clip_pretrained."):
            out["clip"][k[len("clip_pretrained."):]] = v
        elif ours_format and k.startswith(("backbone.", "reassemble.", "fusion.", "head.",
                                           "head_block.")):
            out["lseg"][k] = v
        elif k.startswith(IGNORED_PREFIXES):
            out["ignored"][k] = v
        elif (ours := official_to_ours(k)) is not None:
            out["lseg"][ours] = v
        else:
            out["unknown"][k] = v
    return out


def load_checkpoint(net: LSegNet, checkpoint: str | Path | Mapping[str, torch.Tensor]) -> dict:
    """Load an official lang-seg checkpoint (``demo_e200.ckpt``-style Lightning file: keys
    ``state_dict`` -> ``net.*``) or our own state dict into ``net`` (strict for the image side).
    Returns a report: counts of loaded / ignored / clip keys."""
    sd = read_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else dict(checkpoint)
    parts = split_official_state_dict(sd)
    if not net.arch.arch_option and "head_block.conv.weight" in parts["lseg"]:
        raise CheckpointError(
            "checkpoint has a head block (scratch.head_block.*) but the architecture has none:"
            " pass arch_option (1 bottleneck, 2 depthwise), block_depth and activation as "
            "trained, e.g. get_arch('lseg_vitl16_384', arch_option=1, block_depth=2)")
    if parts["unknown"]:
        raise CheckpointError(
            f"checkpoint has {len(parts['unknown'])} keys that are not LSeg's, e.g. "
            f"{sorted(parts['unknown'])[:5]}")
    own = net.state_dict()
    missing = sorted(set(own) - set(parts["lseg"]))
    unexpected = sorted(set(parts["lseg"]) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit {net.arch.name}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
            f" ({len(unexpected)})")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in parts["lseg"].items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"shape mismatch for {len(bad)} tensors, e.g. {bad[:3]} "
                              f"(checkpoint, {net.arch.name})")
    net.load_state_dict(parts["lseg"], strict=True)
    return {"loaded": len(parts["lseg"]), "clip": len(parts["clip"]),
            "ignored": len(parts["ignored"])}


CLIP_ARCH_OF_CHECKPOINT = "ViT-B-32-quickgelu"   # lang-seg: clip.load("ViT-B/32") (OpenAI)


def extract_clip_checkpoint(checkpoint: str | Path, out_path: str | Path) -> Path | None:
    """Write the CLIP model stored in an official LSeg checkpoint (``net.clip_pretrained.*``,
    OpenAI key names, the CLIP ViT-B/32 whose text tower LSeg was trained against) as a plain
    float32 state dict for :mod:`perception2d_ros.models.clip.checkpoint` (arch
    :data:`CLIP_ARCH_OF_CHECKPOINT`). Returns ``None`` when the checkpoint holds no CLIP."""
    clip = split_official_state_dict(read_checkpoint(checkpoint))["clip"]
    if not clip:
        return None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in clip.items()}, tmp)
    tmp.replace(out)
    return out


def to_official_state_dict(net: LSegNet, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """Our weights under the official names (the inverse key map), e.g. to write a
    Lightning-style checkpoint."""
    return {prefix + ours_to_official(k): v for k, v in net.state_dict().items()}


# --------------------------------------------------------------------------- export
def _input_hw(arch: LSegArch, input_size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    m = arch.stride_multiple
    if h % m or w % m:
        raise ValueError(f"input_size {h}x{w} must be a multiple of {m} for {arch.name}")
    return int(h), int(w)


def onnx_file_name(arch: str | LSegArch, input_size: int | Sequence[int] = 480) -> str:
    a = get_arch(arch)
    h, w = _input_hw(a, input_size)
    return f"{a.name}_{h}x{w}.onnx"


def head_block_spec(net: LSegNet) -> dict[str, Any] | None:
    a = net.arch
    if not a.arch_option:
        return None
    conv = net.head_block.conv
    return {"kind": net.head_block.kind, "activation": a.activation,
            "block_depth": a.block_depth,
            "weight": conv.weight.detach().reshape(3, 3).cpu().double().tolist(),
            "bias": float(conv.bias.detach().cpu()[0])}


def export_onnx(arch: str | LSegArch, checkpoint: str | Path | None, out_dir: str | Path, *,
                seed: int | None = None, input_size: int | Sequence[int] = 480,
                name: str | None = None, opset: int = 17) -> dict[str, Path]:
    """Export the image side (``image`` -> ``pixel_embeds``) to ONNX plus a sidecar JSON.

    ``checkpoint``: official lang-seg checkpoint or our state dict; ``None`` needs ``seed``
    (random weights, for tests). Returns ``{"image": onnx path, "sidecar": json path}``
    (the sidecar is always ``onnx.with_suffix(".json")``)."""
    a = get_arch(arch)
    if checkpoint is None and seed is None:
        raise CheckpointError(
            f"no weights for {a.name}: pass the lang-seg checkpoint (demo_e200.ckpt, see "
            "github.com/isl-org/lang-seg 'Download demo model') or a seed for random weights")
    h, w = _input_hw(a, input_size)
    net = build_model(a, seed=seed if seed is not None else 0)
    report: dict[str, Any] = {}
    if checkpoint is not None:
        report = load_checkpoint(net, checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / (name or onnx_file_name(a, (h, w)))
    if onnx_path.suffix != ".onnx":
        onnx_path = onnx_path.with_suffix(".onnx")
    dummy = torch.zeros(1, 3, h, w)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are fixed on purpose
        warnings.simplefilter("ignore", DeprecationWarning)       # dynamo=False is the convention
        torch.onnx.export(PixelEmbedder(net).eval(), (dummy,), str(onnx_path),
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    sidecar = onnx_path.with_suffix(".json")
    meta = {
        "format": SIDECAR_FORMAT,
        "arch": a.to_dict(),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": [h, w],
        "color": "rgb",
        "mean": list(NORM_MEAN),
        "std": list(NORM_STD),
        "pad_value": 0,
        "embed_stride": EMBED_STRIDE,
        "embed_dim": a.out_dim,
        "embeds_normalized": True,
        "logit_scale": LOGIT_SCALE,
        "head_block": head_block_spec(net),
        "text_model": a.text_model,
        "text_templates": ["{}"],   # lang-seg tokenizes the bare label words
        "checkpoint": None if checkpoint is None or isinstance(checkpoint, Mapping)
        else {"file": Path(checkpoint).name, "sha256": sha256_file(Path(checkpoint))},
        "checkpoint_report": report,
        "seed": seed if checkpoint is None else None,
        "opset": opset,
        "torch": torch.__version__,
        "onnx_sha256": sha256_file(onnx_path),
    }
    sidecar.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return {"image": onnx_path, "sidecar": sidecar}


# --------------------------------------------------------------------------- parity
PARITY_TOLERANCES = {"max_abs": 2e-3, "min_cos": 0.999, "label_agreement": 0.995}


def _onnx_from_outputs(outputs: str | Path | Mapping[str, Any]) -> Path:
    if isinstance(outputs, Mapping):
        if "image" not in outputs:
            raise KeyError(f"export outputs {sorted(outputs)} have no 'image' ONNX")
        return Path(outputs["image"])
    return Path(outputs)


def prototype_embeddings(embeds: np.ndarray, num: int = 8) -> np.ndarray:
    """``num`` pixel embeddings of a (D, h, w) map taken on a regular interior grid: stand-in
    "text" embeddings that give a real, image-dependent nearest-prototype labelling."""
    _, hh, ww = embeds.shape
    k = int(math.ceil(math.sqrt(num)))
    ys = np.linspace(0, hh - 1, k + 2)[1:-1].astype(int)
    xs = np.linspace(0, ww - 1, k + 2)[1:-1].astype(int)
    return np.stack([embeds[:, y, x] for y in ys for x in xs])[:num].astype(np.float32)


def parity_check(arch: str | LSegArch, checkpoint: str | Path | None,
                 outputs: str | Path | Mapping[str, Any],
                 images_bgr: np.ndarray | Sequence[np.ndarray], *, seed: int | None = None,
                 text_embeds: np.ndarray | None = None, num_prototypes: int = 8,
                 threads: int | None = None,
                 tolerances: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Torch module vs the exported ONNX (ONNX Runtime CPU) on real images.

    ``outputs``: :func:`export_onnx`'s dict (or the ONNX path); ``images_bgr``: one BGR image
    or a list. Both sides get the same preprocessed tensor. Per image: max/mean abs difference
    of the pixel embeddings, min/mean per-pixel cosine, and agreement of the stride-2 label
    maps for ``text_embeds`` (default: :func:`prototype_embeddings` of the torch output).
    ``passed`` checks :data:`PARITY_TOLERANCES`."""
    from perception2d_ros.engines.factory import EngineConfig, create_engine
    from perception2d_ros.models.lseg.labeler import LSegMeta, preprocess

    tol = dict(PARITY_TOLERANCES, **(tolerances or {}))
    images = [images_bgr] if isinstance(images_bgr, np.ndarray) else list(images_bgr)
    onnx_path = _onnx_from_outputs(outputs)
    a = get_arch(arch)
    net = build_model(a, seed=seed if seed is not None else 0)
    if checkpoint is not None:
        load_checkpoint(net, checkpoint)
    meta = LSegMeta.from_sidecar(onnx_path.with_suffix(".json"))
    engine = create_engine(onnx_path, EngineConfig(backend="onnxruntime", device="cpu",
                                                   threads=threads))
    rows = []
    try:
        for img in images:
            tensor, _ = preprocess(img, meta)
            with torch.no_grad():
                ref = net.pixel_embeddings(torch.from_numpy(tensor))[0].numpy()
            got = np.asarray(engine.infer({meta.input_name: tensor})[meta.output_name][0])
            d = ref.shape[0]
            protos = (prototype_embeddings(ref, num_prototypes) if text_embeds is None
                      else np.asarray(text_embeds, np.float32))
            protos = protos / np.linalg.norm(protos, axis=1, keepdims=True)
            lab_ref = np.argmax(protos @ ref.reshape(d, -1), axis=0)
            lab_got = np.argmax(protos @ got.reshape(d, -1), axis=0)
            cos = np.sum(ref * got, axis=0) / (np.linalg.norm(ref, axis=0)
                                               * np.linalg.norm(got, axis=0) + 1e-12)
            diff = np.abs(ref - got)
            rows.append({"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                         "min_cos": float(cos.min()), "mean_cos": float(cos.mean()),
                         "label_agreement": float(np.mean(lab_ref == lab_got)),
                         "num_labels": int(len(np.unique(lab_ref)))})
    finally:
        engine.close()
    summary: dict[str, Any] = {
        "images": len(rows),
        "max_abs": max(r["max_abs"] for r in rows),
        "min_cos": min(r["min_cos"] for r in rows),
        "min_label_agreement": min(r["label_agreement"] for r in rows),
        "tolerances": tol,
        "per_image": rows,
    }
    summary["passed"] = bool(summary["max_abs"] <= tol["max_abs"]
                             and summary["min_cos"] >= tol["min_cos"]
                             and summary["min_label_agreement"] >= tol["label_agreement"])
    return summary
