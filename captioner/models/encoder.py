"""Image encoders: every one returns region features (B, N, D) and its grid (h, w).

Registered: ``resnet50``, ``resnet101``, ``resnet152``, ``vgg16``, ``vgg19`` (torchvision; features
before the last pooling, adaptive-pooled to ``grid`` x ``grid``) and ``shapes_cnn`` (a small CNN
trained from scratch, with a 2-D positional signal so that spatial words can be learned).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from captioner.data.transforms import Preprocessing
from captioner.registry import Registry

logger = logging.getLogger(__name__)

ENCODERS: Registry[Encoder] = Registry("encoder")
register_encoder = ENCODERS.register


@dataclass
class EncoderConfig:
    """Encoder settings.

    ``trainable_blocks``: how many of the last blocks are fine-tuned (0 = frozen, -1 = all);
    ignored by ``shapes_cnn``, which always trains. ``weights_path``: a local ``.pth`` state dict
    of the torchvision ImageNet weights, for machines that cannot download them.
    """

    name: str = "shapes_cnn"
    grid: int = 14
    pretrained: bool = False
    weights_path: str | None = None
    trainable_blocks: int = 0
    image_size: int | None = None  # None: the encoder's default
    channels: int = 128  # shapes_cnn width
    # shapes_cnn: "mix" feeds the position code through a 1x1 conv with the features; "append"
    # also appends it to every region feature as is, so each attention context carries the
    # attended position linearly (what spatial words are decided from).
    position: str = "mix"


class Encoder(nn.Module):
    """Images (B, 3, S, S) -> region features (B, N, D) and the grid (h, w).

    A registered encoder class also says, without being built, what preprocessing it expects
    (``default_preprocessing``) and whether it always trains (``always_trains``: its features
    cannot be cached)."""

    always_trains: ClassVar[bool] = False
    out_dim: int
    preprocessing: Preprocessing

    @classmethod
    def default_preprocessing(cls, config: EncoderConfig) -> Preprocessing:  # pragma: no cover
        raise NotImplementedError

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:  # pragma: no cover
        raise NotImplementedError


def create_encoder(config: EncoderConfig) -> Encoder:
    return ENCODERS.get(config.name)(config)


def encoder_preprocessing(config: EncoderConfig) -> Preprocessing:
    """The preprocessing an encoder expects, without building it (used to configure data).
    Raises ``ValueError`` for an unknown name."""
    return ENCODERS.get(config.name).default_preprocessing(config)


def encoder_trains(config: EncoderConfig) -> bool:
    """Whether the encoder's weights change in training (then its features cannot be cached)."""
    return ENCODERS.get(config.name).always_trains or config.trainable_blocks != 0


def _to_regions(fmap: Tensor) -> tuple[Tensor, tuple[int, int]]:
    b, d, h, w = fmap.shape
    return fmap.flatten(2).transpose(1, 2), (h, w)  # (B, N, D)


# -- torchvision backbones -----------------------------------------------------------------------
_TV = {
    "resnet50": ("resnet50", "ResNet50_Weights", 2048),
    "resnet101": ("resnet101", "ResNet101_Weights", 2048),
    "resnet152": ("resnet152", "ResNet152_Weights", 2048),
    "vgg16": ("vgg16", "VGG16_Weights", 512),
    "vgg19": ("vgg19", "VGG19_Weights", 512),
}


def _imagenet_norm(name: str, pretrained: bool) -> tuple[list[float], list[float]]:
    import torchvision

    weights = getattr(torchvision.models, _TV[name][1]).DEFAULT
    t = weights.transforms()
    return list(t.mean), list(t.std)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights that cannot be read or downloaded (the message says which setting)."""


def _load_weights(name: str, config: EncoderConfig) -> dict[str, Tensor]:
    import torchvision

    if config.weights_path:
        try:
            return torch.load(config.weights_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsUnavailable(f"could not load encoder weights from {config.weights_path}: {err}") from err
    weights = getattr(torchvision.models, _TV[name][1]).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:
        raise WeightsUnavailable(
            f"could not download the ImageNet weights for {name} ({weights.url}): {err}. "
            f"Download that file where you have internet and set `model.encoder.weights_path: /path/to/"
            f"{weights.url.rsplit('/', 1)[-1]}` (or set `model.encoder.pretrained: false`)."
        ) from err


class TorchvisionEncoder(Encoder):
    """A torchvision ImageNet backbone; one registered subclass per name (``tv_name``)."""

    tv_name: ClassVar[str]

    @classmethod
    def default_preprocessing(cls, config: EncoderConfig) -> Preprocessing:
        mean, std = _imagenet_norm(cls.tv_name, config.pretrained)
        return Preprocessing(config.image_size or 256, mean, std)

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        import torchvision

        tv_name = self.tv_name
        arch, _, out_dim = _TV[tv_name]
        net = getattr(torchvision.models, arch)(weights=None)
        if config.pretrained or config.weights_path:
            net.load_state_dict(_load_weights(tv_name, config))
        if arch.startswith("resnet"):
            stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
            blocks = [stem, net.layer1, net.layer2, net.layer3, net.layer4]
        else:  # VGG: split the conv stack at its max-pools; drop the last pool
            feats = list(net.features.children())[:-1]
            blocks, cur = [], []
            for m in feats:
                cur.append(m)
                if isinstance(m, nn.MaxPool2d):
                    blocks.append(nn.Sequential(*cur))
                    cur = []
            blocks.append(nn.Sequential(*cur))
        self.blocks = nn.ModuleList(blocks)
        # NHWC convolutions: faster on CPU (oneDNN; docs/performance.md) and what tensor cores want;
        # the pooled map then flattens to (B, N, D) without a copy.
        self.blocks.to(memory_format=torch.channels_last)
        self.pool = nn.AdaptiveAvgPool2d(config.grid)
        self.out_dim = out_dim
        self.preprocessing = encoder_preprocessing(config)
        k = len(blocks) if config.trainable_blocks < 0 else min(config.trainable_blocks, len(blocks))
        self.frozen = nn.ModuleList(blocks[: len(blocks) - k])
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> TorchvisionEncoder:
        super().train(mode)
        self.frozen.eval()  # frozen blocks keep their BatchNorm statistics
        return self

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = images.contiguous(memory_format=torch.channels_last)
        for block in self.blocks:
            x = block(x)
        return _to_regions(self.pool(x))


for _name in _TV:
    register_encoder(_name)(type(f"TorchvisionEncoder_{_name}", (TorchvisionEncoder,), {"tv_name": _name}))


# -- the small from-scratch CNN for `shapes` -------------------------------------------------------
def positional_grid(channels: int, h: int, w: int) -> Tensor:
    """Fixed 2-D sinusoidal position code (channels, h, w): half for rows, half for columns."""
    quarter = channels // 4
    freqs = torch.exp(torch.arange(quarter) * (-math.log(100.0) / max(quarter, 1)))  # (Q,)
    ys = torch.linspace(0, math.pi, h).unsqueeze(1) * freqs  # (h, Q)
    xs = torch.linspace(0, math.pi, w).unsqueeze(1) * freqs  # (w, Q)
    row = torch.cat([ys.sin(), ys.cos()], 1).T.unsqueeze(2).expand(-1, h, w)  # (2Q, h, w)
    col = torch.cat([xs.sin(), xs.cos()], 1).T.unsqueeze(1).expand(-1, h, w)  # (2Q, h, w)
    return torch.cat([row, col], 0)


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    # Stride 2 uses a 4x4 kernel with padding 1: its output o is centred on input 2o + 0.5, so
    # after k such layers grid cell o is centred on pixel 2^k o + (2^k - 1) / 2, the middle of its
    # own pixels (a 3x3 stride-2 stack centres it on 2^k o, half a cell up and left, and the
    # attention then peaks on the neighbouring cell). Stride 1 keeps the centre.
    kernel, padding = (4, 1) if stride == 2 else (3, dilation)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@register_encoder("shapes_cnn")
class ShapesCNN(Encoder):
    """Four conv layers, the first two to three strided so that the output is ``grid`` x ``grid``
    (image size / grid = 4 or 8), then a 1x1 conv over [features; 2-D position code].

    Every grid cell's receptive field is centred on the cell's own pixels, so an attention map
    upsampled onto the image sits where the features came from. Trained from scratch, always.
    """

    always_trains = True

    @classmethod
    def default_preprocessing(cls, config: EncoderConfig) -> Preprocessing:
        return Preprocessing(config.image_size or 64, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = config.channels
        self.preprocessing = encoder_preprocessing(config)
        self.grid = config.grid
        size = self.preprocessing.image_size
        # Strided from the first layer: shapes are flat colour, so full-resolution layers buy
        # little and cost most of the compute. Image/grid = 8: three stride-2 layers; 4 ("fine"):
        # two, and the last layer dilated so the receptive field stays ~35 px, enough for a big
        # shape. Other ratios: three, then adaptive pooling (cells no longer aligned).
        fine = size == 4 * self.grid
        self.body = nn.Sequential(_conv(3, c // 4, 2), _conv(c // 4, c // 2, 2),
                                  _conv(c // 2, c, 1 if fine else 2), _conv(c, c, dilation=2 if fine else 1))
        self.pos_channels = 32
        self.mix = nn.Sequential(nn.Conv2d(c + self.pos_channels, c, 1), nn.ReLU(inplace=True))
        if config.position not in ("mix", "append"):
            raise ValueError(f"encoder.position must be 'mix' or 'append', got {config.position!r}")
        self.append_position = config.position == "append"
        self.out_dim = c + self.pos_channels * self.append_position
        # The features are always pooled to grid x grid, so the code is fixed: made once, moved
        # with the module, not saved in checkpoints.
        self.register_buffer("pos", positional_grid(self.pos_channels, self.grid, self.grid), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.body(images)  # (B, C, S/8, S/8) or (B, C, S/4, S/4)
        if x.shape[-1] != self.grid or x.shape[-2] != self.grid:
            x = nn.functional.adaptive_avg_pool2d(x, self.grid)
        pos = self.pos.to(x.dtype).unsqueeze(0).expand(x.size(0), -1, -1, -1)  # (B, P, h, w)
        x = self.mix(torch.cat([x, pos], 1))
        if self.append_position:
            x = torch.cat([x, pos], 1)  # (B, C + P, h, w)
        return _to_regions(x)
