"""Model folders (`captioner export`), loading them by path or by Hub id (offline, from a Hub cache
laid out as huggingface_hub lays it), bad folders, and the top-level Python API."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.checkpoint import CheckpointError, load_checkpoint
from captioner.cli import main
from captioner.inference import CaptionPipeline
from captioner.model_folder import CONFIG_FILE, WEIGHTS_FILE

ROOT = Path(__file__).parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
METRICS = {"Bleu_4": 0.4321, "CIDEr": 1.25, "exact_match": 0.5, "split": "test", "num_images": 8,
           "beam_size": 1, "scale": "0-1", "skipped": ["METEOR"]}


def _images(shapes_dir: Path, n: int = 4) -> list[Path]:
    return sorted((shapes_dir / "images").iterdir())[:n]


@pytest.fixture(scope="module")
def run(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint in a run folder with its config.yaml, as `fit` leaves it."""
    root = tmp_path_factory.mktemp("export") / "run"
    (root / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, root / "checkpoints" / "best.ckpt")
    (root / "config.yaml").write_text("trainer:\n  max_epochs: 8\nmodel:\n  encoder:\n    channels: 16\n"
                                      "data:\n  dataset: shapes\n  min_count: 1\n")
    return root


@pytest.fixture(scope="module")
def folder(run) -> Path:
    metrics = run / "metrics.json"
    metrics.write_text(json.dumps(METRICS))
    out = run.parent / "my-model"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--out", str(out),
                 "--metrics", str(metrics)]) == 0
    return out


def test_export_writes_the_three_files_and_nothing_else(folder, run):
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no temp left
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["format"] == "captioner-model" and config["format_version"] == 1
    assert config["tokenizer"] == "simple"
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert config["vocab"] == ckpt["captioner"]["vocab"]
    assert config["preprocessing"] == ckpt["captioner"]["preprocessing"]
    for key in ("encoder", "decoder", "decoding"):
        assert config[key] == ckpt["hyper_parameters"][key], key
    card = (folder / "README.md").read_text()
    assert "library_name: captioner" in card and "Data set: `shapes`" in card
    assert "| Bleu_4 | 0.4321 |" in card and "| CIDEr | 1.2500 |" in card
    assert "split test, num_images 8, beam_size 1" in card
    assert "data:\n  dataset: shapes" in card and "channels: 16" in card and "max_epochs" not in card


def test_a_folder_captions_and_scores_as_its_checkpoint(folder, run, shapes_dir):
    images = [Image.open(p).convert("RGB") for p in _images(shapes_dir)]
    for beam in (1, 3):
        a = CaptionPipeline(load_checkpoint(run / "checkpoints" / "best.ckpt"), beam_size=beam)
        b = CaptionPipeline(load_checkpoint(folder), beam_size=beam)
        for x, y in zip(a(images), b(images), strict=True):
            assert x.words == y.words and x.score == y.score
            assert torch.equal(x.alphas, y.alphas)


def test_caption_and_evaluate_take_a_folder(folder, run, shapes_dir, capsys):
    paths = [str(p) for p in _images(shapes_dir)]
    outputs = []
    for ckpt in (run / "checkpoints" / "best.ckpt", folder):
        assert main(["caption", "--checkpoint", str(ckpt), "--json", "--device", "cpu", *paths]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].count("\n") == len(paths)

    cfg = run.parent / "eval.yaml"
    cfg.write_text(f"data:\n  dataset: shapes\n  shapes: {{data_dir: {shapes_dir}, image_size: 32}}\n"
                   "  min_count: 1\n  num_workers: 0\n")
    scores = []
    for i, ckpt in enumerate((run / "checkpoints" / "best.ckpt", folder)):
        out = run.parent / f"metrics-{i}.json"
        assert main(["evaluate", "--checkpoint", str(ckpt), "--config", str(cfg), "--split", "test",
                     "--device", "cpu", "--no-meteor", "--output", str(out)]) == 0
        m = json.loads(out.read_text())
        scores.append({k: m[k] for k in ("Bleu_4", "CIDEr", "ROUGE_L", "exact_match")})
    assert scores[0] == scores[1]


def test_evaluate_of_a_folder_needs_a_config(folder, capsys):
    """docs/checkpoints.md: with a folder "`evaluate` then needs `--config`: a folder has no run
    beside it"."""
    rc = main(["evaluate", "--checkpoint", str(folder), "--split", "test", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--checkpoint {folder}: no " in err and "give the training config with --config CFG.yaml" in err

def test_export_refuses_a_folder_with_files_in_it(run, folder, capsys):
    rc = main(["export", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--out", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "not an empty folder" in err


def test_a_killed_export_leaves_no_folder(run, monkeypatch):
    def dies(fd):
        raise KeyboardInterrupt  # killed with the files written, before the rename

    monkeypatch.setattr("captioner.model_folder.os.fsync", dies)
    out = run.parent / "killed"
    with pytest.raises(KeyboardInterrupt):
        main(["export", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--out", str(out)])
    assert not out.exists()
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".killed")]


def _folder_config(model, enc, dec, vocab: list[str]) -> dict:
    """config.json of a model folder for a model built in the test."""
    return {"format": "captioner-model", "format_version": 1, "encoder": enc.__dict__, "decoder": dec.__dict__,
            "decoding": {}, "tokenizer": "simple", "vocab": vocab,
            "preprocessing": model.encoder.preprocessing.to_dict()}


@pytest.mark.parametrize("stem", ["rgb", "split"])
def test_a_torchvision_encoders_shared_blocks_are_stored_once_and_loaded_back(tmp_path, stem: str):
    """A frozen torchvision encoder names its blocks twice (encoder.blocks.*, encoder.frozen.*);
    safetensors refuses shared tensors, so the folder holds each once and loading restores both.
    With ``stem: split`` (the encoder wrapped, its first convolution split) the same holds."""
    from safetensors.torch import load_file

    from captioner.model_folder import write_model_folder
    from captioner.models import Captioner, DecoderConfig, EncoderConfig

    enc = EncoderConfig(name="resnet50", grid=2, image_size=32, stem=stem)
    dec = DecoderConfig(embed_dim=8, attention_dim=8, decoder_dim=8)
    vocab = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]
    model = Captioner(enc, dec, len(vocab))
    tv = getattr(model.encoder, "encoder", model.encoder)  # the torchvision encoder, wrapped or not
    with torch.no_grad():
        tv.blocks[4][0].bn1.running_mean.uniform_()  # not a fresh model's value
        if stem == "split":
            tv.blocks[0][0][0].weight.uniform_()  # the split conv (ChannelSplit's one layer)
    out = write_model_folder(tmp_path / "m", _folder_config(model, enc, dec, vocab), model.state_dict(), "card")
    stored = load_file(out / WEIGHTS_FILE)
    assert not any(".frozen." in k for k in stored) and len(stored) < len(model.state_dict())
    loaded = load_checkpoint(out).model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def _damage(folder: Path, kind: str) -> str:
    """Break a copy of a model folder; return what the error must name."""
    weights, config = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
        return f"{weights}: not a readable safetensors file"
    if kind == "no-weights":
        weights.unlink()
        return f"{weights}: missing"
    if kind == "no-config":
        config.unlink()
        return f"{config}: missing"
    data = json.loads(config.read_text())
    if kind == "newer":
        data["format_version"] = 99
        expected = f"{config}: format version 99 is newer than this captioner reads (1)"
    else:  # a vocabulary that is not the one the weights were trained with
        data["vocab"] = data["vocab"][:-2]
        expected = f"{weights}: decoder."
    config.write_text(json.dumps(data))
    return expected


@pytest.mark.parametrize("kind", ["truncated", "no-weights", "no-config", "newer", "vocab"])
def test_a_bad_folder_is_one_line_and_exit_2(folder, tmp_path, shapes_dir, kind, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    expected = _damage(bad, kind)
    with pytest.raises(CheckpointError, match="^" + re.escape(expected)):
        load_checkpoint(bad)
    rc = main(["caption", "--checkpoint", str(bad), str(_images(shapes_dir, 1)[0])])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert "Traceback" not in err
    if kind == "vocab":
        assert "words" in err and "has shape" in err


# -- the Hub, offline --------------------------------------------------------------------------
def _hub_cache(folder: Path, cache: Path, repo: str = "owner/name") -> Path:
    """A Hub cache as huggingface_hub lays it out: blobs, a snapshot of links, refs/main."""
    base = cache / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (base / "blobs").mkdir()
    for f in folder.iterdir():
        blob = base / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_hub(folder, tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    _hub_cache(folder, cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads its environment once, at import: set what it read too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_ids_and_local_paths(tmp_path, monkeypatch):
    from captioner.hub import hub_repo_id

    monkeypatch.chdir(tmp_path)
    assert hub_repo_id("hf://owner/name") == "owner/name"
    assert hub_repo_id(Path("hf://owner/name")) == "owner/name"  # pathlib makes it hf:/owner/name
    assert hub_repo_id("owner/name") == "owner/name"
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert hub_repo_id("owner/name") is None  # a local folder wins
    for local in ("runs/best.ckpt", "a/b/c", "best.ckpt", "model"):
        assert hub_repo_id(local) is None, local
    with pytest.raises(CheckpointError, match="not a Hub model id"):
        hub_repo_id("hf://just-a-name")


def test_a_hub_model_loads_offline_from_the_cache(offline_hub, folder, shapes_dir):
    image = _images(shapes_dir, 1)[0]
    want = CaptionPipeline(load_checkpoint(folder))(image)
    for name in ("hf://owner/name", "owner/name"):
        pipe = CaptionPipeline.from_pretrained(name, beam_size=1)
        assert pipe.loaded.path == offline_hub / "models--owner--name" / "snapshots" / COMMIT
        got = pipe(image)
        assert got.words == want.words and got.score == want.score


def test_a_missing_hub_model_offline_is_one_line_and_exit_2(offline_hub, shapes_dir, capsys):
    rc = main(["caption", "--checkpoint", "hf://owner/missing", str(_images(shapes_dir, 1)[0])])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "hf://owner/missing: not found on the Hugging Face Hub or in its cache" in err


def test_the_command_line_reads_the_hub_environment(folder, tmp_path, shapes_dir):
    """As a user runs it: HF_HUB_OFFLINE and HF_HOME in the environment, a fresh process."""
    _hub_cache(folder, tmp_path / "home" / "hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    image = str(_images(shapes_dir, 1)[0])
    out = subprocess.run([sys.executable, "-m", "captioner.cli", "caption", "--checkpoint",
                          "hf://owner/name", "--device", "cpu", image],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    want = CaptionPipeline(load_checkpoint(folder))(image).text
    assert out.stdout == f"{image}\t{want}\n"


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch, shapes_dir, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    rc = main(["caption", "--checkpoint", "hf://owner/name", str(_images(shapes_dir, 1)[0])])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "pip install 'captioner[hub]'" in err


def test_push_to_hub_uploads_the_folder(run, monkeypatch, tmp_path, capsys):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            assert sorted(os.listdir(kwargs["folder_path"])) == ["README.md", "config.json",
                                                                 "model.safetensors"]
            return "https://huggingface.co/me/shapes-model/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "pushed"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--out", str(out),
                 "--push-to-hub", "me/shapes-model", "--private"]) == 0
    assert calls[0] == ("create_repo", "me/shapes-model",
                        {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][0] == "upload_folder"
    assert calls[1][1]["folder_path"] == str(out) and calls[1][1]["repo_id"] == "me/shapes-model"
    assert calls[1][1]["repo_type"] == "model"
    assert "hf://me/shapes-model" in capsys.readouterr().out


def test_a_model_with_grounded_words_and_a_split_stem_loads_back_and_decodes_the_same(tmp_path):
    """The grounded head is saved, its word ids are rebuilt from the folder's vocabulary (they are
    no weights), and the split stem's colour path comes back: same log-probabilities after loading."""

    from captioner.model_folder import write_model_folder
    from captioner.models import Captioner, DecoderConfig, EncoderConfig

    torch.manual_seed(0)
    enc = EncoderConfig(name="shapes_cnn", grid=4, channels=16, image_size=32, position="append", stem="split")
    dec = DecoderConfig(embed_dim=8, attention_dim=8, decoder_dim=8, grounded_words=[["red", "blue"], ["dog", "cat"]])
    vocab = ["<pad>", "<start>", "<end>", "<unk>", "a", "red", "dog", "blue", "cat"]
    model = Captioner(enc, dec, len(vocab), vocab).eval()
    out = write_model_folder(tmp_path / "m", _folder_config(model, enc, dec, vocab), model.state_dict(), "card")
    loaded = load_checkpoint(out).model
    assert loaded.decoder.grounded.ids.tolist() == [5, 7, 6, 8]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        results = []
        for m in (model, loaded):
            feats, _ = m.encode(images)
            logp, _, _ = m.decoder.step(torch.tensor([1, 4]), m.decoder.init_state(feats), m.decoder.precompute(feats))
            results.append(logp)
    torch.testing.assert_close(results[1], results[0])
