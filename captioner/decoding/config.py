"""Decoding settings and the one place that turns them into a strategy call."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from torch import Tensor

from captioner.decoding.beam import beam_search
from captioner.decoding.common import Generated
from captioner.decoding.greedy import greedy
from captioner.models.decoder import AttentionDecoder
from captioner.settings import NonNegativeFloat, PositiveInt, check_fields


@dataclass
class DecodingConfig:
    """Free-running decoding: validation during training, and the checkpoint's default."""

    beam_size: PositiveInt = 1
    max_length: PositiveInt | None = None  # most tokens per caption; None: the tokenizer's (simple 20, others 50)
    length_penalty: NonNegativeFloat = 0.0  # beam: scores divided by words ** length_penalty
    suppress_unk: bool = False
    cuda_graph: bool | None = None  # beam search on a GPU: replay its steps as a CUDA graph (None: yes)

    def __post_init__(self) -> None:
        check_fields(self, "model.decoding")

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> DecodingConfig:
        """From a checkpoint's ``decoding`` hyperparameters (unknown keys ignored); ``None``
        overrides keep the stored value."""
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def generate(decoder: AttentionDecoder, features: Tensor, config: DecodingConfig,
             beam_size: int | None = None) -> Generated:
    """Greedy when the beam is 1 (beam search of width 1 gives the same caption; on the CPU slower).
    ``config.max_length`` must be resolved (the caller knows the tokenizer)."""
    assert config.max_length is not None, "decoding.max_length None: resolve it with the tokenizer's first"
    k = config.beam_size if beam_size is None else beam_size
    if k == 1:
        return greedy(decoder, features, config.max_length, config.suppress_unk, cuda_graph=config.cuda_graph)
    return beam_search(decoder, features, k, config.max_length, config.length_penalty, config.suppress_unk,
                       cuda_graph=config.cuda_graph)
