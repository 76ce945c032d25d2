"""CaptioningSystem: the LightningModule that owns losses, validation metrics and optimisers."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from captioner.checkpoint import CheckpointError, read_trained, stored_vocab, write_entry
from captioner.data.grounding import cell_shares
from captioner.data.transforms import Preprocessing
from captioner.data.vocab import END_ID, PAD_ID, START_ID, Vocabulary
from captioner.decoding import DecodingConfig, generate
from captioner.models import Captioner, DecoderConfig, EncoderConfig
from captioner.models.decoder import DecoderOutput
from captioner.settings import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Range,
    UnitInterval,
    check_fields,
)

logger = logging.getLogger(__name__)


def __getattr__(name: str):
    if name == "CHECKPOINT_FORMAT":  # moved with the format; kept, deprecated, for one release
        warnings.warn("captioner.system.CHECKPOINT_FORMAT is deprecated: use captioner.checkpoint.CHECKPOINT_FORMAT",
                      DeprecationWarning, stacklevel=2)
        from captioner.checkpoint import CHECKPOINT_FORMAT

        return CHECKPOINT_FORMAT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# the optimisers and schedules a run can name (model.optim.optimizer, model.optim.scheduler)
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}
Optimizer = Literal["adam", "adamw", "rmsprop"]
Scheduler = Literal["none", "cosine", "step", "plateau"]


@dataclass
class OptimConfig:
    """Adam(W) with separate learning rates for the encoder and the decoder, and a schedule."""

    lr: PositiveFloat = 4e-4
    encoder_lr: PositiveFloat | None = None  # None: same as lr
    weight_decay: NonNegativeFloat = 0.0
    optimizer: Optimizer = "adam"  # rmsprop: the paper's Flickr choice
    scheduler: Scheduler = "none"  # plateau: on val CIDEr-D
    step_size: PositiveInt = 10  # epochs, "step"
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.8  # "step" and "plateau" decay
    warmup_steps: NonNegativeInt = 0
    min_lr_ratio: UnitInterval = 0.05  # "cosine" floor

    def __post_init__(self) -> None:
        check_fields(self, "model.optim")


@dataclass
class LossConfig:
    """Loss weights. Defaults follow the paper's code (see REFERENCE.md)."""

    doubly_stochastic: NonNegativeFloat = 1.0  # lambda of sum_i (1 - sum_t alpha_ti)^2
    reduction: Literal["caption", "token"] = "caption"  # "caption": CE summed over words, mean over captions; "token": mean
    label_smoothing: Fraction = 0.0
    reinforce: NonNegativeFloat = 0.1  # hard: the learning signal's scale (the paper's code divides by 10)
    entropy: NonNegativeFloat = 0.002  # hard: lambda_e
    baseline_decay: UnitInterval = 0.9  # hard: b <- decay * b + (1 - decay) * log p(y | s, a)
    # hard: "moving_average" (the paper's b) or "expectation": each caption's own baseline, its
    # log-likelihood under the expected context (a second teacher-forced pass, which is also
    # trained: weight semi_sampling, the sampled pass 1 - semi_sampling)
    baseline: Literal["moving_average", "expectation"] = "moving_average"
    # hard: credit step t's location with the log-likelihood of words t.. only (it cannot change
    # earlier words), not the whole caption's: the same expected gradient, less variance
    reward_to_go: bool = False
    # Weight of attention supervision (needs data.grounding, i.e. shapes): on every word that
    # names an object, -log of the attention mass the attention-correctness metric would count
    # inside that object (Liu et al. 2017 supervise the map with the word's region likewise).
    attention_supervision: NonNegativeFloat = 0.0

    def __post_init__(self) -> None:
        check_fields(self, "model.loss")


@dataclass
class ScstConfig:
    """Self-critical sequence training (Rennie et al. 2017): fine-tune on sampled captions,
    rewarded with their CIDEr-D against the image's references minus a baseline."""

    enabled: bool = False
    n_samples: PositiveInt = 5  # sampled captions per image
    # "mean": the mean reward of the image's other samples (Luo 2020); "greedy": the reward of
    # the greedy caption (Rennie et al. 2017), decoded without dropout
    baseline: Literal["mean", "greedy"] = "mean"
    max_length: PositiveInt | None = None  # most tokens per sampled caption; None: the tokenizer's limit
    temperature: PositiveFloat = 1.0  # sampling temperature (the policy whose log-probabilities are trained)
    ce_weight: NonNegativeFloat = 0.0  # weight of the usual cross-entropy loss on the reference captions
    entropy: NonNegativeFloat = 0.0  # bonus on the words' entropy at each sampled step
    bleu4_weight: NonNegativeFloat = 0.0  # reward = CIDEr-D + bleu4_weight * BLEU-4

    def __post_init__(self) -> None:
        check_fields(self, "model.scst")
        if self.baseline == "mean" and self.n_samples < 2:
            raise ValueError(f"model.scst.baseline 'mean' averages the other samples of each image: it needs "
                             f"model.scst.n_samples >= 2, got {self.n_samples} (or use baseline 'greedy')")


def scst_advantage(rewards: Tensor, baseline: str, greedy_rewards: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``rewards`` (B, S): S samples per image -> (baseline, advantage), both (B, S).
    ``mean``: each sample's baseline is the mean reward of the image's other S - 1 samples;
    ``greedy``: the reward of the image's greedy caption, ``greedy_rewards`` (B,)."""
    if baseline == "mean":
        s = rewards.size(1)
        assert s >= 2, "the mean baseline needs at least two samples per image"
        base = (rewards.sum(1, keepdim=True) - rewards) / (s - 1)
    else:
        assert greedy_rewards is not None, "the greedy baseline needs the greedy captions' rewards"
        base = greedy_rewards.unsqueeze(1).expand_as(rewards)
    return base, rewards - base


def scst_policy_loss(
    logits: Tensor, tokens: Tensor, mask: Tensor, advantage: Tensor, temperature: float = 1.0,
    location_log_probs: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """REINFORCE with a baseline on sampled captions: -mean(advantage * log pi(caption)).

    ``logits`` (B, T, V) of a teacher-forced pass over the samples, ``tokens`` (B, T) the sampled
    words (and ``<end>``), ``mask`` (B, T) their real steps, ``advantage`` (B,) (no gradient).
    The policy is the one ``decoding.sample`` drew from: softmax(logits / temperature) without
    ``<pad>``, ``<start>``, nor ``<end>`` as the first word. ``location_log_probs`` (B, T): hard
    attention's sampled locations, which share the caption's advantage.
    Returns the loss, each caption's log-probability (B,) and the mean entropy per step."""
    logits = logits.float() / temperature
    banned = torch.zeros(logits.shape[1:], dtype=torch.bool, device=logits.device)  # (T, V)
    banned[:, PAD_ID] = True
    banned[:, START_ID] = True
    banned[0, END_ID] = True
    logp = torch.log_softmax(logits.masked_fill(banned, float("-inf")), -1)  # (B, T, V)
    m = mask.float()
    picked = logp.gather(2, tokens.unsqueeze(2)).squeeze(2)  # (B, T), -inf on <pad>
    token_logp = torch.where(mask, picked, torch.zeros_like(picked))  # (B, T)
    caption_logp = token_logp.sum(1)  # (B,)
    log_pi = caption_logp if location_log_probs is None else caption_logp + (location_log_probs.float() * m).sum(1)
    loss = -(advantage.detach() * log_pi).mean()
    probs = logp.exp()
    entropy = -(probs * logp.masked_fill(banned, 0.0)).sum(-1)  # (B, T)
    return loss, caption_logp, (entropy * m).sum() / m.sum().clamp(min=1)


@dataclass
class CaptionLoss:
    loss: Tensor  # cross-entropy (reduced as configured) + lambda * doubly stochastic term
    nll: Tensor  # (B,) -log p(y | a) per caption
    ce: Tensor  # (B, T) -log p(y_t | ...) per step, 0 on padding
    mask: Tensor  # (B, T) float, 1 on real steps
    dsr: Tensor  # the doubly stochastic term


def caption_loss(out: DecoderOutput, captions: Tensor, config: LossConfig) -> CaptionLoss:
    """Cross-entropy over real steps plus the doubly stochastic term (without REINFORCE): the
    training loss of ``CaptioningSystem`` for a teacher-forced ``out`` of ``captions`` (B, L)."""
    targets = captions[:, 1:]  # (B, T)
    mask = out.mask.float()  # (B, T)
    # (B*T, V) rows rather than a (B, V, T) transpose: the same sums, without a strided
    # copy of the largest tensor of the step.
    ce = F.cross_entropy(
        out.logits.float().flatten(0, 1), targets.flatten(), reduction="none",
        ignore_index=PAD_ID, label_smoothing=config.label_smoothing,
    ).view_as(targets) * mask  # (B, T), 0 on padding
    nll = ce.sum(1)  # (B,)
    ce_loss = nll.sum() / mask.sum().clamp(min=1) if config.reduction == "token" else nll.mean()
    # Doubly stochastic regularisation over real steps only: sum_i (1 - sum_t alpha_ti)^2.
    att_sum = (out.alphas.float() * mask.unsqueeze(-1)).sum(1)  # (B, N)
    dsr = ((1.0 - att_sum) ** 2).sum(1).mean()
    return CaptionLoss(ce_loss + config.doubly_stochastic * dsr, nll, ce, mask, dsr)


def attention_supervision_loss(
    alphas: Tensor, token_objects: Tensor, object_masks: Tensor, mask: Tensor
) -> Tensor:
    """Mean over grounded steps of -log(sum_i alpha_ti * share_i), share_i being the part of
    cell i's upsampled attention inside the object word t names (``cell_shares``): the negative
    log of the attention correctness the map would score.

    ``alphas`` (R * B, T, N) on a square grid: the batch's captions R times over (the expectation
    baseline runs R = 2 passes); ``token_objects`` (B, T) object index or -1; ``object_masks``
    (B, K, H, W), projected once whatever R; ``mask`` (R * B, T) real steps.
    """
    b, t, n = alphas.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"attention supervision needs a square attention grid, got {n} regions")
    repeat = b // object_masks.size(0)
    shares = cell_shares(object_masks, (side, side)).flatten(2).repeat(repeat, 1, 1)  # (R*B, K, N)
    token_objects = token_objects.repeat(repeat, 1)  # (R*B, T)
    index = token_objects.clamp(min=0).unsqueeze(-1).expand(b, t, n)  # (R*B, T, N)
    target = shares.gather(1, index)  # (R*B, T, N)
    grounded = ((token_objects >= 0) & mask.bool()).float()  # (R*B, T)
    mass = (alphas.float() * target).sum(-1)  # (R*B, T)
    return -(torch.log(mass.clamp_min(1e-6)) * grounded).sum() / grounded.sum().clamp(min=1)


def _rows_of(out: DecoderOutput, rows: slice) -> DecoderOutput:
    """The captions ``rows`` of a teacher-forced output."""
    return DecoderOutput(**{f.name: None if (x := getattr(out, f.name)) is None else x[rows] for f in fields(out)})


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
        self.compile_decoder = compile
        # Hard attention's moving-average baseline is state: saved, restored on resume.
        self.register_buffer("reward_baseline", torch.zeros(()))
        self.register_buffer("baseline_initialised", torch.zeros((), dtype=torch.bool))
        self._val_outputs: list[tuple[Tensor, Tensor]] = []
        # SCST's reward: CIDEr-D with the training references' document frequencies, made at
        # the start of fit (or restored from the checkpoint on resume).
        self._cider = None
        self._cider_state: dict | None = None
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
            dm.check_feature_cache(encoder_fingerprint(self.encoder_config, self.model.encoder),
                                   self.preprocessing, splits)

    # -- losses --------------------------------------------------------------------------------
    def features(self, batch: dict) -> Tensor:
        if "features" in batch:
            return batch["features"]  # (B, N, D) from the feature cache
        return self.model.encode(batch["images"])[0]

    def compute_loss(self, batch: dict) -> dict[str, Tensor]:
        captions, lengths = batch["captions"], batch["lengths"]
        decoder = self.model.decoder
        features = self.features(batch)
        if decoder.training and decoder.attention.stochastic and self.loss_config.baseline == "expectation":
            logs, out = self._hard_loss_with_expectation_baseline(features, captions, lengths)
        else:
            out = decoder(features, captions, lengths)
            cl = caption_loss(out, captions, self.loss_config)
            logs = {"loss": cl.loss, "ce": cl.nll.sum() / cl.mask.sum().clamp(min=1), "dsr": cl.dsr}
            if out.sample_log_probs is not None:
                loss_rl, extra = self._reinforce(out, cl.ce.detach(), cl.mask)
                logs["loss"] = cl.loss + loss_rl
                logs.update(extra)
        weight = self.loss_config.attention_supervision
        if weight > 0:
            if "token_objects" not in batch:
                raise ValueError("model.loss.attention_supervision needs word-region grounding in the "
                                 "training batches: set data.shapes.grounding: true (only shapes has it)")
            att = attention_supervision_loss(out.alphas, batch["token_objects"], batch["object_masks"], out.mask)
            logs["loss"] = logs["loss"] + weight * att
            logs["attention_supervision"] = att.detach()
        return logs

    def _hard_loss_with_expectation_baseline(
        self, features: Tensor, captions: Tensor, lengths: Tensor
    ) -> tuple[dict, DecoderOutput]:
        """Both halves of semi-sampling on every caption: an expectation pass and a sampled pass,
        weighted p = semi_sampling and 1 - p (the expected value of the paper's coin), the first
        pass's log-likelihood being the second's REINFORCE baseline. Both run as one decoder call
        over the batch twice over (fewer, larger products than two calls)."""
        decoder = self.model.decoder
        p = decoder.attention.semi_sampling
        b = features.size(0)
        rows = torch.arange(2 * b, device=features.device) >= b  # expectation rows, then sampled
        both = decoder(torch.cat([features, features]), torch.cat([captions, captions]),
                       torch.cat([lengths, lengths]), rows)
        soft = caption_loss(_rows_of(both, slice(0, b)), captions, self.loss_config)
        out = _rows_of(both, slice(b, 2 * b))
        hard = caption_loss(out, captions, self.loss_config)
        loss_rl, extra = self._reinforce(out, hard.ce.detach(), hard.mask, soft.ce.detach())
        n_words = hard.mask.sum().clamp(min=1)
        return {
            "loss": p * soft.loss + (1 - p) * (hard.loss + loss_rl),
            "ce": hard.nll.sum() / n_words, "ce_expectation": soft.nll.sum() / n_words,
            "dsr": hard.dsr, **extra,
        }, both

    def _reinforce(
        self, out: DecoderOutput, ce: Tensor, mask: Tensor, baseline_ce: Tensor | None = None
    ) -> tuple[Tensor, dict]:
        """REINFORCE for hard attention (Xu et al. 2015, Eq. 12): the learning signal is
        log p(y | s, a) minus a baseline; plus an entropy bonus on alpha. ``ce`` (B, T) holds
        -log p(y_t) per step; ``baseline_ce`` the same under the expected context, or None for
        the moving average."""
        cfg = self.loss_config

        def returns(x: Tensor) -> Tensor:  # (B, T) log-likelihood credited to each step
            if cfg.reward_to_go:
                return -x.flip(1).cumsum(1).flip(1)
            return -x.sum(1, keepdim=True).expand_as(x)

        reward = returns(ce)  # (B, T)
        if baseline_ce is not None:
            baseline = returns(baseline_ce)
        else:
            # The moving average follows log p(y | s, a) per caption (per word with reward_to_go,
            # scaled by the words left at each step).
            observed = -ce.sum() / mask.sum().clamp(min=1) if cfg.reward_to_go else -ce.sum(1).mean()
            if not bool(self.baseline_initialised):
                self.reward_baseline.copy_(observed)
                self.baseline_initialised.fill_(True)
            baseline = self.reward_baseline.clone()  # before this batch's update
            if cfg.reward_to_go:
                baseline = baseline * mask.flip(1).cumsum(1).flip(1)
            if self.training:
                self.reward_baseline.mul_(cfg.baseline_decay).add_((1 - cfg.baseline_decay) * observed)
        advantage = reward - baseline  # (B, T)
        sampled = out.sampled.float() * mask  # steps that used a sample, not the expectation
        signal = (advantage * out.sample_log_probs.float() * sampled).sum(1)  # (B,)
        entropy = (out.entropies.float() * mask).sum(1).mean()
        loss = -(cfg.reinforce * signal).mean() - cfg.entropy * entropy
        extra = {"reinforce": loss.detach(), "entropy": entropy.detach()}
        if baseline_ce is None:
            extra["baseline"] = self.reward_baseline.clone()
        return loss, extra

    # -- self-critical sequence training ------------------------------------------------------------
    def on_fit_start(self) -> None:
        if not self.scst.enabled or self._cider is not None:
            return
        from captioner.metrics.cider import CiderD

        dm = self.trainer.datamodule
        refs = dm.references("train") if dm is not None and hasattr(dm, "references") else None
        if not refs:
            raise ValueError("model.scst needs the training split's reference captions (from the data module)")
        # The document frequencies come from the training references: computed once per run,
        # saved in its checkpoints and restored from there on resume.
        if self._cider_state is not None:
            self._cider = CiderD(refs, **self._cider_state)
        else:
            self._cider = CiderD(refs)
        logger.info("SCST: CIDEr-D document frequencies of %d training images", self._cider.documents)

    def rewards(self, tokens: Tensor, image_ids: list) -> Tensor:
        """CIDEr-D (plus ``bleu4_weight`` BLEU-4) of generated ``tokens`` (B, T) against the
        references of ``image_ids`` (B,): (B,) float on the tokens' device."""
        import numpy as np

        from captioner.metrics.cider import bleu4_per_caption

        words = [self.vocab.decode(row) for row in tokens.tolist()]
        reward = self._cider.scores(words, image_ids)
        if self.scst.bleu4_weight > 0:
            refs = [self._cider.references[i] for i in image_ids]
            reward = reward + self.scst.bleu4_weight * bleu4_per_caption(words, refs)
        return torch.from_numpy(np.asarray(reward, dtype=np.float32)).to(tokens.device)

    def scst_loss(self, batch: dict) -> dict[str, Tensor]:
        """Self-critical loss on ``n_samples`` sampled captions per image: their log-probability
        (re-scored with gradients by a teacher-forced pass) times reward minus baseline."""
        from captioner.decoding import greedy, sample

        cfg = replace(self.scst, max_length=self._length_limit(self.scst.max_length))
        if self._cider is None:
            raise RuntimeError("scst_loss runs inside fit (on_fit_start builds the reward)")
        decoder = self.model.decoder
        features = self.features(batch)  # (B, N, D)
        b, s = features.size(0), cfg.n_samples
        image_ids = batch["image_ids"].tolist()
        rep = features.repeat_interleave(s, 0)  # (B*S, N, D): image i's samples together
        gen = sample(decoder, rep.detach(), cfg.max_length, cfg.temperature)  # no grad, the training mode's policy
        tokens = gen.tokens  # (B*S, T): words, <end> (when emitted), <pad>
        reward = self.rewards(tokens, [i for i in image_ids for _ in range(s)]).view(b, s)
        greedy_reward = None
        if cfg.baseline == "greedy":
            decoder.eval()  # the test-time caption (Rennie et al.): no dropout, expected context
            try:
                best = greedy(decoder, features.detach(), cfg.max_length)
            finally:
                decoder.train()
            greedy_reward = self.rewards(best.tokens, image_ids)
        baseline, advantage = scst_advantage(reward, cfg.baseline, greedy_reward)
        # Teacher-forced re-scoring: <start> + the sampled tokens; lengths count <start>/<end>.
        n_tok = (tokens != PAD_ID).sum(1)  # (B*S,) words + <end>
        start = torch.full((tokens.size(0), 1), START_ID, dtype=torch.long, device=tokens.device)
        captions = torch.cat([start, tokens], 1)
        out = decoder(rep, captions, n_tok + 1, regularise=False)  # the words as sampled
        locations = None
        if out.sample_log_probs is not None:  # hard attention: its sampled locations share the advantage
            locations = out.sample_log_probs * out.sampled.float()
        loss, _, entropy = scst_policy_loss(out.logits, tokens, out.mask, advantage.flatten(),
                                            cfg.temperature, locations)
        logs = {"reward": reward.mean(), "baseline": baseline.mean(), "advantage": advantage.mean(),
                "advantage_abs": advantage.abs().mean(), "sample_length": (n_tok - (tokens == END_ID).sum(1)).float().mean(),
                "scst": loss.detach(), "entropy": entropy.detach()}
        if greedy_reward is not None:
            logs["greedy_reward"] = greedy_reward.mean()
        if cfg.entropy > 0:
            loss = loss - cfg.entropy * entropy
        if cfg.ce_weight > 0:
            ce = caption_loss(decoder(features, batch["captions"], batch["lengths"]), batch["captions"],
                              self.loss_config)
            loss = loss + cfg.ce_weight * ce.loss
            logs["ce"] = ce.nll.sum() / ce.mask.sum().clamp(min=1)
        logs["loss"] = loss
        return logs

    def _anneal_semi_sampling(self) -> bool:
        """The attention's warm-up at this optimiser step (hard attention: the expectation's
        share falls from 1 to semi_sampling). True when there is a warm-up."""
        return self.model.decoder.attention.anneal(self.global_step)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if not batch:  # every image of the batch was unreadable and skipped
            return None
        annealing = self._anneal_semi_sampling()
        logs = self.scst_loss(batch) if self.scst.enabled else self.compute_loss(batch)
        if annealing:
            logs["semi_sampling"] = torch.tensor(self.model.decoder.attention.semi_sampling)
        bs = batch["captions"].size(0)
        self.log("train/loss", logs["loss"], prog_bar=True, batch_size=bs)
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k != "loss"}, batch_size=bs)
        return logs["loss"]

    # -- free-running validation ---------------------------------------------------------------
    def _length_limit(self, setting: int | None) -> int:
        """A caption length limit left unset (None): the data's tokenizer's (20 for ``simple``,
        50 for ``unicode`` and ``char``), so that Japanese captions are not cut at 20 characters."""
        if setting is not None:
            return setting
        from captioner.data.tokenizers import get_tokenizer

        dm = self._trainer.datamodule if self._trainer is not None else None
        return get_tokenizer(getattr(dm, "tokenizer_name", "simple")).max_length

    @property
    def decoding_settings(self) -> DecodingConfig:
        """``decoding`` with its length limit resolved."""
        return replace(self.decoding, max_length=self._length_limit(self.decoding.max_length))

    def generate(self, features: Tensor, beam_size: int | None = None):
        return generate(self.model.decoder, features, self.decoding_settings, beam_size)

    def _eval_step(self, batch: dict, prefix: str) -> None:
        if not batch:
            return
        features = self.features(batch)
        gen = self.generate(features)
        max_length = self.decoding_settings.max_length
        tokens = torch.full((features.size(0), max_length), PAD_ID, dtype=torch.long, device=self.device)
        tokens[:, : gen.tokens.size(1)] = gen.tokens
        self._val_outputs.append((batch["image_ids"], tokens))
        out = self.model.decoder(features, batch["captions"], batch["lengths"])
        mask = out.mask
        ce = F.cross_entropy(out.logits.float()[mask], batch["captions"][:, 1:][mask])
        self.log(f"{prefix}/ce_teacher_forced", ce, batch_size=features.size(0), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._score_epoch("val", "validation")

    def on_test_epoch_end(self) -> None:
        self._score_epoch("test", "test")

    def _gathered_predictions(self) -> dict[int, str]:
        """Predictions of every rank, each image once (the distributed sampler pads with repeats)."""
        if not self._val_outputs:
            ids = torch.zeros(0, dtype=torch.long, device=self.device)
            toks = torch.zeros(0, self.decoding_settings.max_length, dtype=torch.long, device=self.device)
        else:
            ids = torch.cat([o[0] for o in self._val_outputs])
            toks = torch.cat([o[1] for o in self._val_outputs])
        self._val_outputs.clear()
        if self.trainer.world_size > 1:
            ids = self.all_gather(ids).reshape(-1)
            toks = self.all_gather(toks).reshape(-1, toks.size(-1))
        preds: dict[int, str] = {}
        for i, row in zip(ids.tolist(), toks.tolist()):
            preds.setdefault(i, " ".join(self.vocab.decode(row)))
        return preds

    def _score_epoch(self, prefix: str, stage: str) -> None:
        from captioner.data.tokenizers import get_tokenizer
        from captioner.metrics import exact_match, validation_scores

        preds = self._gathered_predictions()
        if not preds or self.trainer.sanity_checking:
            return
        dm = self.trainer.datamodule
        split = "val" if prefix == "val" else "test"
        refs = dm.references(split) if dm is not None and hasattr(dm, "references") else None
        if not refs:
            return
        preds = {i: p for i, p in preds.items() if i in refs}
        if not preds:
            return
        refs = {i: refs[i] for i in preds}
        scores = validation_scores(preds, refs)
        tokenizer = get_tokenizer(getattr(dm, "tokenizer_name", "simple"))
        exact = exact_match(preds, {i: [r.split() for r in rs] for i, rs in refs.items()},
                            tokenize=tokenizer.tokenize)
        # Every rank scored the same gathered captions: the mean over ranks is each rank's value,
        # and saying sync_dist keeps Lightning from asking for it.
        self.log(f"{prefix}/CIDEr", float(scores["CIDEr"]), prog_bar=True, sync_dist=True)
        self.log(f"{prefix}/Bleu_4", float(scores["Bleu_4"]), prog_bar=True, sync_dist=True)
        self.log(f"{prefix}/exact_match", float(exact), sync_dist=True)
        logger.info("%s: CIDEr-D %.3f  BLEU-4 %.3f  exact %.3f on %d images", stage,
                    scores["CIDEr"], scores["Bleu_4"], exact, len(preds))
        for i in sorted(preds)[:3]:  # a glimpse of what the numbers mean
            logger.info("  %s: %r (reference: %r)", i, preds[i], refs[i][0])

    # -- optimisers ----------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.optim
        enc = [p for p in self.model.encoder.parameters() if p.requires_grad]
        dec = [p for p in self.model.decoder.parameters() if p.requires_grad]
        groups = [{"params": dec, "lr": o.lr}]
        if enc:
            groups.append({"params": enc, "lr": o.encoder_lr if o.encoder_lr is not None else o.lr})
        optimizer = OPTIMIZERS[o.optimizer](groups, weight_decay=o.weight_decay)
        if o.scheduler == "none" and not o.warmup_steps:
            return optimizer
        if o.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=o.gamma, patience=2)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "monitor": "val/CIDEr"}}
        if o.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(optimizer, o.step_size, o.gamma)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        total = max(1, int(self.trainer.estimated_stepping_batches)) if o.scheduler == "cosine" else None
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, _WarmupCosine(o.warmup_steps, total, o.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

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
        # Restored here, not at load time: Lightning draws from the RNG while it sets up.
        rng = getattr(self, "_pending_rng", None)
        if rng:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._pending_rng = None


class _WarmupCosine:
    """Linear warm-up, then cosine decay to ``floor`` (constant when ``total`` is None).
    A class rather than a lambda so that the scheduler's state stays picklable-free."""

    def __init__(self, warmup: int, total: int | None, floor: float) -> None:
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        import math

        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.total is None:
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
