"""CLIP checkpoints → open_clip models → ONNX image/text towers (+ JSON sidecar).

Torch and open_clip are needed here only to *export* (and for parity checks); the runtime
(:mod:`.labeler`, :mod:`.vocabulary`) runs the exported ONNX through
:func:`perception2d_ros.engines.engines.create_engine`.

Checkpoints (``load_clip``) — never executes pickled code:

* OpenAI release ``.pt`` (a TorchScript archive): read by :func:`read_state_dict` with a
  restricted unpickler that only rebuilds tensors and records module attributes
  (``__torch__.*`` classes become inert records; any other global is refused). Neither
  ``torch.jit.load`` nor ``torch.load(weights_only=False)`` is used. OpenAI weights use
  QuickGELU: selected automatically for TorchScript archives (or with an ``-quickgelu`` arch
  name / ``quick_gelu=True``).
* ``torch.save`` state dicts (``.pt``/``.pth``/``.bin``; OpenAI or open_clip key names,
  optional ``state_dict`` wrapper / ``module.`` prefix): ``torch.load(weights_only=True)``.
* ``.safetensors`` (``safetensors.torch.load_file``).

Export (``export_onnx``) writes into ``out_dir``:

* ``clip_<arch>_image.onnx``: ``image`` float32 [B,3,S,S] (normalised as in
  :mod:`.preprocess`) → ``image_embeds`` float32 [B,D], **L2-normalised inside the graph**.
* ``clip_<arch>_text.onnx``: ``input_ids`` int64 [B,L] (L ≤ 77; the canonical feed is the
  tokenizer's [B,77]) → ``text_embeds`` float32 [B,D], **L2-normalised inside the graph**.
  The sequence axis is dynamic: under CLIP's causal mask the eot feature does not depend on
  the padding after it, so feeding ids trimmed to the longest ``eot+1`` of a batch gives the
  same embedding (to float rounding) several times faster.
* ``clip_<arch>.json`` sidecar: arch, embed_dim, image_size, mean/std, interpolation,
  logit_scale (the multiplier ``exp(logit_scale)``), context_length, quick_gelu, source
  checkpoint path + sha256 (``random-seed-N`` for seeded random weights), each ONNX file's
  sha256, opset, torch/open_clip versions.

Both ONNX files use opset 17 via the TorchScript-based exporter (``dynamo=False``), named
inputs/outputs and a dynamic batch axis. The export is cached: when the sidecar in
``out_dir`` names the same source sha256 and the ONNX files still match their recorded
sha256, nothing is re-exported (and torch is not imported).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from perception2d_ros.engines.model_store import sha256_file

LOG = logging.getLogger("perception2d.clip")

OPSET = 17
SIDECAR_VERSION = 1
TESTED_ARCHS = ("ViT-B-32", "ViT-B-16")
_ALIASES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14",
            "ViT-L/14@336px": "ViT-L-14-336"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read safely or does not fit the architecture."""


# --------------------------------------------------------------------------- names / paths
def canonical_arch(arch: str) -> str:
    """open_clip model name for ``arch`` ("ViT-B/32" → "ViT-B-32")."""
    return _ALIASES.get(arch, arch)


def _file_arch(arch: str) -> str:
    return canonical_arch(arch).replace("/", "-")


def onnx_names(arch: str) -> dict[str, str]:
    a = _file_arch(arch)
    return {"image": f"clip_{a}_image.onnx", "text": f"clip_{a}_text.onnx",
            "meta": f"clip_{a}.json"}


def cache_root() -> Path:
    """Where ``--checkpoint`` exports are cached: ``$PERCEPTION2D_CACHE_DIR/clip``."""
    from perception2d_ros.engines.base import default_cache_dir

    return Path(default_cache_dir()) / "clip"


def export_dir_for(arch: str, checkpoint: str | Path, root: str | Path | None = None) -> Path:
    """Cache folder of the export of ``checkpoint`` (keyed by its sha256)."""
    digest = sha256_file(checkpoint)
    return Path(root or cache_root()) / f"{_file_arch(arch)}-{digest[:16]}"


# --------------------------------------------------------------------------- checkpoint reading
def read_state_dict(path: str | Path) -> dict[str, Any]:
    """State dict (name → torch.Tensor) of a CLIP checkpoint without executing pickled code."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    suffix = p.suffix.lower()
    if suffix in (".npz", ".npy"):
        raise CheckpointError(f"{p}: numpy (big_vision/SigLIP) checkpoints are not supported")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(p), device="cpu")
    elif zipfile.is_zipfile(p) and _is_torchscript(p):
        sd = _read_torchscript_tensors(p)
    else:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{p}: refused to load (it needs arbitrary pickled code, which is never "
                f"executed here): {str(exc).splitlines()[0]}") from exc
        except Exception as exc:  # torch raises RuntimeError / EOFError on bad files
            raise CheckpointError(f"{p}: not a readable torch checkpoint: {exc}") from exc
    return _unwrap_state_dict(sd, p)


def _unwrap_state_dict(obj: Any, p: Path) -> dict[str, Any]:
    import torch

    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{p}: no state dict found (got {type(obj).__name__})")
    out = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise CheckpointError(f"{p}: the checkpoint holds no tensors")
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def _is_torchscript(p: Path) -> bool:
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


_STORAGE_DTYPES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


class _ScriptRecord:
    """Inert stand-in for a TorchScript object (``__torch__.*``): keeps its attribute dict."""

    __slots__ = ("state",)

    def __init__(self, *args: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


def _read_torchscript_tensors(p: Path) -> dict[str, Any]:
    """All tensors of a TorchScript archive's ``data.pkl`` by attribute path, read with an
    unpickler that can only build tensors, lists, dicts and inert records."""
    import torch

    with zipfile.ZipFile(p) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointError(f"{p}: TorchScript archive without data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        storages: dict[str, Any] = {}

        def rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_: Any) -> Any:
            return torch.as_strided(storage, tuple(size), tuple(stride), int(offset)).clone()

        def identity(x: Any, *_: Any) -> Any:
            return x

        allowed = {
            ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
            ("collections", "OrderedDict"): OrderedDict,
            ("torch.jit._pickle", "build_intlist"): identity,
            ("torch.jit._pickle", "build_doublelist"): identity,
            ("torch.jit._pickle", "build_boollist"): identity,
            ("torch.jit._pickle", "build_tensorlist"): identity,
            ("torch.jit._pickle", "build_genericlist"): identity,
            ("torch.jit._pickle", "restore_type_tag"): identity,
        }

        class Restricted(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if (module, name) in allowed:
                    return allowed[(module, name)]
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _StorageType(_STORAGE_DTYPES[name])
                if module.startswith("__torch__"):
                    return type(name, (_ScriptRecord,), {"__slots__": ()})
                raise pickle.UnpicklingError(
                    f"refusing global '{module}.{name}' in TorchScript archive {p.name}")

            def persistent_load(self, pid: Any) -> Any:
                if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
                    raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
                stype, key = pid[1], str(pid[2])
                if not isinstance(stype, _StorageType) or not re.fullmatch(r"\w+", key):
                    raise pickle.UnpicklingError(f"bad storage reference {pid!r}")
                if key not in storages:
                    data = bytearray(z.read(f"{prefix}data/{key}"))
                    dtype = getattr(torch, stype.dtype)
                    storages[key] = (torch.frombuffer(data, dtype=dtype) if data
                                     else torch.empty(0, dtype=dtype))
                return storages[key]

        import io

        try:
            root = Restricted(io.BytesIO(z.read(pkl[0]))).load()
        except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as exc:
            raise CheckpointError(f"{p}: cannot read TorchScript archive safely: {exc}") from exc

    out: dict[str, Any] = {}

    def walk(obj: Any, prefix_: str, depth: int) -> None:
        if depth > 64:
            raise CheckpointError(f"{p}: module tree too deep")
        if isinstance(obj, torch.Tensor):
            out[prefix_.rstrip(".")] = obj
        elif isinstance(obj, _ScriptRecord):
            walk(obj.state, prefix_, depth + 1)
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                if isinstance(k, str):
                    walk(v, f"{prefix_}{k}.", depth + 1)

    walk(root, "", 0)
    return out


# --------------------------------------------------------------------------- model building
def _quick_gelu_default(arch: str, checkpoint: Path | None) -> bool:
    if canonical_arch(arch).endswith("-quickgelu"):
        return True
    if checkpoint is None:
        return False
    if zipfile.is_zipfile(checkpoint) and _is_torchscript(checkpoint):
        return True  # OpenAI's release archives; their weights were trained with QuickGELU
    cfg = checkpoint.parent / "open_clip_config.json"  # HF-hub layout
    if cfg.is_file():
        try:
            model_cfg = json.loads(cfg.read_text()).get("model_cfg", {})
            return bool(model_cfg.get("quick_gelu", False))
        except (OSError, ValueError):
            return False
    return False


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    import torch

    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _check_arch(arch: str) -> str:
    import open_clip

    name = canonical_arch(arch)
    if name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture '{arch}'; tested: {', '.join(TESTED_ARCHS)}")
    cfg = open_clip.get_model_config(name) or {}
    text = cfg.get("text_cfg", {})
    if text.get("hf_tokenizer_name") or text.get("hf_model_name") or \
            text.get("vocab_size", 49408) != 49408 or text.get("context_length", 77) != 77 or \
            cfg.get("custom_text") or "timm_model_name" in cfg.get("vision_cfg", {}):
        raise ValueError(f"'{name}' is not an OpenAI-style CLIP (CLIP BPE text tower, 77 "
                         f"tokens); tested: {', '.join(TESTED_ARCHS)}")
    if name.replace("-quickgelu", "") not in TESTED_ARCHS:
        LOG.warning("CLIP architecture %s is not covered by the parity tests (tested: %s)",
                    name, ", ".join(TESTED_ARCHS))
    return name


def load_clip(arch: str, checkpoint: str | Path | None = None, seed: int | None = None, *,
              quick_gelu: bool | None = None) -> Any:
    """open_clip ``CLIP`` model (eval, fp32, CPU) with the weights of ``checkpoint``.

    ``checkpoint=None`` gives seeded random weights (tests / smoke checks only; ``seed``
    required). ``quick_gelu=None`` picks the activation from the checkpoint (see module doc).
    """
    import open_clip
    import torch

    name = _check_arch(arch)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is None and seed is None:
        raise ValueError("load_clip: give a checkpoint, or a seed for random weights")
    if quick_gelu is None:
        quick_gelu = _quick_gelu_default(name, ckpt)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "no pretrained weights" on every build
    try:
        with _seeded(seed):
            model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    finally:
        root.setLevel(level)
    if ckpt is not None:
        sd = read_state_dict(ckpt)
        _load_weights(model, sd, ckpt)
    model = model.float().eval()
    model.requires_grad_(False)
    model._p2d_quick_gelu = bool(quick_gelu)  # type: ignore[attr-defined]
    return model


def _load_weights(model: Any, sd: dict[str, Any], ckpt: Path) -> None:
    import torch
    from open_clip.model import resize_pos_embed

    target = model.state_dict()
    sd = {k: v for k, v in sd.items()
          if k not in ("input_resolution", "context_length", "vocab_size")}
    if "positional_embedding" in sd and "text.positional_embedding" in target:
        from open_clip.model import convert_to_custom_text_state_dict

        sd = convert_to_custom_text_state_dict(sd)
    if "logit_scale" in sd and sd["logit_scale"].ndim != target["logit_scale"].ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(target["logit_scale"].shape)
    resize_pos_embed(sd, model)
    missing = [k for k in target if k not in sd]
    extra = [k for k in sd if k not in target]
    if missing:
        raise CheckpointError(
            f"{ckpt}: does not fit {type(model).__name__} of this architecture — "
            f"{len(missing)} weights missing (e.g. {missing[:3]}); wrong --arch?")
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in target.items()
           if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{ckpt}: shape mismatch for {len(bad)} weights, e.g. "
                              f"{bad[0][0]} {bad[0][1]} vs model {bad[0][2]}; wrong --arch?")
    if extra:
        LOG.debug("ignoring %d non-weight tensors of %s: %s", len(extra), ckpt, extra[:5])
    with torch.no_grad():
        model.load_state_dict({k: sd[k].float() if sd[k].is_floating_point() else sd[k]
                               for k in target}, strict=True)


def model_info(model: Any) -> dict[str, Any]:
    """Preprocessing + head facts of an open_clip model (goes into the sidecar)."""
    import torch

    from perception2d_ros.models.clip.preprocess import OPENAI_MEAN, OPENAI_STD

    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    with torch.no_grad():
        scale = float(model.logit_scale.exp().item())
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    return {
        "image_size": size,
        "mean": [float(m) for m in pp.get("mean", OPENAI_MEAN)],
        "std": [float(s) for s in pp.get("std", OPENAI_STD)],
        "interpolation": pp.get("interpolation", "bicubic"),
        "resize_mode": pp.get("resize_mode", "shortest"),
        "logit_scale": scale,
        "embed_dim": int(model.text_projection.shape[1]
                         if not hasattr(model.text_projection, "out_features")
                         else model.text_projection.out_features),
        "context_length": int(model.context_length),
        "vocab_size": int(model.vocab_size),
        "quick_gelu": bool(getattr(model, "_p2d_quick_gelu", False)),
    }


# --------------------------------------------------------------------------- export
def _towers(model: Any) -> tuple[Any, Any]:
    import torch

    def _l2(x: torch.Tensor) -> torch.Tensor:
        # = F.normalize(x, dim=-1); written out so the exporter keeps the output dim static
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    class ImageTower(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.visual = m.visual

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return _l2(self.visual(image))

    class TextTower(torch.nn.Module):
        """open_clip ``CLIP.encode_text`` (argmax pooling) with the sequence axis dynamic."""

        def __init__(self, m: Any) -> None:
            super().__init__()
            self.token_embedding = m.token_embedding
            self.positional_embedding = m.positional_embedding
            self.transformer = _with_export_attention(m.transformer)
            self.ln_final = m.ln_final
            self.text_projection = m.text_projection
            self.register_buffer("attn_mask", m.attn_mask.clone(), persistent=False)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            n = input_ids.shape[1]
            x = self.token_embedding(input_ids) + self.positional_embedding[:n]
            x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
            x = self.ln_final(x)
            # eot has the highest id: argmax on a float copy (exact for ids < 2**24) keeps the
            # graph's ArgMax off int64, which TensorRT does not take
            x = x[torch.arange(x.shape[0]), input_ids.to(torch.float32).argmax(dim=-1)]
            if isinstance(self.text_projection, torch.nn.Linear):
                x = self.text_projection(x)
            else:
                x = x @ self.text_projection
            return _l2(x)

    if getattr(model, "text_pool_type", "argmax") != "argmax" or not hasattr(model, "attn_mask") \
            or getattr(model.transformer, "batch_first", True) is not True:
        raise ValueError("only OpenAI-style CLIP text towers (argmax pooling, causal mask, "
                         "batch_first) can be exported")
    return ImageTower(model).eval(), TextTower(model).eval()


def _with_export_attention(transformer: Any) -> Any:
    """A copy of ``transformer`` whose ``nn.MultiheadAttention`` blocks are replaced by
    :class:`_SelfAttention` (same weights, same math). The traced ``nn.MultiheadAttention``
    bakes the example's sequence length into its reshapes; this one has only batch- and
    length-free reshapes, so the exported text tower takes any L ≤ 77."""
    import copy

    import torch

    t = copy.deepcopy(transformer)
    for block in t.resblocks:
        attn = block.attn
        if not isinstance(attn, torch.nn.MultiheadAttention) or not attn.batch_first or \
                not attn._qkv_same_embed_dim or attn.bias_k is not None:
            raise ValueError("unsupported text attention block for export")
        block.attn = _SelfAttention(attn)
    return t


def _SelfAttention(mha: Any) -> Any:  # noqa: N802 - a class factory (torch imported lazily)
    import torch
    import torch.nn.functional as F

    class SelfAttention(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.num_heads = int(m.num_heads)
            self.head_dim = int(m.embed_dim // m.num_heads)
            self.in_proj_weight = m.in_proj_weight
            self.in_proj_bias = m.in_proj_bias
            self.out_proj = m.out_proj

        def forward(self, q: Any, k: Any = None, v: Any = None, need_weights: bool = False,
                    attn_mask: Any = None) -> tuple[Any, None]:
            qkv = F.linear(q, self.in_proj_weight, self.in_proj_bias)       # B,L,3D
            qkv = qkv.unflatten(-1, (3, self.num_heads, self.head_dim))      # B,L,3,H,hd
            qkv = qkv.permute(2, 0, 3, 1, 4)                                 # 3,B,H,L,hd
            qh, kh, vh = qkv[0], qkv[1], qkv[2]
            scores = (qh * (self.head_dim ** -0.5)) @ kh.transpose(-2, -1)   # B,H,L,L
            if attn_mask is not None:
                scores = scores + attn_mask
            out = torch.softmax(scores, dim=-1) @ vh                         # B,H,L,hd
            out = out.transpose(1, 2).flatten(2)                             # B,L,D
            return self.out_proj(out), None

    return SelfAttention(mha)


def _source_id(checkpoint: Path | None, seed: int | None) -> str:
    return sha256_file(checkpoint) if checkpoint is not None else f"random-seed-{seed}"


def read_sidecar(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    meta = json.loads(p.read_text(encoding="utf-8"))
    for key in ("arch", "image_onnx", "text_onnx", "logit_scale", "image_size"):
        if key not in meta:
            raise ValueError(f"{p}: not a CLIP export sidecar (missing '{key}')")
    return meta


def _cached_export(out_dir: Path, arch: str, source: str,
                   verify: bool = True) -> dict[str, Path] | None:
    names = onnx_names(arch)
    meta_p = out_dir / names["meta"]
    if not meta_p.is_file():
        return None
    try:
        meta = read_sidecar(meta_p)
    except (ValueError, OSError):
        return None
    paths = {"image": out_dir / meta["image_onnx"]["file"],
             "text": out_dir / meta["text_onnx"]["file"], "meta": meta_p}
    if meta.get("source_sha256") != source or canonical_arch(meta["arch"]) != canonical_arch(arch):
        return None
    for key in ("image", "text"):
        if not paths[key].is_file():
            return None
        if verify and sha256_file(paths[key]) != meta[f"{key}_onnx"]["sha256"]:
            LOG.warning("%s does not match its recorded sha256; re-exporting", paths[key])
            return None
    return paths


def export_onnx(arch: str, checkpoint: str | Path | None, out_dir: str | Path, *,
                seed: int | None = None, quick_gelu: bool | None = None,
                force: bool = False) -> dict[str, Path]:
    """Export the image and text towers of ``arch`` with ``checkpoint``'s weights.

    Returns ``{"image": Path, "text": Path, "meta": Path}``. Cached: an existing export in
    ``out_dir`` of the same source (checkpoint sha256, or ``random-seed-N``) is returned as is
    unless ``force``. ``checkpoint=None`` exports seeded random weights (``seed`` required).
    """
    out = Path(out_dir)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is None and seed is None:
        raise ValueError("export_onnx: give a checkpoint, or a seed for random weights")
    source = _source_id(ckpt, seed)
    if not force:
        cached = _cached_export(out, arch, source)
        if cached is not None:
            LOG.info("CLIP export cache hit: %s", out)
            return cached
    import open_clip
    import torch

    t0 = time.monotonic()
    model = load_clip(arch, ckpt, seed, quick_gelu=quick_gelu)
    info = model_info(model)
    image_tower, text_tower = _towers(model)
    names = onnx_names(arch)
    out.mkdir(parents=True, exist_ok=True)
    size = info["image_size"]
    tmp_tag = f".tmp{os.getpid()}"
    tmp = {k: out / (names[k] + tmp_tag) for k in names}
    fast_path = torch.backends.mha.get_fastpath_enabled()
    try:
        # nn.MultiheadAttention's fused inference kernel has no ONNX export
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), _quiet_export():
            torch.onnx.export(
                image_tower, (torch.zeros(2, 3, size, size),), str(tmp["image"]),
                dynamo=False, opset_version=OPSET, input_names=["image"],
                output_names=["image_embeds"],
                dynamic_axes={"image": {0: "batch"}, "image_embeds": {0: "batch"}})
            ids = torch.zeros(2, info["context_length"], dtype=torch.long)
            ids[:, 0], ids[:, 5] = 49406, 49407
            torch.onnx.export(
                text_tower, (ids,), str(tmp["text"]), dynamo=False, opset_version=OPSET,
                input_names=["input_ids"], output_names=["text_embeds"],
                dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                              "text_embeds": {0: "batch"}})
        for key in ("image", "text"):
            _check_opset(tmp[key])
        meta = {
            "format": "perception2d-clip-onnx",
            "version": SIDECAR_VERSION,
            "arch": canonical_arch(arch),
            **info,
            "normalized_embeddings": True,
            "image_input": "image", "image_output": "image_embeds",
            "text_input": "input_ids", "text_output": "text_embeds",
            "source_checkpoint": str(ckpt) if ckpt else None,
            "source_sha256": source,
            "tokenizer_vocab": "clip_bpe_vocab",
            "opset": OPSET,
            "torch_version": torch.__version__,
            "open_clip_version": getattr(open_clip, "__version__", "?"),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for key in ("image", "text"):
            final = out / names[key]
            tmp[key].replace(final)
            meta[f"{key}_onnx"] = {"file": final.name, "sha256": sha256_file(final)}
        tmp["meta"].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        tmp["meta"].replace(out / names["meta"])
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for p in tmp.values():
            p.unlink(missing_ok=True)
    LOG.info("exported CLIP %s (%s) to %s in %.1f s", arch, source[:16], out,
             time.monotonic() - t0)
    return {"image": out / names["image"], "text": out / names["text"],
            "meta": out / names["meta"]}


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            from torch.jit import TracerWarning
            warnings.filterwarnings("ignore", category=TracerWarning)
        except ImportError:  # pragma: no cover
            pass
        yield


def _check_opset(path: Path) -> None:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    versions = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    if versions.get("ai.onnx") != OPSET:
        raise RuntimeError(f"{path}: exported with opset {versions}, expected {OPSET}")


def ensure_exported(arch: str, checkpoint: str | Path, *,
                    cache_dir: str | Path | None = None,
                    quick_gelu: bool | None = None) -> dict[str, Path]:
    """Export ``checkpoint`` once into the cache (keyed by its sha256) and return the paths."""
    return export_onnx(arch, checkpoint, export_dir_for(arch, checkpoint, cache_dir),
                       quick_gelu=quick_gelu)


def find_exported(directory: str | Path, arch: str | None = None) -> Path | None:
    """Sidecar of an export in ``directory`` (of ``arch`` if given; else the only one)."""
    d = Path(directory)
    if arch is not None:
        p = d / onnx_names(arch)["meta"]
        return p if p.is_file() else None
    found = sorted(p for p in d.glob("clip_*.json") if p.is_file())
    return found[0] if len(found) == 1 else None


# --------------------------------------------------------------------------- resolution
class ClipModelUnavailable(RuntimeError):
    """No exported CLIP model and no checkpoint to export one from."""


DEFAULT_MODEL = "clip_vit_b32"
_NAME_ARCH = {"clip_vit_b32": "ViT-B-32", "clip_vit_b16": "ViT-B-16"}


def arch_for_model(name: str | None, default: str = "ViT-B-32") -> str:
    """Architecture of a manifest CLIP model (its ``export.arch``), else ``default``."""
    if name:
        try:
            from perception2d_ros.engines.model_store import load_manifest

            entry = load_manifest().get(name)
        except Exception:  # noqa: BLE001 - manifest problems surface in resolve_export
            entry = None
        recipe = entry.extra.get("export") if entry is not None else None
        if isinstance(recipe, dict) and recipe.get("arch"):
            return canonical_arch(str(recipe["arch"]))
        if name in _NAME_ARCH:
            return _NAME_ARCH[name]
    return canonical_arch(default)


def resolve_export(model: str | Path | None = DEFAULT_MODEL, *,
                   checkpoint: str | Path | None = None, arch: str | None = None,
                   models_dir: str | Path | None = None,
                   cache_dir: str | Path | None = None) -> Path:
    """The sidecar JSON of a usable CLIP export; exports (once, cached) when needed.

    * ``checkpoint``: the user's own file → exported on first use into
      ``$PERCEPTION2D_CACHE_DIR/clip/<arch>-<sha16>/`` and reused afterwards.
    * ``model`` a sidecar ``.json`` or a folder holding one → that export.
    * ``model`` a manifest name (``clip_vit_b32``): the export in the models directory
      (``perception2d models export``), else the fetched checkpoint exported on first use.
    Raises :class:`ClipModelUnavailable` saying how to get a model otherwise.
    """
    from perception2d_ros.engines import model_store as ms

    name = str(model) if model is not None else DEFAULT_MODEL
    arch = canonical_arch(arch) if arch else arch_for_model(name)
    if checkpoint is not None:
        ckpt = Path(checkpoint).expanduser().resolve()
        if not ckpt.is_file():
            raise ClipModelUnavailable(f"checkpoint not found: {ckpt}")
        return ensure_exported(arch, ckpt, cache_dir=cache_dir)["meta"]
    p = Path(name).expanduser()
    if p.suffix == ".json" and p.is_file():
        return p.resolve()
    if p.is_dir():
        found = find_exported(p, arch) or find_exported(p)
        if found is None:
            raise ClipModelUnavailable(f"no CLIP export (clip_*.json sidecar) in {p}")
        return found
    root = ms.models_dir(models_dir)
    manifest = ms.load_manifest(models_dir)
    entry = manifest.get(name)
    how = (f"get it with `perception2d models fetch {name if entry else DEFAULT_MODEL}` "
           f"(exported to ONNX on first use, or now with `perception2d models export "
           f"{name if entry else DEFAULT_MODEL}`), or pass --checkpoint PATH to your own CLIP "
           f"checkpoint (.pt/.bin/.safetensors) with --arch")
    if entry is None:
        clip = sorted(n for n, e in manifest.items() if e.kind == "clip")
        raise ClipModelUnavailable(
            f"unknown CLIP model '{name}' (known: {', '.join(clip) or 'none'}); {how}")
    if entry.kind != "clip":
        raise ClipModelUnavailable(f"'{name}' is a {entry.kind} model, not a CLIP model")
    file = ms.entry_path(entry, models_dir)
    if file.suffix == ".json" and file.is_file():
        return file
    exported = find_exported(root, arch)
    if exported is not None:
        return exported
    if file.suffix in (".onnx",):
        raise ClipModelUnavailable(f"'{name}' is a single ONNX file, not a CLIP export pair")
    if not file.is_file():
        raise ClipModelUnavailable(
            f"CLIP model '{name}' is not available: no exported ONNX "
            f"({onnx_names(arch)['meta']}) in {root} and no checkpoint {file}; {how}")
    ms.verify_file(file, entry.sha256, entry.name, entry)
    return ensure_exported(arch, file, cache_dir=cache_dir)["meta"]


# --------------------------------------------------------------------------- test checkpoints
CHECKPOINT_FORMATS = ("openai-torchscript", "openai-state-dict", "open_clip", "bin",
                      "safetensors")


def make_test_checkpoint(arch: str, path: str | Path, *, seed: int = 0,
                         fmt: str = "openai-torchscript", logit_scale: float | None = 100.0,
                         quick_gelu: bool | None = None, half: bool | None = None) -> Path:
    """Write seeded random weights of ``arch`` as a checkpoint in an official format (for
    tests and smoke checks; no pretrained weights are ever downloaded).

    ``openai-torchscript``: a ``torch.jit.script`` archive with fp16 weights and QuickGELU, as
    OpenAI's ``ViT-B-32.pt`` release files; ``openai-state-dict``: their fp16 state dict saved
    with ``torch.save``; ``open_clip``: a training checkpoint ``{"epoch", "state_dict"}`` with
    ``module.`` prefixes; ``bin``: a plain ``torch.save`` state dict (HF hub
    ``open_clip_pytorch_model.bin``); ``safetensors``. ``logit_scale`` sets the multiplier
    (trained CLIP models sit at the 100 clamp; random init is 1/0.07). ``half``: store fp16
    weights (default: the OpenAI formats only, as released)."""
    import math

    import torch

    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"fmt must be one of {CHECKPOINT_FORMATS}")
    if quick_gelu is None:
        quick_gelu = fmt.startswith("openai")
    model = load_clip(arch, None, seed=seed, quick_gelu=quick_gelu)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(logit_scale))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if fmt.startswith("openai"):
        from open_clip.model import convert_weights_to_lp

        convert_weights_to_lp(model, torch.float16)  # OpenAI releases are fp16
    elif half:
        model.half()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if fmt == "openai-torchscript":
        import warnings

        # OpenAI's archives hold the causal mask as a plain attribute, not in the state dict
        mask = model._buffers.pop("attn_mask")
        model.attn_mask = mask
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(model).save(str(p))
    elif fmt == "openai-state-dict" or fmt == "bin":
        torch.save(sd, p)
    elif fmt == "open_clip":
        torch.save({"epoch": 1, "name": "test",
                    "state_dict": {f"module.{k}": v for k, v in sd.items()}}, p)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(p))
    return p


# --------------------------------------------------------------------------- parity
def parity_check(arch: str, checkpoint: str | Path | None, exported: Mapping[str, Path],
                 image_bgr: np.ndarray, *, seed: int | None = None,
                 phrases: list[str] | None = None,
                 boxes_xyxy: np.ndarray | None = None) -> dict[str, Any]:
    """Compare the exported ONNX path (our tokenizer + preprocessing + ONNX Runtime, CPU fp32)
    with open_clip's torch forward (its PIL preprocess + tokenizer) on the same weights.

    Returns ``image_cosine_min``, ``text_cosine_min``, ``max_logit_diff``, ``max_prob_diff``,
    ``top1_agree``, ``preprocess_max_abs_diff``, the sizes compared and ``ok`` (all within
    :data:`PARITY_TOLERANCES`). ``boxes_xyxy`` adds
    square crops of those boxes (as the labeler makes them) to the full image.
    """
    import open_clip
    import torch
    from PIL import Image

    from perception2d_ros.models.clip.labeler import ClipLabeler
    from perception2d_ros.models.clip.preprocess import (
        preprocess_bgr, preprocess_crops_bgr, square_crop, to_rgb)
    from perception2d_ros.engines.factory import EngineConfig

    phrases = phrases or DEFAULT_PARITY_PHRASES
    labeler = ClipLabeler(exported["meta"], EngineConfig(backend="onnxruntime", device="cpu"),
                          text_cache_dir=None)
    model = load_clip(arch, checkpoint, seed=seed,
                      quick_gelu=labeler.meta.get("quick_gelu"))
    preprocess = open_clip.image_transform(labeler.image_size, is_train=False,
                                           mean=labeler.meta["mean"], std=labeler.meta["std"])
    rgb = to_rgb(image_bgr)
    boxes = np.asarray(boxes_xyxy if boxes_xyxy is not None else [], np.float64).reshape(-1, 4)
    size, mean, std, pad = labeler.image_size, labeler.mean, labeler.std, labeler.padding
    ours_x = np.concatenate([preprocess_bgr(image_bgr, size, mean, std)[None],
                             preprocess_crops_bgr(image_bgr, boxes, size, pad, mean, std)])
    crops = [rgb] + [square_crop(rgb, b, pad) for b in boxes]
    ref_x = torch.stack([preprocess(Image.fromarray(c)) for c in crops])
    ours_img = labeler.embed_preprocessed(ours_x)
    ours_txt = labeler.text_cache.encode(phrases, ["{}"])
    with torch.no_grad():
        ref_img = model.encode_image(ref_x, normalize=True).numpy()
        ref_txt = model.encode_text(open_clip.tokenize(phrases), normalize=True).numpy()
    scale = labeler.logit_scale
    ours_logits, ref_logits = scale * ours_img @ ours_txt.T, scale * ref_img @ ref_txt.T
    ours_p, ref_p = _softmax(ours_logits), _softmax(ref_logits)
    report = {
        "arch": canonical_arch(arch),
        "n_images": len(ours_x), "n_phrases": len(phrases),
        "preprocess_max_abs_diff": float(np.abs(ours_x - ref_x.numpy()).max()),
        "image_cosine_min": float(_rowcos(ours_img, ref_img).min()),
        "text_cosine_min": float(_rowcos(ours_txt, ref_txt).min()),
        "max_logit_diff": float(np.abs(ours_logits - ref_logits).max()),
        "max_prob_diff": float(np.abs(ours_p - ref_p).max()),
        "top1_agree": bool((ours_p.argmax(1) == ref_p.argmax(1)).all()),
        "logit_scale": scale,
        "tolerances": dict(PARITY_TOLERANCES),
    }
    tol = PARITY_TOLERANCES
    report["ok"] = bool(report["image_cosine_min"] >= tol["cosine_min"]
                        and report["text_cosine_min"] >= tol["cosine_min"]
                        and report["max_prob_diff"] <= tol["max_prob_diff"]
                        and report["preprocess_max_abs_diff"] <= tol["preprocess_max_abs_diff"])
    return report


#: fp32 CPU parity bounds (see test/test_clip_parity.py for the measured values)
PARITY_TOLERANCES = {"cosine_min": 0.9999, "max_prob_diff": 1e-4,
                     "preprocess_max_abs_diff": 1e-6}


DEFAULT_PARITY_PHRASES = [
    "a person", "a bicycle", "a car", "a motorcycle", "an airplane", "a bus", "a train",
    "a truck", "a boat", "a traffic light", "a fire hydrant", "a stop sign", "a bench",
    "a bird", "a cat", "a dog", "a horse", "a sheep", "a cow", "an elephant", "a bear",
    "a zebra", "a giraffe", "an umbrella",
]


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def _rowcos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)

