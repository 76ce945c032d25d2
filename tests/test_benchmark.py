"""The benchmarks (benchmarks/, run by scripts/benchmark.py) at tiny sizes: their figures are the
ones their timings and memory samples give (never timings against thresholds: speed targets live
in benchmarks, not tests). benchmarks/ is imported from the repository's root, as tests/ is."""

from __future__ import annotations

import ast
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import timing
from benchmarks.cli import main
from captioner.models import ATTENTIONS

ROOT = Path(__file__).resolve().parent.parent

MACHINE = {"torch", "threads", "device", "cpu"}
TINY_DECODER = ["--encoder-dim", "24", "--grid", "3", "--vocab", "40", "--batch", "3", "--embed-dim", "8",
                "--attention-dim", "8", "--decoder-dim", "12", "--caption-length", "6", "--beam-size", "3",
                "--max-steps", "4", "--repeats", "1"]
TINY_CAPTION = ["--encoder", "shapes_cnn", "--image-size", "32", "--images", "3", "--batch-size", "2",
                "--vocab", "20", "--decoder-dim", "8", "--source-size", "40x30", "--beam-size", "2",
                "--max-length", "3"]


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def timings(monkeypatch) -> list[list[list[float]]]:
    """What each timing loop of the benchmark measured, in order: per timed function, the
    seconds of each round."""
    seen = []
    measure = timing.alternating

    def spy(fns, repeats, device):
        times = measure(fns, repeats, device)
        seen.append(times)
        return times

    monkeypatch.setattr(timing, "alternating", spy)
    return seen


def _run(capsys, *argv: str) -> dict:
    assert main(["--threads", "1", *argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["machine"]) >= MACHINE and report["machine"]["threads"] == 1
    return report


@pytest.mark.parametrize("attention", ATTENTIONS.names())
def test_decoder_benchmark_reports_the_timings_it_measured(capsys, timings, attention: str) -> None:
    report = _run(capsys, "decoder", *TINY_DECODER, "--repeats", "3", "--attention", attention)
    assert report["settings"]["attention"] == attention and report["peak_rss_mb"] > 0
    (train,), (beam,), (greedy,) = timings  # one loop per part, each of one function
    assert len(train) == len(beam) == len(greedy) == 3
    batch = report["settings"]["batch"]
    assert report["train_s_per_step"] == pytest.approx(statistics.median(train))
    assert report["train_captions_per_s"] == pytest.approx(batch / statistics.median(train))
    for part, secs in (("beam", beam), ("greedy", greedy)):
        assert report[f"{part}_ms_per_image"] == pytest.approx(1000 * statistics.median(secs) / batch), part
        assert report[f"{part}_images_per_s"] == pytest.approx(batch / statistics.median(secs)), part


def test_decoder_benchmark_trains_with_the_optimiser_fit_builds(capsys, monkeypatch) -> None:
    from captioner.training import optim

    built = []
    real = optim.OPTIMIZERS["muon"]
    monkeypatch.setitem(optim.OPTIMIZERS, "muon", lambda *a: built.append(real(*a)) or built[-1])
    report = _run(capsys, "decoder", *TINY_DECODER, "--optimizer", "muon", "--only", "train")
    assert report["settings"]["optimizer"] == "muon" and report["train_s_per_step"] > 0
    assert len(built) == 1 and isinstance(built[0].muon, torch.optim.Muon)


def test_decoder_benchmark_decodes_in_int8(capsys) -> None:
    report = _run(capsys, "decoder", *TINY_DECODER, "--quantize", "int8", "--only", "beam", "greedy")
    assert report["beam_images_per_s"] > 0 and report["greedy_images_per_s"] > 0
    assert report["settings"]["quantize"] == "int8" and "train_captions_per_s" not in report


@pytest.mark.parametrize(("precision", "decode"), [("fp32", "auto"), ("bf16", "auto"), ("fp32", "device")])
def test_caption_benchmark_reports_the_timings_it_measured(capsys, timings, precision: str, decode: str) -> None:
    report = _run(capsys, "caption", *TINY_CAPTION, "--repeats", "3", "--precision", precision,
                  "--jpeg-decode", decode)
    assert report["jpeg_on_device"] == (decode == "device")  # auto on a CPU: PIL
    ((encoder, caption),) = timings  # one loop, the two paths taking turns
    assert len(encoder) == len(caption) == 3
    images = report["settings"]["images"]
    assert report["encoder_ms_per_image"] == pytest.approx(1000 * statistics.median(encoder) / images)
    assert report["caption_ms_per_image"] == pytest.approx(1000 * statistics.median(caption) / images)
    # the median of the rounds' ratios (not the ratio of the medians)
    assert report["ratio"] == pytest.approx(statistics.median(c / e for e, c in zip(encoder, caption)))


def test_caption_benchmark_ratio_is_the_median_of_the_rounds_ratios(capsys, monkeypatch) -> None:
    """Rounds whose ratios (3, 1, 5) have a median, 3, far from the ratio of the medians, 1.5."""
    def scripted(fns, repeats, device):
        for fn in fns:  # each path still runs, once
            fn()
        return [[1.0, 2.0, 4.0], [3.0, 2.0, 20.0]]

    monkeypatch.setattr(timing, "alternating", scripted)
    report = _run(capsys, "caption", *TINY_CAPTION, "--repeats", "3")
    assert report["ratio"] == pytest.approx(3.0)
    assert report["encoder_ms_per_image"] == pytest.approx(1000 * 2.0 / 3)
    assert report["caption_ms_per_image"] == pytest.approx(1000 * 3.0 / 3)


def test_encoder_benchmark_reports_the_timings_it_measured(capsys, timings) -> None:
    report = _run(capsys, "encoder", "--image-size", "32", "--grid", "4", "--channels", "16", "--batch", "2",
                  "--repeats", "3")
    ((rgb, split),) = timings  # one loop, the two stems taking turns
    assert len(rgb) == len(split) == 3
    assert report["rgb_ms_per_batch"] == pytest.approx(1000 * statistics.median(rgb))
    assert report["split_ms_per_batch"] == pytest.approx(1000 * statistics.median(split))
    assert report["split_over_rgb"] == pytest.approx(statistics.median(s / r for r, s in zip(rgb, split)))


def test_step_benchmark_reports_each_variant_and_its_ratio_to_fp32(capsys, timings) -> None:
    report = _run(capsys, "step", "--image-size", "32", "--grid", "4", "--channels", "16", "--batch", "2",
                  "--decoder-dim", "16", "--repeats", "3", "--variants", "fp32", "channels_last", "bf16", "muon")
    ((fp32, nhwc, bf16, muon),) = timings  # one loop, the variants taking turns
    assert len(fp32) == len(nhwc) == len(bf16) == len(muon) == 3
    assert report["muon_over_fp32"] == pytest.approx(statistics.median(a / b for a, b in zip(muon, fp32)))
    assert report["fp32_ms_per_step"] == pytest.approx(1000 * statistics.median(fp32))
    assert report["channels_last_over_fp32"] == pytest.approx(statistics.median(a / b for a, b in zip(nhwc, fp32)))
    assert report["bf16_over_fp32"] == pytest.approx(statistics.median(a / b for a, b in zip(bf16, fp32)))


def test_data_benchmark_times_reading_against_memory(capsys, timings, shapes_dir) -> None:
    report = _run(capsys, "data", "--data-dir", str(shapes_dir), "--image-size", "32", "--batch", "4",
                  "--repeats", "3")
    ((disk, memory),) = timings
    assert len(disk) == len(memory) == 3
    assert report["disk_ms_per_batch"] == pytest.approx(1000 * statistics.median(disk))
    assert report["in_memory_over_disk"] == pytest.approx(statistics.median(m / d for d, m in zip(disk, memory)))


def test_scst_benchmark_reports_the_timings_it_measured(capsys, timings) -> None:
    """Its reward is built as fit builds it (on_fit_start, from the data module's references)."""
    report = _run(capsys, "scst", "--batch", "3", "--samples", "2", "--max-length", "5", "--vocab", "40",
                  "--grid", "2", "--decoder-dim", "8", "--repeats", "2")
    (step,), (ce,), (reward,) = timings  # the SCST step, the cross-entropy step, the reward alone
    assert len(step) == len(ce) == len(reward) == 2
    assert report["scst_step_s"] == pytest.approx(statistics.median(step))
    assert report["ce_step_s"] == pytest.approx(statistics.median(ce))
    assert report["reward_share_of_step"] == pytest.approx(statistics.median(reward) / statistics.median(step))
    assert report["captions_per_step"] == 6 and 0 < report["mean_sample_words"] <= 5


def test_memory_benchmark_stays_flat_while_it_streams(capsys) -> None:
    """Sampled after 100 and 200 images: keeping ~40 kB or more per image fails the bound
    (measured: no growth without a leak, +6 MB with 60 kB kept per image)."""
    report = _run(capsys, "memory", "--images", "200", "--batch-size", "8")
    rss, peak = report["rss_mb"], report["peak_rss_mb"]
    assert list(rss) == list(peak) == ["100", "200"]
    assert report["peak_growth_mb"] == pytest.approx(peak["200"] - peak["100"])
    # current, not peak, resident memory: this process's peak may come from an earlier test
    assert rss["200"] - rss["100"] < 4.0, rss


def test_merge_benchmark_merges_every_row_in_a_child_per_size(capsys) -> None:
    report = _run(capsys, "merge", "--rows", "50", "120", "--world", "3", "--block", "4", "--chunk", "8")
    merge = report["merge"]
    assert list(merge) == ["50", "120"] and report["world"] == 3
    assert all(m["peak_rss_mb"] >= m["before_mb"] > 0 for m in merge.values())
    key = "merge_peak_mb" if "merge_peak_mb" in merge["50"] else "peak_rss_mb"
    assert report["peak_growth_mb"] == pytest.approx(merge["120"][key] - merge["50"][key])


def test_script_prints_the_machine_with_the_figures(tmp_path) -> None:
    script = ROOT / "scripts" / "benchmark.py"
    out = subprocess.run([sys.executable, str(script), "--threads", "1", "decoder", *TINY_DECODER,
                          "--only", "greedy"], capture_output=True, text=True, check=True).stdout
    assert "threads" in out and "torch" in out and "greedy_images_per_s" in out


def test_benchmarks_use_captioner_public_api_only() -> None:
    """Outside the package, as a user's script: no private name of captioner imported or read
    (such as a system's reward state), and no benchmark called with positional settings."""
    private, positional = [], []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("captioner"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                private.append(f"{path.name}:{node.lineno}: .{node.attr}")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "").startswith("bench_") and node.args:
                positional.append(f"{path.name}:{node.lineno}")
    assert not private and not positional, (private, positional)
    assert not (ROOT / "captioner" / "benchmark.py").exists()  # not shipped in the package


def test_epoch_benchmark_split_is_coco_shaped_and_cheap(tmp_path) -> None:
    """The synthetic split: the images asked for (plus 8 val, 8 test) over a few files linked under
    every name, five captions each."""
    from benchmarks.epoch import synthetic_split

    args = synthetic_split(tmp_path, images=12, distinct=3, source_size=(40, 30))
    split = json.loads(Path(args[args.index("--data.karpathy.split_file") + 1]).read_text())["images"]
    assert [sum(e["split"] == s for e in split) for s in ("train", "val", "test")] == [12, 8, 8]
    assert all(len(e["sentences"]) == 5 for e in split)
    files = {(tmp_path / e["filepath"] / e["filename"]).resolve() for e in split}
    assert len(files) == 3 and all(f.is_file() for f in files)


def test_epoch_benchmark_times_only_the_steps_after_the_warmup(monkeypatch) -> None:
    from types import SimpleNamespace

    from benchmarks import epoch

    clock, now = epoch.StepClock(warmup=2), iter(range(100, 200, 10))
    monkeypatch.setattr(epoch.time, "perf_counter", lambda: next(now))
    module = SimpleNamespace(device=torch.device("cpu"))
    for step in range(1, 6):  # global_step after each batch
        clock.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, step - 1)
    assert (clock.timed, clock.end - clock.start) == (3, 30)  # steps 3, 4, 5: one 10-s tick each

    monkeypatch.setattr(epoch, "synthetic_split", lambda *a, **k: [])
    monkeypatch.setattr(epoch, "time_fit", lambda settings, warmup, steps: {"s_per_step": 0.1})
    report = epoch.bench_epoch(source="jpeg", batch_size=64, device="cpu")
    assert report["coco_epoch_steps"] == 8851  # 113,287 images x 5 captions / 64, rounded up
    assert report["coco_epoch_min"] == pytest.approx(0.1 * 8851 / 60)


def test_gpu_check_without_a_gpu_stops_at_once_with_one_line(tmp_path) -> None:
    fake = tmp_path / "python"  # an interpreter whose torch sees no GPU
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    script = str(ROOT / "scripts" / "gpu_check.sh")
    out = subprocess.run(["bash", script, "--scale-only", str(tmp_path / "out")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)}, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert "no CUDA GPU" in line and "DEVICE=cpu QUICK=1" in line
    assert not (tmp_path / "out").exists()
    bad = subprocess.run(["bash", script, "--scale"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--scale-only" in bad.stderr
    usage = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--scale-only" in usage.stdout and "set -euo" not in usage.stdout
def test_decode_benchmark_reports_the_timings_it_measured(capsys, timings) -> None:
    report = _run(capsys, "decode", "--files", "1", "--shapes", "3", "--jpeg-sizes", "64x48", "600x500",
                  "--image-size", "128", "--repeats", "2")
    have_torchcodec = report["torchcodec"]
    loops = iter(timings)
    for case in ("shapes_png_64", "jpeg_64x48", "jpeg_600x500"):
        files = report[case]["files"]
        if have_torchcodec:  # PIL alone, then TorchCodec, taking turns
            pil, codec = next(loops)
            decode = report[case]["decode"]
            assert decode["pil"]["per_s"] == pytest.approx(files / statistics.median(pil), rel=0.01)
            assert decode["torchcodec"]["vs_pil"] == pytest.approx(
                statistics.median(p / c for p, c in zip(pil, codec)), abs=0.01)
    # only the photo at least twice the resize is decoded DCT-scaled: whole (PIL, TorchCodec), then reduced
    assert "decode_resize_128" not in report["jpeg_64x48"] and report["jpeg_600x500"]["dct_scale"] == 2
    ways = next(loops)
    assert len(ways) == (3 if have_torchcodec else 2) and all(len(t) == 2 for t in ways)
    resize = report["jpeg_600x500"]["decode_resize_128"]
    assert resize["dct_scaled"]["per_s"] == pytest.approx(1 / statistics.median(ways[-1]), rel=0.01)
    assert next(loops, None) is None


def test_dct_quality_benchmark_compares_features_and_captions(capsys, tiny_checkpoint, shapes_dir) -> None:
    report = _run(capsys, "dct-quality", "--encoder", "resnet50", "--image-size", "64", "--photos", "1",
                  "--photo-size", "600x500", "--checkpoint", str(tiny_checkpoint), "--shapes-dir", str(shapes_dir),
                  "--images", "3")
    features, captions = report["features"], report["captions"]
    assert features["dct_scale"] == 4 and 0 < features["feature_rel_diff_mean"] < 1
    assert features["input_levels_mean"] > 0  # the two decodings do differ
    assert captions["images"] == 3 and captions["dct_scale"] == 8
    share = captions["identical_whole_vs_dct_scaled"] * 3  # a share of 3 images
    assert share == pytest.approx(round(share), abs=1e-3) and 0 <= share <= 3
def test_startup_benchmark_takes_turns_with_the_baseline_code(capsys, monkeypatch, tmp_path) -> None:
    """Each round runs every command on this code and on the baseline's; the speedup is the median
    of the rounds' ratios (baseline / this code)."""
    from benchmarks import startup

    baseline = tmp_path / "before"
    seen = []

    def scripted(cmd, code_root, threads):
        seen.append((cmd[1:3], code_root, threads))
        return {ROOT: 1.0, baseline.resolve(): 3.0}[code_root]

    monkeypatch.setattr(startup, "_wall", scripted)
    report = _run(capsys, "startup", "--checkpoint", str(tmp_path / "m.ckpt"), "--image", str(tmp_path / "a.png"),
                  "--baseline-root", str(baseline), "--repeats", "2")
    assert len(seen) == 3 * 5  # an untimed round, then 2: torch, caption and api on both codes
    assert {threads for *_, threads in seen} == {1}
    assert [code for _, code, _ in seen[:5]] == [ROOT, ROOT, baseline.resolve(), ROOT, baseline.resolve()]
    assert seen[1][0] == ["-m", "captioner.cli"] and seen[3][0][0] == "-c"
    assert report["caption"]["median_s"] == 1.0 and report["caption_speedup"] == pytest.approx(3.0)
    assert report["api_baseline"]["min_s"] <= report["api_baseline"]["median_s"] <= report["api_baseline"]["max_s"]


def test_startup_benchmark_commands_caption(tiny_checkpoint, shapes_dir) -> None:
    from benchmarks import startup

    image = sorted((shapes_dir / "images").glob("*.png"))[0]
    for cmd in startup._commands(tiny_checkpoint, image).values():  # each must succeed
        assert startup._wall(cmd, ROOT, 1) > 0
