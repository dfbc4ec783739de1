"""Export of a CLIP model's image and text towers to ONNX (+ JSON sidecar), and the cache.

``export_onnx`` builds the model with :func:`.checkpoint.load_clip`; ``ensure_exported``
exports a checkpoint once into ``$PERCEPTION2D_CACHE_DIR/clip``; ``read_sidecar`` reads the
sidecar that the runtime (:mod:`.labeler`, :mod:`.vocabulary`) starts from.

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
import time
from pathlib import Path
from typing import Any, Iterator

from perception2d_ros.engines.model_store import sha256_file
from perception2d_ros.models.clip.checkpoint import canonical_arch, load_clip, model_info

LOG = logging.getLogger("perception2d.clip")

OPSET = 17
SIDECAR_VERSION = 1


# --------------------------------------------------------------------------- names / paths
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
