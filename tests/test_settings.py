"""Settings fail at parse time: a bad choice or number ends the command in one line naming the
key and what it accepts, before any data is read or model built; --help lists the choices."""

from __future__ import annotations

from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from captioner.cli import main
from captioner.settings import Range, SettingError

ROOT = Path(__file__).parent.parent
SHAPES = str(ROOT / "configs" / "shapes.yaml")


def _fit(tmp_path: Path, *extra: str) -> list[str]:
    """A fit whose data folder and run folder do not exist yet: whatever made them ran too far."""
    return ["fit", "--config", SHAPES, "--data.shapes.data_dir", str(tmp_path / "data"),
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "1", *extra]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("captioner: error:"), err
    return err


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--model.optim.lr", "-1", "model.optim.lr must be > 0, got -1"),
    ("--model.optim.encoder_lr", "0", "model.optim.encoder_lr must be > 0, got 0"),
    ("--model.optim.weight_decay", "-0.1", "model.optim.weight_decay must be >= 0"),
    ("--model.optim.gamma", "1.5", "model.optim.gamma must be in (0, 1], got 1.5"),
    ("--model.optim.warmup_steps", "-1", "model.optim.warmup_steps must be >= 0"),
    ("--model.loss.label_smoothing", "1", "model.loss.label_smoothing must be in [0, 1), got 1"),
    ("--model.decoder.dropout", "1", "model.decoder.dropout must be in [0, 1), got 1"),
    ("--model.decoder.decoder_dim", "0", "model.decoder.decoder_dim must be >= 1, got 0"),
    ("--model.decoding.beam_size", "0", "model.decoding.beam_size must be >= 1, got 0"),
    ("--model.decoding.max_length", "0", "model.decoding.max_length must be >= 1, got 0"),
    ("--model.scst.temperature", "0", "model.scst.temperature must be > 0"),
    ("--model.encoder.grid", "0", "model.encoder.grid must be >= 1, got 0"),
    ("--data.batch_size", "0", "data.batch_size must be >= 1, got 0"),
    ("--data.min_count", "0", "data.min_count must be >= 1, got 0"),
    ("--data.shapes.num_images", "0", "data.shapes.num_images must be >= 1, got 0"),
    ("--last_checkpoint.every_n_steps", "-1", "last_checkpoint.every_n_steps must be >= 0, got -1"),
    ("--precise_bn.batches", "-1", "precise_bn.batches must be >= 0, got -1"),
])
def test_a_number_out_of_range_is_one_line_before_any_data(flag, value, says, tmp_path, capsys) -> None:
    assert main(_fit(tmp_path, flag, value)) == 2
    assert says in _one_line(capsys)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flag", "says"), [
    ("--model.optim.optimizer", "model.optim.optimizer must be one of 'adam', 'adamw', 'rmsprop', 'muon', got 'sgd'"),
    ("--model.optim.scheduler", "model.optim.scheduler must be one of 'none', 'cosine', 'wsd', 'step', 'plateau'"),
    ("--model.encoder.stem", "model.encoder.stem must be one of 'rgb', 'split', got 'sgd'"),
    ("--model.decoder.gate", "model.decoder.gate must be one of 'scalar', 'vector', 'none'"),
    ("--model.decoder.semi_sampling_unit", "model.decoder.semi_sampling_unit must be one of 'step', 'caption'"),
    ("--model.loss.reduction", "model.loss.reduction must be one of 'caption', 'token'"),
    ("--model.scst.baseline", "model.scst.baseline must be one of 'mean', 'greedy'"),
    ("--data.captions_per_image", "data.captions_per_image must be one of 'random', 'all'"),
    # registries: the names registered now
    ("--model.decoder.attention", "model.decoder.attention must be one of hard, multihead, soft, got 'sgd'"),
    ("--model.encoder.name", "model.encoder.name must be one of resnet101,"),
    ("--data.dataset", "data.dataset must be one of coco, karpathy, shapes, got 'sgd'"),
])
def test_a_bad_choice_is_one_line_before_any_data(flag, says, tmp_path, capsys) -> None:
    assert main(_fit(tmp_path, flag, "sgd")) == 2
    assert says in _one_line(capsys)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_help_lists_the_choices(capsys) -> None:
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    for flag, choices in [("--model.optim.optimizer", "{adam,adamw,rmsprop,muon}"),
                          ("--model.optim.scheduler", "{none,cosine,wsd,step,plateau}"),
                          ("--model.encoder.stem", "{rgb,split}"), ("--model.decoder.gate", "{scalar,vector,none}"),
                          ("--model.decoder.semi_sampling_unit", "{step,caption,batch}"),
                          ("--data.captions_per_image", "{random,all}")]:
        assert f"{flag} {choices}" in out, flag
    # ranges and registries say what they accept
    text = " ".join(out.split())
    assert "--model.optim.lr LR accepts > 0 (type: float" in text
    assert "--data.batch_size BATCH_SIZE accepts >= 1 (type: int" in text
    assert "--model.decoder.attention ATTENTION accepts one of hard, multihead, soft (type: str" in text


def test_settings_that_need_each_other_are_checked_at_parse_time(tmp_path, capsys) -> None:
    assert main(_fit(tmp_path, "--model.decoder.language_dropout", "0.2", "--model.decoder.deep_output", "false")) == 2
    assert "model.decoder.language_dropout needs model.decoder.deep_output" in _one_line(capsys)
    assert main(_fit(tmp_path, "--model.scst.n_samples", "1")) == 2
    assert "model.scst.n_samples >= 2" in _one_line(capsys)
    assert not (tmp_path / "data").exists()


def test_evaluate_and_features_check_the_same_settings(tmp_path, capsys) -> None:
    argv = ["evaluate", "--checkpoint", str(tmp_path / "x.ckpt"), "--config", SHAPES,
            "--data.shapes.data_dir", str(tmp_path / "data"), "--model.decoding.beam_size", "0"]
    assert main(argv) == 2
    assert "model.decoding.beam_size must be >= 1, got 0" in _one_line(capsys)
    argv = ["features", "extract", "--config", SHAPES, "--out", str(tmp_path / "cache"),
            "--data.shapes.data_dir", str(tmp_path / "data"), "--model.encoder.stem", "grey"]
    assert main(argv) == 2
    assert "model.encoder.stem must be one of 'rgb', 'split', got 'grey'" in _one_line(capsys)
    assert not (tmp_path / "data").exists() and not (tmp_path / "cache").exists()


def test_python_callers_get_the_same_checks() -> None:
    from captioner.models import DecoderConfig, EncoderConfig
    from captioner.system import OptimConfig

    with pytest.raises(SettingError, match=r"model.optim.lr must be > 0, got -1"):
        OptimConfig(lr=-1)
    with pytest.raises(SettingError, match="model.optim.optimizer must be one of 'adam', 'adamw', 'rmsprop', 'muon'"):
        OptimConfig(optimizer="sgd")
    with pytest.raises(SettingError, match="model.decoder.attention must be one of"):
        DecoderConfig(attention="nope")
    with pytest.raises(SettingError, match=r"model.encoder.trainable_blocks must be >= -1"):
        EncoderConfig(trainable_blocks=-2)
    OptimConfig(encoder_lr=None)  # None where the type allows it


def test_choices_and_the_code_behind_them_agree() -> None:
    """Each Literal is the one list of its choices: the code it selects covers exactly those."""
    from captioner.models.encoder import STEMS, EncoderConfig
    from captioner.training.optim import OPTIMIZERS, OptimConfig

    assert set(OPTIMIZERS) == set(get_args(get_type_hints(OptimConfig)["optimizer"]))
    assert set(STEMS) == set(get_args(get_type_hints(EncoderConfig)["stem"]))


def test_ranges_say_what_they_accept() -> None:
    assert [str(r) for r in (Range(gt=0), Range(ge=1), Range(ge=0, lt=1), Range(gt=0, le=1), Range(le=2))] == [
        "> 0", ">= 1", "in [0, 1)", "in (0, 1]", "<= 2"]
    assert 0.5 in Range(ge=0, lt=1) and 1 not in Range(ge=0, lt=1) and 0 not in Range(gt=0)
