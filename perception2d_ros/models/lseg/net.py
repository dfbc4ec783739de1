"""LSeg image side in torch: the architecture (:class:`LSegArch`) and the network modules.

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
extracted with :func:`~perception2d_ros.models.lseg.checkpoint.split_official_state_dict`).

Checkpoint loading: :mod:`perception2d_ros.models.lseg.checkpoint`; ONNX export and parity:
:mod:`perception2d_ros.models.lseg.export`. Torch is needed only for export and parity tests.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# lang-seg: self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07)).exp() -- the
# .exp() turns it into a plain float32 tensor, so it is a constant (not trained, not saved).
LOGIT_SCALE = float(torch.exp(torch.ones([]) * float(np.log(1 / 0.07))))


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
