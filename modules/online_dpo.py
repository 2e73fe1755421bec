"""Online DPO and XPO: the DPO loss on pairs the current policy samples and a reward ranks.

Online DPO: Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"
(arXiv:2402.04792), Algorithm 1: for each prompt, two completions are sampled from the current
policy, an annotator picks the preferred one, and the policy takes a DPO step on that pair
(``pmetal.losses.preference.dpo_loss``, any of its ``loss_type``s). Here the annotator is
pmetal's reward set (reward functions and/or ``reward_model``, as GRPO takes them) and the
sampler is GRPO's rollout pipeline with groups of two (``RolloutCallback``); the reference is the
base model with the adapter switched off (a frozen copy under full fine-tuning), as in DPO.

XPO: Xie et al. 2024, "Exploratory Preference Optimization" (arXiv:2405.21046), Algorithm 1: one
completion from the policy and one from the reference, the same DPO loss on the ranked pair,
plus ``alpha`` times the policy's log-prob of the reference's completion
(``pmetal.losses.online_preference.xpo_losses``), as TRL's XPOTrainer does.

Where pmetal departs:
- A pair whose completions get equal rewards is dropped (counted as ``pairs/ties``); TRL keeps it
  and calls the first completion chosen. A step whose pairs all tie makes no update
  (``train/skipped_steps``); ``dynamic_sampling`` instead draws more prompts in their place.
- Ranking needs both rewards of a pair, so with ``async_rewards`` the scoring overlaps generation
  only, not the reference forward and the update as in GRPO.
- XPO drops a tied pair with its exploration term (TRL's XPOTrainer calls the policy's completion
  chosen on a tie).
- The IPO loss uses the per-token mean log-probs, as pmetal's DpoModule does (TRL's online
  trainers use the sums there); every other loss type uses the sums, as TRL does.
- The loss is the mean over the step's untied pairs, accumulated over micro-batches of
  ``micro_batch_size`` completions (pairs stay whole), so memory does not bound the prompt batch.
- XPO samples the reference's completion with the rollout engine in eager mode (no CUDA graph or
  compiled round, whose captured kernels would replay the adapter's path); under full
  fine-tuning the frozen copy samples with every engine option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Literal, Optional

import torch

from pmetal.errors import PmetalError
from pmetal.modules.distributed import sync_metrics
from pmetal.modules.grpo import GrpoModule
from pmetal.modules.online_dpo_settings import GRPO_ONLY
from pmetal.tokens import IGNORE_INDEX



class OnlineDpoModule(GrpoModule):
    """Online DPO: DPO on two completions of the current policy per prompt, ranked by the rewards.

    Args:
        model: the model to fine-tune (a local HF directory, hub id, .gguf, or "default").
        beta: DPO's beta (IPO's tau): higher keeps the policy closer to the reference.
        loss_type: "sigmoid" (DPO), "hinge" (SLiC-HF), "ipo" (IPO, on per-token mean log-probs) or
            "robust" (rDPO).
        label_smoothing: assumed fraction of flipped preferences, in [0, 0.5) ("sigmoid": cDPO,
            "robust": the noise rate); must be 0 for "hinge" and "ipo".
        missing_eos_penalty: subtract this from the reward of a completion that ends without a stop
            token (cut at max_completion_length) before the pair is ranked; None = off.
        micro_batch_size: completions per forward/backward in the update (even: pairs stay whole).
        learning_rate: peak learning rate of AdamW.
        **kwargs: GrpoModule's rollout settings (reward_fns, reward_model, async_rewards, speculative,
            dynamic_sampling, ...), the sampling settings (`SamplingModule`: max_completion_length and
            temperature, here 64 and 0.9 by default, top_p, ...) and the base module's (adapter, lora_r, ...).
    """

    def __init__(
        self,
        model: str = "default",
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid",
        label_smoothing: float = 0.0,
        missing_eos_penalty: Optional[float] = None,
        max_completion_length: int = 64,
        temperature: float = 0.9,
        micro_batch_size: int = 8,
        learning_rate: float = 5e-6,
        **kwargs: Any,
    ) -> None:
        from pmetal.losses.preference import dpo_loss

        grpo_defaults = inspect.signature(GrpoModule.__init__).parameters
        for name in sorted(set(kwargs) & set(GRPO_ONLY)):  # `pmetal fit` passes every setting, at its default
            if kwargs.pop(name) != grpo_defaults[name].default:
                raise PmetalError(f"{type(self).__name__}: {name} does not apply ({GRPO_ONLY[name]})")
        if beta <= 0:
            raise PmetalError(f"beta={beta}: DPO's beta must be > 0")
        if micro_batch_size < 2 or micro_batch_size % 2:
            raise PmetalError(f"micro_batch_size={micro_batch_size}: must be even, so a micro-batch holds whole pairs")
        z = torch.zeros(1)
        try:  # the loss settings are checked before the (slow) model load
            dpo_loss(z, z, z, z, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        except ValueError as exc:
            raise PmetalError(f"{type(self).__name__}: {exc}") from exc
        # GrpoModule's beta is its KL weight; here it is DPO's: non-zero, it also has _update run
        # the reference forward over the rollout (the reference log-probs DPO needs).
        kwargs.update(num_generations=2, scale_rewards="none")  # a pair per prompt; rewards only rank it
        super().__init__(model, beta=beta, max_completion_length=max_completion_length, temperature=temperature,
                         micro_batch_size=micro_batch_size, learning_rate=learning_rate, **kwargs)
        self._pair_stats: list[dict[str, torch.Tensor]] = []  # the current step's, filled by micro_batch_loss

    # ------------------------------------------------------------------ pairs
    def _stop_ids(self) -> set[int]:
        from pmetal.generation.sampling import stop_token_ids

        cache = self.__dict__.setdefault("_stop_cache", {})
        if cache.get("tokenizer") is not self.tokenizer:
            cache.update(tokenizer=self.tokenizer, ids=set(stop_token_ids(self.tokenizer, self.policy)))
        return cache["ids"]

    def contains_stop(self, rollout) -> torch.Tensor:
        """`[N]` bool: the completion ends with a stop token (TRL's `val/contain_eos_token`)."""
        mask = rollout.completion_mask
        last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask  # the last completion token of each row
        last_token = (rollout.labels.masked_fill(~last, 0)).sum(1)
        stops = torch.tensor(sorted(self._stop_ids()), device=last_token.device, dtype=last_token.dtype)
        return torch.isin(last_token, stops) & mask.any(1)

    def pair_rollout(self, rollout):
        """The rollout's untied pairs, each row's `advantages` replaced by its side (+1 chosen, -1 rejected).

        Returns `(pairs, metrics)`: a RolloutBatch of the kept rows (pairs stay consecutive) and the
        step's pair statistics (`objective/scores`, `pairs/ties`, `val/contain_eos_token`, ...).
        """
        from pmetal.losses.online_preference import pair_indices, preference_labels

        hp = self.hparams
        rollout.wait_for_rewards()  # ranking needs both rewards of every pair
        contains_stop = self.contains_stop(rollout)
        scores = rollout.rewards.float()
        if hp.missing_eos_penalty is not None:
            scores = scores - hp.missing_eos_penalty * (~contains_stop).float()
        labels = preference_labels(scores)  # [N]
        chosen, rejected = pair_indices(labels)
        keep = labels != 0
        pairs = select_rows(rollout, keep)
        pairs.advantages = labels[keep].to(pairs.advantages.device)
        metrics = {
            "objective/scores": float(scores.mean()) if len(scores) else 0.0,
            "objective/scores_margin": float((scores[chosen] - scores[rejected]).mean()) if len(chosen) else 0.0,
            "val/contain_eos_token": float(contains_stop.float().mean()) if len(scores) else 0.0,
            "pairs/ties": float((labels.view(-1, 2)[:, 0] == 0).sum()),
            "pairs/kept": float(len(chosen)),
        }
        return pairs, metrics

    # ------------------------------------------------------------------ update
    def training_step(self, batch, batch_idx):
        rollout = batch.get("rollout") if isinstance(batch, dict) else None
        if rollout is None:
            return super().training_step(batch, batch_idx)  # GrpoModule's message
        try:
            pairs, pair_metrics = self.pair_rollout(rollout)
        except BaseException:
            rollout.stop_scoring()
            raise
        batch["rollout"] = pairs
        pairs.metrics = {**rollout.metrics, **pair_metrics}
        self._pair_stats = []
        num_prompts = len(batch["prompt_ids"])
        sync = sync_metrics(self)
        super().training_step(batch, batch_idx)  # every pair tied on every rank: no update, a skipped step
        for name, value in self.pair_metrics().items():
            self.log(f"train/{name}", value, batch_size=num_prompts, sync_dist=sync)
        return None

    def pair_metrics(self) -> dict[str, float]:
        """TRL's names for the step's pairs: rewards/*, logps/*, objective/kl|entropy|non_score_reward, beta."""
        if not self._pair_stats:
            return {}
        stats = {k: torch.cat([s[k] for s in self._pair_stats]).float() for k in self._pair_stats[0]}
        margins = stats["chosen_rewards"] - stats["rejected_rewards"]
        kl = stats["sequence_kl"].mean()
        metrics = {
            "rewards/chosen": stats["chosen_rewards"].mean(),
            "rewards/rejected": stats["rejected_rewards"].mean(),
            "rewards/margins": margins.mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
            "logps/chosen": stats["chosen_logps"].mean(),
            "logps/rejected": stats["rejected_logps"].mean(),
            "objective/kl": kl,
            "objective/entropy": -stats["sequence_logps"].mean(),
            "objective/non_score_reward": -self.hparams.beta * kl,
            "beta": torch.tensor(float(self.hparams.beta)),
        }
        for name in ("dpo_losses", "xpo_losses"):
            if name in stats:
                metrics[f"loss/{name.split('_')[0]}"] = stats[name].mean()
        return {k: float(v) for k, v in metrics.items()}

    def pair_losses(self, part: dict[str, torch.Tensor], token_logps: torch.Tensor):
        """The DPO losses `[K]` of a micro-batch's pairs and its statistics (the module docstring)."""
        from pmetal.losses.online_preference import pair_indices
        from pmetal.losses.preference import dpo_loss

        hp = self.hparams
        mask = part["labels"] != IGNORE_INDEX  # [n, T]
        counts = mask.sum(1).clamp_min(1)
        sums = (token_logps * mask).sum(1)  # [n]
        ref_sums = (part["ref_logps"] * mask).sum(1)
        chosen, rejected = pair_indices(part["advantages"])
        if hp.loss_type == "ipo":
            policy, ref = sums / counts, ref_sums / counts
        else:
            policy, ref = sums, ref_sums
        losses, _, _ = dpo_loss(policy[chosen], policy[rejected], ref[chosen], ref[rejected], beta=hp.beta,
                                loss_type=hp.loss_type, label_smoothing=hp.label_smoothing)
        stats = {
            "chosen_rewards": hp.beta * (sums[chosen] - ref_sums[chosen]).detach(),
            "rejected_rewards": hp.beta * (sums[rejected] - ref_sums[rejected]).detach(),
            "chosen_logps": sums[chosen].detach(),
            "rejected_logps": sums[rejected].detach(),
            "sequence_kl": (sums - ref_sums).detach(),
            "sequence_logps": sums.detach(),
        }
        return losses, sums, stats

    def micro_batch_loss(self, part: dict[str, torch.Tensor], num_sequences: int, num_tokens: int):
        """The sum of this micro-batch's pair losses over the step's pair count (micro-batches sum to the mean)."""
        losses, _, stats = self.pair_losses(part, self.token_logps(part))
        self._pair_stats.append(stats)
        return losses.sum() / max(num_sequences // 2, 1), {}

    @property
    def _loss_temperature(self) -> float:
        # DPO's implicit reward is beta * log(pi / pi_ref) of the models themselves, not of their
        # tempered sampling distributions (as TRL scores them): policy and reference at temperature 1
        return 1.0


def select_rows(rollout, keep: torch.Tensor):
    """A RolloutBatch of the rows of `rollout` where `keep` `[N]` is true (in order; rewards resolved)."""
    rows = keep.nonzero().flatten().tolist()
    index = torch.tensor(rows, dtype=torch.long, device=rollout.input_ids.device)
    tensors = {name: getattr(rollout, name)[index.to(getattr(rollout, name).device)]
               for name in ("input_ids", "attention_mask", "labels", "old_logps", "advantages", "rewards")}
    return dataclasses.replace(
        rollout, **tensors,
        completions=[rollout.completions[i] for i in rows] if rollout.completions else [],
        ref_logps=None, scoring=None, metrics=dict(rollout.metrics),
        pixel_inputs=[rollout.pixel_inputs[i] for i in rows] if rollout.pixel_inputs is not None else None,
    )


class XpoModule(OnlineDpoModule):
    """XPO: Online DPO on (a policy completion, a reference completion) plus alpha * log pi(reference's).

    Args:
        alpha: weight of the exploration term, alpha times the policy's summed log-prob of the
            reference's completion (TRL's XPOTrainer default 1e-5).
        **kwargs: OnlineDpoModule's settings (beta, loss_type, rewards, ...).
    """

    def __init__(self, model: str = "default", alpha: float = 1e-5, **kwargs: Any) -> None:
        if alpha < 0:
            raise PmetalError(f"alpha={alpha}: XPO's exploration weight must be >= 0")
        if kwargs.get("dynamic_sampling"):
            raise PmetalError("XpoModule: dynamic_sampling does not apply (each prompt's pair is one policy and one "
                              "reference completion, sampled once)")
        super().__init__(model, **kwargs)

    def rollout_settings(self):  # each side samples one completion per prompt
        return dataclasses.replace(super().rollout_settings(), num_generations=1)

    @contextlib.contextmanager
    def reference_sampler(self):
        """What `make_rollout` needs to sample from the reference: the frozen copy under full fine-tuning,
        else the policy with its adapter switched off (the engine in eager mode: a CUDA graph or a
        compiled round captured with the adapter on would replay it)."""
        settings = self.rollout_settings()
        settings = dataclasses.replace(settings, speculative=False, draft=None, async_rewards=False, chunks=1)
        if self.hparams.adapter == "full":
            yield _Sampler(self._reference_model(), self, settings)
            return
        eager = dataclasses.replace(settings, cuda_graphs=False, compile_decode=False)
        with self.policy.disable_adapter():
            yield _Sampler(self.policy, self, eager)

    def configure_callbacks(self):
        from pmetal.callbacks.reference_pairs import ReferencePairRollout

        callbacks = super().configure_callbacks()  # GrpoModule's Trainer checks; a RolloutCallback unless one is there
        return [ReferencePairRollout() if type(cb).__name__ == "RolloutCallback" else cb for cb in callbacks]

    def pair_rollout(self, rollout):
        pairs, metrics = super().pair_rollout(rollout)
        scores = rollout.rewards.float().view(-1, 2)  # [P, (policy, reference)]
        stop = self.contains_stop(rollout).float().view(-1, 2)
        metrics.update({"objective/model_scores": float(scores[:, 0].mean()),
                        "objective/ref_scores": float(scores[:, 1].mean()),
                        "val/model_contain_eos_token": float(stop[:, 0].mean()),
                        "val/ref_contain_eos_token": float(stop[:, 1].mean()),
                        "alpha": float(self.hparams.alpha)})
        return pairs, metrics

    def micro_batch_loss(self, part: dict[str, torch.Tensor], num_sequences: int, num_tokens: int):
        from pmetal.losses.online_preference import xpo_losses

        dpo, sums, stats = self.pair_losses(part, self.token_logps(part))
        reference_samples = sums[1::2]  # rows alternate (policy's, reference's) within each pair
        losses = xpo_losses(dpo, reference_samples, self.hparams.alpha)
        stats.update(dpo_losses=dpo.detach(), xpo_losses=(losses - dpo).detach())
        self._pair_stats.append(stats)
        return losses.sum() / max(num_sequences // 2, 1), {}


class _Sampler:
    """The parts of a module `make_rollout` reads, with another model (or mode) sampling."""

    def __init__(self, policy, module, settings) -> None:
        self.policy, self.tokenizer, self.rewards, self.device = policy, module.tokenizer, module.rewards, module.device
        self._settings = settings

    def rollout_settings(self):
        return self._settings
