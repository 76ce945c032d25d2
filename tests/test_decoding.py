"""Greedy, batched beam search and sampling."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from captioner.data.vocab import END_ID, PAD_ID, START_ID
from captioner.decoding import beam_search, cuda_graph, greedy, sample
from captioner.decoding.cuda_graph import GRAPHS_KEPT, CaptureFailed, DecoderGraphs
from captioner.models import ATTENTIONS, AttentionDecoder, DecoderConfig


@pytest.fixture(params=ATTENTIONS.names())
def decoder(request) -> AttentionDecoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(attention=request.param, embed_dim=16, attention_dim=16, decoder_dim=24, num_heads=4)
    return AttentionDecoder(cfg, vocab_size=30, encoder_dim=12).eval()


@torch.no_grad()
def _reference_beam(decoder, features, k, max_length):
    """A plain one-image beam search with explicit hypothesis lists, for comparison."""
    cache = decoder.precompute(features)
    state = decoder.init_state(features)
    hyps = [([], 0.0, state, [], False)]
    for step in range(max_length):
        cands = []
        for toks, score, st, alphas, done in hyps:
            if done:
                cands.append((toks + [PAD_ID], score, st, alphas, True))
                continue
            prev = torch.tensor([toks[-1] if toks else 1])
            logp, st2, alpha = decoder.step(prev, st, cache)
            for v in range(logp.size(-1)):
                if v in (PAD_ID, START_ID) or (step == 0 and v == END_ID):
                    continue  # never <pad>/<start>; no empty captions (min_length 1)
                cands.append((toks + [v], score + float(logp[0, v]), st2, alphas + [alpha[0]], v == END_ID))
        cands.sort(key=lambda c: -c[1])
        hyps = cands[:k]
        if all(h[4] for h in hyps):
            break
    return hyps[0]


def test_beam_size_one_is_greedy(decoder) -> None:
    feats = torch.randn(5, 7, 12)
    g = greedy(decoder, feats, max_length=15)
    b = beam_search(decoder, feats, beam_size=1, max_length=15)
    assert torch.equal(g.tokens, b.tokens)
    torch.testing.assert_close(g.scores, b.scores)
    torch.testing.assert_close(g.alphas, b.alphas)


def test_batched_beam_equals_per_image_beam_and_reference(decoder) -> None:
    feats = torch.randn(4, 7, 12)
    batched = beam_search(decoder, feats, beam_size=3, max_length=8)
    for i in range(4):
        single = beam_search(decoder, feats[i : i + 1], beam_size=3, max_length=8)
        n = int(single.lengths[0])
        assert batched.words(i) == single.words(0)
        torch.testing.assert_close(batched.scores[i], single.scores[0])
        torch.testing.assert_close(batched.alphas[i, :n], single.alphas[0, :n])
        ref_tokens, ref_score, *_ = _reference_beam(decoder, feats[i : i + 1], 3, 8)
        ref_words = [t for t in ref_tokens if t not in (END_ID, PAD_ID)]
        assert batched.words(i) == ref_words
        assert batched.scores[i].item() == pytest.approx(ref_score, abs=1e-4)


def test_no_end_returns_a_caption_of_max_length(decoder) -> None:
    with torch.no_grad():  # make <end> impossible
        decoder.out.bias[END_ID] = -1e4
    feats = torch.randn(3, 7, 12)
    for gen in (greedy(decoder, feats, max_length=6), beam_search(decoder, feats, beam_size=4, max_length=6)):
        assert gen.lengths.tolist() == [6, 6, 6]
        assert gen.tokens.shape == (3, 6)


def test_attention_rows_sum_to_one(decoder) -> None:
    feats = torch.randn(3, 7, 12)
    for gen in (greedy(decoder, feats), beam_search(decoder, feats, beam_size=3), sample(decoder, feats)):
        real = torch.arange(gen.alphas.size(1)).unsqueeze(0) <= gen.lengths.unsqueeze(1).clamp(max=gen.alphas.size(1) - 1)
        sums = gen.alphas.sum(-1)[real]
        torch.testing.assert_close(sums, torch.ones_like(sums))


def test_nbest_is_sorted_and_length_penalty_reranks(decoder) -> None:
    feats = torch.randn(2, 7, 12)
    gen = beam_search(decoder, feats, beam_size=4, max_length=10)
    for hyps in gen.nbest:
        assert len(hyps) == 4
        scores = [s for _, s in hyps]
        assert scores == sorted(scores, reverse=True)
    norm = beam_search(decoder, feats, beam_size=4, max_length=10, length_penalty=1.0)
    for i, hyps in enumerate(norm.nbest):
        for _toks, s in hyps:
            assert s <= norm.scores[i].item() + 1e-6


def test_unk_suppression(decoder) -> None:
    with torch.no_grad():
        decoder.out.bias[3] = 1e4  # <unk> would win every step
    feats = torch.randn(2, 7, 12)
    assert (greedy(decoder, feats, max_length=5).tokens == 3).any()
    for gen in (greedy(decoder, feats, 5, suppress_unk=True), beam_search(decoder, feats, 3, 5, suppress_unk=True)):
        assert not (gen.tokens == 3).any()


def test_sampling_is_reproducible_and_top1_is_greedy(decoder) -> None:
    feats = torch.randn(3, 7, 12)
    a = sample(decoder, feats, generator=torch.Generator().manual_seed(1))
    b = sample(decoder, feats, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens)
    top1 = sample(decoder, feats, top_k=1, max_length=12, generator=torch.Generator().manual_seed(2))
    assert torch.equal(top1.tokens, greedy(decoder, feats, max_length=12).tokens)
    with pytest.raises(ValueError, match="temperature"):
        sample(decoder, feats, temperature=0)


def test_token_logprobs_are_the_steps_of_the_score(decoder) -> None:
    """Every strategy reports each chosen token's log-probability; they sum to the score, match a
    fresh teacher-forced pass of the model and are 0 after <end>."""
    feats = torch.randn(3, 7, 12)
    gens = {"greedy": greedy(decoder, feats, max_length=9),
            "beam": beam_search(decoder, feats, beam_size=3, max_length=9),
            "sample": sample(decoder, feats, max_length=9, generator=torch.Generator().manual_seed(0))}
    for name, gen in gens.items():
        lp = gen.token_logprobs
        assert lp.shape == gen.tokens.shape, name
        torch.testing.assert_close(lp.sum(1), gen.scores, msg=name)
        assert (lp <= 1e-6).all(), name
        pad = gen.tokens == PAD_ID
        assert (lp[pad] == 0).all(), name
        for i in range(3):  # the model's own log-probability of each token, step by step
            cache, state = decoder.precompute(feats[i : i + 1]), decoder.init_state(feats[i : i + 1])
            prev = torch.tensor([START_ID])
            for t, tok in enumerate(gen.tokens[i].tolist()):
                if tok == PAD_ID:
                    break
                with torch.no_grad():
                    logp, state, _ = decoder.step(prev, state, cache)
                assert lp[i, t].item() == pytest.approx(logp[0, tok].item(), abs=1e-4), (name, i, t)
                prev = torch.tensor([tok])


def test_beams_hold_every_hypothesis_best_first(decoder) -> None:
    feats = torch.randn(2, 7, 12)
    gen = beam_search(decoder, feats, beam_size=4, max_length=10)
    beams = gen.beams
    assert beams.tokens.shape[0] == 2 * 4 and beams.alphas.shape[:2] == beams.tokens.shape
    for i, hyps in enumerate(gen.nbest):
        for j, (toks, score) in enumerate(hyps):
            assert beams.words(i * 4 + j) == toks
            assert beams.scores[i * 4 + j].item() == pytest.approx(score)
            torch.testing.assert_close(beams.token_logprobs[i * 4 + j].sum(), beams.scores[i * 4 + j])
        assert len({tuple(t) for t, _ in hyps}) == 4, "the beams are distinct captions"
        assert torch.equal(beams.tokens[i * 4], gen.tokens[i])
        torch.testing.assert_close(beams.alphas[i * 4], gen.alphas[i])
        torch.testing.assert_close(beams.token_logprobs[i * 4], gen.token_logprobs[i])


def test_top_p_keeps_the_nucleus(decoder) -> None:
    feats = torch.randn(3, 7, 12)
    tiny = sample(decoder, feats, max_length=12, top_p=1e-6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(tiny.tokens, greedy(decoder, feats, max_length=12).tokens)
    a = sample(decoder, feats, top_p=0.9, generator=torch.Generator().manual_seed(4))
    b = sample(decoder, feats, top_p=0.9, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.tokens, b.tokens)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            sample(decoder, feats, top_p=bad)


def test_beam_runs_exactly_max_steps_without_early_stop(decoder) -> None:
    gen = beam_search(decoder, torch.randn(3, 7, 12), beam_size=4, max_length=9, early_stop=False)
    assert gen.tokens.shape == (3, 9) and gen.alphas.shape == (3, 9, 7)
    assert [len(hyps) for hyps in gen.nbest] == [4, 4, 4]


def test_no_empty_caption_even_when_end_is_most_likely_first(decoder) -> None:
    with torch.no_grad():
        decoder.out.bias[END_ID] = 50.0  # <end> wins every step
    feats = torch.randn(3, 7, 12)
    for gen in (greedy(decoder, feats), beam_search(decoder, feats, beam_size=4), sample(decoder, feats)):
        assert gen.lengths.tolist() == [1, 1, 1]
    assert greedy(decoder, feats, min_length=0).lengths.tolist() == [0, 0, 0]


def test_pad_and_start_are_never_emitted(decoder) -> None:
    with torch.no_grad():
        decoder.out.bias[PAD_ID] = 50.0  # would end every caption unseen
        decoder.out.bias[START_ID] = 49.0
    feats = torch.randn(3, 7, 12)
    for gen in (greedy(decoder, feats, max_length=6), beam_search(decoder, feats, beam_size=3, max_length=6),
                sample(decoder, feats, max_length=6)):
        assert gen.lengths.min() >= 1
        for i in range(3):
            words = gen.tokens[i, : int(gen.lengths[i])]
            assert not ((words == PAD_ID) | (words == START_ID)).any()


def test_beam_wider_than_the_vocabulary() -> None:
    """Two real words and beam 8: the extra beams start dead and never win; the caption is
    the reference search's."""
    torch.manual_seed(1)
    cfg = DecoderConfig(embed_dim=8, attention_dim=8, decoder_dim=8)
    dec = AttentionDecoder(cfg, vocab_size=6, encoder_dim=4).eval()
    feats = torch.randn(3, 5, 4)
    out = beam_search(dec, feats, beam_size=8, max_length=5)
    for i in range(3):
        assert torch.isfinite(out.scores[i])
        ref_tokens, ref_score, *_ = _reference_beam(dec, feats[i : i + 1], 8, 5)
        assert out.words(i) == [t for t in ref_tokens if t not in (END_ID, PAD_ID)]
        assert out.scores[i].item() == pytest.approx(ref_score, abs=1e-4)
    assert not out.beams.token_logprobs.isnan().any()  # the beams that never lived: -inf
    torch.testing.assert_close(out.token_logprobs.sum(1), out.scores)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        beam_search(dec, feats, beam_size=2, max_length=0)


# -- the recordings' bookkeeping, on the CPU: a stand-in records nothing and runs each step ----------
class _Replay:
    """Stands in for a CUDA-graph recording: runs each step it is asked to replay, and notes it."""

    def __init__(self, state, device) -> None:
        self.state, self.lock, self.replayed = state, threading.Lock(), []

    def run(self, step: int, advance) -> None:
        self.replayed.append(step)
        advance(step)


@pytest.fixture()
def recorded(monkeypatch):
    """Searches on the CPU take the GPU's route: fixed-shape state, kept per decoder and shape."""
    monkeypatch.setattr(DecoderGraphs, "on_gpu", staticmethod(lambda device: True))
    monkeypatch.setattr(DecoderGraphs, "recording", _Replay)


def _same(fixed, plain) -> None:
    assert torch.equal(fixed.tokens, plain.tokens) and torch.equal(fixed.lengths, plain.lengths)
    torch.testing.assert_close(fixed.scores, plain.scores)
    torch.testing.assert_close(fixed.alphas, plain.alphas)
    torch.testing.assert_close(fixed.token_logprobs, plain.token_logprobs)


def test_replayed_greedy_and_beam_equal_the_plain_loops(decoder, recorded) -> None:
    """Greedy has its own fixed-shape path (not beam search of width 1); both give the plain
    loops' captions, on kept state that each new batch of the shape starts afresh."""
    first, second = torch.randn(5, 9, 12), torch.randn(5, 9, 12)
    for features in (first, second, first):
        for min_length in (1, 3):
            _same(greedy(decoder, features, 12, min_length=min_length),
                  greedy(decoder, features, 12, min_length=min_length, cuda_graph=False))
        fixed, plain = beam_search(decoder, features, 3, 12), beam_search(decoder, features, 3, 12, cuda_graph=False)
        _same(fixed, plain)
        assert fixed.nbest == plain.nbest
    kept = [rec for _, rec in DecoderGraphs.of(decoder).kept.values()]
    assert len(kept) == 2 and all(rec.replayed for rec in kept)
    assert {type(rec.state).__name__ for rec in kept} == {"_Path", "_Beams"}  # greedy is not beam search
    assert min(min(rec.replayed) for rec in kept) >= 1  # step 0 runs eagerly


def test_recordings_are_kept_per_shape_and_dropped_when_the_weights_change(recorded) -> None:
    torch.manual_seed(0)
    dec = AttentionDecoder(DecoderConfig(embed_dim=8, attention_dim=8, decoder_dim=8), 20, 6).eval()
    graphs = DecoderGraphs.of(dec)
    batches = {b: torch.randn(b, 4, 6) for b in (2, 3, 4)}
    for b in (2, 3, 4):
        greedy(dec, batches[b], 8)
    assert len(graphs.kept) == GRAPHS_KEPT == 2
    assert [key[0][1] for key in graphs.kept] == [3, 4]  # the least recently used went
    three = graphs.kept[next(iter(graphs.kept))][1]
    greedy(dec, batches[3], 8)
    assert [key[0][1] for key in graphs.kept] == [4, 3] and graphs.kept[next(reversed(graphs.kept))][1] is three
    # a search whose recording another thread holds runs on its own state, and right
    with three.lock:
        before = len(three.replayed)
        _same(greedy(dec, batches[3], 8), greedy(dec, batches[3], 8, cuda_graph=False))
    assert len(three.replayed) == before
    # new weights (an optimiser step, a load): every recording of the old ones goes
    with torch.no_grad():
        dec.out.bias[5:10] += 3.0
    _same(greedy(dec, batches[3], 8), greedy(dec, batches[3], 8, cuda_graph=False))
    assert len(graphs.kept) == 1 and graphs.kept[next(iter(graphs.kept))][1] is not three
    # the recordings stay with the decoder: a copy or a pickle starts with none
    for other in (copy.deepcopy(dec), pickle.loads(pickle.dumps(dec))):
        assert DecoderGraphs.of(other) is not graphs and not DecoderGraphs.of(other).kept
    # no search is recorded where it would not replay
    assert DecoderGraphs.for_search(dec, False, batches[3].device, 8) is None
    assert DecoderGraphs.for_search(dec, None, batches[3].device, 3) is None  # all warm-up


def test_the_cuda_graph_module_holds_no_state() -> None:
    """The recordings live with their decoder (DecoderGraphs.of), not in module globals."""
    mutable = (dict, list, set, type(threading.Lock()))
    state = [name for name, value in vars(cuda_graph).items() if not name.startswith("__")
             and (isinstance(value, mutable) or type(value).__module__ == "weakref")]
    assert state == []


@pytest.mark.parametrize("search", ["greedy", "beam search"])
def test_a_failed_recording_runs_eagerly_for_good(recorded, monkeypatch, caplog, search: str) -> None:
    class Broken(_Replay):
        def run(self, step: int, advance) -> None:
            raise CaptureFailed("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecoderGraphs, "recording", Broken)
    torch.manual_seed(0)
    dec = AttentionDecoder(DecoderConfig(embed_dim=8, attention_dim=8, decoder_dim=8), 20, 6).eval()
    features = torch.randn(3, 4, 6)
    decode = (lambda **kw: greedy(dec, features, 10, **kw)) if search == "greedy" else \
        (lambda **kw: beam_search(dec, features, 3, 10, **kw))
    with caplog.at_level("WARNING"):
        _same(decode(), decode(cuda_graph=False))
    assert f"{search}: CUDA graph capture failed" in caplog.text
    graphs = DecoderGraphs.of(dec)
    assert graphs.failed and not graphs.kept
    assert DecoderGraphs.for_search(dec, None, features.device, 10) is None


# -- CUDA graphs (GPU only) -----------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize(("k", "min_length", "early_stop"), [(3, 1, True), (5, 4, False), (40, 1, True)])
def test_cuda_graph_beam_search_equals_eager(decoder, monkeypatch, k: int, min_length: int,
                                             early_stop: bool) -> None:
    dec = decoder.to("cuda")
    features = torch.randn(6, 9, 12, device="cuda")
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda g: replays.append(1) or real_replay(g))
    kw = {"beam_size": k, "max_length": 12, "min_length": min_length, "early_stop": early_stop}
    eager = beam_search(dec, features, cuda_graph=False, **kw)
    assert not replays
    graphed = beam_search(dec, features, cuda_graph=True, **kw)
    assert replays, "the steps were not replayed from a graph"
    assert torch.equal(graphed.tokens, eager.tokens) and torch.equal(graphed.lengths, eager.lengths)
    torch.testing.assert_close(graphed.scores, eager.scores)
    torch.testing.assert_close(graphed.alphas, eager.alphas)
    torch.testing.assert_close(graphed.token_logprobs, eager.token_logprobs)
    torch.testing.assert_close(graphed.beams.token_logprobs, eager.beams.token_logprobs)
    for a, b in zip(graphed.nbest, eager.nbest, strict=True):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-5)
    # the next batch of the same shape replays the kept graph, on its own images
    other = torch.randn(6, 9, 12, device="cuda")
    recorded = len(replays)
    again, eager_again = beam_search(dec, other, **kw), beam_search(dec, other, cuda_graph=False, **kw)
    assert len(replays) > recorded
    assert torch.equal(again.tokens, eager_again.tokens)
    torch.testing.assert_close(again.alphas, eager_again.alphas)
    # new weights (an optimiser step, a load): recorded again, never the old weights replayed
    with torch.no_grad():
        dec.out.bias[5:15] += 3.0
    changed, eager_changed = beam_search(dec, other, **kw), beam_search(dec, other, cuda_graph=False, **kw)
    assert torch.equal(changed.tokens, eager_changed.tokens)
    torch.testing.assert_close(changed.scores, eager_changed.scores)
    # the recordings live outside the module: it still copies (EMA, SWA) and pickles
    copy.deepcopy(dec)
    pickle.dumps(dec)
    # and the same as on the CPU, where no graph is involved
    cpu = beam_search(dec.cpu(), other.cpu(), **kw)
    assert torch.equal(cpu.tokens, eager_changed.tokens.cpu())


@needs_cuda
def test_cuda_graph_greedy_equals_the_eager_single_path(decoder) -> None:
    dec = decoder.to("cuda")
    features = torch.randn(5, 9, 12, device="cuda")
    for _ in range(2):  # recorded, then replayed from the kept graph
        fast = greedy(dec, features, max_length=12, min_length=2)
        slow = greedy(dec, features, max_length=12, min_length=2, cuda_graph=False)
        assert fast.nbest is None and torch.equal(fast.tokens, slow.tokens)
        assert torch.equal(fast.lengths, slow.lengths)
        torch.testing.assert_close(fast.scores, slow.scores)
        torch.testing.assert_close(fast.alphas, slow.alphas)
        torch.testing.assert_close(fast.token_logprobs, slow.token_logprobs)


@needs_cuda
def test_failed_cuda_graph_capture_falls_back_to_eager(monkeypatch, caplog) -> None:
    torch.manual_seed(0)
    dec = AttentionDecoder(DecoderConfig(embed_dim=16, attention_dim=16, decoder_dim=24), 30, 12).eval().cuda()
    features = torch.randn(3, 9, 12, device="cuda")
    eager = beam_search(dec, features, 3, 10, cuda_graph=False)

    class Broken:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __enter__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

        def __exit__(self, *exc) -> None:
            return None

    monkeypatch.setattr(torch.cuda, "graph", Broken)
    with caplog.at_level("WARNING"):
        out = beam_search(dec, features, 3, 10)
    assert "CUDA graph capture failed" in caplog.text
    assert torch.equal(out.tokens, eager.tokens)
