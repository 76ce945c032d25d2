"""`captioner caption` and `captioner features extract` on 2 CPU processes (DDP over gloo):
each image once, the same output as one process, and a killed run resumed to the same output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from captioner.cli import main
from captioner.commands.caption_output import ChunkRows
from captioner.data.images import FileList
from captioner.data.records import Deal
from captioner.inference import Caption
from captioner.predict import blocks, rank_blocks

ROOT = Path(__file__).resolve().parent.parent
DDP = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2"]
# a frozen torchvision encoder at the session's 32 px (random weights, the same in every process)
ENCODER = {"name": "resnet50", "grid": 2, "image_size": 32, "trainable_blocks": 0}


def _killer(batches: int, rank: int | None) -> str:
    """A callback that SIGKILLs the process of ``rank`` (every process: None) after ``batches``."""
    init = {"batches": batches, "rank": rank}
    return "--trainer.callbacks+=" + json.dumps({"class_path": "tests.helpers.KillAtPredictBatch", "init_args": init})


@pytest.fixture
def one_thread():
    """The one-process reference on one thread, as each of the 2 processes runs (float sums in
    another order would move the scores' last digits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_PORT=str(29500 + os.getpid() % 1000), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "captioner.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def photos(shapes_dir, tmp_path_factory) -> Path:
    """22 images and, in the middle of them, a file that is no image."""
    folder = tmp_path_factory.mktemp("photos")
    for p in sorted((shapes_dir / "images").glob("*.png"))[:22]:
        shutil.copy(p, folder / p.name)
    (folder / "000005b.png").write_text("not a picture\n")
    return folder


def test_blocks_give_each_image_to_one_rank_in_the_same_batches() -> None:
    todo = [i for i in range(23) if i not in (4, 5, 9)]  # a resumed run: holes where chunks are
    assert blocks(todo, 4)[:3] == [[0, 1, 2, 3], [6, 7], [8, 10, 11]]  # never filled from the next
    for world in (1, 2, 3, 7):
        dealt = [b for rank in range(world) for b in rank_blocks(todo, 4, rank, world)]
        assert sorted(i for b in dealt for i in b) == todo, "each image once, none added"
        assert sorted(dealt) == blocks(todo, 4), "the same batches on any number of processes"
    assert rank_blocks(todo, 4, 1, 2) == [[6, 7], [12, 13, 14, 15], [20, 21, 22]]


def test_a_deal_reads_a_file_list_once_and_keeps_the_ranks_blocks(tmp_path) -> None:
    """Deal: the blocks rank_blocks gives, from one pass over a list, holding only the share."""
    names = [f"img{i:02d}.png" for i in range(23)]
    listed = tmp_path / "files.txt"
    listed.write_text("\n".join(f" {n} " if i % 3 else f"{n}\n" for i, n in enumerate(names)) + "\n\n")
    skip = {names[i] for i in (4, 5, 9)}
    todo = [i for i in range(23) if names[i] not in skip]
    for world in (1, 2, 3):
        for rank in range(world):
            deal = Deal(FileList(listed), 4, skip).deal(rank, world)
            assert deal.positions() == [i for b in rank_blocks(todo, 4, rank, world) for i in b]
            assert [str(deal[i]) for i in deal.positions()] == [names[i] for i in deal.positions()]
            assert (deal.total, deal.todo) == (23, 20)


def _chunk_set(folder: Path, n: int, world: int, block: int, chunk: int) -> tuple[ChunkRows, Path]:
    """The chunks ``world`` ranks write for ``n`` images (one error among them), as ChunkWriter
    hands them over: every ``chunk`` results of a rank."""
    paths = Deal([Path(f"img{i:03d}.png") for i in range(n)], block)
    out = folder / "out.jsonl"
    for rank in range(world):
        store = ChunkRows(out, "jsonl", paths.deal(rank, world), resume=False)
        store.start(False)
        mine = paths.positions()
        for k in range(0, len(mine), chunk):
            store.write(rank, [(i, None, "broken") if i == 7 else
                               (i, [Caption(["a", str(i)], -1.0, None, (1, 1), [-0.5, -0.5])], None)
                               for i in mine[k:k + chunk]])
    return ChunkRows(out, "jsonl", paths, resume=False), out


def test_the_merge_streams_the_chunks_in_input_order(tmp_path) -> None:
    store, out = _chunk_set(tmp_path, 50, world=3, block=2, chunk=3)
    assert store.merge() == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == [f"img{i:03d}.png" for i in range(50)]
    assert rows[7] == {"image": "img007.png", "error": "broken"} and rows[8]["caption"] == "a 8"
    assert not store.folder.exists()


def test_a_merge_with_a_hole_keeps_the_chunks_and_resumes_in_order(tmp_path) -> None:
    store, out = _chunk_set(tmp_path, 30, world=2, block=2, chunk=2)
    hole = next(c for c in store.chunks.files() if c.name.startswith("chunk-000000012"))
    data = hole.read_bytes()
    hole.unlink()  # a rank died before it wrote this chunk
    with pytest.raises(RuntimeError, match=r"2 images have no captions .* \(the first: img012.png\)"):
        store.merge()
    part = out.with_name("out.jsonl.part")
    assert len(part.read_text().splitlines()) == 12, "the rows before the hole, nothing after it"
    assert len(store.chunks.files()) > 1 and not out.exists()
    hole.write_bytes(data)  # --resume captions it again
    store.resume = True
    assert store.merge() == 0  # the unreadable image was among the rows kept
    assert [json.loads(r)["image"] for r in out.read_text().splitlines()] == [f"img{i:03d}.png" for i in range(30)]


def _images(rows: list[dict]) -> list[str]:
    return [r["image"] for r in rows]


def test_caption_on_two_processes_equals_one(tiny_checkpoint, photos, tmp_path, one_thread) -> None:
    common = ["caption", "--checkpoint", str(tiny_checkpoint), "--json", "--beam-size", "2", "--batch-size", "3",
              "--chunk-size", "4"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main([*common, "--output", str(one), str(photos)]) == 1  # the bad file
    run = _run([*common, *DDP, "--output", str(two), str(photos)], tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()
    rows = [json.loads(line) for line in one.read_text().splitlines()]
    assert _images(rows) == sorted(str(p) for p in photos.iterdir()), "every image once, in order"
    assert rows[6] == {"image": str(photos / "000005b.png"), "error": "not an image (unrecognised file format)"}
    assert not (tmp_path / "two.jsonl.parts").exists() and not (tmp_path / "two.jsonl.part").exists()
    assert "1 of 23 images could not be captioned" in run.stderr
    # --files-from on 2 processes: each keeps its share of the list; the same file
    listed = tmp_path / "files.txt"
    listed.write_text("".join(f"  {p}\n\n" for p in sorted(photos.iterdir())))
    three = tmp_path / "three.jsonl"
    run = _run([*common, *DDP, "--output", str(three), "--files-from", str(listed)], tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    assert three.read_bytes() == one.read_bytes()


def test_many_processes_write_a_file(tiny_checkpoint, photos, capsys) -> None:
    assert main(["caption", "--checkpoint", str(tiny_checkpoint), *DDP, str(photos)]) == 2
    assert "give --output FILE" in capsys.readouterr().err


def test_killed_caption_run_resumes_to_the_same_file(tiny_checkpoint, photos, tmp_path, one_thread) -> None:
    out = tmp_path / "captions.csv"
    cmd = ["caption", "--checkpoint", str(tiny_checkpoint), "--format", "csv", "--beam-size", "2",
           "--batch-size", "2", "--chunk-size", "4", "--resume", *DDP, "--output", str(out), str(photos)]
    killed = _run([*cmd, _killer(batches=3, rank=1)], tmp_path)  # rank 1: a chunk (2 batches), then 1 batch
    assert killed.returncode != 0  # the other process stops too (at its barrier, or killed by Lightning)
    assert not out.exists()
    chunks = sorted((tmp_path / "captions.csv.parts").glob("chunk-*.jsonl"))
    assert chunks, killed.stderr[-3000:]
    resumed = _run(cmd, tmp_path)
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert "images already captioned" in resumed.stderr
    whole = tmp_path / "whole.csv"
    assert main(["caption", "--checkpoint", str(tiny_checkpoint), "--format", "csv", "--beam-size", "2",
                 "--batch-size", "2", "--output", str(whole), str(photos)]) == 1
    assert out.read_bytes() == whole.read_bytes()


def _config(path: Path, shapes_dir: Path) -> Path:
    cfg = {"model": {"encoder": ENCODER},
           "data": {"dataset": "shapes", "shapes": {"data_dir": str(shapes_dir), "image_size": 32},
                    "min_count": 1, "num_workers": 0}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _same_cache(a: Path, b: Path) -> None:
    ia, ib = (json.loads((d / "index.json").read_text()) for d in (a, b))
    assert ia == ib and ia["complete"]
    for shard in ia["shards"]:
        np.testing.assert_array_equal(np.load(a / shard["file"]), np.load(b / shard["file"]))
    assert not (b / "parts").exists()


def test_features_on_two_processes_equal_one_and_resume_after_a_kill(shapes_dir, tmp_path, one_thread) -> None:
    cfg = _config(tmp_path / "cfg.yaml", shapes_dir)
    common = ["features", "extract", "--config", str(cfg), "--batch-size", "4", "--chunk-size", "8",
              "--shard-size", "32"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    two = _run([*common, *DDP, "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    _same_cache(tmp_path / "one", tmp_path / "two")

    cmd = [*common, *DDP, "--out", str(tmp_path / "three")]
    killed = _run([*cmd, _killer(batches=3, rank=None)], tmp_path)  # both processes, each at its 3rd batch
    assert killed.returncode != 0
    index = json.loads((tmp_path / "three" / "index.json").read_text())
    assert not index["complete"] and list((tmp_path / "three" / "parts").glob("chunk-*.json"))
    resumed = _run(cmd, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "images already extracted" in resumed.stderr
    _same_cache(tmp_path / "one", tmp_path / "three")
