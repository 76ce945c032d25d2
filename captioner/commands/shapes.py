"""``captioner shapes``: generate the synthetic ``shapes`` data set (see ``captioner.data.shapes``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from captioner.commands.common import positive_int


def cmd_shapes(a: argparse.Namespace) -> int:
    from captioner.data.shapes import ShapesConfig, generate_shapes

    cfg = ShapesConfig(num_images=a.num_images, seed=a.seed, image_size=a.image_size,
                       compositional=a.compositional)
    out = generate_shapes(a.out, cfg)
    print(f"wrote {cfg.num_images} images to {out}")
    return 0


def register(subparsers) -> None:
    s = subparsers.add_parser("shapes", help="generate the synthetic `shapes` data set")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--num-images", type=positive_int, default=4000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=positive_int, default=64)
    s.add_argument("--compositional", action="store_true",
                   help="hold out colour-shape pairs for the test split")
    s.set_defaults(func=cmd_shapes)
