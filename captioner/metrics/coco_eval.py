"""Caption metrics through pycocoevalcap, the scorers behind the COCO leaderboard.

The pipeline is the one of ``pycocoevalcap.eval.COCOEvalCap``: Stanford PTBTokenizer (Java) on the
references and the predictions, then BLEU-1..4, METEOR 1.5 (Java), ROUGE-L, CIDEr (the CIDEr-D
variant: clipped counts, Gaussian length penalty) and, on request, SPICE (Java plus CoreNLP models
that pycocoevalcap downloads on first use). Scores are on pycocoevalcap's 0–1 scale (CIDEr ×10
internally); :func:`format_table` prints them ×100 as papers do.

Without Java the Java parts are skipped with one warning each, and a pure-Python tokenizer that
reproduces PTBTokenizer's output on ordinary captions stands in for it, so BLEU, ROUGE-L and CIDEr
are still the reference implementations. :func:`validation_scores` always takes that path: it is
what the training loop calls every epoch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import time
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from captioner.metrics.tables import markdown_table, percent

logger = logging.getLogger(__name__)

ImageId = Hashable
# A caption is a string or a list of word tokens (joined with spaces).
Caption = str | Sequence[str]

METRIC_KEYS: tuple[str, ...] = (
    "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE",
)
NLTK_BLEU_KEY = "nltk_corpus_bleu4"
# Column titles of format_table, in paper order.
_TABLE_TITLES: dict[str, str] = {
    "Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
    "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "SPICE": "SPICE",
    NLTK_BLEU_KEY: "BLEU-4 (nltk)",
}


# ---------------------------------------------------------------------------------------------
# ids
# ---------------------------------------------------------------------------------------------
def _preview(ids: Iterable[ImageId], limit: int = 5) -> str:
    try:
        ids = sorted(ids)
    except TypeError:  # mixed id types
        ids = sorted(ids, key=lambda i: (type(i).__name__, str(i)))
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def check_ids(pred_ids: Iterable[ImageId], ref_ids: Iterable[ImageId]) -> None:
    """Raise ``ValueError`` unless predictions and references cover exactly the same image ids.

    The message gives both counts and a few ids of each kind, and says when the ids only differ
    in type (``"42"`` against ``42``, the usual JSON round-trip mistake).
    """
    pred, ref = set(pred_ids), set(ref_ids)
    if pred == ref:
        return
    missing, extra = ref - pred, pred - ref
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {len(ref)} reference image ids have no prediction "
                     f"(e.g. {_preview(missing)})")
    if extra:
        parts.append(f"{len(extra)} of {len(pred)} predicted image ids have no references "
                     f"(e.g. {_preview(extra)})")
    message = "predictions and references cover different images: " + "; ".join(parts)
    if {str(i) for i in pred} == {str(i) for i in ref}:
        message += " — the ids only differ in type (str vs int); convert one side"
    raise ValueError(message)


def _as_text(caption: Caption) -> str:
    return caption if isinstance(caption, str) else " ".join(caption)


def _validate(
    predictions: Mapping[ImageId, Caption], references: Mapping[ImageId, Sequence[Caption]]
) -> list[ImageId]:
    """Check the inputs; return the image ids in the references' order (COCOEvalCap's order)."""
    check_ids(predictions.keys(), references.keys())
    if not references:
        raise ValueError("nothing to score: predictions and references are empty")
    for image_id, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {image_id!r}: references must be a non-empty list of "
                             f"captions, got {refs!r}")
    return list(references.keys())


# ---------------------------------------------------------------------------------------------
# tokenisation
# ---------------------------------------------------------------------------------------------
_PTB_PUNCTUATIONS = frozenset(PUNCTUATIONS)
# PTBTokenizer turns brackets into -LRB- etc.; with -lowerCase they become "-lrb-", which is not
# in pycocoevalcap's PUNCTUATIONS list, so the COCO pipeline keeps them as words. So do we.
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ",
             "{": " -lcb- ", "}": " -rcb- "}
_BRACKET_RE = re.compile(r"[()\[\]{}]")
# Words PTBTokenizer splits in two.
_SPLIT_WORDS_RE = re.compile(r"\b(can)(not)\b|\b(gon|wan|got)(na|ta)\b")
_NEG_CLITIC_RE = re.compile(r"(\w)(n't)\b")
_CLITIC_RE = re.compile(r"(\w)('(?:s|re|ve|ll|d|m))\b")
# Abbreviations PTBTokenizer keeps with their period.
_ABBREVIATIONS = (
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "mt", "ave", "blvd", "co", "inc", "ltd",
    "corp", "dept", "prof", "ft", "rd", "gen", "gov", "sen", "rep", "lt", "sgt", "capt", "col",
    "jan", "feb", "aug", "sept", "oct", "nov", "dec", "mon", "tue", "fri", "bros", "est", "sq",
    "tel", "univ",
)
_TIME_RE = re.compile(r"(\d:\d\d)([ap]m)\b")  # 3:30pm -> 3:30 pm (but 5pm stays)
_PTB_TOKEN_RE = re.compile(
    r"-[lr][rsc]b-"                                       # brackets mapped above
    r"|(?:[a-z]\.){2,}"                                   # u.s.  p.m.
    rf"|\b(?:{'|'.join(_ABBREVIATIONS)})\."              # dr.  st.  (PTB keeps the period)
    r"|\bno\.(?=\s*\d)"                                  # no. 5
    r"|\d+(?:,\d{3})+(?:\.\d+)?"                          # 1,000  12,500.5
    r"|n't|'(?:s|re|ve|ll|d|m)\b"                         # clitics split off above
    r"|\w+(?:[-/.&'’:]\w+)*"                              # black-and-white  man/woman  3.5  3:30
    r"|\.\.\.|--"
    r"|\S"                                                # any other symbol on its own
)


def python_tokenize_caption(text: str) -> str:
    """Tokenise one caption the way pycocoevalcap's PTBTokenizer does, without Java.

    Lower-cases, splits off punctuation and clitics (``dog's`` -> ``dog 's``, ``isn't`` ->
    ``is n't``), maps brackets to ``-lrb-`` style tokens and drops the tokens in pycocoevalcap's
    ``PUNCTUATIONS`` list. It agrees with the Java tokenizer on ordinary caption text (tested
    against it); exotic input (URLs, emoticons, unusual abbreviations) may differ by a token.
    """
    text = text.lower().replace("\n", " ").replace('"', " ")
    text = _BRACKET_RE.sub(lambda m: _BRACKETS[m.group(0)], text)
    text = _SPLIT_WORDS_RE.sub(lambda m: " ".join(g for g in m.groups() if g), text)
    text = _TIME_RE.sub(r"\1 \2", text)
    text = _NEG_CLITIC_RE.sub(r"\1 \2", text)
    text = _CLITIC_RE.sub(r"\1 \2", text)
    tokens = _PTB_TOKEN_RE.findall(text)
    return " ".join(t for t in tokens if t not in _PTB_PUNCTUATIONS)


def _python_tokenize(captions: Mapping[ImageId, Sequence[str]]) -> dict[ImageId, list[str]]:
    return {k: [python_tokenize_caption(c) for c in caps] for k, caps in captions.items()}


def _ptb_tokenize(captions: Mapping[ImageId, Sequence[str]]) -> dict[ImageId, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Same input format as COCOEvalCap, one Java call per side as it does.
    out = PTBTokenizer().tokenize(
        {k: [{"caption": c} for c in caps] for k, caps in captions.items()}
    )
    # pycocoevalcap zips Java's output lines with the ids, so a failed run silently drops images.
    if out.keys() != captions.keys() or any(len(out[k]) != len(v) for k, v in captions.items()):
        raise RuntimeError("Stanford PTBTokenizer (Java) returned incomplete output; check that "
                           "`java -version` works, or pass java=False")
    return out


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Corpus scores, per-image scores and how they were obtained.

    ``metrics`` holds the COCOEvalCap keys that were computed (``Bleu_1..Bleu_4, METEOR, ROUGE_L,
    CIDEr, SPICE``, 0–1 scale). ``per_image`` maps each image id to its ``Bleu_4``, ``CIDEr``,
    ``ROUGE_L`` (and ``METEOR``/``SPICE`` when computed) for best/worst selection.
    ``skipped`` lists metrics that were asked for (or are part of the default set) but not
    computed, with ``skip_reasons[metric]`` saying why.
    """

    metrics: dict[str, float]
    per_image: dict[ImageId, dict[str, float]]
    tokenizer: str  # "ptb" (Stanford, Java) or "python"
    skipped: list[str] = field(default_factory=list)
    skip_reasons: dict[str, str] = field(default_factory=dict)
    nltk_corpus_bleu4: float | None = None  # the popular tutorial's BLEU-4, for comparison only
    num_images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (image ids become strings as JSON keys must be)."""
        return {
            "metrics": dict(self.metrics),
            NLTK_BLEU_KEY: self.nltk_corpus_bleu4,
            "tokenizer": self.tokenizer,
            "skipped": list(self.skipped),
            "skip_reasons": dict(self.skip_reasons),
            "num_images": self.num_images,
            "seconds": round(self.seconds, 3),
            "per_image": {str(k): v for k, v in self.per_image.items()},
        }

    def table_metrics(self) -> dict[str, float]:
        """``metrics`` plus the nltk BLEU-4, the input :func:`format_table` expects."""
        out = dict(self.metrics)
        if self.nltk_corpus_bleu4 is not None:
            out[NLTK_BLEU_KEY] = self.nltk_corpus_bleu4
        return out

    def ranked(self, metric: str = "CIDEr") -> list[tuple[ImageId, float]]:
        """``(image_id, score)`` pairs, best first (ties keep the input order)."""
        if not self.per_image or metric not in next(iter(self.per_image.values())):
            raise KeyError(f"no per-image {metric!r} scores in this result")
        return sorted(((k, v[metric]) for k, v in self.per_image.items()), key=lambda kv: -kv[1])


# ---------------------------------------------------------------------------------------------
# scorers
# ---------------------------------------------------------------------------------------------
def _close_meteor(meteor: Any) -> None:
    """Stop pycocoevalcap's METEOR subprocess and close its pipes (its ``__del__`` leaves
    stdout/stderr open and only runs whenever the object happens to be collected)."""
    with meteor.lock:
        proc = meteor.meteor_p
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _spice_models_present() -> bool:
    from pycocoevalcap.spice import get_stanford_models as gsm

    return Path(gsm.SPICEDIR, gsm.SPICELIB, f"{gsm.JAR}.jar").exists()


def _run_spice(
    gts: dict[ImageId, list[str]], res: dict[ImageId, list[str]]
) -> tuple[float, list[dict]]:
    from pycocoevalcap.spice.spice import Spice

    if not _spice_models_present():
        logger.info("SPICE: Stanford CoreNLP 3.6.0 models are missing; pycocoevalcap will try "
                    "to download them (~400 MB) into its spice/lib folder")
    # pycocoevalcap prints its download progress; keep stdout clean and log it instead.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        try:
            score, scores = Spice().compute_score(gts, res)
        finally:
            if captured.getvalue().strip():
                logger.debug("pycocoevalcap SPICE output: %s", captured.getvalue().strip())
    return float(score), scores


def _bleu(gts: dict, res: dict) -> tuple[list[float], list[list[float]]]:
    score, scores = Bleu(4).compute_score(gts, res, verbose=0)
    return [float(s) for s in score], scores


def _skip(result: EvalResult, metric: str, reason: str) -> None:
    logger.warning("%s skipped: %s", metric, reason)
    result.skipped.append(metric)
    result.skip_reasons[metric] = reason


def score_captions(
    predictions: Mapping[ImageId, Caption],
    references: Mapping[ImageId, Sequence[Caption]],
    spice: bool = False,
    java: bool | None = None,
    meteor: bool = True,
) -> EvalResult:
    """Score one caption per image against its references, as COCOEvalCap does.

    ``java=None`` uses Java when ``java`` is on ``PATH``; ``java=False`` forces the Java-less
    path (Python tokenizer, no METEOR/SPICE); ``java=True`` fails if there is no Java.
    ``meteor=False`` skips METEOR deliberately (its JVM takes ~10 s to load the paraphrase table).
    Raises ``ValueError`` when the two sides cover different image ids.
    """
    start = time.perf_counter()
    ids = _validate(predictions, references)
    java_found = shutil.which("java") is not None
    if java and not java_found:
        raise RuntimeError("java=True but no `java` executable is on PATH")
    use_java = java_found if java is None else java
    no_java_reason = ("Java is not on PATH" if not java_found
                      else "Java disabled (java=False)")

    result = EvalResult(metrics={}, per_image={k: {} for k in ids},
                        tokenizer="ptb" if use_java else "python", num_images=len(ids))
    refs_text = {k: [_as_text(c) for c in references[k]] for k in ids}
    preds_text = {k: [_as_text(predictions[k])] for k in ids}

    meteor_scorer = None
    if meteor and use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        # Start METEOR's JVM first: it loads its paraphrase table while we tokenise and score.
        meteor_scorer = Meteor()
    try:
        if use_java:
            gts, res = _ptb_tokenize(refs_text), _ptb_tokenize(preds_text)
        else:
            logger.warning("PTBTokenizer skipped: %s; tokenising with the pure-Python "
                           "PTB-style tokenizer instead", no_java_reason)
            gts, res = _python_tokenize(refs_text), _python_tokenize(preds_text)
            if meteor:
                _skip(result, "METEOR", f"{no_java_reason} (METEOR 1.5 runs in Java)")
            if spice:
                _skip(result, "SPICE", f"{no_java_reason} (SPICE runs in Java)")

        bleu, bleu_per_image = _bleu(gts, res)
        for n in range(4):
            result.metrics[f"Bleu_{n + 1}"] = bleu[n]
        rouge, rouge_per_image = Rouge().compute_score(gts, res)
        result.metrics["ROUGE_L"] = float(rouge)
        cider, cider_per_image = Cider().compute_score(gts, res)
        result.metrics["CIDEr"] = float(cider)
        for i, k in enumerate(ids):
            result.per_image[k].update(Bleu_4=float(bleu_per_image[3][i]),
                                       ROUGE_L=float(rouge_per_image[i]),
                                       CIDEr=float(cider_per_image[i]))
        if meteor_scorer is not None:  # last: its JVM has had the most time to start
            try:
                score, scores = meteor_scorer.compute_score(gts, res)
                result.metrics["METEOR"] = float(score)
                for k, s in zip(ids, scores):
                    result.per_image[k]["METEOR"] = float(s)
            except (OSError, ValueError) as exc:  # JVM died (e.g. could not reserve -Xmx2G)
                _skip(result, "METEOR", f"the METEOR Java process failed ({exc!r})")
    finally:
        if meteor_scorer is not None:
            _close_meteor(meteor_scorer)

    if spice and use_java:
        try:
            score, scores = _run_spice(gts, res)
            result.metrics["SPICE"] = score
            for k, s in zip(sorted(ids), scores):  # pycocoevalcap's Spice sorts the ids
                result.per_image[k]["SPICE"] = s["All"]["f"]
        except Exception as exc:  # any SPICE failure (download, JVM, parsing) -> a message
            reason = (f"{type(exc).__name__}: {exc}" if _spice_models_present() else
                      "the Stanford CoreNLP models it needs are missing and could not be "
                      f"downloaded ({type(exc).__name__}: {exc})")
            _skip(result, "SPICE", reason)

    # COCOEvalCap's key order, for tables and JSON.
    result.metrics = {m: result.metrics[m] for m in METRIC_KEYS if m in result.metrics}
    result.per_image = {k: {m: v[m] for m in METRIC_KEYS if m in v}
                        for k, v in result.per_image.items()}
    result.nltk_corpus_bleu4 = nltk_corpus_bleu4(
        {k: res[k][0] for k in ids}, {k: gts[k] for k in ids}
    )
    result.seconds = time.perf_counter() - start
    logger.info("scored %d images in %.1f s (tokenizer=%s)", len(ids), result.seconds,
                result.tokenizer)
    return result


def validation_scores(
    predictions: Mapping[ImageId, Caption], references: Mapping[ImageId, Sequence[Caption]]
) -> dict[str, float]:
    """CIDEr(-D) and BLEU-4 for the per-epoch validation: pycocoevalcap's scorers on the
    Python tokenizer's output, so no Java process is started."""
    ids = _validate(predictions, references)
    gts = _python_tokenize({k: [_as_text(c) for c in references[k]] for k in ids})
    res = _python_tokenize({k: [_as_text(predictions[k])] for k in ids})
    bleu, _ = _bleu(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"CIDEr": float(cider), "Bleu_4": bleu[3]}


def nltk_corpus_bleu4(
    predictions: Mapping[ImageId, Caption], references: Mapping[ImageId, Sequence[Caption]]
) -> float:
    """``nltk.translate.bleu_score.corpus_bleu`` with its default weights on lower-cased
    whitespace tokens: the BLEU-4 the popular PyTorch tutorial reports. Its brevity penalty and
    lack of smoothing differ from pycocoevalcap's, so the two numbers are not interchangeable."""
    from nltk.translate.bleu_score import corpus_bleu

    ids = _validate(predictions, references)
    hyps = [_as_text(predictions[k]).lower().split() for k in ids]
    refs = [[_as_text(r).lower().split() for r in references[k]] for k in ids]
    with warnings.catch_warnings():
        # nltk warns when a higher-order n-gram never matches; the score is then 0, as reported.
        warnings.filterwarnings("ignore", message=r"\nThe hypothesis contains 0 counts", category=UserWarning,
                                module=r"nltk\.translate\.bleu_score")
        return float(corpus_bleu(refs, hyps))


# ---------------------------------------------------------------------------------------------
# presentation
# ---------------------------------------------------------------------------------------------
def format_table(metrics: Mapping[str, float] | EvalResult) -> str:
    """A two-row table of the scores ×100 (papers' convention), columns in paper order.

    Accepts ``EvalResult`` (its nltk BLEU-4 is added as a last, labelled column) or a metrics
    dict; unknown keys are ignored and missing metrics left out.
    """
    if isinstance(metrics, EvalResult):
        metrics = metrics.table_metrics()
    keys = [k for k in (*METRIC_KEYS, NLTK_BLEU_KEY)
            if k in metrics and metrics[k] is not None]
    if not keys:
        return "(no metrics)"
    return markdown_table([_TABLE_TITLES[k] for k in keys], [[percent(metrics[k]) for k in keys]])


__all__: list[str] = [
    "EvalResult", "check_ids", "format_table", "nltk_corpus_bleu4", "python_tokenize_caption",
    "score_captions", "validation_scores", "METRIC_KEYS",
]
