"""The one configuration path of every command that takes ``--config``.

``fit``/``validate``/``test``, ``evaluate`` and ``features extract`` all parse their arguments
with the same LightningCLI (jsonargparse) parser, so ``--config a.yaml --config b.yaml
--data.batch_size 8 --model.decoding.beam_size 3`` means the same to each of them. The training
commands run the Trainer; the others only instantiate the data module and read the rest.
``caption`` has no run config: its options and, when asked for, the same ``trainer`` section
(:func:`add_prediction_trainer`) are parsed by :mod:`captioner.commands.parsing`, which imports
no Lightning.

One setting decides where a run writes: ``trainer.default_root_dir`` (the run folder). It gets

    <root>/checkpoints/best.ckpt, last.ckpt   (unless best_checkpoint.dirpath says otherwise)
    <root>/logs/version_N/metrics.csv         (CSV logger)
    <root>/tensorboard/version_N/             (TensorBoard logger)
    <root>/config.yaml                        (the resolved config of the last fit)
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import sys
import time
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from captioner.callbacks import PreciseBatchNorm, ScaleReport
from captioner.checkpointing import (
    AtomicCheckpointIO,
    PeriodicCheckpoint,
    RunCSVLogger,
    RunTensorBoardLogger,
)
from captioner.commands.common import CONFIG_NAME, UsageError
from captioner.commands.parsing import ConfigError, config_trees, error_line
from captioner.data.datamodule import RENAMED_DATA_KEYS, CaptionDataModule
from captioner.files import atomic_write, exception_chain, find_disk_full
from captioner.settings import accepts, check_arguments, is_choice
from captioner.system import CaptioningSystem

logger = logging.getLogger(__name__)

# Not our call: Lightning 2.6's CombinedLoader flattens every run's dataloaders with its own
# copy of torch's tree_flatten (lightning/pytorch/utilities/_pytree.py), which builds torch's
# LeafSpec; torch 2.10+ marks that a FutureWarning. No captioner code touches LeafSpec and no
# dataloader shape avoids it, so only that warning, from that module, is ignored, and it would
# greet every `fit` otherwise. Lightning 2.6.6, the newest release on 2026-12-07, still does.
# Remove when Lightning stops using LeafSpec (pyproject has the same filter for the tests).
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                        category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")

DEFAULT_ROOT = "runs/captioner"
# Sharding is done by the data module's EpochSampler (resumable, no repeats).
TRAINER_DEFAULTS = {"use_distributed_sampler": False, "default_root_dir": DEFAULT_ROOT}
# The trainer of the commands that predict (caption, features extract): one device unless asked
# (Lightning's "auto" would take every GPU), nothing logged or saved, their own progress bar.
PREDICT_DEFAULTS = {"devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False}
# --device of the commands that predict -> the trainer's accelerator
ACCELERATORS = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}
# Per-invocation arguments of `fit`, not settings of the run: left out of the saved config.
NOT_SAVED = ("ckpt_path", "weights_only")


# Settings renamed since earlier releases: old dotted key -> new one.
RENAMED = {
    # `checkpoint` clashed with the --checkpoint option of `evaluate`; it pairs with last_checkpoint
    "checkpoint": "best_checkpoint",
    **{f"data.{old}": f"data.{new}" for old, new in RENAMED_DATA_KEYS.items()},
}


# The classes whose arguments are sections of a run's config, checked right after parsing.
SECTIONS = {"model": CaptioningSystem, "data": CaptionDataModule, "last_checkpoint": PeriodicCheckpoint,
            "precise_bn": PreciseBatchNorm}

# What a resumed `fit` keeps from its checkpoint: the model settings that decide the weights'
# shapes (encoder, decoder), what is optimised and how (loss, scst, optim: the optimiser's state
# and the schedule continue). A different value there needs a new run (--model.init_from).
# `decoding` (validation, and the checkpoints' default), `compile` and every section outside
# `model` follow the command, as in any run.
KEPT_ON_RESUME = ("encoder", "decoder", "optim", "loss", "scst")
# ...except where the encoder's starting weights are read: the checkpoint's replace them.
FREE_ON_RESUME = ("encoder.weights_path",)


class _Parser(LightningArgumentParser):
    """jsonargparse's errors as exceptions: the CLI prints one line instead of LightningCLI's
    full usage (hundreds of lines) followed by the error."""

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        raise ConfigError(error_line(message, ex))


def setting_hints() -> dict[str, Any]:
    """Dotted key -> type of every setting of the ``SECTIONS`` (a dataclass argument's fields
    one by one)."""
    out: dict[str, Any] = {}
    for prefix, cls in SECTIONS.items():
        for name, hint in typing.get_type_hints(cls.__init__, include_extras=True).items():
            fields = typing.get_type_hints(hint, include_extras=True) if dataclasses.is_dataclass(hint) else None
            if fields:
                out.update({f"{prefix}.{name}.{k}": h for k, h in fields.items()})
            elif name != "return":
                out[f"{prefix}.{name}"] = hint
    return out


def _say_what_settings_accept(parser: LightningArgumentParser) -> None:
    """``--help``: a setting with a range or a registry says what it accepts (a choice setting
    lists its choices by itself)."""
    hints = setting_hints()
    for action in parser._actions:
        hint = hints.get(action.dest)
        if hint is not None and not is_choice(hint) and (text := accepts(hint, names=True)):
            action.help = f"accepts {text.replace('`', '')}" + (f"; {action.help}" if action.help else "")


def check_settings(config: Mapping) -> None:
    """Every setting of the ``SECTIONS`` of a parsed config (plain dicts) against what it accepts, right after parsing: before any data is read or model built.
    jsonargparse has checked the types and a Literal's choices; this runs each config
    dataclass's own checks (ranges, registry names, settings that need each other)."""
    for name, cls in SECTIONS.items():
        section = config.get(name)
        if isinstance(section, Mapping):
            try:
                check_arguments(cls.__init__, name, section)
            except ValueError as err:
                raise ConfigError(" ".join(str(err).split())) from None


def _plain(value: Any) -> Any:
    """Tuples as lists (a checkpoint keeps asdict's tuples, a parsed config has lists)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def resume_settings(given: Mapping, stored: Mapping) -> tuple[dict, list[tuple[str, Any, Any, bool]]]:
    """What a run resumed from a checkpoint takes from it. ``given``: the parsed ``model``
    section (plain dicts); ``stored``: the checkpoint's hyper-parameters. Returns ``taken``
    ({section: {field: value}}, the checkpoint's value of every setting in ``KEPT_ON_RESUME``)
    and ``differ``: (key, given, stored, set) for each of them given another value than the
    checkpoint's; ``set``: by the config or the command line (not left at its default)."""
    params = inspect.signature(CaptioningSystem).parameters
    taken: dict[str, dict] = {}
    differ = []
    for section in KEPT_ON_RESUME:
        values, theirs = given.get(section), stored.get(section)
        if not isinstance(values, Mapping) or not isinstance(theirs, Mapping):
            continue
        defaults = dataclasses.asdict(params[section].default)
        for name in defaults:  # a setting newer than the checkpoint keeps the config's value
            if name not in theirs or f"{section}.{name}" in FREE_ON_RESUME:
                continue
            mine, value = _plain(values.get(name)), _plain(theirs[name])
            taken.setdefault(section, {})[name] = value
            if mine != value:
                differ.append((f"model.{section}.{name}", mine, value, mine != _plain(defaults[name])))
    return taken, differ


def _as_dict(section: Any) -> Any:
    return section.as_dict() if hasattr(section, "as_dict") else section


def encoder_config(section):
    """``model.encoder`` of a parsed config (a jsonargparse Namespace before instantiation, or
    already an EncoderConfig) -> EncoderConfig."""
    from captioner.models.encoder import EncoderConfig

    if isinstance(section, EncoderConfig):
        return section
    fields = vars(getattr(section, "init_args", section))
    return EncoderConfig(**{k: v for k, v in fields.items() if not k.startswith("_")})


def _preprocessing_from_encoder(encoder) -> dict:
    from captioner.models.encoder import encoder_preprocessing

    # a dict, so the saved config can hold it
    return encoder_preprocessing(encoder_config(encoder)).to_dict()


def _vocab_list(vocab) -> list[str]:
    return vocab.to_list()


def add_run_arguments(parser: LightningArgumentParser, link_vocab: bool = True) -> None:
    """The sections of a run's config beyond trainer/model/data, and how they link.
    ``link_vocab``: the model takes the data's vocabulary (only where the model is built)."""
    parser.link_arguments("model.encoder", "data.preprocessing",
                          compute_fn=_preprocessing_from_encoder, apply_on="parse")
    if link_vocab:
        parser.link_arguments("data.vocab", "model.vocab", compute_fn=_vocab_list, apply_on="instantiate")
    parser.add_lightning_class_args(ModelCheckpoint, "best_checkpoint")
    parser.add_lightning_class_args(PeriodicCheckpoint, "last_checkpoint")
    parser.add_lightning_class_args(EarlyStopping, "early_stopping")
    parser.add_lightning_class_args(PreciseBatchNorm, "precise_bn")
    _say_what_settings_accept(parser)
    parser.set_defaults({
        # dirpath None: <trainer.default_root_dir>/checkpoints, decided when the trainer is made
        "best_checkpoint.monitor": "val/CIDEr", "best_checkpoint.mode": "max",
        "best_checkpoint.save_last": True, "best_checkpoint.filename": "best",
        "best_checkpoint.save_top_k": 1, "best_checkpoint.enable_version_counter": False,
        # strict False: a run shorter than an epoch has no val/CIDEr yet, and that is no error
        "early_stopping.monitor": "val/CIDEr", "early_stopping.mode": "max",
        "early_stopping.patience": 10, "early_stopping.check_finite": False,
        "early_stopping.strict": False,
    })


def default_loggers(root: Path) -> list:
    """CSV (read by ``evaluate --report``) and TensorBoard logs inside the run folder."""
    return [RunCSVLogger(root, name="logs"), RunTensorBoardLogger(root, name="tensorboard")]


class RunConfig(SaveConfigCallback):
    """Writes the resolved config of a ``fit`` to ``<default_root_dir>/config.yaml`` (atomically),
    so that ``evaluate --checkpoint <root>/checkpoints/best.ckpt`` finds the run's settings."""

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        config = self.config.clone()
        for key in NOT_SAVED:
            config.pop(key, None)
        text = _dump_with_nulls(self.parser, config)
        atomic_write(Path(trainer.default_root_dir) / CONFIG_NAME, lambda f: f.write(text.encode()))


def _shown(path: Path) -> str:
    """``path`` as the user would type it: relative to the current folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _dump_with_nulls(parser: LightningArgumentParser, config) -> str:
    """The config as YAML, null settings included (jsonargparse 4.49 renamed skip_none)."""
    try:
        return parser.dump(config, skip_unset=False)
    except (TypeError, ValueError):  # jsonargparse < 4.49
        return parser.dump(config, skip_none=False)


def _renamed(key: str) -> str | None:
    for old, new in RENAMED.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def _dotted_keys(tree: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}{k}"
            yield key
            if key not in ("trainer", "model", "data.coco"):  # values there are not settings
                yield from _dotted_keys(v, key + ".")


def check_renamed(args: Sequence[str]) -> None:
    """An old setting, on the command line or in a ``--config`` file -> ConfigError naming the
    new one (jsonargparse alone would only say that the key is unknown)."""
    for arg in args:
        key = arg[2:].split("=", 1)[0]
        # only dotted flags: a section's name alone may be a command's own option (--checkpoint)
        if arg.startswith("--") and "." in key and (new := _renamed(key)):
            raise ConfigError(f"{arg.split('=', 1)[0]} is now --{new}")
    for path, tree in config_trees(args):
        for key in _dotted_keys(tree):
            if new := _renamed(key):
                raise ConfigError(f"{path}: setting {key} is now {new}")


@contextlib.contextmanager
def _argv(args: Sequence[str]) -> Iterator[None]:
    """LightningCLI reads sys.argv (and warns when given ``args`` beside a longer sys.argv).
    sys.argv[0] stays: Lightning's DDP launcher starts the other ranks with it."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "captioner", *args]
    try:
        yield
    finally:
        sys.argv = saved


class CaptionerCLI(LightningCLI):
    """``captioner fit|validate|test``: LightningCLI with captioner's callbacks and run folder."""

    def __init__(self, args: Sequence[str], run: bool = True, prog: str = "captioner",
                 description: str | None = None) -> None:
        _one_log_handler()
        check_renamed(args)
        with _argv(args):
            super().__init__(
                CaptioningSystem, CaptionDataModule,
                seed_everything_default=0,
                trainer_defaults=TRAINER_DEFAULTS,
                parser_class=_Parser,
                save_config_callback=RunConfig,
                save_config_kwargs={"save_to_log_dir": False, "overwrite": True},
                parser_kwargs={"prog": prog, **({"description": description} if description else {})},
                run=run,
            )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_run_arguments(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        check_settings(_as_dict(self.config[subcommand] if subcommand else self.config))

    def _parse_ckpt_path(self) -> None:
        """Lightning's step that, given ``--ckpt_path``, replaces the model's settings with the
        checkpoint's before the model is built; here it replaces only ``KEPT_ON_RESUME``, says
        so, and refuses (``fit``) a setting given another value than the checkpoint's. The saved
        config.yaml then holds what the run uses."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        path = config.get("ckpt_path") if config is not None else None
        if not path or not Path(path).is_file():  # Lightning's names (last, hpc) and errors
            return
        from captioner.checkpoint import CheckpointError, stored_settings

        try:
            stored, step = stored_settings(path)
        except CheckpointError as err:
            raise ConfigError(f"--ckpt_path: {err}") from None
        taken, differ = resume_settings(_as_dict(config.model), stored)
        conflicts = [(key, mine, value) for key, mine, value, given in differ if given]
        if conflicts and subcommand == "fit":
            said = ", ".join(f"{key} is {mine!r} here but {value!r} in the checkpoint"
                             for key, mine, value in conflicts)
            raise ConfigError(
                f"--ckpt_path {path}: {said}; a resumed run keeps the checkpoint's model, loss and "
                f"optimiser settings: leave {'them' if len(conflicts) > 1 else 'it'} out to resume, or "
                f"start a new run from its weights with a fresh optimiser: --model.init_from {path} "
                "(without --ckpt_path)")
        for key, mine, value, given in differ:
            logger.info("%s: %s %r from the checkpoint (%s %r)", subcommand, key, value,
                        "not the" if given else "this config leaves it at its default", mine)
        logger.info("%s --ckpt_path %s (step %s): model.%s from the checkpoint; the rest from this command",
                    subcommand, path, step, ", ".join(KEPT_ON_RESUME))
        if taken:
            self.config = self.parser.parse_object({subcommand: {"model": taken}}, self.config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = self._get(self.config_init, "trainer", default={})
        root = Path(trainer.get("default_root_dir") or DEFAULT_ROOT)
        checkpoint = self._get(self.config_init, "best_checkpoint")
        if checkpoint.dirpath is None:
            checkpoint.dirpath = os.path.realpath(root / "checkpoints")
        if trainer.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(root)
        plugins = trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        # Here, not in trainer_defaults: the saved config could not serialise an instance.
        kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        built = super().instantiate_trainer(**kwargs)
        built.callbacks.append(ScaleReport())  # not a setting: every fit says its scale
        return built

    def _run_subcommand(self, subcommand: str) -> None:
        started = time.time()
        try:
            super()._run_subcommand(subcommand)
        except Exception as err:
            full = find_disk_full(err)
            if full is None or subcommand != "fit":
                raise
            full.hint = self._resume_hint(started)
            if any(full is e for e in exception_chain(err)):
                raise
            raise full from err

    def _resume_hint(self, started: float) -> str:
        """How to go on after a full disk stopped ``fit``: from the newest whole checkpoint of
        this run (written atomically: the one on disk is whole), else from the one it resumed."""
        cb = self.trainer.checkpoint_callback
        folder = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(self.trainer.default_root_dir) / "checkpoints"
        given = self.config.get(self.subcommand).get("ckpt_path")
        found = [p for p in (folder / "last.ckpt", folder / "best.ckpt") if p.is_file() and p.stat().st_mtime >= started]
        found += [Path(given)] if given and Path(given).is_file() else []
        if not found:
            return "free space and run the same command again (no checkpoint was saved yet)"
        return f"free space and run the same command with --ckpt_path {_shown(found[0])} to continue from it"

    def after_fit(self) -> None:
        """Where the run is: the one line a user needs after training."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        cb = trainer.checkpoint_callback
        folder = Path(cb.dirpath) if cb is not None and cb.dirpath else None
        if folder is None:
            return
        best = folder / "best.ckpt"
        if best.is_file() and cb.best_model_score is not None:
            logger.info("best checkpoint: %s (%s %.4f)", best, cb.monitor, float(cb.best_model_score))
        elif not best.is_file():
            logger.info("no best.ckpt (it is chosen by a validation score, and none was saved): "
                        "use %s", folder / "last.ckpt")
        logger.info("run folder: %s (checkpoints/, logs/, tensorboard/, %s)",
                    trainer.default_root_dir, CONFIG_NAME)


class ConfigCLI(CaptionerCLI):
    """A run's config parsed exactly as ``fit`` parses it, plus a command's own options
    (``add_options(parser)``); only the data module is instantiated (``.datamodule``), the
    model's settings are read from ``.config.model``. Nothing is seeded or trained."""

    def __init__(self, prog: str, args: Sequence[str],
                 add_options: Callable[[LightningArgumentParser], None],
                 description: str | None = None) -> None:
        self._add_options = add_options
        super().__init__(args, run=False, prog=prog, description=description)

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_prediction_trainer(parser)
        # The model comes from a checkpoint (evaluate) or is a frozen encoder (features): its
        # section is parsed and checked, never built.
        parser.add_class_arguments(CaptioningSystem, "model", fail_untyped=False,
                                   instantiate=False, sub_configs=True)
        parser.add_lightning_class_args(CaptionDataModule, "data")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        add_run_arguments(parser, link_vocab=False)
        self._add_options(parser)

    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # A fit config sets it, so it must parse here too; nothing here is seeded.
        parser.add_argument("--seed_everything", type=bool | int, default=self.seed_everything_default,
                            help="the training seed of a fit config: read so that the config parses, "
                                 "not used by this command")

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        # jsonargparse 4.49 renamed instantiate_classes to instantiate
        instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
        self.config_init = instantiate(self.config)
        self.datamodule = self._get(self.config_init, "data", default=None)

    def prediction_trainer(self, device: str = "auto") -> Trainer:
        """The ``trainer`` section as a Trainer for ``Trainer.predict``: :func:`prediction_trainer`."""
        return prediction_trainer(self._get(self.config_init, "trainer", default={}), device)


def add_prediction_trainer(parser: ArgumentParser) -> None:
    """The ``trainer`` section of the commands that predict (Lightning's Trainer arguments, with
    ``PREDICT_DEFAULTS``), as ``LightningArgumentParser.add_lightning_class_args`` adds it."""
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False, instantiate=False, sub_configs=True)
    parser.set_defaults({f"trainer.{k}": v for k, v in {**TRAINER_DEFAULTS, **PREDICT_DEFAULTS}.items()})


def prediction_trainer(settings: Mapping[str, Any] | None, device: str = "auto") -> Trainer:
    """A Trainer for ``Trainer.predict``: ``settings``, the parsed ``trainer`` section (its
    callbacks instantiated; None: the defaults of :func:`add_prediction_trainer`). ``device``: a
    command's ``--device`` (auto, cpu, cuda), the accelerator unless ``--trainer.accelerator``
    says otherwise (both given and different: UsageError)."""
    settings = dict(settings) if settings is not None else {**TRAINER_DEFAULTS, **PREDICT_DEFAULTS}
    asked = settings.get("accelerator") or "auto"
    if device != "auto" and asked != "auto" and asked != ACCELERATORS[device]:
        raise UsageError(f"--device {device} and --trainer.accelerator {asked} disagree: give one of them")
    if asked == "auto":
        settings["accelerator"] = ACCELERATORS[device]
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    _one_log_handler()
    # Lightning's device lines ("GPU available: ...") are for training runs; a command that
    # captions says what it did itself, and stderr stays one line on a user's error
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)
    try:
        return Trainer(**settings)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as err:
        raise UsageError(f"trainer: {' '.join(str(err).split())}") from None
    finally:
        rank_zero.setLevel(level)


def _one_log_handler() -> None:
    """Lightning gives its logger a handler of its own when imported; the CLI's root handler
    already prints its messages, so each would appear twice."""
    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()
