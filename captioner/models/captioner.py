"""Encoder + decoder as one plain module."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from captioner.models.decoder import AttentionDecoder, DecoderConfig, DecoderOutput
from captioner.models.encoder import EncoderConfig, create_encoder


class Captioner(nn.Module):
    def __init__(
        self, encoder: EncoderConfig, decoder: DecoderConfig, vocab_size: int, words: Sequence[str] | None = None
    ) -> None:
        """``words``: the vocabulary, needed by ``decoder.grounded_words`` only."""
        super().__init__()
        self.encoder = create_encoder(encoder)
        self.decoder = AttentionDecoder(decoder, vocab_size, self.encoder.out_dim, words)

    @property
    def preprocessing(self):
        return self.encoder.preprocessing

    def encode(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """images (B, 3, S, S) -> features (B, N, D), grid (h, w)."""
        assert images.dim() == 4, f"images must be (B, 3, H, W), got {tuple(images.shape)}"
        return self.encoder(images)

    def forward(self, images: Tensor, captions: Tensor, lengths: Tensor) -> DecoderOutput:
        features, _ = self.encode(images)
        return self.decoder(features, captions, lengths)
