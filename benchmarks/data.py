"""The training batches of an image data set: read per batch against ``data.in_memory``."""

from __future__ import annotations

import statistics

import torch

from benchmarks import timing
from captioner.data.datamodule import CaptionDataModule
from captioner.data.sources import ShapesSource
from captioner.data.transforms import Preprocessing


def bench_data(*, data_dir: str = "data/shapes", image_size: int = 64, batch: int = 64, repeats: int = 20) -> dict:
    """ms per training batch of ``shapes`` (with its grounding, as configs/shapes.yaml trains) read
    from the files in this process against taken from memory, the two taking turns; the memory
    is filled before timing. Both draw each image's grounding masks on first use."""
    source = ShapesSource(data_dir=data_dir, grounding=True, ground_relations=True)
    pre = Preprocessing(image_size, [0.5] * 3, [0.5] * 3)
    batches = []
    for in_memory in (False, True):
        dm = CaptionDataModule(shapes=source, batch_size=batch, num_workers=0, preprocessing=pre, in_memory=in_memory)
        batches.append(iter(dm.train_dataloader()))
    disk, memory = timing.alternating([lambda it=it: next(it) for it in batches], repeats, torch.device("cpu"))
    return {"disk_ms_per_batch": 1000 * statistics.median(disk),
            "in_memory_ms_per_batch": 1000 * statistics.median(memory),
            "in_memory_over_disk": statistics.median(m / d for d, m in zip(disk, memory, strict=True))}
