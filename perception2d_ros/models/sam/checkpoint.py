"""SAM checkpoints on the torch side: the reference packages (``segment_anything`` for
ViT-B/L/H, ``mobile_sam`` for vit_t), building the official architecture, weights-only
loading, arch inference from a state dict, seeded random weights for tests and benchmarks."""
from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any, Mapping

from perception2d_ros.models.sam.spec import ARCH_ALIASES, ARCHS

# the package that defines each arch (import name, distribution name for the sidecar)
_REFERENCE = {"vit_b": ("segment_anything", "segment-anything"),
              "vit_l": ("segment_anything", "segment-anything"),
              "vit_h": ("segment_anything", "segment-anything"),
              "vit_t": ("mobile_sam", "mobilesam-mirror")}

# ImageEncoderViT embed dim → arch (official checkpoints are plain state dicts)
_EMBED_DIM_TO_ARCH = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
# MobileSAM's TinyViT: first conv of the patch embedding (embed_dims[0] // 2 = 32 channels)
_TINYVIT_STEM = "image_encoder.patch_embed.seq.0.c.weight"
_TINYVIT_STEM_CHANNELS = 32


def canonical_arch(arch: str) -> str:
    """``arch`` by its canonical name (``mobile_sam`` → ``vit_t``); unknown ones raise."""
    name = ARCH_ALIASES.get(arch, arch)
    if name not in ARCHS:
        known = ", ".join([*ARCHS, *ARCH_ALIASES])
        raise ValueError(f"unknown SAM arch '{arch}'; known: {known}")
    return name


def reference_package(arch: str) -> Any:
    """The official package that defines ``arch``: ``segment_anything``, or ``mobile_sam``
    for vit_t (its ``sam_model_registry``, ``SamPredictor`` and ``utils.onnx``)."""
    name = _REFERENCE[canonical_arch(arch)][0]
    with warnings.catch_warnings():
        # mobile_sam imports timm's deprecated module paths and re-registers timm's tiny_vit
        # models under the same names: import-time notices about its own code, not ours
        warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Overwriting tiny_vit_", category=UserWarning)
        module = importlib.import_module(name)
        importlib.import_module(f"{name}.utils.onnx")
    return module


def reference_version(arch: str) -> dict[str, str]:
    """Distribution name and version of the reference package (for the sidecar)."""
    from importlib.metadata import PackageNotFoundError, version

    dist = _REFERENCE[canonical_arch(arch)][1]
    try:
        return {"package": dist, "version": version(dist)}
    except PackageNotFoundError:  # imported from a source tree
        return {"package": dist, "version": "unknown"}


def build_sam(arch: str) -> Any:
    """The official architecture (``sam_model_registry[arch]`` of its reference package),
    no weights, eval mode."""
    arch = canonical_arch(arch)
    return reference_package(arch).sam_model_registry[arch](checkpoint=None).eval()


def _with_weights(model: Any, state_dict: Mapping[str, Any]) -> Any:
    """Strict load, then eval mode. The order matters for TinyViT: its attention caches the
    bias table (``ab``) when switched to eval, so weights loaded after ``eval()`` need another
    ``eval()`` to reach the forward pass."""
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def load_state_dict(checkpoint: str | Path) -> dict[str, Any]:
    """An official SAM checkpoint (a plain state dict ``.pth``) loaded weights-only on CPU.
    Also accepts the ``{"model": state_dict}`` / ``{"state_dict": ...}`` wrappers."""
    import torch

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling error: not a weights-only state dict
        raise ValueError(f"{path} is not a weights-only torch state dict: {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def infer_arch(state_dict: Mapping[str, Any]) -> str:
    """vit_b / vit_l / vit_h from the ViT encoder's embedding width; vit_t from MobileSAM's
    TinyViT layout (``image_encoder.patch_embed.seq.*``, ``image_encoder.layers.*``)."""
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    if w is None:
        stem = state_dict.get(_TINYVIT_STEM)
        if stem is not None:
            if int(stem.shape[0]) != _TINYVIT_STEM_CHANNELS:
                raise ValueError(f"TinyViT encoder of width {int(stem.shape[0])} is not "
                                 f"MobileSAM's vit_t ({_TINYVIT_STEM_CHANNELS})")
            return "vit_t"
        raise ValueError("not a SAM checkpoint: neither image_encoder.patch_embed.proj.weight "
                         f"(ViT) nor {_TINYVIT_STEM} (MobileSAM TinyViT)")
    arch = _EMBED_DIM_TO_ARCH.get(int(w.shape[0]))
    if arch is None:
        raise ValueError(f"unknown SAM encoder width {int(w.shape[0])}")
    return arch


def load_sam(checkpoint: str | Path, arch: str | None = None) -> Any:
    """Official SAM with the checkpoint's weights (weights-only load, strict key match).
    ``arch`` defaults to the one the checkpoint implies; a mismatch raises."""
    sd = load_state_dict(checkpoint)
    found = infer_arch(sd)
    if arch is not None and canonical_arch(arch) != found:
        raise ValueError(f"checkpoint {checkpoint} is {found}, not {arch}")
    return _with_weights(build_sam(found), sd)


def random_state_dict(arch: str, seed: int, scale: float = 0.5,
                      logit_gain: float = 20.0) -> dict[str, Any]:
    """Official-format state dict of a seeded random SAM (for tests and benchmarks where no
    weights exist). segment-anything's init leaves many tensors degenerate (zero positional
    embeddings and relative positions, LayerNorms at 1/0, ...); every floating tensor gets
    seeded normal noise of ``scale`` x its own std (at least 0.02) so masks are non-trivial,
    and the hypernetwork output layers are scaled by ``logit_gain`` so mask logits reach the
    magnitude of trained SAM (|logit| ~ 10; stability scores are then informative).
    MobileSAM's BatchNorm statistics stay valid: ``running_var`` gets log-normal noise
    (positive), ``num_batches_tracked`` (integer) is kept."""
    import torch

    torch.manual_seed(seed)
    model = build_sam(arch)
    gen = torch.Generator().manual_seed(seed + 1)
    sd = model.state_dict()
    out = {}
    for name, t in sd.items():
        if t.is_floating_point():
            std = float(t.float().std()) if t.numel() > 1 else 0.0
            sigma = max(scale * std, 0.02)
            noise = sigma * torch.randn(t.shape, generator=gen, dtype=t.dtype)
            t = t * torch.exp(noise) if name.endswith(".running_var") else t + noise
            if name.startswith("mask_decoder.output_hypernetworks_mlps.") and \
                    ".layers.2." in name:
                t = t * logit_gain
        out[name] = t.clone()
    return out


def random_sam(arch: str, seed: int) -> Any:
    """The official architecture with :func:`random_state_dict` weights, eval mode."""
    return _with_weights(build_sam(arch), random_state_dict(arch, seed))


def save_checkpoint(state_dict: Mapping[str, Any], path: str | Path) -> Path:
    """Save a state dict the way the official ``sam_vit_*.pth`` files are stored."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state_dict), path)
    return path

