"""Image preprocessing as data: the encoder decides it, checkpoints store it, loaders apply it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocessing:
    """Resize to ``image_size`` x ``image_size`` (no crop: attention sees the whole image), normalise."""

    image_size: int = 256
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(image_size=int(d["image_size"]), mean=list(d["mean"]), std=list(d["std"]))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised float tensor (3, S, S)."""
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        x = x.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std
