"""More than one caption per image, confidence, CSV/TSV and resumable output: `captioner caption`,
`captioner attend --rank` and the Python API."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from captioner.checkpoint import load_checkpoint
from captioner.cli import main
from captioner.inference import CaptionOptions, CaptionPipeline, OptionError

AWKWARD = ["a, b", 'say "cheese"', "two  spaces", "café ünïcode", "tab\there"]


@pytest.fixture()
def awkward_folder(tmp_path, shapes_dir) -> tuple[Path, list[Path]]:
    """Images whose paths have commas, quotes, spaces, non-ASCII letters and a tab."""
    folder = tmp_path / "odd, \"names\" ü"
    srcs = sorted((shapes_dir / "images").glob("*.png"))
    out = []
    for i, name in enumerate(AWKWARD):
        dst = folder / name / f"{name} {i}.png"
        dst.parent.mkdir(parents=True)
        shutil.copy(srcs[i], dst)
        out.append(dst)
    return folder, sorted(out)


def _run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["caption", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _check_confidence(row: dict) -> None:
    words = row["caption"].split()
    probs = row["word_probs"]
    assert len(probs) == len(words) and all(0 < p <= 1 for p in probs)
    # the mean per token (words and <end>) times the tokens is the summed log-probability
    tokens = round(row["score"] / row["mean_logprob"]) if row["mean_logprob"] else len(words) + 1
    assert tokens in (len(words), len(words) + 1)
    assert sum(math.log(p) for p in probs) >= row["score"] - 1e-3


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_csv_and_tsv_round_trip_awkward_paths(tiny_checkpoint, awkward_folder, capsys, fmt):
    folder, images = awkward_folder
    rc, out, err = _run(capsys, "--checkpoint", str(tiny_checkpoint), "--format", fmt, "--beam-size", "3",
                        "--n-best", "2", str(folder), str(folder / "missing.png"))
    assert rc == 1, err
    rows = list(csv.DictReader(io.StringIO(out), delimiter="," if fmt == "csv" else "\t"))
    assert list(rows[0]) == ["image", "rank", "caption", "score", "mean_logprob", "word_probs", "error"]
    good = [r for r in rows if not r["error"]]
    assert sorted({Path(r["image"]) for r in good}) == images
    for r in good:
        row = {"caption": r["caption"], "score": float(r["score"]), "mean_logprob": float(r["mean_logprob"]),
               "word_probs": [float(p) for p in r["word_probs"].split()]}
        _check_confidence(row)
    assert {r["rank"] for r in good} <= {"1", "2"}
    (bad,) = [r for r in rows if r["error"]]
    assert bad["image"] == str(folder / "missing.png") and bad["error"] == "file not found" and not bad["caption"]


def test_n_best_captions_are_distinct_and_sorted(tiny_checkpoint, awkward_folder, capsys):
    folder, images = awkward_folder
    rc, out, err = _run(capsys, "--checkpoint", str(tiny_checkpoint), "--json", "--beam-size", "4",
                        "--n-best", "4", "--max-length", "8", str(folder))
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    for image in images:
        mine = [r for r in rows if r["image"] == str(image)]
        assert [r["rank"] for r in mine] == list(range(1, len(mine) + 1)) and len(mine) >= 2
        assert len({r["caption"] for r in mine}) == len(mine), "distinct captions"
        scores = [r["score"] for r in mine]
        assert scores == sorted(scores, reverse=True), "best first"
        for r in mine:
            _check_confidence(r)
    # rank 1 is the caption the beam search gives alone
    rc, single, _ = _run(capsys, "--checkpoint", str(tiny_checkpoint), "--json", "--beam-size", "4",
                         "--max-length", "8", str(folder))
    best = {r["image"]: r["caption"] for r in rows if r["rank"] == 1}
    assert {r["image"]: r["caption"] for r in map(json.loads, single.splitlines())} == best


def test_seeded_sampling_repeats_and_seeds_differ(tiny_checkpoint, awkward_folder, capsys):
    folder, images = awkward_folder

    def draw(seed: int) -> list[tuple[str, int, str]]:
        rc, out, err = _run(capsys, "--checkpoint", str(tiny_checkpoint), "--json", "--sample", "--num-samples",
                            "3", "--temperature", "1.5", "--top-k", "10", "--top-p", "0.95", "--seed", str(seed),
                            str(folder))
        assert rc == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        for r in rows:
            _check_confidence(r)
        return [(r["image"], r["rank"], r["caption"]) for r in rows]

    first = draw(1)
    assert len(first) == 3 * len(images)
    assert draw(1) == first, "the same seed draws the same captions"
    assert draw(2) != first, "another seed draws others"


@pytest.mark.parametrize(("args", "message"), [
    (["--temperature", "0.5"], "--temperature is an option of sampling"),
    (["--seed", "1"], "--seed is an option of sampling"),
    (["--num-samples", "2"], "--num-samples is an option of sampling"),
    (["--beam-size", "2", "--n-best", "3"], "--n-best: n_best (3) must be <= the beam size (2)"),
    (["--sample", "--n-best", "2"], "--n-best"),
    (["--sample", "--temperature", "0"], "--temperature: temperature must be > 0"),
    (["--sample", "--top-p", "0"], "--top-p"),
    (["--sample", "--top-p", "1.5"], "--top-p"),
    (["--sample", "--top-k", "-1"], "--top-k"),
    (["--resume"], "give --output"),
    (["--json", "--format", "csv"], "--json is --format jsonl"),
    (["--format", "text", "--resume", "--output", "OUT"], "--resume needs --format jsonl, csv or tsv"),
])
def test_caption_option_errors_exit_2(tiny_checkpoint, awkward_folder, tmp_path, capsys, args, message):
    folder, _ = awkward_folder
    args = [str(tmp_path / "out.txt") if a == "OUT" else a for a in args]
    rc, out, err = _run(capsys, "--checkpoint", str(tiny_checkpoint), *args, str(folder))
    assert rc == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1, err


def _rows(path: Path, fmt: str) -> list[tuple]:
    """(image, rank, caption, score, mean_logprob, *word_probs) per row: the scores compare
    approximately (a batch of another size may change their last float32 digit)."""
    text = path.read_text(encoding="utf-8")
    if fmt == "jsonl":
        rows = [json.loads(line) for line in text.splitlines()]
    else:
        rows = list(csv.DictReader(io.StringIO(text), delimiter="," if fmt == "csv" else "\t"))
        for r in rows:
            r["word_probs"] = [float(p) for p in r["word_probs"].split()]
    return [(r["image"], int(r["rank"]), r["caption"], float(r["score"]), float(r["mean_logprob"]),
             *r["word_probs"]) for r in rows]


def _same_rows(a: list[tuple], b: list[tuple]) -> None:
    assert [r[:3] for r in a] == [r[:3] for r in b]
    assert [x for r in a for x in r[3:]] == pytest.approx([x for r in b for x in r[3:]], abs=1e-4)


def _count_images(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = CaptionPipeline._caption_tensors

    def counting(self, images, *args, **kwargs):
        seen.append(images.size(0))
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(CaptionPipeline, "_caption_tensors", counting)
    return seen


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_resume_captions_only_what_is_left(tiny_checkpoint, awkward_folder, tmp_path, capsys, monkeypatch, fmt):
    folder, images = awkward_folder
    out_file = tmp_path / f"captions.{fmt}"
    opts = ["--checkpoint", str(tiny_checkpoint), "--format", fmt, "--beam-size", "2", "--n-best", "2",
            "--batch-size", "2"]
    base = [*opts, "--output", str(out_file)]
    first = images[:3]
    rc, out, err = _run(capsys, *base, *map(str, first))
    assert rc == 0 and out == "", err
    assert not out_file.with_name(out_file.name + ".part").exists()
    before = out_file.read_bytes()

    seen = _count_images(monkeypatch)
    rc, out, err = _run(capsys, *base, "--resume", *map(str, images))
    assert rc == 0, err
    assert sum(seen) == len(images) - len(first), "only the new images went through the model"
    after = out_file.read_bytes()
    assert after.startswith(before) and len(after) > len(before), "the first lines are kept byte for byte"

    # the same as one uninterrupted run
    whole = tmp_path / f"whole.{fmt}"
    assert main(["caption", *opts, "--output", str(whole), *map(str, images)]) == 0
    _same_rows(_rows(whole, fmt), _rows(out_file, fmt))

    # nothing left: no model call, the file unchanged
    seen.clear()
    assert main(["caption", *base, "--resume", *map(str, images)]) == 0
    assert seen == [] and out_file.read_bytes() == after


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_after_a_kill_mid_line(tiny_checkpoint, awkward_folder, tmp_path, monkeypatch, fmt):
    """A run killed while writing leaves FILE.part with a torn last line and FILE untouched;
    --resume cuts the torn record (and its image's rows) and finishes the same file as an
    uninterrupted run."""
    folder, images = awkward_folder
    whole, out_file = tmp_path / f"whole.{fmt}", tmp_path / f"out.{fmt}"
    base = ["caption", "--checkpoint", str(tiny_checkpoint), "--format", fmt, "--beam-size", "2",
            "--n-best", "2", *map(str, images)]
    assert main([*base[:1], "--output", str(whole), *base[1:]]) == 0
    data = whole.read_bytes()
    lines = data.splitlines(keepends=True)
    cut = sum(map(len, lines[:4])) + len(lines[4]) // 2  # in the middle of the fifth line
    part = out_file.with_name(out_file.name + ".part")
    part.write_bytes(data[:cut])
    out_file.write_bytes(b"an older finished file\n")
    seen = _count_images(monkeypatch)
    assert main([*base[:1], "--output", str(out_file), "--resume", *base[1:]]) == 0
    assert not part.exists()
    resumed = out_file.read_bytes()
    kept = sum(map(len, lines[:2]))  # at least these lines stay as they were
    assert resumed[:kept] == data[:kept]
    _same_rows(_rows(out_file, fmt), _rows(whole, fmt))
    assert 0 < sum(seen) < len(images)


def test_resume_refuses_a_file_of_another_format(tiny_checkpoint, awkward_folder, tmp_path, capsys):
    folder, images = awkward_folder
    out_file = tmp_path / "captions.csv"
    out_file.write_text('{"image": "x.png", "rank": 1}\n')
    rc, out, err = _run(capsys, "--checkpoint", str(tiny_checkpoint), "--format", "csv", "--output",
                        str(out_file), "--resume", str(images[0]))
    assert rc == 2 and "is not a csv output" in err
    assert out_file.read_text() == '{"image": "x.png", "rank": 1}\n'
    assert not out_file.with_name("captions.csv.part").exists()


@pytest.mark.parametrize("left", ["part", "chunks"])
def test_a_run_without_resume_keeps_an_earlier_runs_work(tiny_checkpoint, awkward_folder, tmp_path, capsys, left):
    """An earlier run's OUT.part (one process) or OUT.parts/ chunks (many) are never thrown away
    by a run that forgot --resume: it stops with exit 2 and one line naming --resume and
    --overwrite; --overwrite deletes them and starts afresh."""
    folder, images = awkward_folder
    out_file = tmp_path / "captions.jsonl"
    part, chunk = tmp_path / "captions.jsonl.part", tmp_path / "captions.jsonl.parts" / "chunk-000000000-000001.jsonl"
    earlier = {part: b'{"image": "x.png", "rank": 1, "caption": "a"}\n'} if left == "part" else {
        chunk: b'{"i": 0, "image": "x.png", "rows": [{"image": "x.png", "error": "e"}]}\n'}
    for path, data in earlier.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    args = ["--checkpoint", str(tiny_checkpoint), "--json", "--output", str(out_file), str(folder)]
    rc, out, err = _run(capsys, *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and "--overwrite" in lines[0], err
    assert all(path.read_bytes() == data for path, data in earlier.items()), "the earlier run's work is untouched"
    assert not out_file.exists()
    rc, out, err = _run(capsys, *args, "--overwrite")
    assert rc == 0, err
    assert not part.exists() and not chunk.parent.exists()
    assert len(out_file.read_text().splitlines()) == len(images)
    rc, out, err = _run(capsys, *args, "--overwrite", "--resume")
    assert rc == 2 and "--overwrite" in err


# -- the Python API ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint) -> CaptionPipeline:
    return CaptionPipeline(load_checkpoint(tiny_checkpoint), beam_size=3)


def _images(shapes_dir: Path, n: int = 3) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((shapes_dir / "images").glob("*.png"))[:n]]


def test_api_n_best_and_default(pipeline, shapes_dir):
    images = _images(shapes_dir)
    best = pipeline(images)
    nbest = pipeline(images, n_best=3)
    assert len(nbest) == 3
    for one, caps in zip(best, nbest, strict=True):
        assert caps[0].words == one.words and caps[0].score == pytest.approx(one.score)
        assert [c.score for c in caps] == sorted((c.score for c in caps), reverse=True)
        assert len({c.text for c in caps}) == len(caps)
        for c in caps:
            assert len(c.word_probs) == len(c.words) == c.alphas.shape[0]
            assert sum(c.token_logprobs) == pytest.approx(c.score, abs=1e-4)
            assert c.mean_logprob == pytest.approx(c.score / len(c.token_logprobs))


def test_api_seeded_samples(pipeline, shapes_dir):
    images = _images(shapes_dir)
    opts = CaptionOptions(sample=True, num_samples=4, seed=7, temperature=1.3)
    a = pipeline(images, options=opts)
    b = pipeline(images, sample=True, num_samples=4, seed=7, temperature=1.3)
    c = pipeline(images, options=opts, seed=8)
    assert [len(x) for x in a] == [4, 4, 4]
    assert [[x.words for x in caps] for caps in a] == [[x.words for x in caps] for caps in b]
    assert [[x.words for x in caps] for caps in a] != [[x.words for x in caps] for caps in c]
    for caps in a:
        for x in caps:
            assert sum(x.token_logprobs) == pytest.approx(x.score, abs=1e-4)


@pytest.mark.parametrize(("kw", "field"), [
    ({"n_best": 4}, "n_best"), ({"sample": True, "temperature": 0.0}, "temperature"),
    ({"sample": True, "top_p": 0.0}, "top_p"), ({"seed": 3}, "seed"), ({"num_samples": 0}, "num_samples"),
    ({"sample": True, "n_best": 2}, "n_best"), ({"max_length": 0}, "max_length"),
])
def test_api_option_errors_name_the_field(pipeline, shapes_dir, kw, field):
    with pytest.raises(OptionError) as err:
        pipeline(_images(shapes_dir, 1), **kw)
    assert err.value.field == field


# -- attend --rank -------------------------------------------------------------------------------
def test_attend_rank_draws_the_kth_caption(tiny_checkpoint, shapes_dir, tmp_path, capsys):
    image = sorted((shapes_dir / "images").glob("*.png"))[0]
    texts = {}
    for rank in (1, 2):
        out = tmp_path / f"rank{rank}.png"
        rc = main(["attend", "--checkpoint", str(tiny_checkpoint), str(image), "-o", str(out), "--json",
                   "--beam-size", "3", "--rank", str(rank)])
        assert rc == 0
        texts[rank] = capsys.readouterr().out.strip()
        maps = json.loads(out.with_suffix(".json").read_text())
        assert maps["caption"] == texts[rank] and maps["rank"] == rank
        assert len(maps["word_probs"]) == len(maps["words"]) == len(maps["maps"])
    caps = CaptionPipeline(load_checkpoint(tiny_checkpoint), beam_size=3)(
        Image.open(image).convert("RGB"), n_best=2)
    assert [texts[1], texts[2]] == [c.text for c in caps]
    assert texts[1] != texts[2]
    rc = main(["attend", "--checkpoint", str(tiny_checkpoint), str(image), "-o", str(tmp_path / "x.png"),
               "--beam-size", "3", "--rank", "4"])
    assert rc == 2 and "--rank: 4 is more than the beam size (3)" in capsys.readouterr().err


# -- the options, declared once ------------------------------------------------------------------
def test_cli_flags_and_api_schema_come_from_caption_options(tiny_checkpoint, capsys):
    """Every option of CaptionOptions with a help text is a `caption` flag with that help; every
    option is a field of the API's form, with the limits its metadata declares."""
    from dataclasses import fields

    from fastapi.testclient import TestClient

    from captioner.checkpoint import load_checkpoint
    from captioner.serve.app import create_app

    assert main(["caption", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for f in fields(CaptionOptions):
        if f.metadata["help"] is not None:
            assert f"--{f.name.replace('_', '-')}" in help_text and f.metadata["help"] in help_text, f.name
    with TestClient(create_app(load_checkpoint(tiny_checkpoint))) as client:
        schema = client.get("/openapi.json").json()["paths"]["/api/caption"]["post"]["requestBody"]
        form = schema["content"]["multipart/form-data"]["schema"]["properties"]
        assert set(form) == {"image"} | {f.name for f in fields(CaptionOptions)}
        assert form["n_best"]["maximum"] == fields(CaptionOptions)[2].metadata["api_max"] == 10
        r = client.post("/api/caption", files={"image": ("a.png", b"x", "image/png")}, data={"n_best": "11"})
        assert r.status_code == 422 and r.json()["error"] == "n_best must be from 1 to 10, got 11"
