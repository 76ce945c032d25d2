"""The documentation cannot drift: every setting is in docs/training.md with its real default,
the README stays a short page, and every `captioner` command in it runs as written."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from captioner.callbacks import PreciseBatchNorm
from captioner.checkpointing import PeriodicCheckpoint
from captioner.data.datamodule import CaptionDataModule
from captioner.data.sources import SOURCES
from captioner.decoding import DecodingConfig
from captioner.models import DecoderConfig, EncoderConfig
from captioner.system import CaptioningSystem, LossConfig, OptimConfig, ScstConfig

ROOT = Path(__file__).parent.parent
TRAINING = ROOT / "docs" / "training.md"


def _yaml(value) -> str:
    """A default as the docs write it (YAML scalars; a tuple as the list a config writes)."""
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_yaml, value)) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _settings() -> dict[str, object]:
    """Every setting of a run's config that captioner defines, with its default."""
    out: dict[str, object] = {}
    sections = {"model.encoder": EncoderConfig, "model.decoder": DecoderConfig,
                "model.optim": OptimConfig, "model.loss": LossConfig, "model.decoding": DecodingConfig,
                "model.scst": ScstConfig}
    sections.update({f"data.{name}": SOURCES.get(name) for name in SOURCES.names()})
    for prefix, cls in sections.items():
        for f in dataclasses.fields(cls):
            out[f"{prefix}.{f.name}"] = f.default
    for prefix, fn in (("model", CaptioningSystem.__init__), ("data", CaptionDataModule.__init__),
                       ("last_checkpoint", PeriodicCheckpoint.__init__),
                       ("precise_bn", PreciseBatchNorm.__init__)):
        for p in inspect.signature(fn).parameters.values():
            key = f"{prefix}.{p.name}"
            if p.name != "self" and not any(s.startswith(key + ".") for s in out):  # sections
                out[key] = p.default
    return out


def _documented() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z0-9_.]+)` \| (`[^`]*`)? *\|", TRAINING.read_text(encoding="utf-8"), re.M)
    return {key: default.strip("`") for key, default in rows}


def test_every_documented_range_and_choice_is_the_codes() -> None:
    """The "accepts" column says what the setting's type accepts (captioner.settings.accepts)."""
    from captioner.commands.config import setting_hints
    from captioner.settings import accepts

    hints = setting_hints()
    rows = re.findall(r"^\| `([a-z0-9_.]+)` \| `[^`]*` \| ([^|]*) \|", TRAINING.read_text(encoding="utf-8"), re.M)
    documented = {key: text.strip() for key, text in rows if key.startswith(("model.", "data."))}
    assert documented.keys() == {k for k in hints if k in _settings() and k.startswith(("model.", "data."))}
    wrong = {k: (documented[k], accepts(hints[k])) for k in documented if documented[k] != accepts(hints[k])}
    assert not wrong, f"docs/training.md says (accepts, code says): {wrong}"


def test_every_setting_is_documented_with_its_default() -> None:
    documented = _documented()
    missing = [k for k in _settings() if k not in documented]
    assert not missing, f"docs/training.md lacks: {', '.join(missing)}"
    wrong = {k: (documented[k], _yaml(v)) for k, v in _settings().items() if documented[k] != _yaml(v)}
    assert not wrong, f"docs/training.md defaults differ from the code (docs, code): {wrong}"


def test_no_documented_setting_is_gone() -> None:
    settings = _settings()
    extra = [k for k in _documented() if k not in settings and not k.startswith(("seed_everything",))]
    assert not extra, f"docs/training.md documents settings the code no longer has: {extra}"


def test_readme_is_a_short_page_with_links_that_exist() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(((?:docs|configs|scripts)/[^)#]+)", text):
        assert (ROOT / target).exists(), target
    for name in ("training", "results", "performance", "checkpoints", "data"):
        assert f"docs/{name}.md" in text and (ROOT / "docs" / f"{name}.md").is_file(), name


def readme_commands() -> list[str]:
    """The `captioner ...` lines of the README's fenced blocks, continuation lines joined.
    Other lines are not run here: `scripts/train_flickr8k.sh` and `scripts/train_coco.sh`
    download tens of GB; tests/test_recipes.py runs them on tiny archives of the same layout."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line.startswith("captioner "):
                out.append(line)
    return out


def test_the_readme_shows_the_tour() -> None:
    words = {line.split()[1] for line in readme_commands()}
    assert {"fit", "caption", "attend", "evaluate", "serve", "features", "data", "shapes"} <= words


# Commands that need what a test cannot have: a GPU, a download, hours, a server that blocks.
NOT_RUN = ("--trainer.accelerator gpu", "--trainer.devices 4", "configs/coco.yaml",
           "configs/flickr8k.yaml", "captioner serve", "data/flickr8k", "data/coco",
           "configs/custom.yaml", "runs/custom")  # ResNet-101 weights: a download
# The commands parsed by the parser of `fit` (--print_config): those of them that cannot run here
# must still parse.
PARSED = ("fit", "caption", "features")


@pytest.mark.slow
# the tour trains on a tiny split, fewer batches than the logging interval: Lightning says so
@pytest.mark.filterwarnings("ignore:The number of training batches:UserWarning")
def test_every_readme_command_runs_as_written(tiny_run, monkeypatch, capsys) -> None:
    """Each command runs in a folder laid out as the README assumes (a trained run under
    runs/shapes, data/shapes, photos/), with short training where it trains."""
    import shlex

    from captioner.cli import main

    monkeypatch.chdir(tiny_run)
    ran = parsed = 0
    for line in readme_commands():
        argv = shlex.split(line)[1:]
        if ">" in argv:
            argv = argv[: argv.index(">")]
        if any(skip in line for skip in NOT_RUN):
            if argv[0] not in PARSED:
                continue
            argv.append("--print_config")  # it cannot run here, but it must parse
            parsed += 1
        elif argv[0] == "fit" and "--print_config" not in argv:
            # as written, plus what keeps it short and on the session's tiny data
            argv += ["--trainer.max_steps", "2", "--trainer.max_time", "null", *TINY]
        elif "--checkpoint" in argv and argv[0] in ("evaluate", "features"):
            argv += ["--data.num_workers", "0", "--no-meteor"]
        elif argv[0] == "shapes":
            argv += ["--num-images", "20", "--image-size", "32"]
        capsys.readouterr()
        code = main(argv)
        assert code == 0, (line, capsys.readouterr().err[-2000:])
        ran += 1
    assert ran >= 12 and parsed >= 3, (ran, parsed)
    # the Python example, as written
    (example,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    exec(compile(example, "README.md", "exec"), {})
    assert "(words, h, w) maps" in example and capsys.readouterr().out.strip()


TINY = ["--data.shapes.image_size", "32", "--data.num_workers", "0", "--data.batch_size", "8",
        "--data.eval_batch_size", "8", "--data.min_count", "1",
        "--model.encoder.channels", "16", "--model.encoder.grid", "4", "--model.encoder.image_size", "32",
        "--model.decoder.embed_dim", "16", "--model.decoder.attention_dim", "16",
        "--model.decoder.decoder_dim", "16", "--model.decoder.num_heads", "4",
        "--trainer.enable_progress_bar", "false"]


@pytest.fixture
def tiny_run(shapes_dir, tmp_path_factory):
    """A folder like a user's after the README's first commands: data/shapes (the session's tiny
    set), runs/shapes/ with a short trained run, and photos/ with two images."""
    import os
    import shutil

    from captioner.cli import main

    cwd = os.getcwd()
    root = tmp_path_factory.mktemp("readme")
    os.chdir(root)  # the run records data/shapes relative to it, as a user's would
    shutil.copytree(shapes_dir, root / "data" / "shapes")
    photos = root / "photos"
    photos.mkdir()
    for p in sorted((shapes_dir / "images").iterdir())[:2]:
        shutil.copy(p, photos / p.name)
    shutil.copy(photos / p.name, root / "photo.png")
    (root / "files.txt").write_text("".join(f"photos/{p.name}\n" for p in sorted(photos.iterdir())))
    custom = root / "data" / "custom"  # your own captions, for `data convert`
    shutil.copytree(photos, custom / "images")
    (custom / "captions.csv").write_text("image,caption\n" + "".join(
        f"{p.name},\"a shape, number {i}\"\n" for i, p in enumerate(sorted(photos.iterdir()))))
    run = root / "runs" / "shapes"
    assert main(["fit", "--config", str(ROOT / "configs" / "shapes.yaml"), *TINY,
                 "--data.shapes.data_dir", "data/shapes",
                 "--trainer.max_epochs", "1", "--trainer.max_time", "null",
                 "--trainer.default_root_dir", str(run)]) == 0
    shutil.copytree(ROOT / "configs", root / "configs")
    os.chdir(cwd)
    return root
