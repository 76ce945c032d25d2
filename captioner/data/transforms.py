"""Image preprocessing as data: the encoder decides it, checkpoints store it, loaders apply it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from captioner.data.images import load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# resize filters by name: PIL's for one image, and torch's `interpolate` takes the same names
_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclass
class Preprocessing:
    """Resize to ``image_size`` x ``image_size`` (no crop: attention sees the whole image), normalise.

    ``interpolation``: the resize filter, ``bicubic`` or ``bilinear`` (a timm or CLIP model's own,
    from its pretrained config); checkpoints written before it existed read as ``bicubic``.
    ``jpeg_dct_scaling``: a JPEG file at least twice ``image_size`` on both sides is decoded at
    1/2, 1/4 or 1/8 of its size (the most that keeps both sides >= ``image_size``) before the
    resize: about 5x faster on a 12-MP photo, slightly other pixels (docs/performance.md).
    Checkpoints and feature caches made before it existed read as false (what they were made with)."""

    image_size: int = 256
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    interpolation: str = "bicubic"
    jpeg_dct_scaling: bool = True

    def __post_init__(self) -> None:
        if self.interpolation not in _FILTERS:
            raise ValueError(f"preprocessing interpolation must be one of {', '.join(_FILTERS)}, "
                             f"got {self.interpolation!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(image_size=int(d["image_size"]), mean=list(d["mean"]), std=list(d["std"]),
                   interpolation=str(d.get("interpolation", "bicubic")),
                   jpeg_dct_scaling=bool(d.get("jpeg_dct_scaling", False)))

    @property
    def decode_size(self) -> int | None:
        """What ``load_image(path, reduce_to=...)`` is given: large JPEGs decoded at reduced size
        for this resize (None: at full size)."""
        return self.image_size if self.jpeg_dct_scaling else None

    def load(self, path: str | os.PathLike) -> torch.Tensor:
        """An image file -> normalised float tensor (3, S, S): the one way files become model
        input (training, captioning, features), so they all see the same pixels. Raises
        ``ImageLoadError`` for a file that cannot be read."""
        return self(load_image(path, self.decode_size))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised float tensor (3, S, S)."""
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), _FILTERS[self.interpolation])
        # numpy, not torch: the same float32 operations (so the same values), but no intra-op
        # thread pool, which costs far more than the arithmetic on one small image (measured:
        # 1.5 ms against 30 ms with two torch threads on a 2-core VM).
        x = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)  # (3, S, S)
        x /= np.float32(255.0)
        x -= np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        x /= np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return torch.from_numpy(x)

    def from_uint8(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """RGB uint8 tensors (3, H_i, W_i), on any one device -> normalised (B, 3, S, S) there.

        The tensor twin of ``__call__`` for images decoded on a GPU: antialiased bicubic resize
        (PIL's filter, or bilinear as the preprocessing says), rounded to 8 bits as PIL's resize is, then normalised. Images of one
        size are resized together."""
        if not images:
            raise ValueError("from_uint8 needs at least one image")
        s = self.image_size
        dev = images[0].device
        out = torch.empty(len(images), 3, s, s, device=dev)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            if im.dim() != 3 or im.size(0) != 3 or im.dtype != torch.uint8:
                raise ValueError(f"image {i}: expected a (3, H, W) uint8 tensor, got {tuple(im.shape)} {im.dtype}")
            by_size.setdefault(tuple(im.shape[1:]), []).append(i)
        for size, idx in by_size.items():
            x = torch.stack([images[i] for i in idx]).float()  # (b, 3, H, W)
            if size != (s, s):
                x = F.interpolate(x, size=(s, s), mode=self.interpolation, antialias=True, align_corners=False)
                x = x.round_().clamp_(0.0, 255.0)
            out[idx] = x
        mean = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, 3, 1, 1)
        return out.div_(255.0).sub_(mean).div_(std)
