"""Vocabulary: built from training captions only, saved as JSON, encode/decode."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from captioner.files import atomic_write_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3

# Karpathy's split files were tokenised by keeping alphanumerics and lower-casing; this rule
# reproduces his `tokens` from `raw` for plain English captions without any nltk data.
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """NFKC-normalise and lower-case ``text`` and split it into word tokens (ASCII letters and
    digits), dropping punctuation and every other letter."""
    return [t.replace("'", "") for t in _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())]


class Vocabulary:
    """Maps words to ids. Ids 0..3 are ``<pad> <start> <end> <unk>``.

    ``made_from``: what decided the words (the training captions' source by content, the
    tokenizer, ``min_count``, ``max_vocab``), saved with them so that a cached vocabulary can be
    checked against a config (``CaptionDataModule``); None for files of earlier releases."""

    def __init__(self, words: Sequence[str], made_from: dict | None = None) -> None:
        words = list(words)
        if tuple(words[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {words[:4]}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary must not repeat words")
        self.itos: list[str] = words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(words)}
        self.made_from = made_from

    @classmethod
    def build(
        cls, captions: Iterable[Sequence[str]], min_count: int = 5, max_size: int | None = None
    ) -> Vocabulary:
        """Words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for cap in captions for w in cap)
        kept = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        if max_size is not None:
            kept = kept[: max(0, max_size - len(SPECIALS))]
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, tokens: Sequence[str], max_length: int | None = None) -> list[int]:
        """``<start> w1 .. wn <end>``; words beyond ``max_length`` (words, not specials) are cut."""
        if max_length is not None:
            tokens = tokens[:max_length]
        return [START_ID, *(self.stoi.get(t, UNK_ID) for t in tokens), END_ID]

    def decode(self, ids: Iterable[int], strip: bool = True) -> list[str]:
        """Words up to the first ``<end>``; with ``strip`` the specials are removed."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if strip and i in (PAD_ID, START_ID):
                continue
            words.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return words

    def to_list(self) -> list[str]:
        return list(self.itos)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``{"words": [...], "made_from": {...}}`` atomically."""
        atomic_write_json(path, {"words": self.itos, **({"made_from": self.made_from} if self.made_from else {})})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise ValueError(f"{path}: not a captioner vocabulary (expected {{'words': [...]}})")
        made_from = data.get("made_from")
        return cls(data["words"], made_from if isinstance(made_from, dict) else None)
