"""An LSeg vocabulary: the phrases to segment, text templates and how "other" is treated,
from a comma-separated list or a YAML file (default config/lseg_indoor_vocabulary.yaml)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

DEFAULT_VOCABULARY = Path(__file__).resolve().parents[3] / "config" / "lseg_indoor_vocabulary.yaml"


@dataclass(frozen=True)
class LSegVocabulary:
    """Phrases to segment + how to treat "other" (see config/lseg_indoor_vocabulary.yaml).

    ``text_phrases`` is what gets encoded: ``phrases`` plus the catch-all ``other_phrase``
    (last) when set; :attr:`other_classes` is the catch-all's index for
    :func:`label_map_from_logits`."""

    phrases: tuple[str, ...]
    templates: tuple[str, ...] = ("{}",)
    version: int = 1
    name: str = ""
    other_threshold: float | None = None
    other_phrase: str | None = None

    @property
    def text_phrases(self) -> tuple[str, ...]:
        if self.other_phrase and self.other_phrase not in self.phrases:
            return self.phrases + (self.other_phrase,)
        return self.phrases

    @property
    def other_classes(self) -> tuple[int, ...]:
        if not self.other_phrase:
            return ()
        return (self.text_phrases.index(self.other_phrase),)

    @classmethod
    def from_phrases(cls, phrases: str | Sequence[str], **kw: Any) -> "LSegVocabulary":
        if isinstance(phrases, str):
            phrases = phrases.split(",")
        clean = tuple(p.strip() for p in phrases if p.strip())
        if not clean:
            raise ValueError("empty vocabulary")
        if len(set(clean)) != len(clean):
            raise ValueError(f"duplicate phrases in vocabulary: {clean}")
        return cls(phrases=clean, **kw)

    @classmethod
    def from_yaml(cls, path: str | Path = DEFAULT_VOCABULARY) -> "LSegVocabulary":
        import yaml

        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw.get("phrases"), list):
            raise ValueError(f"{path}: 'phrases' list missing")
        other = raw.get("other") or {}
        thr = other.get("threshold")
        return cls.from_phrases(
            [str(p) for p in raw["phrases"]], templates=tuple(raw.get("templates") or ("{}",)),
            version=int(raw.get("version", 1)), name=str(raw.get("name", Path(path).stem)),
            other_threshold=None if thr is None else float(thr),
            other_phrase=(str(other["phrase"]).strip() or None) if other.get("phrase") else None)
