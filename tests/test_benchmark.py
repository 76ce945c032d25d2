"""scripts/benchmark.py at tiny sizes (figures, not timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.benchmark import main

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


@pytest.mark.parametrize("attention", ["soft", "hard", "multihead"])
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
