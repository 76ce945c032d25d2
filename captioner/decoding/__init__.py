"""Caption generation from region features: greedy, batched beam search, sampling."""

from captioner.decoding.beam import beam_search
from captioner.decoding.common import Generated
from captioner.decoding.config import DecodingConfig, generate
from captioner.decoding.greedy import greedy
from captioner.decoding.sample import sample

__all__ = ["DecodingConfig", "Generated", "beam_search", "generate", "greedy", "sample"]
