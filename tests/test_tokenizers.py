"""The caption tokenizers: every registered one round-trips, and each language splits as documented."""

from __future__ import annotations

import pytest

from captioner.data.tokenizers import TOKENIZERS, get_tokenizer
from captioner.data.vocab import tokenize

SAMPLES = [
    "A dog runs on the grass.",
    "L'été, à Paris : un chien joue.",
    "Die Straße ist nass. Ein Hund läuft!",
    "一只狗在草地上奔跑。",
    "犬が公園でフリスビーをキャッチしている。",
]


@pytest.mark.parametrize("name", TOKENIZERS.names())
def test_every_tokenizer_is_idempotent_on_its_joined_words(name: str) -> None:
    tok = get_tokenizer(name)
    assert tok.name == name
    for text in SAMPLES:
        words = tok.tokenize(text)
        assert tok.tokenize(" ".join(words)) == words
        assert tok.tokenize(tok.join(words)) == words or name == "simple"


def test_simple_is_the_karpathy_rule() -> None:
    tok = get_tokenizer("simple")
    assert tok.tokenize("A Dog's toy, 2 balls.") == tokenize("A Dog's toy, 2 balls.") == ["a", "dogs", "toy", "2", "balls"]
    assert tok.join(["a", "dog"]) == "a dog"


def test_unicode_keeps_accents_and_apostrophes_inside_words() -> None:
    tok = get_tokenizer("unicode")
    assert tok.tokenize("L'été, à Paris : un chien joue.") == ["l'été", "à", "paris", "un", "chien", "joue"]
    assert tok.tokenize("Die Straße, ein Hund läuft!") == ["die", "straße", "ein", "hund", "läuft"]
    assert tok.tokenize("l\u2019été") == ["l'été"]
    assert tok.tokenize("一只狗") == ["一", "只", "狗"]
    assert tok.join(["l'été", "à", "paris"]) == "l'été à paris"


def test_char_splits_scripts_without_spaces_and_joins_without_spaces() -> None:
    tok = get_tokenizer("char")
    assert tok.tokenize("一只狗 在跑。") == ["一", "只", "狗", "在", "跑"]
    words = tok.tokenize("コーヒーを飲む man")
    assert words == ["コ", "ー", "ヒ", "ー", "を", "飲", "む", "man"]
    assert tok.join(words) == "コーヒーを飲むman"
    assert tok.join(["一", "只", "dog", "and", "cat"]) == "一只dog and cat"


def test_unknown_tokenizer_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown data.tokenizer 'bpe'; choose one of char, simple, unicode"):
        get_tokenizer("bpe")
