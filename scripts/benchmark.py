#!/usr/bin/env python
"""Speed and memory benchmarks with random weights; the logic lives in ``captioner.benchmark``.

    python scripts/benchmark.py decoder --json            # training, beam search, greedy
    python scripts/benchmark.py caption --images 32       # encoder alone vs the whole caption path
    python scripts/benchmark.py memory --images 1000      # resident memory while streaming
    python scripts/benchmark.py scst --repeats 1          # SCST step vs its reward vs a cross-entropy step
    python scripts/benchmark.py encoder                   # training step, stem: rgb vs stem: split
"""

import sys

from captioner.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
