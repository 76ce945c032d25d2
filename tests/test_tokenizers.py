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


@pytest.mark.parametrize("name", TOKENIZERS.names())
def test_every_tokenizer_normalises_with_nfkc(name: str) -> None:
    tok = get_tokenizer(name)
    assert tok.tokenize("ＡＢＣ") == ["abc"]  # full-width letters
    assert tok.tokenize("a \ufb01sh") == ["a", "fish"]  # the ligature "ﬁ"
    if name != "simple":
        assert tok.tokenize("cafe\u0301") == ["café"]  # a decomposed accent composes


def test_length_limits_are_per_tokenizer() -> None:
    # 20 English words; scripts without spaces give a token per character (STAIR Captions' mean
    # Japanese caption is 23.8 characters), so the tokenizers that split them allow 50
    assert {n: get_tokenizer(n).max_length for n in TOKENIZERS.names()} == {"simple": 20, "unicode": 50, "char": 50}
    ja = "茶色い犬が緑の芝生の上で赤いボールを追いかけて走っています"
    assert 20 < len(get_tokenizer("char").tokenize(ja)) <= get_tokenizer("char").max_length
