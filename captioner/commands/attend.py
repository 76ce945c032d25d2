"""``captioner attend``: caption one image and draw where the model looked for each word.

Writes the figure of the paper's Figures 2/3 (PNG) or an animation of the sentence (GIF, one
frame per word), optionally the raw maps as JSON next to it, and prints the caption.
Exit status: 0 written, 1 the image could not be read, 2 bad arguments or an unusable checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from captioner.commands.common import UsageError, add_model_arguments, load_pipeline, positive_int

logger = logging.getLogger(__name__)


def cmd_attend(a: argparse.Namespace) -> int:
    from matplotlib import colormaps

    from captioner.data.images import ImageLoadError, load_image
    from captioner.files import atomic_write_json
    from captioner.viz import attention_json, save_attention_figure, save_attention_gif

    if a.cmap is not None and a.cmap not in colormaps:
        raise UsageError(f"--cmap: unknown colour map {a.cmap!r} (try jet, inferno, viridis)")
    fmt = a.format or ("gif" if a.output.suffix.lower() == ".gif" else "png")
    if not a.output.parent.is_dir():
        raise UsageError(f"--output: folder {a.output.parent} does not exist")
    pipeline = load_pipeline(a.checkpoint, a.device, a.quantize, beam_size=a.beam_size,
                             max_length=a.max_length)
    if a.rank > pipeline.beam_size:
        raise UsageError(f"--rank: {a.rank} is more than the beam size ({pipeline.beam_size}); "
                         "give a --beam-size of at least the rank")
    try:
        # decoded as captioning decodes it (a large JPEG at reduced size), and drawn on
        image = load_image(a.image, pipeline.loaded.preprocessing.decode_size)
    except ImageLoadError as err:
        print(f"captioner: error: {err}", file=sys.stderr)
        return 1

    captions = pipeline(image, n_best=a.rank)
    captions = captions if isinstance(captions, list) else [captions]
    if len(captions) < a.rank:
        print(f"captioner: error: the beam search found {len(captions)} distinct captions, "
              f"fewer than --rank {a.rank}", file=sys.stderr)
        return 1
    caption = captions[a.rank - 1]
    if fmt == "gif":
        save_attention_gif(image, caption.words, caption.alphas, a.output, smooth=a.smooth,
                           duration_ms=a.duration_ms, cmap=a.cmap)
    else:
        save_attention_figure(image, caption.words, caption.alphas, a.output, smooth=a.smooth,
                              max_cols=a.max_cols, cmap=a.cmap)
    written = [a.output]
    if a.json:
        maps = attention_json(caption.words, caption.alphas, caption.grid)
        caption.image = a.image
        maps.update(caption.to_dict(("image", "rank", "score", "mean_logprob", "word_probs"), digits=None))
        written.append(atomic_write_json(a.output.with_suffix(".json"), maps, newline=True))
    print(caption.text)
    logger.info("wrote %s", ", ".join(str(p) for p in written))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attend",
        help="caption one image and draw its per-word attention maps (PNG figure or GIF)",
        description="Caption IMAGE and draw, for every word, where the model attended "
        "(as in the paper's Figures 2 and 3). Prints the caption.",
    )
    add_model_arguments(p)
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("--output", "-o", required=True, type=Path, help="OUT.png or OUT.gif")
    p.add_argument("--format", choices=("png", "gif"), default=None,
                   help="figure (png) or one frame per word (gif); default: from --output's suffix")
    p.add_argument("--smooth", action=argparse.BooleanOptionalAction, default=True,
                   help="bicubic upsampling of the maps (default) or blocky regions (--no-smooth)")
    p.add_argument("--cmap", default=None, metavar="NAME",
                   help="overlay a matplotlib colour map (e.g. jet, inferno) instead of dimming "
                   "what is not attended (the paper's look, default)")
    p.add_argument("--json", action="store_true", help="also write OUT.json with the raw per-word maps")
    p.add_argument("--rank", type=positive_int, default=1, metavar="K",
                   help="draw the K-th best caption of the beam search (1 = the best; K <= beam size)")
    p.add_argument("--max-cols", type=positive_int, default=5, help="panels per row of the figure")
    p.add_argument("--duration-ms", type=positive_int, default=800, help="GIF: time per word")
    p.set_defaults(func=cmd_attend)
