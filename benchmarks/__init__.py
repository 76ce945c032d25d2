"""Speed and memory benchmarks with random weights, outside the package: they use captioner's
public API only, as a user's script would.

* :mod:`benchmarks.decoder` - decoder training throughput (teacher forcing + cross-entropy + doubly
  stochastic loss + backward + Adam step), batched beam search and greedy decoding, on random
  region features.
* :mod:`benchmarks.caption` - the encoder alone against the whole ``captioner caption`` path
  (read, preprocess, encode, beam search) on generated JPEG files.
* :mod:`benchmarks.memory` - resident memory while captioning many small images in a stream.
* :mod:`benchmarks.scst` - the CIDEr-D reward against a whole self-critical training step.
* :mod:`benchmarks.encoder` - an encoder's training step with ``stem: rgb`` against ``stem: split``.
* :mod:`benchmarks.startup` - time to the first caption of ``captioner caption`` and the Python API,
  each a fresh process, optionally against another checkout of the code.

Run them with ``python scripts/benchmark.py BENCHMARK`` (or ``python -m benchmarks BENCHMARK``
from the repository's root); :mod:`benchmarks.cli` holds the command line. Figures are medians
over ``repeats`` timed runs after one warm-up run. Nothing here needs data or pretrained weights
(``startup`` needs a checkpoint: it times loading one).
"""
