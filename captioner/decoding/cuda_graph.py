"""A decoding step replayed as a CUDA graph, and the recordings kept beside each decoder.

A search whose state lives in tensors allocated once (fixed shapes and addresses: beam search's
``_Beams``, greedy's ``_Path``) records one step as a CUDA graph and replays it for the steps
after: one launch per word instead of a hundred small kernels. The recording is kept for the next
batch of the same shape and made again when the weights change.

``DecoderGraphs.of(decoder)`` is one decoder's recordings, made on first use and attached to it as
a plain attribute that copies and pickles leave behind (a copy starts with none), so that copying
or pickling a decoder (EMA, SWA, DDP) never meets a CUDA graph or a lock, the recordings go with
their decoder, and this module holds no state.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Steps run eagerly before a graph is first recorded: the warm-up that capture needs (lazy
# initialisation, cuBLAS workspaces) happens on real steps rather than thrown-away ones.
GRAPH_WARMUP_STEPS = 2
# Recorded searches kept per decoder (one per batch shape; each holds its buffers on the GPU).
GRAPHS_KEPT = 2


class CaptureFailed(RuntimeError):
    pass


class Recording:
    """One batch shape's search state and, once recorded, the CUDA graph of a step on it."""

    def __init__(self, state: Any, device: torch.device) -> None:
        self.state = state
        self.graph: torch.cuda.CUDAGraph | None = None
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.lock = threading.Lock()  # one search at a time on these buffers
        self.warm = 0

    def run(self, step: int, advance: Callable[[int], None]) -> None:
        """Run step ``step``: eagerly while warming up, else by replaying the graph (recorded
        first if need be; CaptureFailed if that fails)."""
        if self.graph is None:
            current = torch.cuda.current_stream(self.device)
            if self.warm < GRAPH_WARMUP_STEPS:  # on a side stream, as capture wants
                self.stream.wait_stream(current)
                with torch.cuda.stream(self.stream):
                    advance(step)
                current.wait_stream(self.stream)  # the caller reads `done` on its stream
                self.warm += 1
                return
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: only this thread is held to capture's rules, so a server's other
                # threads keep using the GPU meanwhile
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    advance(step)  # recorded, not run
            except RuntimeError as err:
                raise CaptureFailed(str(err).splitlines()[0] if str(err) else type(err).__name__) from err
            self.graph = graph
        self.graph.replay()


class DecoderGraphs:
    """The recorded searches of one decoder, by batch shape, least recently used first."""

    ATTRIBUTE = "_cuda_graphs"  # where a decoder keeps its recordings
    recording = Recording  # what records a search (tests put a CPU stand-in here)

    def __init__(self) -> None:
        self.kept: OrderedDict[tuple, tuple[tuple, Recording]] = OrderedDict()  # key -> (weights, recording)
        self.failed = False  # a capture failed: this decoder decodes eagerly for good
        self.lock = threading.Lock()

    def __reduce__(self):  # copies and pickles of the decoder start with no recordings
        return (type(self), ())

    @classmethod
    def of(cls, decoder: nn.Module) -> DecoderGraphs:
        """The decoder's recordings, made on first use (one per decoder, whatever the threads)."""
        graphs = decoder.__dict__.get(cls.ATTRIBUTE)
        return graphs if graphs is not None else decoder.__dict__.setdefault(cls.ATTRIBUTE, cls())

    @staticmethod
    def on_gpu(device: torch.device) -> bool:
        return device.type == "cuda"

    @classmethod
    def for_search(cls, decoder: nn.Module, cuda_graph: bool | None, device: torch.device,
                   max_length: int) -> DecoderGraphs | None:
        """The decoder's recordings when a search here would replay its steps as a CUDA graph,
        else None."""
        if not cls.on_gpu(device) or cuda_graph is False:
            return None
        graphs = cls.of(decoder)
        if graphs.failed:
            return None
        # Autocast caches its casts of the weights for one forward pass; a graph recorded with them
        # would replay reads of freed memory. bf16 decoding (slower than fp32 here) stays eager.
        if torch.is_autocast_enabled("cuda"):
            return None
        return graphs if max_length > GRAPH_WARMUP_STEPS + 1 else None  # steps left to replay

    def checkout(self, decoder: nn.Module, shape: tuple, cache: tuple[Tensor, ...], h: Tensor,
                 map_dtype: torch.dtype, allocate: Callable[[tuple[Tensor, ...]], Any]) -> Recording | None:
        """The kept search for this batch shape and these weights (when there is none, a new one on
        the state ``allocate`` makes around new buffers of the image cache's shapes), locked for
        this call; None when it is busy (another thread) or the weights are inference tensors (no
        version counter to tell whether they changed since the recording)."""
        params = list(decoder.parameters())
        if any(p.is_inference() for p in params):
            return None
        # The graph reads the weights where they were when it was recorded; an optimiser step or a
        # load changes their versions (and the decoder's cached copies), so the key holds them.
        weights = tuple((p.data_ptr(), p._version) for p in params)
        key = (shape, tuple((x.shape, x.dtype, x.device) for x in cache), h.dtype, map_dtype,
               torch.is_inference_mode_enabled())
        with self.lock:
            kept = self.kept
            for old in [key_ for key_, rec in kept.items() if rec[0] != weights]:
                del kept[old]
            entry = kept.get(key)
            if entry is None:
                state = allocate(tuple(torch.empty_like(x) for x in cache))
                entry = kept[key] = (weights, self.recording(state, cache[0].device))
                while len(kept) > GRAPHS_KEPT:
                    kept.popitem(last=False)
            kept.move_to_end(key)
            rec = entry[1]
            return rec if rec.lock.acquire(blocking=False) else None

    def give_up(self) -> None:
        """A capture failed: no recording for this decoder again."""
        with self.lock:
            self.failed = True
            self.kept.clear()


class Steps:
    """Steps 1, 2, .. of one search on its fixed state: run eagerly, or replayed from the kept
    recording of its batch shape (``graphs`` given). ``allocate(cache)`` makes a state around an
    image cache; ``release()`` once the state has been read (in a ``finally``)."""

    def __init__(self, graphs: DecoderGraphs | None, decoder: nn.Module, shape: tuple,
                 cache: tuple[Tensor, ...], h: Tensor, map_dtype: torch.dtype,
                 allocate: Callable[[tuple[Tensor, ...]], Any], name: str) -> None:
        self.graphs, self.name = graphs, name
        self.recording = graphs.checkout(decoder, shape, cache, h, map_dtype, allocate) if graphs else None
        # eager: the state holds this search's own image cache, no copy
        self.state = self.recording.state if self.recording is not None else allocate(cache)

    def run(self, advance: Callable[[int], None], done: Tensor, max_length: int, min_length: int,
            early_stop: bool) -> int:
        """``advance(step)`` for step 1 .. ``max_length - 1`` (until every row of ``done`` is
        True with ``early_stop``) -> the number of steps, step 0 included."""
        steps = 1
        for step in range(1, max_length):
            if early_stop and bool(done.all()):
                break
            # ban_tokens depends on the step before min_length; the graph replays later steps
            if self.recording is None or step < min_length:
                advance(step)
            else:
                try:
                    self.recording.run(step, advance)
                except CaptureFailed as err:
                    logger.warning("%s: CUDA graph capture failed (%s); running steps eagerly", self.name, err)
                    self.graphs.give_up()  # for good: do not try again
                    self.release()
                    advance(step)
            steps += 1
        return steps

    def release(self) -> None:
        if self.recording is not None:
            self.recording.lock.release()
            self.recording = None
