"""One configuration path for every command, one run folder per run, runs of any length, and
output a newcomer can read: what `captioner fit`, `evaluate` and `features extract` share."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner.cli import main
from tests.conftest import fit_args

ROOT = Path(__file__).parent.parent


def _test_image(shapes_dir: Path) -> Path:
    return sorted((shapes_dir / "images").iterdir())[0]


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


# 64 training images in batches of 8: an epoch is 8 steps.
@pytest.mark.parametrize("length", [
    ["--trainer.max_steps", "3"],
    ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0"],
    ["--trainer.fast_dev_run", "true"],
    ["--trainer.max_time", "00:00:00:01", "--trainer.max_epochs", "100"],
], ids=["max_steps", "limit_train_batches", "fast_dev_run", "max_time"])
def test_any_run_length_leaves_a_checkpoint_to_caption_with(length, shapes_dir, tmp_path, capsys) -> None:
    assert main(fit_args(shapes_dir, tmp_path, "--trainer.max_time", "null", *length)) == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file(), sorted(p.name for p in tmp_path.rglob("*"))
    assert _step(last) >= 1
    err = capsys.readouterr().err
    if length[0] == "--trainer.max_steps":
        assert _step(last) == 3 and not (tmp_path / "checkpoints" / "best.ckpt").exists()
        # docs/training.md: such a run "exits 0, writes last.ckpt and says so"
        assert f"no best.ckpt (it is chosen by a validation score, and none was saved): use {last}" in err
    assert main(["caption", "--checkpoint", str(last), "--device", "cpu", str(_test_image(shapes_dir))]) == 0
    assert capsys.readouterr().out.count("\t") == 1


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _kinds(files: dict[str, int]) -> set[str]:
    """File names without the TensorBoard event file's time stamp and process."""
    return {name.split(".out.tfevents.")[0] for name in files}


def test_two_runs_in_two_folders_never_touch_each_other(shapes_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the shipped config's own default, runs/shapes, would land here
    a, b = tmp_path / "a", tmp_path / "b"
    # logged at least once in the epoch's 8 batches (the shipped config logs every 20 steps)
    extra = ["--trainer.max_epochs", "1", "--trainer.logger", "true", "--trainer.log_every_n_steps", "4"]
    main(fit_args(shapes_dir, a, *extra))
    first = _files(a)
    assert {"checkpoints/best.ckpt", "checkpoints/last.ckpt", "config.yaml",
            "logs/version_0/metrics.csv"} <= set(first)
    assert any(name.startswith("tensorboard/version_0/events") for name in first)
    main(fit_args(shapes_dir, b, *extra))
    assert _files(a) == first  # not one file of the first run written again
    assert _kinds(_files(b)) == _kinds(first)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "lightning_logs").exists()
    saved = (b / "config.yaml").read_text()
    assert f"default_root_dir: {b}" in saved and "ckpt_path" not in saved


def test_resume_finds_last_ckpt_in_the_run_folder(shapes_dir, tmp_path) -> None:
    main(fit_args(shapes_dir, tmp_path, "--trainer.max_steps", "3"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    main(fit_args(shapes_dir, tmp_path, "--trainer.max_steps", "5", "--ckpt_path", str(last)))
    assert _step(last) == 5


def test_an_override_means_the_same_to_fit_and_evaluate(shapes_dir, tmp_path, capsys) -> None:
    main(fit_args(shapes_dir, tmp_path, "--trainer.max_epochs", "1", "--data.limit_eval", "4",
                  "--model.decoding.beam_size", "2"))
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    out = tmp_path / "m.json"
    # no --config: the run's own config.yaml, with what fit was told on its command line
    assert main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", "--no-meteor",
                 "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert (metrics["num_images"], metrics["beam_size"]) == (4, 2)
    assert metrics["config"] == [str(tmp_path / "config.yaml")]
    # the same flags on evaluate's command line, over an explicit config file
    config = ROOT / "configs" / "shapes.yaml"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--config", str(config), "--config",
                 str(tmp_path / "config.yaml"), "--device", "cpu", "--no-meteor", "--output", str(out),
                 "--data.limit_eval", "3", "--model.decoding.beam_size", "1"]) == 0
    metrics = json.loads(out.read_text())
    assert (metrics["num_images"], metrics["beam_size"]) == (3, 1)


@pytest.mark.parametrize(("argv", "says"), [
    (["fit", "--config", "configs/shapes.yaml", "--checkpoint.dirpath", "x"], "--best_checkpoint.dirpath"),
    (["fit", "--config", "configs/shapes.yaml", "--data.data_dir", "x"], "--data.shapes.data_dir"),
    (["fit", "--config", "configs/shapes.yaml", "--data.nonsense", "1"], "--data.nonsense"),
    (["evaluate", "--checkpoint", "x.ckpt", "--config", "configs/shapes.yaml", "--set", "data_dir=x"],
     "--data.KEY VALUE"),
    (["evaluate", "--checkpoint", "x.ckpt", "--beam-size", "3"], "--model.decoding.beam_size"),
    (["evaluate", "--checkpoint", "x.ckpt", "--batch-size", "3"], "--data.eval_batch_size"),
    (["features", "extract", "--config", "configs/shapes.yaml", "--out", "c", "--num-workers", "0"],
     "--data.num_workers"),
    (["evaluate", "--checkpoint", "nowhere/checkpoints/best.ckpt"], "--config"),
])
def test_old_flags_and_unknown_keys_are_one_line_naming_the_fix(argv, says, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("captioner: error:") and says in err and "\n" not in err, err


def test_old_keys_in_a_config_file_name_the_new_key(tmp_path, capsys) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  shapes_num_images: 30\ncheckpoint:\n  dirpath: x\n")
    assert main(["fit", "--config", str(ROOT / "configs" / "shapes.yaml"), "--config", str(old)]) == 2
    err = capsys.readouterr().err
    assert f"{old}: setting" in err and "is now" in err


def test_a_missing_data_file_ends_fit_in_one_line(tmp_path, capsys) -> None:
    argv = ["fit", "--config", str(ROOT / "configs" / "flickr8k.yaml"),
            "--data.karpathy.split_file", str(tmp_path / "missing.json"),
            "--trainer.default_root_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("captioner: error:")]
    assert "data.karpathy.split_file" in line and "missing.json" in line and "captioner -v fit" in line
    assert "Traceback" not in err


def test_fit_says_each_thing_once(shapes_dir, tmp_path) -> None:
    """What a newcomer sees: Lightning's messages once, no warning caused by our own wiring."""
    args = fit_args(shapes_dir, tmp_path, "--trainer.max_steps", "2", "--trainer.logger", "true")
    out = subprocess.run([sys.executable, "-m", "captioner.cli", *args], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert text.count("Seed set to 0") == 1, text
    assert text.count("Trainable params") == 1, text
    for noise in ("JsonargparseWarning", "Unable to serialize", "`args` parameter", "LightningCLI's args",
                  "Tip:", "INFO:", "Traceback"):
        assert noise not in text, (noise, text)
    assert f"run folder: {tmp_path}" in text


def test_lightning_keeps_the_program_that_ddp_relaunches(monkeypatch) -> None:
    """Lightning's DDP launcher starts the other ranks with sys.argv[0]: it must stay the real
    program (the `captioner` console script) while the CLI hands LightningCLI its arguments."""
    from captioner.commands.config import _argv

    monkeypatch.setattr(sys, "argv", ["/venv/bin/captioner", "fit", "--config", "x.yaml"])
    with _argv(["fit", "--config", "x.yaml", "--trainer.devices", "2"]):
        assert sys.argv == ["/venv/bin/captioner", "fit", "--config", "x.yaml", "--trainer.devices", "2"]
    assert sys.argv == ["/venv/bin/captioner", "fit", "--config", "x.yaml"]


# -- the import graph: one-way arrows ------------------------------------------------------------
# Lower layers never import higher ones; the CLI is the top and nothing imports it.
LAYERS = [
    {"captioner", "registry", "settings", "files", "data"},
    {"models"},
    {"decoding"},
    {"metrics", "viz"},
    {"checkpoint", "model_folder", "hub", "training"},
    {"system", "inference", "callbacks", "checkpointing", "predict"},
    {"evaluation", "serve"},
    {"commands"},
    {"cli"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in (ROOT / "captioner").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        names = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # imports for type checkers only never run
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        out[module] = {n for n in names if n == "captioner" or n.startswith("captioner.")}
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "captioner"


def test_imports_point_down_the_layers_only() -> None:
    wrong = []
    for module, imported in _imports().items():
        assert _layer(module) in RANK, f"{module}: add its package to LAYERS"
        for target in imported:
            # The package root re-exports the Python API lazily (a module __getattr__ imports
            # captioner.inference on first use), so `import captioner` loads nothing: its import
            # points up by design, and nothing below imports the root back (the cycle test).
            if module == "captioner" and target in ("captioner.inference", "captioner.checkpoint"):
                continue
            if RANK[_layer(target)] > RANK[_layer(module)]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports up the layers: " + ", ".join(sorted(wrong))


def test_the_import_graph_has_no_cycle() -> None:
    graph = _imports()
    modules = set(graph)

    def resolve(name: str) -> str | None:  # `from captioner.data import x` -> the package module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: {t for n in names if (t := resolve(n)) and t != m} for m, names in graph.items()}
    # a package's __init__ re-exporting its modules is not a cycle of code
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and t in modules)} for m, ts in edges.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in edges.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(t):], t]))
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


def test_model_compile_true_is_refused_and_false_still_loads(shapes_dir, tmp_path, capsys) -> None:
    """model.compile never compiled anything: true is refused before training; false, which
    older run configs and checkpoints carry, still loads."""
    assert main(fit_args(shapes_dir, tmp_path / "run", "--model.compile", "true", "--trainer.max_steps", "1")) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("captioner: error:")]
    assert "model.compile: true is not supported" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert main(fit_args(shapes_dir, tmp_path / "old", "--model.compile", "false", "--trainer.max_steps", "1")) == 0
