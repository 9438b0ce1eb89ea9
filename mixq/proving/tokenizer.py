"""A CLIP tokenizer whose vocabulary holds every word of the shapes grammar as one token.

It is a real `CLIPTokenizer` (byte-level BPE, CLIP's special tokens, 77-token padding), so pipelines
save and load it like SDXL's: its vocabulary is the 512 byte tokens (any text still tokenizes) plus one
token per grammar word, built by merges that join each word's characters left to right.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mixq.offline import write_clip_tokenizer_files

from .scenes import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, ONE_OBJECT_TEMPLATES, TWO_OBJECT_TEMPLATES


def grammar_words() -> list[str]:
    text = " ".join([*COLORS, *SHAPES, *SIZES, *POSITIONS, *RELATIONS, *ONE_OBJECT_TEMPLATES, *TWO_OBJECT_TEMPLATES])
    for field in ("{a}", "{b}", "{where}", "{rel}"):
        text = text.replace(field, " ")
    return sorted({word.strip(",.") for word in text.split() if word.strip(",.")})


def word_merges(word: str) -> list[tuple[str, str]]:
    """The merges that build `word</w>` from its characters, left to right."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, current = [], symbols[0]
    for symbol in symbols[1:]:
        merges.append((current, symbol))
        current += symbol
    return merges


def grammar_merges(words: list[str]) -> list[tuple[str, str]]:
    """Every word's merges, once each; earlier words' merges rank first."""
    merges = []
    for word in words:
        merges += [merge for merge in word_merges(word) if merge not in merges]
    return merges


def grammar_clip_tokenizer():
    """The tokenizer. BPE applies the lowest-ranked merge first, so one word's merge can break another
    word's chain ("r i" of "right" inside "triangle"): such words move to the front until every word is
    one token."""
    from transformers import CLIPTokenizer

    words = sorted(grammar_words(), key=lambda w: (-len(w), w))
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(len(words)):
            files = write_clip_tokenizer_files(Path(folder), grammar_merges(words))
            tokenizer = CLIPTokenizer.from_pretrained(str(files))
            split = [w for w in words if len(tokenizer.tokenize(w)) != 1]
            if not split:
                return tokenizer
            words = split + [w for w in words if w not in split]
    raise RuntimeError(f"no merge order makes these words single tokens: {split}")
