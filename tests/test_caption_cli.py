"""`captioner caption` and `captioner attend` end to end, on the session's tiny checkpoint."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.cli import main
from tests.conftest import fit_args

BAD = {"cut.jpg": "truncated image", "empty.jpg": "zero-byte file", "notes.jpg": "not an image"}


def _good_images(folder: Path, shapes_dir: Path, n: int = 5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, src in enumerate(sorted((shapes_dir / "images").glob("*.png"))[:n]):
        # Nested folder and mixed extensions: the search is recursive and case-insensitive.
        dst = folder / ("sub" if i % 2 else "") / f"good{i}{'.PNG' if i == 3 else '.png'}"
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(src, dst)
        out.append(dst)
    return out


@pytest.fixture()
def mixed_folder(tmp_path, shapes_dir) -> tuple[Path, list[Path], dict[Path, str]]:
    """Five good images plus a truncated JPEG, a zero-byte file and a text file named .jpg."""
    folder = tmp_path / "mixed"
    good = _good_images(folder, shapes_dir)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("definitely not a picture\n")
    (folder / "README.txt").write_text("not an image extension: skipped\n")
    return folder, good, {folder / name: reason for name, reason in BAD.items()}


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


# -- caption -------------------------------------------------------------------------------------
def test_caption_json_reports_bad_files_and_captions_the_rest(tiny_checkpoint, mixed_folder, capsys, caplog):
    folder, good, bad = mixed_folder
    rc = main(["caption", "--checkpoint", str(tiny_checkpoint), "--json", "--batch-size", "2",
               "--device", "cpu", str(folder)])
    out, err = capsys.readouterr()
    assert rc == 1
    rows = _json_lines(out)
    assert len(rows) == len(good) + len(bad)
    by_path = {Path(r["image"]): r for r in rows}
    for path, reason in bad.items():
        assert set(by_path[path]) == {"image", "error"}
        assert reason in by_path[path]["error"]
    for path in good:
        row = by_path[path]
        assert set(row) == {"image", "rank", "caption", "score", "mean_logprob", "word_probs"}
        assert row["rank"] == 1 and len(row["word_probs"]) == len(row["caption"].split())
        assert isinstance(row["caption"], str) and row["caption"]
        assert isinstance(row["score"], float) and row["score"] <= 0
    # Output follows the sorted recursive listing, errors in place.
    assert [r["image"] for r in rows] == sorted(r["image"] for r in rows)
    assert "3 of 8 images could not be captioned" in caplog.text


def test_reading_threads_give_the_same_stream_in_input_order(tiny_checkpoint, mixed_folder):
    """pipeline.stream with reader threads: same captions and per-file errors, in input order,
    as reading inline; a batch smaller than the read-ahead window is fine."""
    from captioner.checkpoint import load_checkpoint
    from captioner.inference import CaptionPipeline, ImageError

    folder, good, bad = mixed_folder
    paths = sorted([*good, *bad]) * 3  # longer than the read-ahead window (2 batches)
    pipeline = CaptionPipeline(load_checkpoint(tiny_checkpoint, device="cpu"), beam_size=2)
    def triples(results):
        return [(r.image, None, r.reason) if isinstance(r, ImageError) else (r[0].image, r[0], None)
                for r in results]

    inline = triples(pipeline.stream(paths, batch_size=2, num_workers=0))
    threaded = triples(pipeline.stream(iter(paths), batch_size=2, num_workers=3))
    assert [p for p, _, _ in threaded] == paths
    for (p1, c1, e1), (p2, c2, e2) in zip(threaded, inline, strict=True):
        assert (p1, e1) == (p2, e2)
        if c1 is not None:
            assert (c1.words, c1.score) == (c2.words, c2.score)
            torch.testing.assert_close(c1.alphas, c2.alphas)
    assert sum(e is not None for _, _, e in threaded) == 3 * len(bad)


def test_caption_text_output_all_good(tiny_checkpoint, tmp_path, shapes_dir, capsys):
    good = _good_images(tmp_path / "imgs", shapes_dir, n=3)
    extra = tmp_path / "single.png"
    shutil.copy(good[0], extra)
    rc = main(["caption", "--checkpoint", str(tiny_checkpoint), "--beam-size", "2",
               "--max-length", "6", str(tmp_path / "imgs"), str(extra)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    assert [Path(line.split("\t")[0]) for line in lines] == sorted(good) + [extra]
    for line in lines:
        path, caption = line.split("\t")
        assert 1 <= len(caption.split()) <= 6
    # The same image gives the same caption wherever it comes from.
    assert lines[0].split("\t")[1] == lines[-1].split("\t")[1]
    assert "ERROR" not in err


def test_caption_text_errors_go_to_stderr(tiny_checkpoint, mixed_folder, capsys):
    folder, good, bad = mixed_folder
    rc = main(["caption", "--checkpoint", str(tiny_checkpoint), "--progress", str(folder)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert sorted(Path(line.split("\t")[0]) for line in out.splitlines()) == sorted(good)
    for path, reason in bad.items():
        assert f"{path}\tERROR: " in err and reason in err
    assert "img" in err  # the progress bar


def test_caption_missing_file_is_a_per_file_error(tiny_checkpoint, tmp_path, shapes_dir, capsys):
    good = _good_images(tmp_path / "imgs", shapes_dir, n=1)
    rc = main(["caption", "--checkpoint", str(tiny_checkpoint), "--json", str(good[0]),
               str(tmp_path / "nope.png")])
    rows = _json_lines(capsys.readouterr().out)
    assert rc == 1
    assert "caption" in rows[0] and rows[1] == {"image": str(tmp_path / "nope.png"), "error": "file not found"}


class _Payload:
    """Unpickling this runs code: it writes a file next to the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _bad_checkpoint(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "garbage":
        path.write_bytes(b"\x00\x01 certainly not a checkpoint " * 10)
    elif kind == "malicious":
        torch.save({"state_dict": {}, "payload": _Payload(tmp_path / "PWNED")}, path)
    elif kind == "malicious_raw_pickle":
        path.write_bytes(pickle.dumps({"payload": _Payload(tmp_path / "PWNED")}))
    elif kind == "not_captioner":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "no_vocab":
        torch.save({"state_dict": {}, "hyper_parameters": {"encoder": {}, "decoder": {}},
                    "captioner": {"preprocessing": {}}}, path)
    return path  # "missing": never written


@pytest.mark.parametrize("kind", ["missing", "garbage", "malicious", "malicious_raw_pickle", "not_captioner",
                                  "no_vocab"])
def test_unusable_checkpoint_exits_2_with_one_line(kind, tmp_path, shapes_dir, capsys):
    good = _good_images(tmp_path / "imgs", shapes_dir, n=1)
    ckpt = _bad_checkpoint(kind, tmp_path)
    rc = main(["caption", "--checkpoint", str(ckpt), str(good[0])])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("captioner: error: ") and str(ckpt) in err
    assert "Traceback" not in err
    assert not (tmp_path / "PWNED").exists()
    # docs/checkpoints.md: "the keys a checkpoint must have are checked with a message naming what is missing"
    if kind == "not_captioner":
        assert "it lacks state_dict, hyper_parameters, captioner" in err
    if kind == "no_vocab":
        assert err.rstrip().endswith("it lacks captioner.vocab")
    if kind == "malicious":
        assert "refused" in err
        # The payload is real: an unsafe load would have run it.
        torch.load(ckpt, weights_only=False)
        assert (tmp_path / "PWNED").read_text() == "pwned"


def test_caption_int8_decoding(tiny_checkpoint, tmp_path, shapes_dir, capsys):
    good = _good_images(tmp_path / "imgs", shapes_dir, n=3)
    rc = main(["caption", "--checkpoint", str(tiny_checkpoint), "--quantize", "int8", "--json",
               "--beam-size", "2", "--device", "cpu", str(tmp_path / "imgs")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = _json_lines(out)
    assert sorted(Path(r["image"]) for r in rows) == sorted(good) and all(r["caption"] for r in rows)


def test_caption_int8_without_quantised_kernels_exits_2(tiny_checkpoint, monkeypatch, tmp_path, shapes_dir,
                                                         capsys):
    good = _good_images(tmp_path / "imgs", shapes_dir, n=1)
    monkeypatch.setattr("captioner.models.quantize.int8_available", lambda: "no quantised CPU kernels")
    rc = main(["caption", "--checkpoint", str(tiny_checkpoint), "--quantize", "int8", str(good[0])])
    assert rc == 2
    assert "--quantize int8: int8 decoding is not available: no quantised CPU kernels" in capsys.readouterr().err


def test_caption_no_images_found_exits_2(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    rc = main(["caption", "--checkpoint", str(tiny_checkpoint), str(tmp_path / "empty")])
    assert rc == 2
    assert "no image files found" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--beam-size", "0"], ["--batch-size", "-1"], ["--device", "tpu"]])
def test_caption_bad_arguments_exit_2(tiny_checkpoint, tmp_path, args, capsys):
    assert main(["caption", "--checkpoint", str(tiny_checkpoint), *args, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("captioner: error:") and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="only meaningful without a GPU")
def test_caption_cuda_without_gpu_exits_2(tiny_checkpoint, tmp_path, shapes_dir, capsys):
    good = _good_images(tmp_path / "imgs", shapes_dir, n=1)
    rc = main(["caption", "--checkpoint", str(tiny_checkpoint), "--device", "cuda", str(good[0])])
    assert rc == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_caption_through_the_installed_entry_point(tiny_checkpoint, mixed_folder):
    folder, good, bad = mixed_folder
    exe = Path(sys.executable).parent / "captioner"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "captioner.cli"]
    proc = subprocess.run([*cmd, "caption", "--checkpoint", str(tiny_checkpoint), "--json", str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    rows = _json_lines(proc.stdout)
    assert sum("error" in r for r in rows) == len(bad)
    assert sum("caption" in r for r in rows) == len(good)
    assert "Traceback" not in proc.stderr

    proc = subprocess.run([*cmd, "caption", "--checkpoint", str(folder / "empty.jpg"), str(good[0])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# -- attend --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["soft", "hard", "multihead"])
def attention_checkpoint(request, tiny_checkpoint, shapes_dir, tmp_path_factory) -> Path:
    """The session checkpoint for soft attention; one epoch of training for the others."""
    if request.param == "soft":
        return tiny_checkpoint
    from captioner.checkpoint import read_checkpoint

    root = tmp_path_factory.mktemp(request.param)
    assert main(fit_args(shapes_dir, root, "--trainer.max_epochs", "1",
                         "--model.decoder.attention", request.param,
                         "--model.decoder.num_heads", "4")) == 0
    ckpt = read_checkpoint(root / "checkpoints" / "best.ckpt")
    assert ckpt["global_step"] == 8  # one epoch: 64 training images in batches of 8
    assert ckpt["hyper_parameters"]["decoder"]["attention"] == request.param
    return root / "checkpoints" / "best.ckpt"


def test_attend_png_and_json(attention_checkpoint, shapes_dir, tmp_path, capsys):
    from captioner.checkpoint import load_checkpoint

    image = sorted((shapes_dir / "images").glob("*.png"))[0]
    out = tmp_path / "att.png"
    rc = main(["attend", "--checkpoint", str(attention_checkpoint), str(image), "--output", str(out),
               "--json", "--beam-size", "2"])
    stdout = capsys.readouterr().out
    assert rc == 0
    caption = stdout.strip()
    with Image.open(out) as im:
        assert im.format == "PNG"
    maps = json.loads(out.with_suffix(".json").read_text())
    assert maps["caption"] == caption and maps["words"] == caption.split()
    h, w = maps["grid"]
    grid = load_checkpoint(attention_checkpoint).hparams["encoder"]["grid"]
    assert (h, w) == (grid, grid)
    arr = np.asarray(maps["maps"])
    assert arr.shape == (len(maps["words"]), h, w)
    np.testing.assert_allclose(arr.sum(axis=(1, 2)), 1.0, atol=1e-4)
    assert (arr >= 0).all()


def test_attend_gif_one_frame_per_word(tiny_checkpoint, shapes_dir, tmp_path, capsys):
    image = sorted((shapes_dir / "images").glob("*.png"))[1]
    out = tmp_path / "att.gif"
    rc = main(["attend", "--checkpoint", str(tiny_checkpoint), str(image), "-o", str(out), "--no-smooth",
               "--cmap", "jet"])
    words = capsys.readouterr().out.split()
    assert rc == 0
    with Image.open(out) as im:
        assert im.format == "GIF" and im.n_frames == len(words)
    # --format wins over the suffix.
    rc = main(["attend", "--checkpoint", str(tiny_checkpoint), str(image), "-o", str(tmp_path / "x.img"),
               "--format", "gif"])
    assert rc == 0
    with Image.open(tmp_path / "x.img") as im:
        assert im.format == "GIF"


def test_attend_unreadable_image_exits_1(tiny_checkpoint, mixed_folder, tmp_path, capsys):
    folder, _, _ = mixed_folder
    rc = main(["attend", "--checkpoint", str(tiny_checkpoint), str(folder / "cut.jpg"), "-o",
               str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "cut.jpg" in err and "truncated image" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.png").exists()


def test_attend_bad_checkpoint_and_output_folder_exit_2(tiny_checkpoint, shapes_dir, tmp_path, capsys):
    image = sorted((shapes_dir / "images").glob("*.png"))[0]
    rc = main(["attend", "--checkpoint", str(tmp_path / "missing.ckpt"), str(image), "-o", str(tmp_path / "a.png")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    rc = main(["attend", "--checkpoint", str(tiny_checkpoint), str(image), "-o", str(tmp_path / "no" / "a.png")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["attend", "--checkpoint", str(tiny_checkpoint), str(image), "-o", str(tmp_path / "a.png"),
               "--cmap", "nonsense"])
    assert rc == 2 and "unknown colour map" in capsys.readouterr().err


def test_one_process_captions_through_the_stream_not_trainer_predict(tiny_checkpoint, tmp_path, shapes_dir,
                                                                     capsys, monkeypatch):
    """`caption` on one process without --resume is the pipeline's stream: Trainer.predict is
    never called, and the rows are those of the resumable (Trainer.predict) path, byte for byte."""
    import lightning as L

    good = _good_images(tmp_path / "imgs", shapes_dir, n=5)
    args = ["caption", "--checkpoint", str(tiny_checkpoint), "--json", "--beam-size", "2", "--batch-size", "2",
            *map(str, good)]
    real = L.Trainer.predict
    monkeypatch.setattr(L.Trainer, "predict", lambda *a, **k: pytest.fail("Trainer.predict was called"))
    assert main(args) == 0
    streamed = capsys.readouterr().out
    monkeypatch.setattr(L.Trainer, "predict", real)
    out = tmp_path / "out.jsonl"
    assert main([*args, "--output", str(out), "--resume"]) == 0  # --resume: Trainer.predict
    assert out.read_text() == streamed and len(streamed.splitlines()) == len(good)


def test_caption_files_from_a_list_and_stdin(tiny_checkpoint, mixed_folder, tmp_path, monkeypatch, capsys):
    """--files-from: one path a line (blank lines and surrounding spaces ignored, relative to
    the current folder), the rows in the list's order, a listed file that is missing reported
    per file while the rest are captioned; '-' reads standard input; no folder is walked."""
    folder, good, _bad = mixed_folder
    monkeypatch.chdir(folder)
    listed = [good[3], good[0], folder / "missing.png", good[1]]
    names = [str(p.relative_to(folder)) for p in listed]
    files = tmp_path / "files.txt"
    files.write_text(f"\n  {names[0]}  \n{names[1]}\n\n{names[2]}\r\n\t{names[3]}\n")

    def walk(*args):
        raise AssertionError("a folder was walked")

    monkeypatch.setattr("captioner.data.images.iter_image_paths", walk)
    assert main(["caption", "--checkpoint", str(tiny_checkpoint), "--json", "--files-from", str(files)]) == 1
    rows = _json_lines(capsys.readouterr().out)
    assert [r["image"] for r in rows] == names
    assert "error" in rows[2] and all("caption" in r for r in rows[:2] + rows[3:])
    with open(files) as stdin:
        monkeypatch.setattr("sys.stdin", stdin)
        assert main(["caption", "--checkpoint", str(tiny_checkpoint), "--json", "--files-from", "-"]) == 1
    assert _json_lines(capsys.readouterr().out) == rows


@pytest.mark.parametrize(("args", "message"), [
    (["--files-from", "LIST", "x.png"], "not both"),
    (["--files-from", "nowhere.txt"], "nowhere.txt is not a file"),
    (["--files-from", "EMPTY"], "lists no files"),
    (["--files-from", "-", "--output", "OUT", "--trainer.devices", "2", "--trainer.strategy", "ddp",
      "--trainer.accelerator", "cpu"], "standard input"),
])
def test_caption_files_from_mistakes_exit_2(tiny_checkpoint, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "LIST").write_text("x.png\n")
    (tmp_path / "EMPTY").write_text("\n  \n")
    assert main(["caption", "--checkpoint", str(tiny_checkpoint), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
