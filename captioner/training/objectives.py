"""Training objectives: what a training step minimises, chosen by the settings.

One interface, ``Objective.loss(system, batch)`` -> the values the step logs, ``"loss"`` (the one
minimised) among them, and a registry keyed by what the settings say (``objective_for``):

- ``cross_entropy``: teacher-forced cross-entropy, the doubly stochastic term and attention
  supervision (``model.loss``);
- ``reinforce_moving_average``, ``reinforce_expectation``: an attention that samples its locations
  (``Attention.stochastic``: hard) adds REINFORCE on them (Xu et al. 2015), its baseline the paper's
  moving average or each caption's log-likelihood under the expected context (``model.loss.baseline``);
- ``scst``: self-critical sequence training on sampled captions, rewarded with CIDEr-D
  (``model.scst.enabled``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from captioner.data.features import batch_features as cached_features
from captioner.data.grounding import cell_shares
from captioner.data.vocab import END_ID, PAD_ID, START_ID, Vocabulary
from captioner.models.decoder import DecoderOutput
from captioner.registry import Registry
from captioner.settings import (
    Fraction,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    UnitInterval,
    check_fields,
)

if TYPE_CHECKING:
    from captioner.metrics.cider import CiderD
    from captioner.models import Captioner

logger = logging.getLogger(__name__)


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


# -- the losses, as functions of tensors ---------------------------------------------------------
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


def returns(ce: Tensor, to_go: bool) -> Tensor:
    """``ce`` (B, T) -log p(y_t) per step -> the log-likelihood credited to each step's location
    (B, T): the whole caption's, or with ``to_go`` that of words t.. only."""
    if to_go:
        return -ce.flip(1).cumsum(1).flip(1)
    return -ce.sum(1, keepdim=True).expand_as(ce)


def reinforce_loss(
    out: DecoderOutput, reward: Tensor, baseline: Tensor, mask: Tensor, config: LossConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE for sampled attention locations (Xu et al. 2015, Eq. 12): the learning signal is
    ``reward`` (B, T) (``returns``: log p(y | s, a)) minus ``baseline`` (B, T), on the steps that
    used a sample; plus an entropy bonus on alpha. ``mask`` (B, T) float, 1 on real steps."""
    advantage = reward - baseline  # (B, T)
    sampled = out.sampled.float() * mask  # steps that used a sample, not the expectation
    signal = (advantage * out.sample_log_probs.float() * sampled).sum(1)  # (B,)
    entropy = (out.entropies.float() * mask).sum(1).mean()
    loss = -(config.reinforce * signal).mean() - config.entropy * entropy
    return loss, {"reinforce": loss.detach(), "entropy": entropy.detach()}


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


def _rows_of(out: DecoderOutput, rows: slice) -> DecoderOutput:
    """The captions ``rows`` of a teacher-forced output."""
    return DecoderOutput(**{f.name: None if (x := getattr(out, f.name)) is None else x[rows] for f in fields(out)})


def batch_features(model: Captioner, batch: dict) -> Tensor:
    """A batch's region features (B, N, D): the feature cache's (int8 ones dequantised here, on
    the device), or the encoder's of its images."""
    if "features" in batch:
        return cached_features(batch)
    return model.encode(batch["images"])[0]


def caption_length_limit(setting: int | None, datamodule: object | None) -> int:
    """A caption length limit left unset (None): the data's tokenizer's (20 for ``simple``,
    50 for ``unicode`` and ``char``), so that Japanese captions are not cut at 20 characters."""
    if setting is not None:
        return setting
    from captioner.data.tokenizers import get_tokenizer

    return get_tokenizer(getattr(datamodule, "tokenizer_name", "simple")).max_length


# -- the objectives ------------------------------------------------------------------------------
class Trainee(Protocol):
    """What an objective reads of the LightningModule it trains (``CaptioningSystem``)."""

    model: Captioner
    vocab: Vocabulary
    training: bool
    # hard attention's moving-average baseline: buffers of the system, so that its checkpoints
    # keep them under these keys
    reward_baseline: Tensor  # ()
    baseline_initialised: Tensor  # () bool


class Objective:
    """A training loss, built from the run's ``model.loss`` and ``model.scst`` settings."""

    def __init__(self, loss: LossConfig, scst: ScstConfig) -> None:
        self.config = loss

    def start(self, datamodule: object | None, saved: dict | None) -> None:
        """At the start of fit; ``saved``: what a resumed run's checkpoint kept (its "scst" entry)."""

    def loss(self, system: Trainee, batch: dict) -> dict[str, Tensor]:
        """The values a training step logs on ``batch``; ``"loss"`` is minimised."""
        raise NotImplementedError


OBJECTIVES: Registry[Objective] = Registry("objective")


def objective_for(loss: LossConfig, scst: ScstConfig, stochastic_attention: bool) -> Objective:
    """The objective the settings ask for: SCST when ``model.scst.enabled``; REINFORCE with
    ``model.loss.baseline`` for an attention that samples its locations; else cross-entropy."""
    if scst.enabled:
        name = "scst"
    elif stochastic_attention:
        name = f"reinforce_{loss.baseline}"
    else:
        name = "cross_entropy"
    return OBJECTIVES.get(name)(loss, scst)


@OBJECTIVES.register("cross_entropy")
class CrossEntropy(Objective):
    """Teacher-forced cross-entropy plus the doubly stochastic term, and attention supervision
    when ``model.loss.attention_supervision`` weighs it."""

    def loss(self, system: Trainee, batch: dict) -> dict[str, Tensor]:
        features = batch_features(system.model, batch)
        logs, out = self.terms(system, features, batch["captions"], batch["lengths"])
        weight = self.config.attention_supervision
        if weight > 0:
            if "token_objects" not in batch:
                raise ValueError("model.loss.attention_supervision needs word-region grounding in the "
                                 "training batches: set data.shapes.grounding: true (only shapes has it)")
            att = attention_supervision_loss(out.alphas, batch["token_objects"], batch["object_masks"], out.mask)
            logs["loss"] = logs["loss"] + weight * att
            logs["attention_supervision"] = att.detach()
        return logs

    def terms(
        self, system: Trainee, features: Tensor, captions: Tensor, lengths: Tensor
    ) -> tuple[dict[str, Tensor], DecoderOutput]:
        """The logged values before attention supervision, and the teacher-forced output it reads."""
        out = system.model.decoder(features, captions, lengths)
        cl = caption_loss(out, captions, self.config)
        logs = {"loss": cl.loss, "ce": cl.nll.sum() / cl.mask.sum().clamp(min=1), "dsr": cl.dsr}
        if out.sample_log_probs is not None:  # the attention sampled its locations (training)
            loss_rl, extra = self.reinforce(system, out, cl.ce.detach(), cl.mask)
            logs["loss"] = cl.loss + loss_rl
            logs.update(extra)
        return logs, out

    def reinforce(self, system: Trainee, out: DecoderOutput, ce: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        """REINFORCE on ``out``'s sampled locations: (its loss, the values it logs)."""
        raise NotImplementedError(f"{type(self).__name__} trains no attention that samples its locations")


@OBJECTIVES.register("reinforce_moving_average")
class MovingAverageReinforce(CrossEntropy):
    """Hard attention as in the paper: REINFORCE on the sampled locations, its baseline a moving
    average of log p(y | s, a), kept in the system's buffers (saved and restored on resume)."""

    def reinforce(self, system: Trainee, out: DecoderOutput, ce: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        """``ce`` (B, T) -log p(y_t) per step (no gradient), ``mask`` (B, T) float."""
        cfg = self.config
        reward = returns(ce, cfg.reward_to_go)  # (B, T)
        # The moving average follows log p(y | s, a) per caption (per word with reward_to_go,
        # scaled by the words left at each step).
        observed = -ce.sum() / mask.sum().clamp(min=1) if cfg.reward_to_go else -ce.sum(1).mean()
        if not bool(system.baseline_initialised):
            system.reward_baseline.copy_(observed)
            system.baseline_initialised.fill_(True)
        baseline = system.reward_baseline.clone()  # before this batch's update
        if cfg.reward_to_go:
            baseline = baseline * mask.flip(1).cumsum(1).flip(1)
        if system.training:
            system.reward_baseline.mul_(cfg.baseline_decay).add_((1 - cfg.baseline_decay) * observed)
        loss, extra = reinforce_loss(out, reward, baseline, mask, cfg)
        extra["baseline"] = system.reward_baseline.clone()
        return loss, extra


@OBJECTIVES.register("reinforce_expectation")
class ExpectationReinforce(CrossEntropy):
    """Both halves of semi-sampling on every caption: an expectation pass and a sampled pass,
    weighted p = semi_sampling and 1 - p (the expected value of the paper's coin), the first
    pass's log-likelihood being the second's REINFORCE baseline. Both run as one decoder call
    over the batch twice over (fewer, larger products than two calls). Out of training the
    attention takes the expectation: one pass, cross-entropy alone."""

    def terms(
        self, system: Trainee, features: Tensor, captions: Tensor, lengths: Tensor
    ) -> tuple[dict[str, Tensor], DecoderOutput]:
        decoder = system.model.decoder
        if not decoder.training:
            return super().terms(system, features, captions, lengths)
        p = decoder.attention.semi_sampling
        b = features.size(0)
        rows = torch.arange(2 * b, device=features.device) >= b  # expectation rows, then sampled
        both = decoder(torch.cat([features, features]), torch.cat([captions, captions]),
                       torch.cat([lengths, lengths]), rows)
        soft = caption_loss(_rows_of(both, slice(0, b)), captions, self.config)
        out = _rows_of(both, slice(b, 2 * b))
        hard = caption_loss(out, captions, self.config)
        to_go = self.config.reward_to_go
        loss_rl, extra = reinforce_loss(out, returns(hard.ce.detach(), to_go), returns(soft.ce.detach(), to_go),
                                        hard.mask, self.config)
        n_words = hard.mask.sum().clamp(min=1)
        return {
            "loss": p * soft.loss + (1 - p) * (hard.loss + loss_rl),
            "ce": hard.nll.sum() / n_words, "ce_expectation": soft.nll.sum() / n_words,
            "dsr": hard.dsr, **extra,
        }, both


@OBJECTIVES.register("scst")
class SelfCritical(Objective):
    """Self-critical loss on ``n_samples`` sampled captions per image: their log-probability
    (re-scored with gradients by a teacher-forced pass) times reward minus baseline. The reward,
    ``cider``, is CIDEr-D with the training references' document frequencies, made at the start
    of fit; its ``state_dict()`` is what checkpoints keep (under "scst") for a resumed run."""

    def __init__(self, loss: LossConfig, scst: ScstConfig) -> None:
        super().__init__(loss, scst)
        self.scst = scst
        self.cider: CiderD | None = None
        self.max_length = caption_length_limit(scst.max_length, None)

    def start(self, datamodule: object | None, saved: dict | None) -> None:
        self.max_length = caption_length_limit(self.scst.max_length, datamodule)
        if self.cider is not None:
            return
        refs = datamodule.references("train") if datamodule is not None and hasattr(datamodule, "references") else None
        if not refs:
            raise ValueError("model.scst needs the training split's reference captions (from the data module)")
        self.use_references(refs, saved)
        logger.info("SCST: CIDEr-D document frequencies of %d training images", self.cider.documents)

    def use_references(self, references: dict, saved: dict | None = None) -> None:
        """Reward against ``references`` (image id -> captions); the document frequencies come from
        them, or from ``saved`` (``cider.state_dict()``), computed once per run."""
        from captioner.metrics.cider import CiderD

        self.cider = CiderD(references) if saved is None else CiderD(references, **saved)

    def rewards(self, vocab: Vocabulary, tokens: Tensor, image_ids: list) -> Tensor:
        """CIDEr-D (plus ``bleu4_weight`` BLEU-4) of generated ``tokens`` (B, T) against the
        references of ``image_ids`` (B,): (B,) float on the tokens' device."""
        import numpy as np

        from captioner.metrics.cider import bleu4_per_caption

        if self.cider is None:
            raise RuntimeError("the SCST reward is made at the start of fit (or by use_references)")
        words = [vocab.decode(row) for row in tokens.tolist()]
        reward = self.cider.scores(words, image_ids)
        if self.scst.bleu4_weight > 0:
            refs = [self.cider.references[i] for i in image_ids]
            reward = reward + self.scst.bleu4_weight * bleu4_per_caption(words, refs)
        return torch.from_numpy(np.asarray(reward, dtype=np.float32)).to(tokens.device)

    def loss(self, system: Trainee, batch: dict) -> dict[str, Tensor]:
        from captioner.decoding import greedy, sample

        cfg = replace(self.scst, max_length=self.max_length)
        if self.cider is None:
            raise RuntimeError("the SCST loss runs inside fit (its start builds the reward)")
        decoder = system.model.decoder
        features = batch_features(system.model, batch)  # (B, N, D)
        b, s = features.size(0), cfg.n_samples
        image_ids = batch["image_ids"].tolist()
        rep = features.repeat_interleave(s, 0)  # (B*S, N, D): image i's samples together
        gen = sample(decoder, rep.detach(), cfg.max_length, cfg.temperature)  # no grad, the training mode's policy
        tokens = gen.tokens  # (B*S, T): words, <end> (when emitted), <pad>
        reward = self.rewards(system.vocab, tokens, [i for i in image_ids for _ in range(s)]).view(b, s)
        greedy_reward = None
        if cfg.baseline == "greedy":
            decoder.eval()  # the test-time caption (Rennie et al.): no dropout, expected context
            try:
                best = greedy(decoder, features.detach(), cfg.max_length)
            finally:
                decoder.train()
            greedy_reward = self.rewards(system.vocab, best.tokens, image_ids)
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
            ce = caption_loss(decoder(features, batch["captions"], batch["lengths"]), batch["captions"], self.config)
            loss = loss + cfg.ce_weight * ce.loss
            logs["ce"] = ce.nll.sum() / ce.mask.sum().clamp(min=1)
        logs["loss"] = loss
        return logs
