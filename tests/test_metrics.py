"""captioner.metrics.coco_eval against pycocoevalcap's own COCOEvalCap pipeline."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess

import pytest
from nltk.translate.bleu_score import corpus_bleu
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captioner.metrics import coco_eval
from captioner.metrics.coco_eval import (
    METRIC_KEYS,
    EvalResult,
    check_ids,
    format_table,
    nltk_corpus_bleu4,
    python_tokenize_caption,
    score_captions,
    validation_scores,
)
from captioner.metrics.exact_match import exact_match

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java on PATH")

# COCO-style raw references: capitals, punctuation, clitics, quotes, brackets, numbers.
RAW_REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a big wave!",
        "Someone's surfing on a wave, in the ocean."],
    2: ["Two dogs playing with a frisbee in the park.", "Dogs don't stop playing (with a toy).",
        "Two brown dogs run across the grass"],
    3: ["A kitchen with stainless steel appliances and granite counter tops.",
        'A kitchen that has a "modern" look.', "An old-fashioned kitchen; it's clean."],
    4: ["A plate of food: pizza, salad and 1,000 olives.", "A pizza on a white plate.",
        "A close up of a pizza with cheese..."],
    5: ["A street sign on the corner of 5th Ave. and 42nd St.", "A green street sign.",
        "Signs on a pole at the U.S. border"],
    6: ["A cat laying on a laptop computer's keyboard", "A cat sleeps on a laptop.",
        "A grey cat lies on the keyboard of a laptop"],
}
RAW_PREDICTIONS = {
    1: "A man riding a wave on a surfboard.",
    2: "two dogs play with a frisbee",
    3: "A kitchen with a stove and a sink.",
    4: "a pizza on a plate",
    5: "A street sign on a pole.",
    6: "a cat laying on a laptop keyboard",
}
# Already clean, lower-case, space separated: PTB tokenisation leaves these as they are.
CLEAN_REFERENCES = {
    10: ["a big red circle left of a small blue square", "a red circle and a blue square"],
    11: ["a small green triangle above a big yellow circle", "there is a green triangle"],
    12: ["a purple square", "a big purple square on a white background"],
    13: ["a blue circle right of a red triangle", "a blue circle and a red triangle"],
}
CLEAN_PREDICTIONS = {
    10: "a big red circle left of a blue square",
    11: "a green triangle above a yellow circle",
    12: "a big purple square",
    13: "a red triangle left of a blue circle",
}


def _cocoevalcap_style(predictions, references, meteor=None):
    """What COCOEvalCap.evaluate does, written with pycocoevalcap's own pieces."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    out, per_image = {}, {}
    bleu, bleu_scores = Bleu(4).compute_score(gts, res)
    for n in range(4):
        out[f"Bleu_{n + 1}"] = bleu[n]
    if meteor is not None:
        out["METEOR"], _ = meteor.compute_score(gts, res)
    out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], cider_scores = Cider().compute_score(gts, res)
    for i, k in enumerate(gts):
        per_image[k] = {"Bleu_4": bleu_scores[3][i], "CIDEr": cider_scores[i]}
    return out, per_image


def _no_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no `java` anywhere
    assert shutil.which("java") is None


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING]


@needs_java
def test_java_path_equals_cocoevalcap_pipeline_without_meteor():
    expected, expected_per_image = _cocoevalcap_style(RAW_PREDICTIONS, RAW_REFERENCES)
    result = score_captions(RAW_PREDICTIONS, RAW_REFERENCES, meteor=False)
    assert result.tokenizer == "ptb"
    assert result.skipped == []
    assert set(result.metrics) == set(expected)
    for key, value in expected.items():
        assert result.metrics[key] == value, key  # the same computation: exact equality
    for k, scores in expected_per_image.items():
        assert result.per_image[k]["Bleu_4"] == scores["Bleu_4"]
        assert result.per_image[k]["CIDEr"] == scores["CIDEr"]
    assert 0 < result.metrics["CIDEr"] < 10 and 0 < result.metrics["Bleu_1"] <= 1


@needs_java
@pytest.mark.slow  # METEOR's JVM loads a paraphrase table for ~10 s
def test_full_pipeline_with_meteor_equals_cocoevalcap_and_closes_java(monkeypatch):
    from pycocoevalcap.meteor import meteor as meteor_module

    started = []

    class RecordingMeteor(meteor_module.Meteor):
        def __init__(self):
            super().__init__()
            started.append(self)

    monkeypatch.setattr(meteor_module, "Meteor", RecordingMeteor)
    result = score_captions(RAW_PREDICTIONS, RAW_REFERENCES)
    monkeypatch.undo()
    reference_meteor = meteor_module.Meteor()
    try:
        expected, _ = _cocoevalcap_style(RAW_PREDICTIONS, RAW_REFERENCES, reference_meteor)
    finally:
        coco_eval._close_meteor(reference_meteor)
    assert result.metrics == expected  # Bleu_1..4, METEOR, ROUGE_L, CIDEr, all exact
    assert list(result.metrics) == [k for k in METRIC_KEYS if k != "SPICE"]
    assert list(result.per_image[1]) == ["Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert len(started) == 1
    proc = started[0].meteor_p
    assert proc.poll() is not None, "METEOR's Java process must be stopped"
    assert proc.stdin.closed and proc.stdout.closed and proc.stderr.closed


def test_java_less_path_without_java_on_path(monkeypatch, tmp_path, caplog):
    _no_java(monkeypatch, tmp_path)
    with caplog.at_level(logging.WARNING, logger="captioner.metrics.coco_eval"):
        result = score_captions(CLEAN_PREDICTIONS, CLEAN_REFERENCES, spice=True)
    assert result.tokenizer == "python"
    assert result.skipped == ["METEOR", "SPICE"]
    assert "Java" in result.skip_reasons["METEOR"] and "Java" in result.skip_reasons["SPICE"]
    assert set(result.metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    messages = [r.getMessage() for r in _warnings(caplog)]
    assert len(messages) == 3  # one line each: tokenizer, METEOR, SPICE
    assert sum("PTBTokenizer" in m for m in messages) == 1
    assert sum(m.startswith("METEOR skipped") for m in messages) == 1
    assert sum(m.startswith("SPICE skipped") for m in messages) == 1
    assert all("\n" not in m for m in messages)
    # Clean input needs no tokenising, so the scorers on the raw strings are the reference.
    gts = {k: list(v) for k, v in CLEAN_REFERENCES.items()}
    res = {k: [CLEAN_PREDICTIONS[k]] for k in CLEAN_REFERENCES}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [result.metrics[f"Bleu_{n}"] for n in range(1, 5)] == bleu
    assert result.metrics["CIDEr"] == Cider().compute_score(gts, res)[0]
    assert result.metrics["ROUGE_L"] == Rouge().compute_score(gts, res)[0]
    with pytest.raises(RuntimeError, match="java=True"):
        score_captions(CLEAN_PREDICTIONS, CLEAN_REFERENCES, java=True)


@needs_java
def test_java_less_path_equals_java_path_on_clean_input(caplog):
    with_java = score_captions(CLEAN_PREDICTIONS, CLEAN_REFERENCES, meteor=False)
    with caplog.at_level(logging.WARNING):
        without = score_captions(CLEAN_PREDICTIONS, CLEAN_REFERENCES, java=False)
    assert (with_java.tokenizer, without.tokenizer) == ("ptb", "python")
    assert "Java disabled" in without.skip_reasons["METEOR"]
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert without.metrics[key] == with_java.metrics[key], key
    assert without.per_image == with_java.per_image


# Caption-like text with the punctuation real references carry.
PTB_CASES = [
    *(c for refs in RAW_REFERENCES.values() for c in refs), *RAW_PREDICTIONS.values(),
    "It's a sunny day at the beach; kids play.", "The dogs' owners can't find them",
    "A man in his 20's skiing down a hill", "What is this? A cake with 1,000 candles!",
    "A black and white photo of a train--an old one.", "A large jet flying through a blue sky...",
    "A clock tower over a city at 3:30pm.", "Mr. Smith and Dr. Jones at the U.S. Open",
    "A sign that says 'STOP' on a pole [red]", "A 10-year-old boy doesn't like his broccoli.",
    "A MAN SURFING ON A WAVE .", "a vase with flowers in it.  ", "Someone's mouse & keyboard.",
    "A bus at a stop: route 42 (downtown) is 50% full, costs $5", "Cannot WON'T gonna",
    "A big red circle left of a small blue square.",
]


def test_python_tokenizer_examples():
    assert python_tokenize_caption("A man's dog isn't (very) big, is it?") == \
        "a man 's dog is n't -lrb- very -rrb- big is it"
    assert python_tokenize_caption("Mr. Smith, at the U.S. Open...") == "mr. smith at the u.s. open"
    assert python_tokenize_caption("a black-and-white cat -- 3.5 kg") == "a black-and-white cat 3.5 kg"
    assert python_tokenize_caption("") == ""


@needs_java
def test_python_tokenizer_matches_ptbtokenizer():
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(PTB_CASES)})
    for i, caption in enumerate(PTB_CASES):
        assert python_tokenize_caption(caption) == ptb[i][0], caption


@needs_java
def test_spice_failure_degrades_to_one_message(monkeypatch, caplog, capsys):
    from urllib.error import URLError

    from pycocoevalcap.spice import spice as spice_module

    def offline():
        print("Downloading stanford-corenlp-3.6.0 for SPICE ...")
        raise URLError("Name or service not known")

    monkeypatch.setattr(spice_module, "get_stanford_models", offline)
    monkeypatch.setattr(coco_eval, "_spice_models_present", lambda: False)
    with caplog.at_level(logging.WARNING, logger="captioner.metrics.coco_eval"):
        result = score_captions(RAW_PREDICTIONS, RAW_REFERENCES, spice=True, meteor=False)
    assert "SPICE" not in result.metrics
    assert result.skipped == ["SPICE"]
    assert "could not be downloaded" in result.skip_reasons["SPICE"]
    assert "URLError" in result.skip_reasons["SPICE"]
    records = _warnings(caplog)
    assert len(records) == 1 and records[0].getMessage().startswith("SPICE skipped")
    assert records[0].exc_info is None  # a message, not a traceback
    assert "Downloading" not in capsys.readouterr().out  # pycocoevalcap's print is kept off stdout
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(result.metrics)


def test_id_mismatch_raises_with_counts_and_ids():
    refs = {i: ["a red circle"] for i in range(10)}
    preds = {i: "a red circle" for i in range(3, 12)}
    with pytest.raises(ValueError) as info:
        score_captions(preds, refs, java=False)
    message = str(info.value)
    assert "3 of 10 reference image ids have no prediction" in message
    assert "2 of 9 predicted image ids have no references" in message
    assert "0, 1, 2" in message and "10, 11" in message
    with pytest.raises(ValueError, match="only differ in type"):
        check_ids(["1", "2"], [1, 2])
    check_ids([2, 1], {1: None, 2: None})  # same ids, any order: fine
    with pytest.raises(ValueError, match="non-empty list"):
        validation_scores({1: "a"}, {1: []})


def test_validation_scores_needs_no_java(monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("validation_scores must not start a process")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    scores = validation_scores(RAW_PREDICTIONS, RAW_REFERENCES)
    assert set(scores) == {"CIDEr", "Bleu_4"}
    full = score_captions(RAW_PREDICTIONS, RAW_REFERENCES, java=False)
    assert scores == {"CIDEr": full.metrics["CIDEr"], "Bleu_4": full.metrics["Bleu_4"]}
    # Token lists are accepted wherever strings are.
    as_tokens = {k: v.split() for k, v in CLEAN_PREDICTIONS.items()}
    assert validation_scores(as_tokens, CLEAN_REFERENCES) == \
        validation_scores(CLEAN_PREDICTIONS, CLEAN_REFERENCES)
    # An untrained model's empty captions score zero rather than failing.
    empty = validation_scores(dict.fromkeys(CLEAN_REFERENCES, ""), CLEAN_REFERENCES)
    assert empty == {"CIDEr": 0.0, "Bleu_4": 0.0}


def test_nltk_corpus_bleu4_matches_nltk():
    refs = [[r.lower().split() for r in CLEAN_REFERENCES[k]] for k in CLEAN_REFERENCES]
    hyps = [CLEAN_PREDICTIONS[k].lower().split() for k in CLEAN_REFERENCES]
    assert nltk_corpus_bleu4(CLEAN_PREDICTIONS, CLEAN_REFERENCES) == corpus_bleu(refs, hyps)
    # Exactly 1 for a perfect corpus of captions of 4+ words (nltk counts a phantom 4-gram
    # miss for shorter ones, part of the tutorial's figure).
    long_refs = {k: v for k, v in CLEAN_REFERENCES.items() if len(v[0].split()) >= 4}
    perfect = {k: v[0] for k, v in long_refs.items()}
    assert nltk_corpus_bleu4(perfect, long_refs) == pytest.approx(1.0)
    result = score_captions(CLEAN_PREDICTIONS, CLEAN_REFERENCES, java=False)
    assert result.nltk_corpus_bleu4 == corpus_bleu(refs, hyps)
    assert result.to_dict()["nltk_corpus_bleu4"] == result.nltk_corpus_bleu4


def test_result_ranking_and_json():
    result = score_captions(CLEAN_PREDICTIONS, CLEAN_REFERENCES, java=False)
    ranked = result.ranked("CIDEr")
    assert [k for k, _ in ranked][0] == max(CLEAN_REFERENCES, key=lambda k: result.per_image[k]["CIDEr"])
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)
    assert len(result.ranked("Bleu_4")) == len(CLEAN_REFERENCES)
    with pytest.raises(KeyError):
        result.ranked("METEOR")
    data = json.loads(json.dumps(result.to_dict()))
    assert data["tokenizer"] == "python" and data["skipped"] == ["METEOR"]
    assert set(data["per_image"]) == {str(k) for k in CLEAN_REFERENCES}


def test_format_table_scales_by_100_in_paper_order():
    metrics = {"CIDEr": 0.9123, "Bleu_1": 0.7, "Bleu_4": 0.25, "ROUGE_L": 0.5, "extra": 3.0}
    table = format_table(metrics)
    header, rule, values = table.splitlines()
    assert header.split("|")[1:-1] == [" BLEU-1 ", " BLEU-4 ", " ROUGE-L ", " CIDEr "]
    assert [v.strip() for v in values.split("|")[1:-1]] == ["70.0", "25.0", "50.0", "91.2"]
    assert set(rule) == {"|", "-"}
    result = EvalResult(metrics={"Bleu_4": 0.3}, per_image={}, tokenizer="python",
                        nltk_corpus_bleu4=0.28)
    assert "BLEU-4 (nltk)" in format_table(result) and "28.0" in format_table(result)
    assert format_table({}) == "(no metrics)"


def test_exact_match_compares_words_with_tokenised_references():
    """One rule for validation (decoded words joined by spaces) and evaluate (any results file):
    a caption counts when its words equal one of the image's tokenised references."""
    refs = {1: [["a", "red", "circle"], ["a", "circle"]], 2: [["two", "blue", "squares"]],
            3: [["a", "mans", "hat"]]}
    # case and punctuation are not words; a prefix or a reordering is no match
    assert exact_match({1: "A red circle.", 2: "two blue", 3: "A man's hat"}, refs) == 2 / 3
    assert exact_match({1: "a circle", 2: "squares blue two"}, refs) == 1 / 2
    # the validation loop's form: references as space-joined tokens, split back into words
    joined = {1: ["a red circle", "a circle"]}
    assert exact_match({1: "a circle"}, {i: [r.split() for r in rs] for i, rs in joined.items()}) == 1.0
    assert math.isnan(exact_match({}, refs))
