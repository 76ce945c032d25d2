"""Image encoders: every one returns region features (B, N, D) and its grid (h, w).

Registered: ``resnet50``, ``resnet101``, ``resnet152``, ``vgg16``, ``vgg19`` (torchvision; features
before the last pooling, adaptive-pooled to ``grid`` x ``grid``) and ``shapes_cnn`` (a small CNN
trained from scratch, with a 2-D positional signal so that spatial words can be learned).
Families, by name prefix: ``timm/<model>`` (any timm model; extra ``captioner[timm]``) and
``open_clip/<model>:<tag>`` (a CLIP image tower; extra ``captioner[clip]``). Any of them with
``stem: split``: shape features that do not depend on colour, and a colour path beside them.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

import torch
from torch import Tensor, nn

from captioner.data.transforms import Preprocessing
from captioner.registry import Registry
from captioner.settings import PositiveInt, Range, check_fields

logger = logging.getLogger(__name__)

ENCODERS: Registry[Encoder] = Registry("encoder")
register_encoder = ENCODERS.register


@dataclass
class EncoderConfig:
    """Encoder settings.

    ``trainable_blocks``: how many of the last blocks are fine-tuned (0 = frozen, -1 = all);
    ignored by ``shapes_cnn``, which always trains. ``weights_path``: a local ``.pth`` state dict
    of the torchvision ImageNet weights (or the timm / open_clip checkpoint file), for machines
    that cannot download them. ``stage``: which feature stage of a ``timm/`` model gives the
    regions (an index into its ``feature_info``; -1 = the last map).
    """

    name: Annotated[str, ENCODERS] = "shapes_cnn"
    grid: PositiveInt = 14
    pretrained: bool = False
    weights_path: str | None = None
    trainable_blocks: Annotated[int, Range(ge=-1)] = 0
    image_size: PositiveInt | None = None  # None: the encoder's default
    channels: PositiveInt = 128  # shapes_cnn width
    # shapes_cnn: "mix" feeds the position code through a 1x1 conv with the features; "append"
    # also appends it to every region feature as is, so each attention context carries the
    # attended position linearly (what spatial words are decided from).
    position: Literal["mix", "append"] = "mix"
    stage: int = -1
    # "rgb" convolves the colour image; "split" runs the first convolution on each colour channel
    # alone with shared filters and keeps the strongest response (so the features do not depend
    # on an object's colour), and appends the colour from a per-pixel path max-pooled to the grid
    # (docs/training.md, model.encoder.stem). Every encoder.
    stem: Literal["rgb", "split"] = "rgb"
    # Convolutions in NHWC memory order (weights and input): oneDNN's fast layout on CPU, and what
    # tensor cores want. The same features up to float rounding (docs/training.md). Every encoder.
    channels_last: bool = False

    def __post_init__(self) -> None:
        check_fields(self, "model.encoder")


class Encoder(nn.Module):
    """Images (B, 3, S, S) -> region features (B, N, D) and the grid (h, w).

    A registered encoder class also says, without being built, what preprocessing it expects
    (``default_preprocessing``) and whether it always trains (``always_trains``: its features
    cannot be cached)."""

    always_trains: ClassVar[bool] = False
    # The EncoderConfig.stem values it builds itself; create_encoder applies the others (STEMS).
    stems: ClassVar[tuple[str, ...]] = ("rgb",)
    # The EncoderConfig fields that shape its features beyond its weights and preprocessing (what
    # a feature cache records and is compared on: encoder_fingerprint).
    feature_settings: ClassVar[tuple[str, ...]] = ("grid", "stem")
    out_dim: int
    preprocessing: Preprocessing

    @classmethod
    def default_preprocessing(cls, config: EncoderConfig) -> Preprocessing:  # pragma: no cover
        raise NotImplementedError

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:  # pragma: no cover
        raise NotImplementedError


def create_encoder(config: EncoderConfig) -> Encoder:
    cls = ENCODERS.get(config.name)
    encoder = cls(config)
    if config.stem not in getattr(cls, "stems", Encoder.stems):
        encoder = STEMS[config.stem](encoder, config.name)
    if config.channels_last:
        encoder.to(memory_format=torch.channels_last)  # the 4-D weights
        encoder.register_forward_pre_hook(_channels_last_input)
    return encoder


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    images, *rest = args  # (B, 3, S, S), stored NHWC from here on
    return (images.contiguous(memory_format=torch.channels_last), *rest)


def encoder_preprocessing(config: EncoderConfig) -> Preprocessing:
    """The preprocessing an encoder expects, without building it (used to configure data).
    Raises ``ValueError`` for an unknown name."""
    return ENCODERS.get(config.name).default_preprocessing(config)


def encoder_fingerprint(config: EncoderConfig, encoder: nn.Module) -> dict:
    """What decides ``encoder``'s features, as a feature cache records it: the name, the settings
    its class says shape them (``feature_settings``) and ``weights``, the sha256 of its tensors.
    ``pretrained``, ``weights_path`` and ``trainable_blocks`` are left out: the weights' content
    stands for them, wherever the file lies. Resizing and normalisation are the cache's
    ``preprocessing``."""
    from captioner.data.features import weights_sha256

    settings = ENCODERS.get(config.name).feature_settings
    return {"name": config.name, **{k: getattr(config, k) for k in settings}, "weights": weights_sha256(encoder)}


def why_encoder_trains(config: EncoderConfig) -> str | None:
    """Why the encoder's weights change in training (then its features cannot be cached), or None."""
    if ENCODERS.get(config.name).always_trains:
        return f"{config.name} always trains"
    if config.trainable_blocks:
        return f"model.encoder.trainable_blocks is {config.trainable_blocks}"
    if config.stem == "split":
        return "model.encoder.stem split trains a colour path"
    return None


def encoder_trains(config: EncoderConfig) -> bool:
    """Whether the encoder's weights change in training (then its features cannot be cached)."""
    return why_encoder_trains(config) is not None


# -- stems: what the first layer sees ------------------------------------------------------------
class ChannelSplit(nn.Sequential):
    """Layers made for a one-channel image, run on each colour channel alone with shared weights,
    keeping the strongest response: (B, K, H, W) -> (B, C, H', W'). An edge gives the same
    response in whichever channel it is, so what follows cannot tell an object's colour."""

    def forward(self, images: Tensor) -> Tensor:
        b, k = images.shape[:2]
        x = super().forward(images.reshape(b * k, 1, *images.shape[2:]))  # (B*K, C, H', W')
        return x.unflatten(0, (b, k)).amax(1)


class ColourPath(nn.Sequential):
    """Per pixel (1x1 convolutions, no spatial extent), max-pooled to the feature grid: which
    colours a region holds, not their shape. (B, 3, H, W) -> (B, 16, h, w)."""

    channels = 16

    def __init__(self) -> None:
        c = self.channels
        super().__init__(nn.Conv2d(3, c, 1), nn.ReLU(inplace=True), nn.Conv2d(c, c, 1), nn.ReLU(inplace=True))

    def pooled(self, images: Tensor, grid: int | tuple[int, int]) -> Tensor:
        return nn.functional.adaptive_max_pool2d(self(images), grid)


def _split_first_conv(module: nn.Module, name: str) -> None:
    """Replace the module's first colour-image convolution (3 inputs, not grouped) by its
    one-channel form in a ChannelSplit. The weights are summed over the colour inputs, so a
    pretrained layer answers a grey image (equal channels) as before; same class (a timm
    weight-standardised or "same"-padded conv keeps its forward), same trainability."""
    found = next(((n, m) for n, m in module.named_modules()
                  if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1), None)
    if found is None:
        raise ValueError(f"model.encoder.stem split: {name} has no convolution over the colour image to split")
    path, conv = found
    one = copy.deepcopy(conv)
    one.in_channels = 1
    one.weight = nn.Parameter(conv.weight.detach().sum(1, keepdim=True), requires_grad=conv.weight.requires_grad)
    parent, _, child = path.rpartition(".")
    setattr(module.get_submodule(parent), child, ChannelSplit(one))


class SplitStem(Encoder):
    """``stem: split`` for an encoder that does not build it itself: its first convolution split
    by colour channel (ChannelSplit), and a ColourPath appended to every region feature."""

    def __init__(self, encoder: Encoder, name: str) -> None:
        super().__init__()
        _split_first_conv(encoder, name)
        self.encoder = encoder
        self.colour = ColourPath()
        self.preprocessing = encoder.preprocessing
        self.out_dim = encoder.out_dim + ColourPath.channels

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        regions, grid = self.encoder(images)  # (B, N, D)
        colour = self.colour.pooled(images, grid).to(regions.dtype)  # (B, 16, h, w)
        return torch.cat([regions, colour.flatten(2).transpose(1, 2)], -1), grid  # (B, N, D + 16)


# EncoderConfig.stem -> how create_encoder applies it to an encoder class that does not build it itself
STEMS: dict[str, Callable[[Encoder, str], Encoder]] = {"rgb": lambda encoder, name: encoder, "split": SplitStem}


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
    stems = ("rgb", "split")
    feature_settings = ("grid", "stem", "position")

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
        # stem split: the whole first layer (conv, norm, ReLU) runs on each channel alone
        split = config.stem == "split"
        first = ChannelSplit(*_conv(1, c // 4, 2)) if split else _conv(3, c // 4, 2)
        self.body = nn.Sequential(first, _conv(c // 4, c // 2, 2),
                                  _conv(c // 2, c, 1 if fine else 2), _conv(c, c, dilation=2 if fine else 1))
        self.colour = ColourPath() if split else None
        self.pos_channels = 32
        self.mix = nn.Sequential(nn.Conv2d(c + self.pos_channels, c, 1), nn.ReLU(inplace=True))
        self.append_position = config.position == "append"
        self.out_dim = c + ColourPath.channels * split + self.pos_channels * self.append_position
        # The features are always pooled to grid x grid, so the code is fixed: made once, moved
        # with the module, not saved in checkpoints.
        self.register_buffer("pos", positional_grid(self.pos_channels, self.grid, self.grid), persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.body(images)  # (B, C, S/8, S/8) or (B, C, S/4, S/4)
        if x.shape[-1] != self.grid or x.shape[-2] != self.grid:
            x = nn.functional.adaptive_avg_pool2d(x, self.grid)
        pos = self.pos.to(x.dtype).unsqueeze(0).expand(x.size(0), -1, -1, -1)  # (B, P, h, w)
        x = self.mix(torch.cat([x, pos], 1))
        if self.colour is not None:
            x = torch.cat([x, self.colour.pooled(images, self.grid)], 1)  # (B, C + 16, h, w)
        if self.append_position:
            x = torch.cat([x, pos], 1)  # (B, C + P, h, w)
        return _to_regions(x)


# -- model families by name prefix: timm/<model>, open_clip/<model>:<tag> ------------------------------
def _import_extra(module: str, extra: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"model.encoder.name {name!r} needs the {module} package: "
                         f"pip install 'captioner[{extra}]'") from err


def _unknown(name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return ValueError(f"model.encoder.name: unknown model {name!r}{hint}")


def _family_preprocessing(config: EncoderConfig, size: int, mean, std, interpolation: str) -> Preprocessing:
    # No crop (timm's crop_pct): attention should see the whole image, as for every encoder here.
    interp = interpolation if interpolation in ("bicubic", "bilinear") else "bicubic"
    return Preprocessing(config.image_size or int(size), [float(m) for m in mean], [float(v) for v in std], interp)


def _freeze_all_but_last(units: list[nn.Module], params: list[nn.Parameter], k: int) -> None:
    """``k`` = trainable_blocks: 0 freezes every parameter, -1 none, else all but the last k units."""
    if k < 0:
        return
    for p in params:
        p.requires_grad_(False)
    for unit in units[len(units) - min(k, len(units)):]:
        for p in unit.parameters():
            p.requires_grad_(True)


def _keep_frozen_norms(module: nn.Module) -> None:
    # frozen BatchNorm layers keep their running statistics in training
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _check_image_size(name: str, size: int, patch: int) -> None:
    if size % patch:
        raise ValueError(f"model.encoder.image_size {size}: {name} cuts images into {patch} px patches; "
                         f"use a multiple of {patch} (e.g. {max(patch, size // patch * patch)})")


def _probe_dim(encoder: Encoder, name: str, size: int) -> int:
    """Run one blank image through a family encoder: its region width D, or a clear error for an
    image size the model cannot take (e.g. a fixed-size ViT)."""
    was = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            regions, _ = encoder(torch.zeros(1, 3, size, size))  # (1, N, D)
    except (AssertionError, RuntimeError, ValueError) as err:
        raise ValueError(f"model.encoder.image_size {size}: {name} cannot take {size} px images: "
                         f"{' '.join(str(err).split())}") from err
    finally:
        encoder.train(was)
    return int(regions.size(-1))


def _pool_regions(x: Tensor, grid: int) -> tuple[Tensor, tuple[int, int]]:
    """A map (B, D, h, w) -> regions (B, N, D) on grid x grid (pooled only if h, w differ)."""
    if x.shape[-2:] != (grid, grid):
        x = nn.functional.adaptive_avg_pool2d(x, grid)
    return _to_regions(x)


@ENCODERS.register_family("timm", "timm/<model>[.<tag>], any timm model, e.g. timm/convnext_tiny.fb_in22k_ft_in1k "
                          "(pip install 'captioner[timm]')")
class TimmEncoder(Encoder):
    """A timm model: a CNN's last feature map (or ``stage``), or a ViT's patch tokens without its
    prefix tokens (class, register, distillation), pooled to ``grid`` x ``grid`` where they differ.

    ViTs are built with timm's ``dynamic_img_size`` at ``image_size``, so any multiple of the patch
    size works (position embeddings resampled). Preprocessing comes from the model's pretrained config."""

    feature_settings = ("grid", "stem", "stage")

    @staticmethod
    def _model_name(config: EncoderConfig) -> str:
        timm = _import_extra("timm", "timm", config.name)
        name = config.name.removeprefix("timm/")
        arch, _ = timm.models.split_model_name_tag(name)
        if not timm.is_model(arch):
            raise _unknown(name, timm.list_models())
        return name

    @classmethod
    def default_preprocessing(cls, config: EncoderConfig) -> Preprocessing:
        name = cls._model_name(config)  # first: it says which extra is missing
        import timm.data

        pcfg = timm.models.get_pretrained_cfg(name)
        data = timm.data.resolve_data_config(pretrained_cfg=pcfg.to_dict() if pcfg else {})
        return _family_preprocessing(config, data["input_size"][-1], data["mean"], data["std"], data["interpolation"])

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        import timm

        name = self._model_name(config)
        self.preprocessing = encoder_preprocessing(config)
        size = self.preprocessing.image_size
        kwargs: dict = {"num_classes": 0}
        if config.weights_path:
            kwargs["pretrained_cfg_overlay"] = {"file": config.weights_path}
        pretrained = bool(config.pretrained or config.weights_path)
        try:
            try:  # token models (ViT and kin) take any multiple of the patch size
                net = timm.create_model(name, pretrained=pretrained, dynamic_img_size=True, img_size=size, **kwargs)
            except TypeError as err:  # a CNN's constructor has no such arguments
                if "img_size" not in str(err):
                    raise
                net = timm.create_model(name, pretrained=pretrained, **kwargs)
        except Exception as err:
            if not pretrained or isinstance(err, TypeError):
                raise
            where = (f"from {config.weights_path}" if config.weights_path
                     else "(no download here?); set `model.encoder.weights_path` to a local copy of the checkpoint")
            raise WeightsUnavailable(f"could not load the timm weights of {name} {where}: "
                                     f"{' '.join(str(err).split())}") from err
        self.prefix_tokens = int(getattr(net, "num_prefix_tokens", 0))
        patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
        if patch is not None:
            _check_image_size(config.name, size, int(patch[0]))
        info = list(net.feature_info)
        self.stage = config.stage if config.stage >= 0 else len(info) + config.stage
        if not 0 <= self.stage < len(info):
            raise ValueError(f"model.encoder.stage {config.stage}: {config.name} has {len(info)} stages")
        self.last = self.stage == len(info) - 1
        if not self.last:  # stop at the chosen stage: later stages are never run
            if not hasattr(net, "forward_intermediates"):
                raise ValueError(f"model.encoder.stage {config.stage}: {config.name} has no forward_intermediates")
            net.prune_intermediate_layers([self.stage], prune_head=True)
        self.net = net
        self.grid = config.grid
        self.out_dim = _probe_dim(self, config.name, size)
        units = [net.get_submodule(i["module"]) for i in info[: self.stage + 1]]
        _freeze_all_but_last(units, list(net.parameters()), config.trainable_blocks)
        if self.last and config.trainable_blocks > 0:  # the final norm belongs to the last block's output
            for p in getattr(net, "norm", nn.Identity()).parameters():
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> TimmEncoder:
        super().train(mode)
        _keep_frozen_norms(self.net)
        return self

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if not self.last:
            x = self.net.forward_intermediates(images, indices=[self.stage], norm=False,
                                               intermediates_only=True)[0]  # (B, D, h, w)
            return _pool_regions(x, self.grid)
        x = self.net.forward_features(images)
        if x.dim() == 3:  # tokens (B, P + h*w, D): drop the prefix, lay the patches on their grid
            h, w = self.net.patch_embed.dynamic_feat_size(images.shape[-2:])
            x = x[:, self.prefix_tokens:]
            assert x.size(1) == h * w, f"{x.size(1)} patch tokens for a {h}x{w} grid"
            x = x.transpose(1, 2).reshape(x.size(0), -1, h, w)  # (B, D, h, w)
        return _pool_regions(x, self.grid)  # (B, N, D)


@ENCODERS.register_family("open_clip", "open_clip/<model>[:<pretrained tag>], a CLIP image tower, e.g. "
                          "open_clip/ViT-B-16:openai (pip install 'captioner[clip]')")
class OpenClipEncoder(Encoder):
    """A CLIP image tower's spatial tokens: a ViT's patch tokens (after ``ln_post``, before the
    projection; the class token dropped) or a ModifiedResNet's map before its attention pooling.
    ``pretrained: true`` loads the tag's weights; without a tag or with ``pretrained: false`` the
    tower is random."""

    @staticmethod
    def _model_tag(config: EncoderConfig) -> tuple[str, str | None]:
        open_clip = _import_extra("open_clip", "clip", config.name)
        model, _, tag = config.name.removeprefix("open_clip/").partition(":")
        if model not in open_clip.list_models():
            known = [f"{m}:{t}" for m, t in open_clip.list_pretrained()] + open_clip.list_models()
            raise _unknown(config.name.removeprefix("open_clip/"), known)
        if tag and tag not in open_clip.list_pretrained_tags_by_model(model):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
            raise ValueError(f"model.encoder.name: {model} has no pretrained tag {tag!r} (tags: {tags})")
        return model, tag or None

    @classmethod
    def default_preprocessing(cls, config: EncoderConfig) -> Preprocessing:
        model, tag = cls._model_tag(config)  # first: it says which extra is missing
        import open_clip

        mcfg = open_clip.get_model_config(model) or {}
        pre = {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD,
               "interpolation": "bicubic", **mcfg.get("preprocess_cfg", {}),
               **(open_clip.get_pretrained_cfg(model, tag) if tag else {})}
        size = mcfg.get("vision_cfg", {}).get("image_size", 224)
        size = size if isinstance(size, int) else size[-1]
        return _family_preprocessing(config, size, pre["mean"], pre["std"], pre["interpolation"])

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        import open_clip
        from open_clip.model import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        model, tag = self._model_tag(config)
        self.preprocessing = encoder_preprocessing(config)
        size = self.preprocessing.image_size
        weights = config.weights_path or (tag if config.pretrained else None)
        if config.pretrained and not weights:
            raise ValueError(f"model.encoder.pretrained: name a tag, e.g. open_clip/{model}:"
                             f"{(open_clip.list_pretrained_tags_by_model(model) or ['<tag>'])[0]}")
        try:  # force_image_size resamples the position embedding of a loaded checkpoint
            clip = open_clip.create_model(model, pretrained=weights, force_image_size=size)
        except Exception as err:
            if not weights:
                raise
            where = (f"from {config.weights_path}" if config.weights_path
                     else "(no download here?); set `model.encoder.weights_path` to a local copy of the checkpoint")
            raise WeightsUnavailable(f"could not load the open_clip weights {model}:{tag} {where}: "
                                     f"{' '.join(str(err).split())}") from err
        visual = clip.visual
        if isinstance(visual, VisionTransformer):
            _check_image_size(config.name, size, int(visual.patch_size[0]))
            units = list(visual.transformer.resblocks)
            self.is_vit = True
        elif isinstance(visual, ModifiedResNet):
            units = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
            visual.attnpool = nn.Identity()  # its pooled vector is not used: the map is
            self.is_vit = False
        else:
            raise ValueError(f"model.encoder.name {config.name!r}: its image tower is a {type(visual).__name__}; "
                             "open_clip/ takes ViT and ModifiedResNet towers (use timm/ for the others)")
        self.visual = visual  # the text tower is dropped
        self.grid = config.grid
        self.out_dim = _probe_dim(self, config.name, size)
        _freeze_all_but_last(units, list(visual.parameters()), config.trainable_blocks)
        if self.is_vit and config.trainable_blocks > 0:
            visual.ln_post.requires_grad_(True)

    def train(self, mode: bool = True) -> OpenClipEncoder:
        super().train(mode)
        _keep_frozen_norms(self.visual)
        return self

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        v = self.visual
        if not self.is_vit:
            x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))  # (B, D, h, w)
            return _pool_regions(x, self.grid)
        # The tower's own embedding, without patch dropout (it would remove grid cells).
        x = v.conv1(images)  # (B, D, h, w)
        b, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        cls = v.class_embedding.to(x.dtype).expand(b, 1, d)
        x = v.ln_pre(torch.cat([cls, x], 1) + v.positional_embedding.to(x.dtype))  # (B, 1 + h*w, D)
        if not getattr(v.transformer, "batch_first", False):  # older open_clip: sequence first
            x = v.transformer(x.transpose(0, 1)).transpose(0, 1)
        else:
            x = v.transformer(x)
        x = v.ln_post(x[:, 1:])  # (B, h*w, D): the class token dropped
        return _pool_regions(x.transpose(1, 2).reshape(b, d, h, w), self.grid)
