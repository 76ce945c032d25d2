"""Pinned outputs of a seeded tiny captioner (torchvision's expected-output tests): greedy and
beam (k=3) captions, scores and attention summaries, for each attention type, against
``tests/golden/decoding.json``.

A change to the encoder, the decoder or the decoding strategies that moves any of them fails
here. When the change is meant (a fixed bug, a new formula), regenerate the record on purpose
and review its diff with the change:

    CAPTIONER_GOLDEN_UPDATE=1 python -m pytest tests/test_golden.py

Floats are compared to 1e-4 (BLAS thread counts move the last digits), tokens exactly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from captioner.data.vocab import END_ID
from captioner.decoding import beam_search, greedy
from captioner.decoding.common import Generated
from captioner.models import Captioner, DecoderConfig, EncoderConfig

GOLDEN = Path(__file__).parent / "golden" / "decoding.json"
UPDATE = os.environ.get("CAPTIONER_GOLDEN_UPDATE") == "1"
ATOL = 1e-4
MAX_LENGTH = 8
BEAM = 3
# case -> DecoderConfig settings
CASES = {
    "soft": {"attention": "soft"},
    "hard": {"attention": "hard"},  # expectation at test time: the same maths as soft
    "hard_argmax": {"attention": "hard", "hard_test_mode": "argmax"},
    "multihead": {"attention": "multihead", "num_heads": 2},
}


def tiny_captioner(**decoder) -> Captioner:
    """16 px images, a 4 x 4 grid of 16-d features, 12 words; weights drawn by parameter name.

    The draws are larger than PyTorch's default initialisation (under which every image gets
    the same caption, one word repeated, and near-uniform attention): with them captions depend
    on the image, end at different lengths, beam search finds better captions than greedy
    decoding, and attention maps are peaked. Drawing by sorted name keeps the weights
    independent of the order in which modules are created."""
    model = Captioner(
        EncoderConfig(name="shapes_cnn", grid=4, channels=16, image_size=16),
        DecoderConfig(embed_dim=8, attention_dim=8, decoder_dim=12, dropout=0.0, **decoder),
        vocab_size=12,
    ).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _name, p in sorted(model.named_parameters()):
            std = 2 / math.sqrt(p[0].numel()) if p.dim() > 1 else 1.0  # (out, in, ...): fan-in
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_images() -> torch.Tensor:
    """(4, 3, 16, 16): noise around a different colour per image."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=g) + 2 * torch.randn(4, 3, 1, 1, generator=g)


def _floats(x: torch.Tensor) -> list[float]:
    return [round(v, 6) for v in x.tolist()]


def _caption(gen: Generated, i: int) -> dict:
    """Image ``i``'s tokens (words, then ``<end>`` if emitted), score, and per emitted token the
    attention map's sum, maximum and centroid (mean region index, row-major)."""
    steps = min(int(gen.lengths[i]) + 1, gen.tokens.size(1))  # the words and <end>
    alpha = gen.alphas[i, :steps].double()  # (T, N)
    regions = torch.arange(alpha.size(1), dtype=torch.float64)
    record = {
        "tokens": gen.tokens[i, :steps].tolist(),
        "score": round(float(gen.scores[i]), 6),
        "alpha_sum": _floats(alpha.sum(-1)),
        "alpha_max": _floats(alpha.max(-1).values),
        "alpha_centroid": _floats(alpha @ regions),
    }
    if gen.nbest is not None:
        record["nbest"] = [[tokens, round(score, 6)] for tokens, score in gen.nbest[i]]
    return record


def decode_case(case: str) -> dict:
    model = tiny_captioner(**CASES[case])
    with torch.no_grad():
        features, _ = model.encode(tiny_images())  # (B, N, D)
    out = {"greedy": greedy(model.decoder, features, MAX_LENGTH),
           f"beam{BEAM}": beam_search(model.decoder, features, BEAM, MAX_LENGTH)}
    return {name: [_caption(gen, i) for i in range(gen.tokens.size(0))] for name, gen in out.items()}


def _dump(obj, indent: int = 0) -> str:
    """JSON with one line per caption record field: short diffs when the record changes."""
    if isinstance(obj, dict) and not any(isinstance(v, list | dict) for v in obj.values()):
        return json.dumps(obj)
    pad = " " * (indent + 2)
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {_dump(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        return "[\n" + ",\n".join(pad + _dump(v, indent + 2) for v in obj) + "\n" + " " * indent + "]"
    return json.dumps(obj)


@pytest.fixture(scope="module")
def golden() -> dict:
    if UPDATE:
        record = {"about": "tests/test_golden.py; regenerate with CAPTIONER_GOLDEN_UPDATE=1",
                  **{case: decode_case(case) for case in CASES}}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(_dump(record) + "\n")
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing; write it with CAPTIONER_GOLDEN_UPDATE=1")
    return json.loads(GOLDEN.read_text())


def _assert_matches(actual, expected, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for k in expected:
            _assert_matches(actual[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual} != {expected}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_matches(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=ATOL), where
    else:  # token ids
        assert actual == expected, where


@pytest.mark.parametrize("case", CASES)
def test_decoding_matches_the_golden_record(golden: dict, case: str) -> None:
    _assert_matches(decode_case(case), golden[case], case)


def test_the_golden_record_is_informative(golden: dict) -> None:
    """Every case is recorded, and its captions are ones a regression could change: they
    depend on the image, greedy and beam search disagree somewhere, some end early."""
    assert golden.keys() - {"about"} == CASES.keys()
    for case in CASES:
        greedy_caps, beam_caps = golden[case]["greedy"], golden[case][f"beam{BEAM}"]
        tokens = [c["tokens"] for c in greedy_caps + beam_caps]
        assert all(t and t[0] != END_ID for t in tokens), case
        assert len({tuple(t) for t in tokens}) > 2, case
        assert any(END_ID in t for t in tokens), case
        assert any(g["tokens"] != b["tokens"] for g, b in zip(greedy_caps, beam_caps)), case
        assert any(max(c["alpha_max"]) > 0.2 for c in greedy_caps), case  # peaked, not uniform (1/16)
