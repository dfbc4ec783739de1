"""LSeg checkpoints: the official lang-seg key names <-> ours (:data:`KEY_RULES`), reading a
Lightning / plain checkpoint safely, splitting it into image side / CLIP / ignored keys,
loading it into an :class:`LSegNet`, and extracting the CLIP model stored inside."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from perception2d_ros.models.lseg.net import LSegArch, LSegNet, build_model

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
    float32 state dict for :mod:`perception2d_ros.models.clip.model` (arch
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
