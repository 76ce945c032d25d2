"""Plain nn.Modules: encoders, attention, the LSTM decoder. No Lightning here."""

from captioner.models.attention import ATTENTIONS, create_attention, register_attention
from captioner.models.captioner import Captioner
from captioner.models.decoder import AttentionDecoder, DecoderConfig
from captioner.models.encoder import ENCODERS, EncoderConfig, create_encoder, register_encoder

__all__ = [
    "ATTENTIONS",
    "ENCODERS",
    "AttentionDecoder",
    "Captioner",
    "DecoderConfig",
    "EncoderConfig",
    "create_attention",
    "create_encoder",
    "register_attention",
    "register_encoder",
]
