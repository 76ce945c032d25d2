"""CaptioningSystem: the LightningModule that wires a ``Captioner`` to its training objective
(``captioner.training.objectives``), optimiser (``captioner.training.optim``) and validation scores."""

from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from captioner.checkpoint import CheckpointError, read_trained, stored_vocab, write_entry
from captioner.data.transforms import Preprocessing
from captioner.data.vocab import Vocabulary
from captioner.decoding import DecodingConfig, generate
from captioner.models import Captioner, DecoderConfig, EncoderConfig
from captioner.training.objectives import (
    LossConfig,
    ScstConfig,
    batch_features,
    caption_length_limit,
    objective_for,
)
from captioner.training.optim import OptimConfig, build_optimizer, set_budget_used
from captioner.training.validation import EpochCaptions, score_epoch, teacher_forced_ce

logger = logging.getLogger(__name__)


# moved out of the system (issue 30); kept, deprecated, for one release: name -> its module now
_MOVED = {
    **dict.fromkeys(["CaptionLoss", "caption_loss", "attention_supervision_loss", "scst_advantage",
                     "scst_policy_loss"], "captioner.training.objectives"),
    **dict.fromkeys(["OPTIMIZERS", "Optimizer", "Scheduler"], "captioner.training.optim"),
    "CHECKPOINT_FORMAT": "captioner.checkpoint",
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"captioner.system.{name} is deprecated: use {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"CaptioningSystem.{old} is deprecated: use {new}", DeprecationWarning, stacklevel=3)


class CaptioningSystem(L.LightningModule):
    """Trains a ``Captioner``. ``vocab`` is linked from the data module by ``captioner fit``."""

    def __init__(
        self,
        encoder: EncoderConfig = EncoderConfig(),
        decoder: DecoderConfig = DecoderConfig(),
        optim: OptimConfig = OptimConfig(),
        loss: LossConfig = LossConfig(),
        decoding: DecodingConfig = DecodingConfig(),
        vocab: list[str] | None = None,
        compile: bool = False,
        scst: ScstConfig = ScstConfig(),
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if vocab is None:
            raise ValueError("CaptioningSystem needs a vocabulary (captioner fit links it from the data)")
        if compile:  # kept as a parameter so that the configs and checkpoints that say false still load
            raise ValueError("model.compile: true is not supported: it never compiled anything, and "
                             "compiling the decoder's training step ran far slower (docs/performance.md, "
                             "'torch.compile'); leave it false")
        # Configs are never mutated, so the shared default instances are safe.
        self.encoder_config = encoder
        self.decoder_config = decoder
        self.optim = optim
        self.loss_config = loss
        self.decoding = decoding
        self.scst = scst
        self.vocab = vocab if isinstance(vocab, Vocabulary) else Vocabulary(vocab)
        # Plain dicts only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters({
            "encoder": asdict(self.encoder_config), "decoder": asdict(self.decoder_config),
            "optim": asdict(self.optim), "loss": asdict(self.loss_config),
            "decoding": asdict(self.decoding), "scst": asdict(self.scst),
        })
        self.model = Captioner(self.encoder_config, self.decoder_config, len(self.vocab), self.vocab.to_list())
        # Hard attention's moving-average baseline is state: saved, restored on resume. Every
        # system has it, so that every checkpoint has the same keys.
        self.register_buffer("reward_baseline", torch.zeros(()))
        self.register_buffer("baseline_initialised", torch.zeros((), dtype=torch.bool))
        self.objective = objective_for(loss, scst, self.model.decoder.attention.stochastic)
        self._cider_state: dict | None = None  # a resumed run's SCST state, for the objective's start
        self._captions = EpochCaptions()
        if init_from is not None:
            self._init_from(init_from)

    def _init_from(self, path: str) -> None:
        """The weights of a finished run (a fine-tuning stage's start); its vocabulary must be
        the data's. Optimiser, schedule and step start afresh."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.init_from: {path}: checkpoint not found")
        try:
            trained = read_trained(path)
        except CheckpointError as err:
            raise ValueError(f"model.init_from: {err}") from None
        if differ := self._vocab_differs(trained.vocab):
            raise ValueError(f"model.init_from: {path}: {differ}: fine-tune on the data (and data.min_count, "
                             "data.vocab_path) the checkpoint was trained with")
        try:
            self.model.load_state_dict(trained.weights)
        except RuntimeError as err:
            first = " ".join(str(err).split())[:300]
            raise ValueError(f"model.init_from: {path}: its model differs from model.encoder/model.decoder "
                             f"of this config: {first}") from None
        logger.info("model.init_from: weights of %s", path)

    def _vocab_differs(self, words: list[str]) -> str | None:
        """How a checkpoint's vocabulary ``words`` differs from the data's, or None."""
        theirs, ours = list(words), self.vocab.to_list()
        if theirs == ours:
            return None
        differ = sum(a != b for a, b in zip(theirs, ours)) + abs(len(theirs) - len(ours))
        return (f"its vocabulary ({len(theirs)} words) differs from the data's ({len(ours)} words) "
                f"in {differ} word(s)")

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.preprocessing

    def setup(self, stage: str) -> None:
        """Before any step, on every process: a feature cache must have been made by this model's
        encoder (its settings and weights, as built or loaded by ``init_from``) with its
        preprocessing, from the images the data's ids name now (else ValueError: exit 2). Here,
        before the weights move to a device or a precision plugin converts them; a resumed run's
        frozen encoder is the one it was built as."""
        dm = self.trainer.datamodule
        if getattr(dm, "feature_cache", None) and hasattr(dm, "check_feature_cache"):
            from captioner.models.encoder import encoder_fingerprint

            splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ())
            self._decode_as_the_cache(dm)
            dm.check_feature_cache(encoder_fingerprint(self.encoder_config, self.model.encoder),
                                   self.preprocessing, splits)

    def _decode_as_the_cache(self, dm) -> None:
        """A cache made before ``jpeg_dct_scaling`` existed decoded large JPEGs whole; otherwise
        made as this run would make it, it is kept (not refused, which would mean encoding a whole
        data set again) and the model decodes as the cache did, so that its captions see the
        pixels it trained on. The checkpoint records it."""
        cached = dm.feature_cache_preprocessing() if hasattr(dm, "feature_cache_preprocessing") else None
        pre = self.preprocessing
        if cached is not None and pre.jpeg_dct_scaling and cached == replace(pre, jpeg_dct_scaling=False):
            self.model.encoder.preprocessing = cached
            logger.info("the feature cache decoded large JPEGs whole (it predates jpeg_dct_scaling): "
                        "this model will too, to caption the pixels it trained on")

    # -- training ------------------------------------------------------------------------------
    def compute_loss(self, batch: dict) -> dict[str, Tensor]:
        """Teacher-forced training on ``batch`` whatever ``model.scst`` says (cross-entropy, and
        REINFORCE for an attention that samples): the values it logs, ``"loss"`` among them.
        A training step minimises ``self.objective``'s loss (the same one unless SCST is on)."""
        stochastic = self.model.decoder.attention.stochastic
        return objective_for(self.loss_config, ScstConfig(), stochastic).loss(self, batch)

    def _anneal_semi_sampling(self) -> bool:
        """The attention's warm-up at this optimiser step (hard attention: the expectation's
        share falls from 1 to semi_sampling). True when there is a warm-up."""
        return self.model.decoder.attention.anneal(self.global_step)

    def on_fit_start(self) -> None:
        self.objective.start(self.trainer.datamodule, self._cider_state)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if not batch:  # every image of the batch was unreadable and skipped
            return None
        annealing = self._anneal_semi_sampling()
        logs = self.objective.loss(self, batch)
        if annealing:
            logs["semi_sampling"] = torch.tensor(self.model.decoder.attention.semi_sampling)
        bs = batch["captions"].size(0)
        self.log("train/loss", logs["loss"], prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k != "loss"}, batch_size=bs)
        return logs["loss"]

    def configure_optimizers(self):
        return build_optimizer(self.model, self.optim, lambda: self.trainer.estimated_stepping_batches)

    def _follow_time_budget(self) -> None:
        """``model.optim.schedule_by: time``: tell the schedule the share of ``trainer.max_time``
        spent, as Lightning's ``Timer`` (the clock that stops the run) counts it."""
        if self.optim.schedule_by != "time":
            return
        from lightning.pytorch.callbacks import Timer

        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is None:  # no max_time: the steps alone decide
            return
        elapsed = timer.time_elapsed()
        for config in self.trainer.lr_scheduler_configs:
            set_budget_used(config.scheduler, elapsed / max(elapsed + remaining, 1e-9))

    # -- free-running validation ---------------------------------------------------------------
    @property
    def decoding_settings(self) -> DecodingConfig:
        """``decoding`` with its length limit resolved (unset: the data's tokenizer's)."""
        dm = self._trainer.datamodule if self._trainer is not None else None
        return replace(self.decoding, max_length=caption_length_limit(self.decoding.max_length, dm))

    def generate(self, features: Tensor, beam_size: int | None = None):
        return generate(self.model.decoder, features, self.decoding_settings, beam_size)

    def _eval_step(self, batch: dict, prefix: str) -> None:
        if not batch:
            return
        features = batch_features(self.model, batch)
        gen = self.generate(features)
        self._captions.add(batch["image_ids"], gen.tokens, self.decoding_settings.max_length)
        ce = teacher_forced_ce(self.model.decoder(features, batch["captions"], batch["lengths"]), batch["captions"])
        self.log(f"{prefix}/ce_teacher_forced", ce, batch_size=features.size(0), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._score_epoch("val", "validation")

    def on_test_epoch_end(self) -> None:
        self._score_epoch("test", "test")

    def _score_epoch(self, prefix: str, stage: str) -> None:
        preds = self._captions.gather(self, self.vocab, self.decoding_settings.max_length)
        if not preds or self.trainer.sanity_checking:
            return
        # Every rank scored the same gathered captions: the mean over ranks is each rank's value,
        # and saying sync_dist keeps Lightning from asking for it.
        for name, value in score_epoch(preds, self.trainer.datamodule, prefix, stage).items():
            self.log(f"{prefix}/{name}", value, prog_bar=name != "exact_match", sync_dist=True)

    @property
    def _cider(self):
        """SCST's reward (CIDEr-D), whose ``state_dict()`` checkpoints keep; None otherwise."""
        return getattr(self.objective, "cider", None)

    # deprecated aliases, for one release (issue 30): the losses moved to captioner.training
    def features(self, batch: dict) -> Tensor:
        _deprecated("features", "captioner.training.batch_features(system.model, batch)")
        return batch_features(self.model, batch)

    def scst_loss(self, batch: dict) -> dict[str, Tensor]:
        _deprecated("scst_loss", "system.objective.loss(system, batch) (model.scst.enabled)")
        return self.objective.loss(self, batch)

    def rewards(self, tokens: Tensor, image_ids: list) -> Tensor:
        _deprecated("rewards", "system.objective.rewards(system.vocab, tokens, image_ids) (model.scst.enabled)")
        return self.objective.rewards(self.vocab, tokens, image_ids)

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        write_entry(checkpoint, self.vocab, self.preprocessing,
                    getattr(self.trainer.datamodule, "tokenizer_name", "simple"))
        # Dropout and hard attention's samples draw from torch's RNG: resume must continue it.
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["rng_state"] = rng
        if self._cider is not None:  # SCST's document frequencies: a resumed run keeps its reward
            checkpoint["scst"] = self._cider.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # --ckpt_path: the embedding's rows are words; another vocabulary of the same size would
        # load without a word and give each row another meaning
        words = stored_vocab(checkpoint)
        if words is not None and (differ := self._vocab_differs(words)):
            raise ValueError(f"ckpt_path: {differ}: resume with the data (and data.min_count, "
                             "data.vocab_path) the checkpoint was trained with")
        self._pending_rng = checkpoint.get("rng_state")
        self._cider_state = checkpoint.get("scst")

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._follow_time_budget()
        # Restored here, not at load time: Lightning draws from the RNG while it sets up.
        rng = getattr(self, "_pending_rng", None)
        if rng:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._pending_rng = None

