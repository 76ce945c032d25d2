"""What every benchmark shares: the machine, resident memory, random vocabularies, captions,
models and image files."""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

import torch

from captioner.checkpoint import LoadedModel
from captioner.data.vocab import END_ID, SPECIALS, START_ID, Vocabulary
from captioner.models import Captioner, DecoderConfig, EncoderConfig


def machine_info(device: str | torch.device = "cpu") -> dict:
    """What the figures were measured on."""
    dev = torch.device(device)
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_name(),
        "device": str(dev),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # macOS reports bytes


def current_rss_mb() -> float:
    """Resident set size now (MB); the peak where /proc is not available."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mb()


def random_vocab(size: int) -> Vocabulary:
    return Vocabulary([*SPECIALS, *(f"w{i}" for i in range(size - len(SPECIALS)))])


def random_captions(batch: int, length: int, vocab: int, generator: torch.Generator) -> tuple:
    """``<start> w.. <end>`` captions of exactly ``length`` tokens: (B, L) ids and (B,) lengths."""
    caps = torch.randint(len(SPECIALS), vocab, (batch, length), generator=generator)
    caps[:, 0] = START_ID
    caps[:, -1] = END_ID
    return caps, torch.full((batch,), length, dtype=torch.long)


def random_model(*, encoder: str = "resnet101", image_size: int = 256, vocab: int = 10000, decoder_dim: int = 512,
                 grid: int | None = None, channels: int = 128, device: str = "cpu") -> LoadedModel:
    """A ``LoadedModel`` with random weights, as ``load_checkpoint`` would return it."""
    torch.manual_seed(0)
    enc = EncoderConfig(name=encoder, image_size=image_size, grid=grid or 14, channels=channels)
    dec = DecoderConfig(embed_dim=decoder_dim, attention_dim=decoder_dim, decoder_dim=decoder_dim)
    words = random_vocab(vocab)
    model = Captioner(enc, dec, len(words)).eval().to(device)
    hparams = {"decoding": {"beam_size": 1, "max_length": 20}}
    return LoadedModel(model, words, model.preprocessing, hparams, Path("<random weights>"))


def write_images(folder: Path, count: int, size: tuple[int, int] = (640, 480), fmt: str = "JPEG",
                 seed: int = 0) -> list[Path]:
    """``count`` photo-like images (smooth colour fields plus noise), COCO-sized by default."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        noise = rng.normal(0, 12, (h, w, 3))
        pixels = np.clip(np.asarray(coarse, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        Image.fromarray(pixels).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        paths.append(path)
    return paths
