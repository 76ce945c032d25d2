"""The fast CIDEr-D of the rewards equals pycocoevalcap's CiderScorer, caption by caption."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captioner.metrics.cider import CiderD, bleu4_per_caption

WORDS = ["a", "an", "the", "man", "woman", "dog", "cat", "red", "blue", "small", "big", "on", "in", "of", "with", "is", "sitting", "running", "grass"]


def reference_scores(refs: dict[int, list[str]], candidates: dict[int, str]) -> dict[int, float]:
    """pycocoevalcap's per-caption CIDEr-D, document frequencies from ``refs`` (every image)."""
    scorer = CiderScorer(n=4, sigma=6.0)
    ids = sorted(refs)
    for i in ids:
        scorer += (candidates[i], refs[i])
    _, per = scorer.compute_score()
    return dict(zip(ids, per))


def random_caption(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def check_equal(refs: dict[int, list[str]], rounds: list[dict[int, str]]) -> float:
    ours = CiderD(refs)
    worst = 0.0
    for cands in rounds:  # several candidates per image: df depends on the references only
        expected = reference_scores(refs, cands)
        ids = sorted(cands)
        got = ours.scores([cands[i] for i in ids], ids)
        diff = np.abs(got - np.array([expected[i] for i in ids]))
        worst = max(worst, float(diff.max()))
        assert diff.max() < 1e-6, (got, expected)
    return worst


def test_random_captions_equal_pycocoevalcap() -> None:
    rng = random.Random(0)
    refs = {i: [random_caption(rng, 1, 12) for _ in range(rng.randint(1, 6))] for i in range(30)}
    rounds = [{i: random_caption(rng, 1, 25) for i in refs} for _ in range(5)]  # some longer than every ref
    check_equal(refs, rounds)


def test_real_looking_captions_equal_pycocoevalcap() -> None:
    refs = {
        1: ["a man riding a wave on top of a surfboard", "a surfer rides a large wave in the ocean",
            "a man on a surfboard riding a wave", "a person surfing on a wave", "surfer riding a wave"],
        2: ["a dog runs across the grass", "a brown dog running on the grass with a ball",
            "the dog is playing in a field", "a dog in a grassy field", "a dog running"],
        3: ["two cats sleeping on a couch", "a couple of cats lying on a red couch",
            "cats asleep on the sofa", "two cats curled up together", "a pair of cats on a couch"],
    }
    rounds = [
        {1: "a man riding a wave on a surfboard", 2: "a dog a dog a dog a dog", 3: "two cats on a couch"},
        {1: "a a a a a a a a a a a a a a a a a a a a", 2: "dog", 3: "the the the"},
        {1: "a surfer", 2: "a brown dog running on the grass with a ball in a big field of green grass today",
         3: "zebra giraffe elephant"},  # words no reference has
        {1: "a man riding a wave on top of a surfboard", 2: "a dog runs across the grass",
         3: "two cats sleeping on a couch"},  # a reference itself
    ]
    check_equal(refs, rounds)


def test_document_frequencies_survive_a_round_trip() -> None:
    rng = random.Random(1)
    refs = {i: [random_caption(rng, 2, 10) for _ in range(5)] for i in range(10)}
    a = CiderD(refs)
    b = CiderD(refs, **a.state_dict())
    cands = [random_caption(rng, 1, 15) for _ in range(10)]
    np.testing.assert_array_equal(a.scores(cands, list(range(10))), b.scores(cands, list(range(10))))


def test_token_lists_and_strings_agree_and_unknown_images_are_named() -> None:
    refs = {7: ["a red square", "a red square on the left"]}
    scorer = CiderD(refs)
    assert scorer.scores(["a red square"], [7])[0] == scorer.scores([["a", "red", "square"]], [7])[0]
    with pytest.raises(KeyError, match="8"):
        scorer.scores(["a red square"], [8])


def test_bleu4_per_caption_is_pycocoevalcap_bleu() -> None:
    refs = [["a man riding a wave on a surfboard", "a surfer on a wave"]]
    assert bleu4_per_caption(["a man riding a wave on a surfboard"], refs)[0] == pytest.approx(1.0)
    assert bleu4_per_caption(["zebra"], refs)[0] < 1e-6
