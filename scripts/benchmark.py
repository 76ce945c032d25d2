#!/usr/bin/env python
"""Speed and memory benchmarks with random weights; they live in the repository's ``benchmarks/``.

    python scripts/benchmark.py decoder --json            # training, beam search, greedy
    python scripts/benchmark.py caption --images 32       # encoder alone vs the whole caption path
    python scripts/benchmark.py memory --images 1000      # resident memory while streaming
    python scripts/benchmark.py scst --repeats 1          # SCST step vs its reward vs a cross-entropy step
    python scripts/benchmark.py encoder                   # training step, stem: rgb vs stem: split
    python scripts/benchmark.py decode                    # CPU decoding: PIL vs TorchCodec, DCT-scaled JPEGs
    python scripts/benchmark.py dct-quality --checkpoint CKPT  # what DCT-scaled decoding changes
"""

import sys
from pathlib import Path

# benchmarks/ sits beside scripts/ (it is not part of the installed package); appended, so that
# an installed captioner still wins over the checkout's as before
sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
