"""A fast CIDEr-D for rewards: the score of pycocoevalcap's ``CiderScorer``, caption by caption,
without Java and without re-cooking the references at every call.

pycocoevalcap computes the document frequencies from the references of the set it evaluates. Here
they come from a fixed corpus (for self-critical training: the training split's references),
computed once; given the same corpus, each caption's score equals ``CiderScorer``'s per-caption
score (``tests/test_cider.py``). The parts are the same: n-grams n = 1..4, tf-idf vectors with
idf = log(#documents) - log(max(1, df)), clipped counts ``min(hyp, ref) * ref``, cosine per n, a
Gaussian penalty (sigma 6) on the difference of the *bigram* counts (pycocoevalcap's ``length``
counts the n-grams of index 1), the mean over n and over the references, times 10.

Tokenisation is the caller's: a caption is a string split on spaces or a list of tokens.
pycocoevalcap's evaluation first runs the PTB tokenizer, which lower-cases and strips
punctuation; the rewards of self-critical training use the vocabulary's word tokens directly
(already lower-case, without punctuation), so both see the same words.

Speed: each image's reference n-grams become a tf-idf matrix (refs x n-grams of its references),
cached the first time the image is scored; all samples of an image are then scored at once
with array operations (``scores``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Caption = str | Sequence[str]
NGram = tuple[str, ...]


def _tokens(caption: Caption) -> Sequence[str]:
    return caption.split() if isinstance(caption, str) else caption


def ngram_counts(tokens: Sequence[str], n: int = 4) -> Counter[NGram]:
    """Counts of every k-gram, k = 1..n."""
    counts: Counter[NGram] = Counter()
    for k in range(1, n + 1):
        counts.update(tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1))
    return counts


@dataclass
class _References:
    """One image's references: a tf-idf matrix over the n-grams they contain."""

    index: dict[NGram, int]  # n-gram -> column
    order: np.ndarray  # (K,) n - 1 of each column
    tfidf: np.ndarray  # (R, K)
    norms: np.ndarray  # (R, n) L2 norm of each reference's vector per n
    lengths: np.ndarray  # (R,) bigram counts (pycocoevalcap's "length")


class CiderD:
    """CIDEr-D of candidate captions against ``references`` (image id -> its captions).

    ``document_frequency``/``documents``: from another corpus (``state_dict`` of an earlier
    scorer, e.g. from a checkpoint); by default they are computed from ``references``.
    """

    def __init__(
        self,
        references: Mapping[Hashable, Sequence[Caption]],
        document_frequency: Mapping[str, float] | None = None,
        documents: int | None = None,
        n: int = 4,
        sigma: float = 6.0,
    ) -> None:
        self.n, self.sigma = n, sigma
        self.references = {i: [list(_tokens(r)) for r in refs] for i, refs in references.items()}
        if document_frequency is None:
            df: Counter[NGram] = Counter()
            for refs in self.references.values():
                df.update({g for r in refs for g in ngram_counts(r, n)})
            self.df: dict[NGram, float] = {g: float(c) for g, c in df.items()}
            documents = len(self.references)
        else:
            if documents is None:
                raise ValueError("document_frequency needs the number of documents it counts")
            self.df = {tuple(g.split(" ")): float(c) for g, c in document_frequency.items()}
        if not documents:
            raise ValueError("CIDEr-D needs at least one image with references for its document frequencies")
        self.documents = documents
        self.log_documents = math.log(float(documents))  # pycocoevalcap's ref_len
        self._cache: dict[Hashable, _References] = {}

    def state_dict(self) -> dict:
        """Document frequencies as plain types (n-grams joined by spaces), for checkpoints."""
        return {"document_frequency": {" ".join(g): c for g, c in self.df.items()}, "documents": self.documents}

    def _idf(self, gram: NGram) -> float:
        return self.log_documents - math.log(max(1.0, self.df.get(gram, 0.0)))

    def _vector(self, counts: Counter[NGram]) -> tuple[dict[NGram, float], np.ndarray, int]:
        """tf-idf per n-gram, the norm per n and the bigram count."""
        vec = {g: c * self._idf(g) for g, c in counts.items()}
        norms = np.zeros(self.n)
        for g, v in vec.items():
            norms[len(g) - 1] += v * v
        length = sum(c for g, c in counts.items() if len(g) == 2)
        return vec, np.sqrt(norms), length

    def _refs(self, image_id: Hashable) -> _References:
        cached = self._cache.get(image_id)
        if cached is not None:
            return cached
        try:
            refs = self.references[image_id]
        except KeyError:
            raise KeyError(f"CIDEr-D: no references for image {image_id!r}") from None
        vectors = [self._vector(ngram_counts(r, self.n)) for r in refs]
        index: dict[NGram, int] = {}
        for vec, _, _ in vectors:
            for g in vec:
                index.setdefault(g, len(index))
        tfidf = np.zeros((len(refs), len(index)))
        for row, (vec, _, _) in enumerate(vectors):
            for g, v in vec.items():
                tfidf[row, index[g]] = v
        order = np.fromiter((len(g) - 1 for g in index), dtype=np.int64, count=len(index))
        entry = _References(index, order, tfidf, np.stack([v[1] for v in vectors]),
                            np.array([v[2] for v in vectors], dtype=np.float64))
        self._cache[image_id] = entry
        return entry

    def _score_image(self, refs: _References, candidates: Sequence[Sequence[str]]) -> np.ndarray:
        s, k = len(candidates), len(refs.index)
        hyp = np.zeros((s, k))  # (S, K) the candidates' tf-idf on the references' n-grams
        hyp_norms = np.zeros((s, self.n))
        hyp_lengths = np.zeros(s)
        for row, cand in enumerate(candidates):
            vec, hyp_norms[row], hyp_lengths[row] = self._vector(ngram_counts(cand, self.n))
            for g, v in vec.items():
                col = refs.index.get(g)
                if col is not None:
                    hyp[row, col] = v
        clipped = np.minimum(hyp[:, None, :], refs.tfidf[None]) * refs.tfidf[None]  # (S, R, K)
        onehot = np.zeros((k, self.n))
        onehot[np.arange(k), refs.order] = 1.0
        dots = clipped @ onehot  # (S, R, n)
        denom = hyp_norms[:, None, :] * refs.norms[None]  # (S, R, n)
        cos = np.where(denom != 0, dots / np.where(denom != 0, denom, 1.0), dots)
        delta = hyp_lengths[:, None] - refs.lengths[None]  # (S, R)
        penalty = np.exp(-(delta ** 2) / (2 * self.sigma ** 2))
        per_ref = cos * penalty[..., None]  # (S, R, n)
        return per_ref.sum(1).mean(-1) / len(refs.lengths) * 10.0  # (S,)

    def scores(self, candidates: Sequence[Caption], image_ids: Sequence[Hashable]) -> np.ndarray:
        """CIDEr-D of each candidate against its image's references: (C,) float64. The
        candidates of one image are scored together."""
        if len(candidates) != len(image_ids):
            raise ValueError(f"{len(candidates)} candidates but {len(image_ids)} image ids")
        groups: dict[Hashable, list[int]] = {}
        for i, image in enumerate(image_ids):
            groups.setdefault(image, []).append(i)
        out = np.zeros(len(candidates))
        for image, rows in groups.items():
            out[rows] = self._score_image(self._refs(image), [list(_tokens(candidates[r])) for r in rows])
        return out


def bleu4_per_caption(candidates: Sequence[Caption], references: Iterable[Sequence[Caption]]) -> np.ndarray:
    """pycocoevalcap's BLEU-4 of each candidate on its own (closest reference length)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for cand, refs in zip(candidates, references):
        scorer += (" ".join(_tokens(cand)), [" ".join(_tokens(r)) for r in refs])
    _, per_caption = scorer.compute_score(option="closest", verbose=0)
    return np.asarray(per_caption[3], dtype=np.float64)
