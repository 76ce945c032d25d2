"""scripts/benchmark.py at tiny sizes (figures, not timings), and the fast paths it measures
against straightforward implementations of the same maths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import captioner.models.attention as attention_module
from captioner.benchmark import main
from captioner.decoding import beam_search
from captioner.models import ATTENTIONS, AttentionDecoder, DecoderConfig

MACHINE = {"torch", "threads", "device", "cpu"}
TINY_DECODER = ["--encoder-dim", "24", "--grid", "3", "--vocab", "40", "--batch", "3", "--embed-dim", "8",
                "--attention-dim", "8", "--decoder-dim", "12", "--caption-length", "6", "--beam-size", "3",
                "--max-steps", "4", "--repeats", "1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run(capsys, *argv: str) -> dict:
    assert main(["--threads", "1", *argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["machine"]) >= MACHINE and report["machine"]["threads"] == 1
    return report


@pytest.mark.parametrize("attention", ATTENTIONS.names())
def test_decoder_benchmark_reports_its_figures(capsys, attention: str) -> None:
    report = _run(capsys, "decoder", *TINY_DECODER, "--attention", attention)
    for key in ("train_captions_per_s", "beam_images_per_s", "greedy_images_per_s", "peak_rss_mb"):
        assert report[key] > 0, key
    assert report["settings"]["attention"] == attention


def test_decoder_benchmark_decodes_in_int8(capsys) -> None:
    report = _run(capsys, "decoder", *TINY_DECODER, "--quantize", "int8", "--only", "beam", "greedy")
    assert report["beam_images_per_s"] > 0 and report["greedy_images_per_s"] > 0
    assert report["settings"]["quantize"] == "int8" and "train_captions_per_s" not in report


@pytest.mark.parametrize(("precision", "decode"), [("fp32", "auto"), ("bf16", "auto"), ("fp32", "device")])
def test_caption_benchmark_reports_its_figures(capsys, precision: str, decode: str) -> None:
    report = _run(capsys, "caption", "--encoder", "shapes_cnn", "--image-size", "32", "--images", "3",
                  "--batch-size", "2", "--vocab", "20", "--decoder-dim", "8", "--source-size", "40x30",
                  "--beam-size", "2", "--max-length", "3", "--repeats", "1", "--precision", precision,
                  "--jpeg-decode", decode)
    assert report["jpeg_on_device"] == (decode == "device")  # auto on a CPU: PIL
    assert report["encoder_ms_per_image"] > 0 and report["caption_ms_per_image"] > 0
    assert report["ratio"] == pytest.approx(report["caption_ms_per_image"] / report["encoder_ms_per_image"])


def test_memory_benchmark_samples_as_it_streams(capsys) -> None:
    report = _run(capsys, "memory", "--images", "24", "--batch-size", "8")
    assert list(report["rss_mb"]) == ["24"] and report["peak_rss_mb"]["24"] > 0
    assert report["peak_growth_mb"] == 0


def test_script_prints_the_machine_with_the_figures(tmp_path) -> None:
    script = Path(__file__).parent.parent / "scripts" / "benchmark.py"
    out = subprocess.run([sys.executable, str(script), "--threads", "1", "decoder", *TINY_DECODER,
                          "--only", "greedy"], capture_output=True, text=True, check=True).stdout
    assert "threads" in out and "torch" in out and "greedy_images_per_s" in out


# -- the fast paths against the plain maths ------------------------------------------------------
def _decoder(attention: str = "soft", gate: str = "scalar") -> AttentionDecoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(attention=attention, embed_dim=8, attention_dim=10, decoder_dim=12, num_heads=2,
                        dropout=0.0, gate=gate)
    return AttentionDecoder(cfg, vocab_size=20, encoder_dim=6)


def _reference_forward(dec: AttentionDecoder, feats, captions):
    """Teacher forcing written the obvious way: tanh attention, nn.LSTMCell, per-step logits."""
    att = dec.attention
    proj = att.encoder_proj(feats)  # (B, N, A)
    h, c = dec.init_state(feats)
    logits, alphas = [], []
    for t in range(captions.size(1) - 1):
        emb = dec.embedding(captions[:, t])
        e = att.score(torch.tanh(proj + att.hidden_proj(h).unsqueeze(1))).squeeze(-1)  # (B, N)
        alpha = F.softmax(e, -1)
        z = (alpha.unsqueeze(-1) * feats).sum(1)
        if dec.gate is not None:
            z = torch.sigmoid(dec.gate(h)) * z
        h, c = dec.lstm(torch.cat([emb, z], 1), (h, c))
        logits.append(dec.out(torch.tanh(emb + dec.out_h(h) + dec.out_z(z))))
        alphas.append(alpha)
    return torch.stack(logits, 1), torch.stack(alphas, 1)


@pytest.mark.parametrize("gate", ["scalar", "vector", "none"])
def test_teacher_forcing_and_its_gradients_equal_the_plain_maths(gate: str) -> None:
    dec = _decoder(gate=gate).train()
    feats = torch.randn(4, 5, 6)
    caps = torch.randint(4, 20, (4, 7))
    lengths = torch.tensor([7, 6, 7, 4])
    grads = []
    for run in ("fast", "reference"):
        dec.zero_grad()
        if run == "fast":
            out = dec(feats, caps, lengths)
            logits, alphas = out.logits, out.alphas
        else:
            logits, alphas = _reference_forward(dec, feats, caps)
        # real steps only: the fast path does not compute the steps after a caption's end
        real = torch.arange(caps.size(1) - 1) < (lengths - 1).unsqueeze(1)  # (B, T)
        loss = (F.cross_entropy(logits[real], caps[:, 1:][real])
                + ((1 - (alphas * real.unsqueeze(-1)).sum(1)) ** 2).sum())
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in dec.named_parameters() if p.grad is not None})
        if run == "fast":
            fast_logits, fast_alphas = logits.detach(), alphas.detach()
    torch.testing.assert_close(fast_logits[real], logits.detach()[real])
    torch.testing.assert_close(fast_alphas[real], alphas.detach()[real])
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("attention", ATTENTIONS.names())
def test_beams_sharing_the_image_cache_equal_copies_of_it(attention: str) -> None:
    dec = _decoder(attention).eval()
    feats, k = torch.randn(3, 5, 6), 4
    h = torch.randn(3 * k, 12)
    with torch.no_grad():
        cache = dec.precompute(feats)
        shared = dec.attention(cache, h)
        copied = dec.attention(tuple(c.repeat_interleave(k, 0) for c in cache), h)
    torch.testing.assert_close(shared.context, copied.context)
    torch.testing.assert_close(shared.alpha, copied.alpha)


@pytest.mark.parametrize("grad", [False, True])
def test_chunked_attention_scores_equal_one_pass(monkeypatch, grad: bool) -> None:
    dec = _decoder().eval()
    feats = torch.randn(5, 4, 6)
    h = torch.randn(5 * 3, 12, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        _, proj2 = dec.precompute(feats)
        whole = dec.attention.scores(proj2, h)
        monkeypatch.setattr(attention_module, "SCORE_CHUNK_ELEMENTS", 3 * 4 * 10 * 2)  # 2 images (grad)
        chunked = dec.attention.scores(proj2, h)
    torch.testing.assert_close(chunked, whole)
    if grad:
        (g1,) = torch.autograd.grad(whole.sum(), h)
        (g2,) = torch.autograd.grad(chunked.sum(), h)
        torch.testing.assert_close(g1, g2)


def test_batched_beam_search_still_runs_exactly_max_steps() -> None:
    dec = _decoder().eval()
    gen = beam_search(dec, torch.randn(3, 5, 6), beam_size=4, max_length=7, early_stop=False)
    assert gen.tokens.shape == (3, 7) and gen.alphas.shape == (3, 7, 5)
    assert [len(hyps) for hyps in gen.nbest] == [4, 4, 4]
