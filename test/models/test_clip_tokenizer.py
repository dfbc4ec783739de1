"""CLIP BPE tokenizer: exact token ids against open_clip's reference tokenizer."""
from __future__ import annotations

import numpy as np
import pytest

from perception2d_ros.models.clip.tokenizer import CONTEXT_LENGTH, ClipTokenizer, get_tokenizer

CASES = [
    "",
    " ",
    "a photo of a cat",
    "A Photo Of A CAT",
    "a photo of a cat.",
    "Hello, world! What's up? I'm fine; you'll see -- (really) [ok] {x} <y> @#$%^&*",
    "don't won't they're we've I'd",
    "traffic light",
    "fire hydrant",
    "café crème brûlée naïve façade",
    "Ångström Øresund straße",
    "日本語のテキスト 中文 한국어",
    "emoji 🐱🐶🚗 and 👍🏽 and 🏳️‍🌈",
    "numbers 12345 3.14159 1,000,000",
    "  lots   of\twhitespace\n\nand newlines  ",
    "html &amp; entities &lt;b&gt; &amp;amp;",
    "mojibake cafÃ© (ftfy fixes this)",
    "<start_of_text> literal special tokens <end_of_text>",
    "tab\tseparated\tvalues",
    "x" * 300,
    " ".join(["word"] * 100),
    "a very long caption " * 30,
    "Κάτι στα ελληνικά και русский текст",
    "mixedCASE camelCase snake_case kebab-case",
]


@pytest.fixture(scope="module")
def ours() -> ClipTokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def reference():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.get_tokenizer("ViT-B-32")


def test_ids_equal_open_clip(ours, reference):
    want = reference(CASES).numpy()
    got = ours(CASES)
    assert got.dtype == np.int64 and got.shape == (len(CASES), CONTEXT_LENGTH)
    for i, text in enumerate(CASES):
        assert got[i].tolist() == want[i].tolist(), f"ids differ for {text!r}"


def test_each_string_alone_equals_batch(ours):
    batch = ours(CASES)
    for i, text in enumerate(CASES):
        assert ours(text)[0].tolist() == batch[i].tolist()


def test_special_tokens_and_truncation(ours):
    assert ours.sot_token_id == 49406 and ours.eot_token_id == 49407
    assert ours.vocab_size == 49408
    empty = ours("")[0]
    assert empty[:3].tolist() == [49406, 49407, 0]
    long = ours("a very long caption " * 30)[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long != 0).all()
    assert int(long.argmax()) == CONTEXT_LENGTH - 1  # eot (highest id) last → pooled there
    short = ours("a photo of a cat")[0]
    n = int((short != 0).sum())
    assert short[n - 1] == 49407 and (short[n:] == 0).all()


def test_decode_roundtrip(ours, reference):
    ids = ours.encode("a photo of a café, 🐱!")
    # emoji + "!" are one pre-token ([^\s\p{L}\p{N}]+), hence no space between them
    assert ours.decode(ids).strip() == "a photo of a café , 🐱!"
    assert ours.decode(ids) == reference.decode(ids)


def test_context_length_override(ours, reference):
    text = "one two three four five six seven eight nine ten"
    got = ours(text, context_length=8)
    assert got.shape == (1, 8)
    assert got.tolist() == reference([text], context_length=8).numpy().tolist()
