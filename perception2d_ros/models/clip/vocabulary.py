"""Open vocabularies and the CLIP text-embedding cache (shared by the CLIP labeler and LSeg).

``TextEmbeddingCache.encode(phrases, templates)`` returns ``(len(phrases), D)`` float32,
L2-normalised: for each phrase the mean of its normalised per-template embeddings,
renormalised (the standard CLIP prompt ensemble). Every (model id, phrase, template)
embedding is computed once and kept in memory and, with a ``cache_dir``, on disk as one
``.npy`` per entry under ``<cache_dir>/<model_id[:16]>/`` (atomic writes; safe to share between
processes). ``model_id`` is the text-tower ONNX sha256, so a re-exported or different model
never reuses stale embeddings.

Text encoding batches the missing texts sorted by token length and trims each batch to its
longest ``eot+1`` (exact under CLIP's causal mask; the text ONNX has a dynamic sequence
axis). A text engine with a fixed 77-token input is fed full rows instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

LOG = logging.getLogger("perception2d.clip")

#: Default prompt ensemble (a subset of OpenAI's ImageNet templates that suits object crops).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
)
VERBATIM: tuple[str, ...] = ("{}",)


def normalize_templates(templates: Sequence[str] | str | None) -> tuple[str, ...]:
    """``None`` → :data:`DEFAULT_TEMPLATES`; a string → one template. Each must hold ``{}``."""
    if templates is None:
        return DEFAULT_TEMPLATES
    if isinstance(templates, str):
        templates = [templates]
    out = tuple(str(t) for t in templates)
    if not out:
        raise ValueError("templates must not be empty (use ['{}'] for verbatim phrases)")
    for t in out:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
    return out


def parse_phrases(text: str | Iterable[str]) -> list[str]:
    """``"a cat, a dog"`` or an iterable → stripped, non-empty phrases (order kept; duplicates
    rejected so index → name stays unambiguous)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    phrases = [str(p).strip() for p in items if str(p).strip()]
    if not phrases:
        raise ValueError("the vocabulary is empty")
    seen: set[str] = set()
    dup = [p for p in phrases if p in seen or seen.add(p)]  # type: ignore[func-returns-value]
    if dup:
        raise ValueError(f"duplicate phrases in vocabulary: {sorted(set(dup))}")
    return phrases


class Vocabulary:
    """Phrases + templates with a version that every runtime change bumps.

    ``label_info()`` gives the index → name mapping (as in vision_msgs LabelInfo); results
    carry the ``version`` they were computed with. Thread-safe.
    """

    def __init__(self, phrases: Iterable[str] | str, templates: Sequence[str] | str | None = None,
                 version: int = 1) -> None:
        self._lock = threading.Lock()
        self._phrases = tuple(parse_phrases(phrases))
        self._templates = normalize_templates(templates)
        self._version = int(version)

    @property
    def phrases(self) -> tuple[str, ...]:
        return self._phrases

    @property
    def templates(self) -> tuple[str, ...]:
        return self._templates

    @property
    def version(self) -> int:
        return self._version

    def __len__(self) -> int:
        return len(self._phrases)

    def __getitem__(self, index: int) -> str:
        return self._phrases[index]

    def index(self, phrase: str) -> int:
        return self._phrases.index(phrase)

    def label_info(self) -> dict[int, str]:
        return dict(enumerate(self._phrases))

    def set(self, phrases: Iterable[str] | str | None = None,
            templates: Sequence[str] | str | None = ...) -> int:  # type: ignore[assignment]
        """Replace phrases and/or templates (``...`` = keep); bumps the version if anything
        changed. Returns the (new) version."""
        with self._lock:
            new_p = tuple(parse_phrases(phrases)) if phrases is not None else self._phrases
            new_t = self._templates if templates is ... else normalize_templates(templates)
            if (new_p, new_t) != (self._phrases, self._templates):
                self._phrases, self._templates = new_p, new_t
                self._version += 1
            return self._version

    def add(self, phrases: Iterable[str] | str) -> int:
        extra = [p for p in parse_phrases(phrases) if p not in self._phrases]
        return self.set(list(self._phrases) + extra) if extra else self._version

    def remove(self, phrases: Iterable[str] | str) -> int:
        drop = set(parse_phrases(phrases))
        return self.set([p for p in self._phrases if p not in drop])

    def snapshot(self) -> tuple[tuple[str, ...], tuple[str, ...], int]:
        with self._lock:
            return self._phrases, self._templates, self._version

    def __repr__(self) -> str:
        return (f"Vocabulary(v{self._version}, {len(self._phrases)} phrases, "
                f"{len(self._templates)} templates)")


@dataclass(frozen=True)
class CacheStats:
    memory_hits: int
    disk_hits: int
    computed: int


class TextEmbeddingCache:
    """Normalised CLIP text embeddings per (model id, phrase, template), memory + disk.

    ``text_engine`` is an :class:`~perception2d_ros.engines.engines.Engine` of the exported text
    tower (input ``input_ids``, output ``text_embeds``) or any callable
    ``int64 [B, L] → float32 [B, D]``. ``model_id`` defaults to the engine's ONNX sha256.
    """

    def __init__(self, text_engine: Any, model_id: str | None = None, *,
                 cache_dir: str | Path | None = None, tokenizer: Any = None,
                 batch_size: int = 64, input_name: str = "input_ids",
                 output_name: str = "text_embeds") -> None:
        from perception2d_ros.models.clip.tokenizer import get_tokenizer

        self.engine = text_engine
        self.tokenizer = tokenizer or get_tokenizer()
        if model_id is None:
            path = getattr(text_engine, "path", None) or getattr(text_engine, "onnx_path", None)
            if path is None:
                raise ValueError("model_id is required when the text engine has no ONNX path")
            from perception2d_ros.engines.model_store import sha256_file

            model_id = sha256_file(path)
        self.model_id = str(model_id)
        self.cache_dir = (Path(cache_dir) / self.model_id[:16]) if cache_dir else None
        self.batch_size = max(1, int(batch_size))
        self.input_name, self.output_name = input_name, output_name
        self._mem: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()
        self._hits = [0, 0, 0]
        self._fixed_len = self._engine_fixed_len()

    @classmethod
    def from_model(cls, model: str | Path | None = "clip_vit_b32", *,
                   models_dir: str | Path | None = None, engine_config: Any = None,
                   checkpoint: str | Path | None = None, arch: str | None = None,
                   cache_dir: str | Path | bool | None = True,
                   **kwargs: Any) -> "TextEmbeddingCache":
        """Cache over the text tower of a CLIP model: a manifest name (``clip_vit_b32``), an
        export sidecar/folder, or ``checkpoint`` (see
        :func:`perception2d_ros.models.clip.resolve.resolve_export`; raises
        ``ClipModelUnavailable`` with how-to-get-it when there is none)."""
        from perception2d_ros.models.clip.export import read_sidecar
        from perception2d_ros.models.clip.resolve import resolve_export

        meta_p = resolve_export(model, checkpoint=checkpoint, arch=arch, models_dir=models_dir)
        meta = read_sidecar(meta_p)
        return text_cache_for(meta_p.parent / meta["text_onnx"]["file"], engine_config,
                              cache_dir=cache_dir, **kwargs)

    # ------------------------------------------------------------------ public
    @property
    def stats(self) -> CacheStats:
        """Counts of (memory hits, disk hits, computed) texts so far."""
        with self._lock:
            return CacheStats(*self._hits)

    def encode(self, phrases: Sequence[str] | str,
               templates: Sequence[str] | str | None = VERBATIM) -> np.ndarray:
        """``(len(phrases), D)`` float32 L2-normalised prompt-ensemble embeddings."""
        if isinstance(phrases, str):
            phrases = [phrases]
        temps = normalize_templates(templates)
        per_t = self.encode_texts([(p, t) for p in phrases for t in temps])
        if not len(phrases):
            return np.zeros((0, per_t.shape[1] if per_t.ndim == 2 else 0), np.float32)
        per_t = per_t.reshape(len(phrases), len(temps), -1).astype(np.float64)
        mean = per_t.mean(axis=1)
        mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
        return mean.astype(np.float32)

    def encode_texts(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """``(len(pairs), D)`` normalised embeddings of ``template.format(phrase)``."""
        out: list[np.ndarray | None] = [None] * len(pairs)
        missing: dict[tuple[str, str], list[int]] = {}
        for i, key in enumerate(pairs):
            with self._lock:
                hit = self._mem.get(key)
            if hit is not None:
                self._count(0)
                out[i] = hit
                continue
            disk = self._load(key)
            if disk is not None:
                self._count(1)
                with self._lock:
                    self._mem[key] = disk
                out[i] = disk
                continue
            missing.setdefault(key, []).append(i)
        if missing:
            keys = list(missing)
            embeds = self._compute([t.format(p) for p, t in keys])
            self._count(2, len(keys))
            for key, emb in zip(keys, embeds):
                emb = np.ascontiguousarray(emb, np.float32)
                with self._lock:
                    self._mem[key] = emb
                self._store(key, emb)
                for i in missing[key]:
                    out[i] = emb
        if not pairs:
            return np.zeros((0, 0), np.float32)
        return np.stack(out).astype(np.float32)  # type: ignore[arg-type]

    def clear_memory(self) -> None:
        with self._lock:
            self._mem.clear()

    # ------------------------------------------------------------------ internals
    def _count(self, which: int, n: int = 1) -> None:
        with self._lock:
            self._hits[which] += n

    def _engine_fixed_len(self) -> int | None:
        inputs = getattr(self.engine, "inputs", None)
        if not inputs:
            return None
        for spec in inputs:
            if spec.name == self.input_name and len(spec.shape) == 2 and \
                    isinstance(spec.shape[1], int) and spec.shape[1] > 0:
                return int(spec.shape[1])
        return None

    def _run(self, ids: np.ndarray) -> np.ndarray:
        if callable(getattr(self.engine, "infer", None)):
            return np.asarray(self.engine.infer({self.input_name: ids})[self.output_name])
        return np.asarray(self.engine(ids))

    def _compute(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenizer(texts)
        eot = ids.argmax(axis=1)  # eot is the highest id in each row
        order = np.argsort(eot, kind="stable")
        result: np.ndarray | None = None
        for start in range(0, len(texts), self.batch_size):
            rows = order[start:start + self.batch_size]
            n = self._fixed_len or int(eot[rows].max()) + 1
            emb = self._run(np.ascontiguousarray(ids[rows, :n]))
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            if result is None:
                result = np.empty((len(texts), emb.shape[1]), np.float32)
            result[rows] = emb
        assert result is not None
        return result

    def _file(self, key: tuple[str, str]) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(f"{key[1]}\x00{key[0]}".encode("utf-8")).hexdigest()[:32]
        return self.cache_dir / f"{digest}.npy"

    def _load(self, key: tuple[str, str]) -> np.ndarray | None:
        f = self._file(key)
        if f is None or not f.is_file():
            return None
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as exc:
            LOG.warning("ignoring unreadable text-embedding cache file %s: %s", f, exc)
            return None
        return arr.astype(np.float32) if arr.ndim == 1 else None

    def _store(self, key: tuple[str, str], emb: np.ndarray) -> None:
        f = self._file(key)
        if f is None:
            return
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f"{f.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npy")
            np.save(tmp, emb)
            tmp.replace(f)
        except OSError as exc:
            LOG.warning("could not write text-embedding cache %s: %s", f, exc)


def text_cache_for(text_onnx: str | Path, engine_config: Any = None,
                   cache_dir: str | Path | None | bool = True, **kwargs: Any) -> TextEmbeddingCache:
    """A cache over an exported text tower (for LSeg and others). ``cache_dir=True`` uses
    ``$PERCEPTION2D_CACHE_DIR/clip_text``; ``None``/``False`` keeps it in memory only."""
    from perception2d_ros.engines.base import default_cache_dir
    from perception2d_ros.engines.factory import EngineConfig, create_engine
    from perception2d_ros.engines.model_store import sha256_file

    import copy

    cfg = copy.copy(engine_config or EngineConfig())
    cfg.profiles = {"input_ids": (cfg.profiles or {}).get("input_ids",
                                                          [[1, 1], [16, 16], [64, 77]])}
    engine = create_engine(text_onnx, cfg)
    if cache_dir is True:
        cache_dir = Path(default_cache_dir()) / "clip_text"
    return TextEmbeddingCache(engine, sha256_file(text_onnx),
                              cache_dir=cache_dir or None, **kwargs)


__all__ = ["DEFAULT_TEMPLATES", "VERBATIM", "Vocabulary", "TextEmbeddingCache",
           "CacheStats", "normalize_templates", "parse_phrases", "text_cache_for"]

