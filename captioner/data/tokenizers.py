"""Caption tokenizers, registered by name (``data.tokenizer``): text -> words, and words -> text.

Every tokenizer first normalises the text with Unicode NFKC, so that the same word typed two
ways is one word: full-width "ＡＢＣ" is "abc", the ligature "ﬁ" is "fi", a decomposed "é" is "é".

``simple``  lower-case, split on non-alphanumerics (ASCII): reproduces Karpathy's ``tokens`` of
            English captions, and drops every other letter ("âgé" -> "g"); what Karpathy split
            files without a ``tokenizer`` field are read with.
``unicode`` words of any script: letters, marks and digits of every alphabet, with apostrophes
            inside words kept ("l'été", "Straße", "naïve"), lower-cased (``str.lower``, so "ß"
            stays "ß"); punctuation dropped. Ideographs and kana are one word each, as Unicode
            word segmentation (UAX #29) treats them. ``data convert``'s default.
``char``    one token per character (grapheme cluster, so a Thai vowel stays on its consonant),
            whitespace and punctuation dropped: for scripts written without spaces (Chinese,
            Japanese, Thai). A run of Latin letters or digits inside such text stays one word.

Each has a ``max_length``, the tokens per caption that training keeps and decoding writes when
``data.max_caption_length`` / ``model.decoding.max_length`` are left unset: 20 for ``simple``
(English words; about twice the mean COCO caption), 50 for ``char`` and ``unicode``, about twice
the mean Japanese caption of STAIR Captions (23.8 characters, captions.stair.center): ``unicode``
splits Chinese and Japanese into characters as ``char`` does.

``join`` writes words back as text: a space between two words unless one side is written
without spaces, so a Chinese or Japanese caption has none and "a dog" keeps its space.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import regex

from captioner.data.vocab import tokenize as simple_tokenize
from captioner.registry import Registry

# Scripts written without spaces between words (by script extension, so that the kana length
# mark and iteration marks count as kana).
_NO_SPACE = (r"\p{scx=Han}\p{scx=Hiragana}\p{scx=Katakana}\p{scx=Thai}\p{scx=Lao}\p{scx=Khmer}"
             r"\p{scx=Myanmar}\p{scx=Tibetan}")
_WORD_CHAR = rf"[\p{{L}}\p{{M}}\p{{N}}--[{_NO_SPACE}]]"
_APOSTROPHE = r"['\u2019]"
_UNICODE_RE = regex.compile(
    rf"{_WORD_CHAR}+(?:{_APOSTROPHE}{_WORD_CHAR}+)*|(?=[{_NO_SPACE}--[\p{{P}}\p{{S}}]])\X", regex.V1)
_LATIN_RUN_RE = regex.compile(
    rf"[\p{{Latin}}\p{{N}}][\p{{Latin}}\p{{M}}\p{{N}}]*(?:{_APOSTROPHE}[\p{{Latin}}\p{{M}}\p{{N}}]+)*|\X", regex.V1)
_NO_SPACE_RE = regex.compile(rf"[{_NO_SPACE}]", regex.V1)
_DROPPED_RE = regex.compile(r"^[\p{Z}\p{P}\p{S}\p{C}\s]+$", regex.V1)
_LETTER_RE = regex.compile(r"[\p{L}\p{M}\p{N}]", regex.V1)


def normalize(text: str) -> str:
    """Unicode NFKC: compatibility characters (full-width letters, ligatures, half-width kana)
    become their ordinary form, and accents compose."""
    return text if unicodedata.is_normalized("NFKC", text) else unicodedata.normalize("NFKC", text)


@dataclass(frozen=True)
class Tokenizer:
    name: str
    _tokenize: Callable[[str], list[str]]
    _join: Callable[[Sequence[str]], str]
    max_length: int = 20  # tokens per caption kept in training and written by decoding, unless set

    def tokenize(self, text: str) -> list[str]:
        """Caption text -> words (``[]`` for text without any), after NFKC normalisation."""
        return self._tokenize(normalize(text))

    def loses_letters(self, text: str, tokens: Sequence[str] | None = None) -> bool:
        """Whether the words (``tokens``, or this tokenizer's of ``text``) hold fewer letters,
        marks and digits than the text: what ``simple`` does to "âgé" or "Straße"."""
        if text.isascii():  # every tokenizer keeps ASCII letters and digits
            return False
        tokens = self.tokenize(text) if tokens is None else tokens
        kept = sum(len(_LETTER_RE.findall(t)) for t in tokens)
        return kept < len(_LETTER_RE.findall(normalize(text).lower()))

    def join(self, words: Sequence[str]) -> str:
        """Words -> caption text, spaced as the language writes it."""
        return self._join(words)


TOKENIZERS: Registry[Tokenizer] = Registry("data.tokenizer")


def _spaced_join(words: Sequence[str]) -> str:
    """A space between two words unless the end of one or the start of the next is a character
    of a script written without spaces."""
    out: list[str] = []
    for w in words:
        if not w:
            continue
        if out and not (_NO_SPACE_RE.match(out[-1][-1]) or _NO_SPACE_RE.match(w[0])):
            out.append(" ")
        out.append(w)
    return "".join(out)


def _unicode_tokenize(text: str) -> list[str]:
    return [w.replace("\u2019", "'") for w in _UNICODE_RE.findall(text.lower())]


def _char_tokenize(text: str) -> list[str]:
    return [t.replace("\u2019", "'") for t in _LATIN_RUN_RE.findall(text.lower())
            if not _DROPPED_RE.match(t)]


@TOKENIZERS.register("simple")
def _simple() -> Tokenizer:
    return Tokenizer("simple", simple_tokenize, " ".join)


@TOKENIZERS.register("unicode")
def _unicode() -> Tokenizer:
    return Tokenizer("unicode", _unicode_tokenize, _spaced_join, max_length=50)


@TOKENIZERS.register("char")
def _char() -> Tokenizer:
    return Tokenizer("char", _char_tokenize, _spaced_join, max_length=50)


def get_tokenizer(name: str) -> Tokenizer:
    """The registered tokenizer ``name``; ``ValueError`` listing the names for an unknown one."""
    return TOKENIZERS.get(name)()


def lost_letters_warning(tokenizer: Tokenizer, captions: Iterable[tuple[str, Sequence[str]]],
                         advice: str) -> tuple[int, str | None]:
    """How many of the (raw text, words) ``captions`` lost letters to ``tokenizer``, and one
    message for them all with the first as an example (None when none lost any)."""
    count, example = 0, None
    for raw, tokens in captions:
        if tokenizer.loses_letters(raw, tokens):
            count += 1
            example = example or (raw, tokens)
    if not count:
        return 0, None
    raw, tokens = example
    return count, (f"the {tokenizer.name} tokenizer dropped letters from {count} caption(s), e.g. "
                   f"{raw!r} -> {' '.join(tokens)!r}; {advice}")


__all__ = ["TOKENIZERS", "Tokenizer", "get_tokenizer", "lost_letters_warning", "normalize"]
