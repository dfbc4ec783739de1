"""CLIP byte-level BPE tokenizer (OpenAI CLIP / open_clip ``SimpleTokenizer`` semantics).

Our own implementation of the standard CLIP tokenizer; token ids are identical to
``open_clip.tokenize`` (checked in ``test/models/test_clip_tokenizer.py`` on punctuation, unicode,
emoji, accents, mixed case, the empty string and over-long text).

* Vocabulary: ``bpe_simple_vocab_16e6.txt.gz`` (manifest name ``clip_bpe_vocab``, sha256
  checked), the first 48894 merges; 256 byte symbols + their ``</w>`` forms + merges +
  ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407).
* Cleaning (open_clip ``clean='lower'``): ``ftfy.fix_text``, ``html.unescape`` twice, strip,
  collapse whitespace, lower-case.
* Pre-tokenisation regex (``regex`` module, ``\\p{L}``/``\\p{N}`` classes, case-insensitive).
* ``__call__`` returns ``int64 [N, context_length]``: ``[sot] + tokens + [eot]`` zero-padded;
  over-long sequences are truncated to ``context_length`` with the last id forced to eot,
  exactly as open_clip does.
"""
from __future__ import annotations

import gzip
import html
import threading
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

CONTEXT_LENGTH = 77
N_MERGES = 49152 - 256 - 2
SOT = "<start_of_text>"
EOT = "<end_of_text>"


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Reversible map utf-8 byte → printable unicode char (GPT-2 / CLIP convention)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _pairs(word: Sequence[str]) -> set[tuple[str, str]]:
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


def clean_text(text: str) -> str:
    """open_clip ``clean='lower'``: ftfy fix, double html unescape, whitespace collapse,
    lower-case."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = " ".join(text.split()).strip()
    return text.lower()


def default_vocab_path() -> Path:
    """The BPE vocabulary from the models directory (sha256-verified against the manifest)."""
    from perception2d_ros.engines.model_store import resolve

    path, _ = resolve("clip_bpe_vocab")
    return path


class ClipTokenizer:
    """CLIP BPE tokenizer. Thread-safe; the BPE cache is shared by all callers."""

    def __init__(self, vocab_path: str | Path | None = None,
                 context_length: int = CONTEXT_LENGTH) -> None:
        import regex

        self.vocab_path = Path(vocab_path) if vocab_path else default_vocab_path()
        self.context_length = int(context_length)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        with gzip.open(self.vocab_path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{self.vocab_path}: not a CLIP BPE merges file "
                             f"(expected {N_MERGES} merge pairs)")
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += [SOT, EOT]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self.vocab_size = len(self.encoder)
        self._cache: dict[str, str] = {SOT: SOT, EOT: EOT}
        self._lock = threading.Lock()
        self._pat = regex.compile(
            rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE)

    # ------------------------------------------------------------------ BPE
    def bpe(self, token: str) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word: tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        ranks = self.bpe_ranks
        inf = float("inf")
        while True:
            bigram = min(pairs, key=lambda p: ranks.get(p, inf))
            if bigram not in ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        with self._lock:
            self._cache[token] = out
        return out

    # ------------------------------------------------------------------ API
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without sot/eot."""
        ids: list[int] = []
        for token in self._pat.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(mapped).split(" "))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids if int(i) in self.decoder)
        raw = bytearray(self.byte_decoder[c] for c in text if c in self.byte_decoder)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str],
                 context_length: int | None = None) -> np.ndarray:
        """``int64 [len(texts), context_length]`` ids, open_clip truncation semantics."""
        if isinstance(texts, str):
            texts = [texts]
        n_ctx = int(context_length or self.context_length)
        out = np.zeros((len(texts), n_ctx), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > n_ctx:
                ids = ids[:n_ctx]
                ids[-1] = self.eot_token_id
            out[row, :len(ids)] = ids
        return out


_DEFAULT: dict[str, ClipTokenizer] = {}
_DEFAULT_LOCK = threading.Lock()


def get_tokenizer(vocab_path: str | Path | None = None) -> ClipTokenizer:
    """Process-wide tokenizer (loading the vocabulary takes ~0.3 s)."""
    key = str(vocab_path or "")
    with _DEFAULT_LOCK:
        if key not in _DEFAULT:
            _DEFAULT[key] = ClipTokenizer(vocab_path)
        return _DEFAULT[key]
