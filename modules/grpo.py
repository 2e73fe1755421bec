"""GRPO and DAPO: the policy update over rollout batches sampled by `RolloutCallback`.

GRPO: Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300), §4.1, Algorithm 1: for each prompt,
``G`` completions are sampled, scored, and given group-relative advantages; the policy maximizes
the clipped surrogate (PPO-style) with an optional k3 KL penalty to the reference policy
(``pmetal.losses.policy.grpo_loss``). The reference is the base model with the adapter disabled
(no second copy under LoRA). Dr. GRPO (arXiv:2503.20783) is ``loss_type="dr_grpo"`` with
``scale_rewards="none"``.

DAPO: Yu et al. 2025 (arXiv:2503.14476) is the same update with other settings: clip-higher
(``epsilon=0.2``, ``epsilon_high=0.28``), the token-level loss (``loss_type="dapo"``), the soft
overlong punishment added to the rewards, and dynamic sampling (groups with equal rewards dropped,
more prompts drawn); ``DapoModule`` only changes these defaults.

RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
from Human Feedback in LLMs" (arXiv:2402.14740): REINFORCE with a leave-one-out baseline, each
completion's reward minus the mean of its group's other completions
(``pmetal.losses.policy.rloo_advantages``). ``RlooModule`` is this update with
``advantage_estimator="rloo"`` and no std scaling; with ``num_iterations=1`` the ratio is 1 and the
clipped surrogate's gradient is REINFORCE's. Departure: the paper's KL penalty is part of the
sequence reward; here it is the loss's k3 term (``beta``, 0 by default), as TRL's RLOO also does now.

Also settings of every module here: REINFORCE++'s batch-normalized advantages
(``advantage_estimator="reinforce_pp"``), CISPO (``loss_type="cispo"``), truncated importance
sampling against the sampler/trainer mismatch (``tis_cap``) and entropy masking
(``top_entropy_quantile``); each loss term is in ``pmetal.losses.policy`` with its paper.

Where pmetal departs:
- ``beta`` defaults to 0.0 (no KL, no reference forward), as DAPO, Dr. GRPO and TRL do;
  DeepSeekMath used 0.04 and PMetal (Rust) 0.001: pass ``beta`` to use one.
- The old policy's log-probs are the sampling-time log-probs (recorded during generation under
  the same temperature), not a second forward pass: the importance ratio starts at 1 up to
  KV-cache numerics (``tests/unit/test_generation.py``).
- One optimizer step per pass over a rollout: ``num_iterations`` (the paper's μ) passes, each
  accumulating gradients over micro-batches of ``micro_batch_size`` completions, so group and
  prompt batch sizes are independent of memory. ``max_steps`` counts optimizer steps.
- Gradient clipping is the module's own ``max_grad_norm`` (the update is manual, which Lightning's
  Trainer-side clipping refuses): it clips in `on_before_optimizer_step`, after a gradient scaler's
  unscale. pmetal's commands hand their ``--gradient-clip-val`` (``--max-grad-norm``) to it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Literal, Optional

import torch

from pmetal.errors import PmetalError
from pmetal.modules.sampling import SamplingModule
from pmetal.tokens import IGNORE_INDEX
from pmetal.modules.distributed import global_sum, sync_metrics, world_size


class GrpoModule(SamplingModule):
    """Group Relative Policy Optimization with reward functions (see the module docstring).

    Args:
        model: the model to fine-tune (a local HF directory, hub id, .gguf, or "default").
        reward_fns: reward functions: built-in names (think_format, accuracy, length, overlong) or
            import paths "package.module:function" taking (prompts, completions, **columns).
        reward_weights: one weight per entry of reward_fns (default 1 each).
        reasoning_rewards: add the reasoning set: think-format (1.0), answer accuracy (1.0) and
            length shaping (0.2).
        reward_model: path of a sequence-classification reward model scoring prompt + completion.
        num_generations: completions sampled per prompt (the group size G).
        num_iterations: optimizer steps per rollout (the paper's mu); above 1 the importance ratio
            departs from 1 and the clipping engages.
        micro_batch_size: completions per forward/backward in the update (memory, not the math).
        beta: KL coefficient to the reference (the base model without the adapter); 0 = no KL.
        epsilon: clip range below (and above, unless epsilon_high is set).
        epsilon_high: clip range above (DAPO's clip-higher); None = epsilon.
        loss_type: token aggregation: "grpo" (per-sequence mean), "bnpo" (token mean per
            micro-batch), "dr_grpo" (sum / (G x max length)), "dapo" (token mean over the rollout),
            or "cispo" (MiniMax-M1: the clipped importance weight, detached, times REINFORCE;
            token mean over the rollout).
        scale_rewards: advantage scaling: "group" std (GRPO), "batch" std, or "none" (Dr. GRPO).
        advantage_estimator: "grpo" (reward minus the group mean), "rloo" (minus the mean of the
            group's other completions, Ahmadian et al. 2024) or "reinforce_pp" (normalized over the
            batch, no per-prompt baseline; REINFORCE++, Hu et al. 2025).
        tis_cap: truncated importance sampling (Yao et al. 2025): weight each token by
            min(pi_trainer / pi_sampler, tis_cap), the trainer's and the rollout engine's
            probabilities of the sampled token, against their numerical mismatch; None = off.
        top_entropy_quantile: train on the top fraction of completion tokens by the policy's
            entropy only (Wang et al. 2025 use 0.2); 1.0 = every token.
        dynamic_sampling: drop groups whose rewards are all equal and draw more prompts (DAPO).
        max_sampling_rounds: most generation rounds per step under dynamic sampling.
        overlong_punishment: add DAPO's soft overlong punishment to the rewards.
        overlong_buffer: the punishment's buffer L_cache in tokens; None = max_completion_length / 4.
        importance_sampling_level: "token" (GRPO's per-token ratio) or "sequence" (GSPO's
            length-normalized sequence ratio, Zheng et al. 2025).
        speculative: speculative rollouts: draft tokens and verify them in one policy forward
            (exact: the completions' distribution is unchanged).
        draft_model: the draft model (same tokenizer) for speculative rollouts; None drafts from
            n-grams of the prompt and completion.
        num_draft_tokens: tokens drafted per speculative round.
        compile_rollouts: compile the rollout engine's decode round with torch.compile before it is
            captured in CUDA graphs (the first rollout pays the compilation); None = on CUDA only.
        async_rewards: score rewards in a background worker while the next chunk of prompts is
            generated, the reference forward runs and the micro-batches already scored are updated
            (the same rewards, advantages, losses and weights as scoring in line).
        rollout_chunks: prompt chunks per rollout, generated one after another; None = 2 with
            async_rewards, else 1 (results depend on the chunks, not on async_rewards).
        max_grad_norm: clip the update's gradient norm to this value; None or 0 = off. The update
            is manual, so this replaces the Trainer's gradient_clip_val (which must stay unset).
        learning_rate: peak learning rate of AdamW.
        **kwargs: the sampling settings (max_completion_length, temperature, top_p, top_k, min_p:
            `SamplingModule`) and the base module's (adapter, lora_r, quantization, warmup_steps, ...).
    """

    needs_reference = True
    clips_own_gradients = True  # the update is manual: max_grad_norm, never the Trainer's gradient_clip_val

    def __init__(
        self,
        model: str = "default",
        reward_fns: Optional[list[str]] = None,
        reward_weights: Optional[list[float]] = None,
        reasoning_rewards: bool = False,
        reward_model: Optional[str] = None,
        num_generations: int = 8,
        num_iterations: int = 1,
        micro_batch_size: int = 8,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: Optional[float] = None,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"] = "grpo",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        advantage_estimator: Literal["grpo", "rloo", "reinforce_pp"] = "grpo",
        tis_cap: Optional[float] = None,
        top_entropy_quantile: float = 1.0,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 4,
        overlong_punishment: bool = False,
        overlong_buffer: Optional[int] = None,
        importance_sampling_level: Literal["token", "sequence"] = "token",
        speculative: bool = False,
        draft_model: Optional[str] = None,
        num_draft_tokens: int = 4,
        compile_rollouts: Optional[bool] = None,
        async_rewards: bool = False,
        rollout_chunks: Optional[int] = None,
        max_grad_norm: Optional[float] = None,
        learning_rate: float = 5e-6,
        **kwargs: Any,
    ) -> None:
        from pmetal.generation.speculative import check_draft_settings
        from pmetal.ranges import check_settings
        from pmetal.rewards import OverlongPunishment, RewardSet

        # every argument the range table names, the sampling settings (kwargs) too: before the rewards load
        check_settings(type(self).__name__, {**locals(), **kwargs})
        try:
            check_draft_settings(speculative, draft_model, num_draft_tokens)
        except ValueError as exc:
            raise PmetalError(f"{type(self).__name__}: {exc}") from exc
        if draft_model is not None:  # a tokenizer mismatch is reported before any model loads
            from pmetal.generation.speculative import check_draft_tokenizer
            from pmetal.models import load_tokenizer

            try:
                check_draft_tokenizer(load_tokenizer(model), load_tokenizer(draft_model), draft_model)
            except ValueError as exc:
                raise PmetalError(str(exc)) from exc
        # Rewards first: a missing reward is reported before minutes of model loading.
        rewards = RewardSet.from_specs(reward_fns or [], reward_weights, reasoning=reasoning_rewards,
                                       reward_model=reward_model)
        if overlong_punishment:
            rewards = RewardSet([*rewards.functions, OverlongPunishment(buffer=overlong_buffer)], [*rewards.weights, 1.0])
        super().__init__(model, learning_rate=learning_rate, **kwargs)
        self.rewards = rewards
        self.automatic_optimization = False
        self.iteration_metrics: list[dict[str, float]] = []  # the last step's per-iteration metrics
        self.draft = None  # the draft model, loaded with the policy (setup) when draft_model is set

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.draft_model is not None and self.draft is None:
            from pmetal.models import load_model_and_tokenizer

            dtype = next(self.policy.parameters()).dtype
            draft, _ = load_model_and_tokenizer(self.hparams.draft_model, dtype=dtype)
            # outside the module's children: the draft is frozen and never saved with the policy
            object.__setattr__(self, "draft", draft.to(self.device).eval().requires_grad_(False))

    # ------------------------------------------------------------------ rollout side
    def rollout_settings(self):
        from pmetal.rl.settings import RolloutSettings

        hp = self.hparams
        return RolloutSettings(self.sampling_config(), hp.num_generations, hp.scale_rewards, hp.dynamic_sampling,
                               hp.max_sampling_rounds, speculative=hp.speculative, draft=self.draft,
                               num_draft_tokens=hp.num_draft_tokens, compile_decode=hp.compile_rollouts,
                               async_rewards=hp.async_rewards,
                               chunks=hp.rollout_chunks or (2 if hp.async_rewards else 1),
                               advantage_estimator=hp.advantage_estimator)

    def configure_callbacks(self):
        from pmetal.callbacks.rollout import RolloutCallback

        trainer = self._trainer
        if trainer is not None:
            # The update is manual (several optimizer steps per rollout), which Lightning refuses to
            # combine with Trainer-side clipping: the module clips from its own setting.
            if clip := trainer.gradient_clip_val:
                raise PmetalError(f"{type(self).__name__} steps its own optimizer, so the Trainer's gradient_clip_val="
                                  f"{clip} does not apply: pass max_grad_norm={clip} to the module instead")
            if trainer.accumulate_grad_batches != 1:
                raise PmetalError(
                    f"accumulate_grad_batches={trainer.accumulate_grad_batches} does not apply to {type(self).__name__}: "
                    "a rollout is already accumulated over micro-batches; raise the prompt batch size instead"
                )
            if any(isinstance(cb, RolloutCallback) for cb in trainer.callbacks):
                return []
        return [RolloutCallback()]

    # ------------------------------------------------------------------ update side
    @property
    def steps_per_batch(self) -> int:  # each batch (rollout) makes num_iterations optimizer steps
        return self.hparams.num_iterations

    @property
    def _loss_temperature(self) -> float:
        return self.hparams.temperature if self.hparams.temperature > 0 else 1.0

    def token_logps(self, part: dict[str, torch.Tensor]) -> torch.Tensor:  # [n, T] aligned with labels
        out = self.completion_logps(part["input_ids"], part["attention_mask"], part["labels"],
                                    temperature=self._loss_temperature, return_token_logps=True,
                                    return_token_entropy=self.hparams.top_entropy_quantile < 1.0,
                                    pixel_inputs=part.get("pixel_inputs"))
        if out.token_entropy is not None:  # the mask is fixed by the first pass, as the ratio's old side
            part.setdefault("token_entropy", out.token_entropy)
        return out.token_logps

    def micro_batch_loss(self, part: dict[str, torch.Tensor], num_sequences: int, num_tokens: int):
        """GRPO loss of one micro-batch, normalized so the micro-batch losses sum to the rollout's."""
        return self.policy_loss(self.token_logps(part), part, num_sequences, num_tokens)

    def policy_loss(self, token_logps: torch.Tensor, part: dict[str, torch.Tensor], num_sequences: int,
                    num_tokens: int):
        """`pmetal.losses.policy.grpo_loss` of one micro-batch from its token log-probs `[n, T]`.

        With `tis_cap` the ratio's old side is the trainer's own log-probs before the update (this
        pass's, detached, kept in `part` for later passes) and the sampler's weigh the tokens.
        """
        from pmetal.losses.policy import grpo_loss, high_entropy_mask

        hp = self.hparams
        mask = part["labels"] != IGNORE_INDEX
        old_logps, tis = part["old_logps"], {}
        if hp.tis_cap is not None:
            old_logps = part.setdefault("trainer_old_logps", token_logps.detach())
            tis = dict(sampling_logps=part["old_logps"], tis_cap=hp.tis_cap)
        entropy_mask = None
        if hp.top_entropy_quantile < 1.0:
            entropy_mask = high_entropy_mask(part["token_entropy"], mask, hp.top_entropy_quantile)
        return grpo_loss(
            token_logps,
            old_logps,
            part["advantages"],
            mask,
            ref_logps=part.get("ref_logps"),
            beta=hp.beta,
            epsilon_low=hp.epsilon,
            epsilon_high=hp.epsilon_high if hp.epsilon_high is not None else hp.epsilon,
            loss_type=hp.loss_type,
            max_completion_length=hp.max_completion_length,
            num_sequences=num_sequences,
            num_tokens=num_tokens,
            importance_sampling_level=hp.importance_sampling_level,
            entropy_mask=entropy_mask,
            **tis,
        )

    @torch.no_grad()
    def _reference_token_logps(self, rollout) -> torch.Tensor:
        ref = torch.zeros_like(rollout.old_logps)
        size = self.hparams.micro_batch_size
        for start, part in zip(range(0, rollout.num_sequences, size), rollout.micro_batches(size)):
            out = self.reference_logps(part["input_ids"], part["attention_mask"], part["labels"],
                                       temperature=self._loss_temperature, return_token_logps=True,
                                       pixel_inputs=part.get("pixel_inputs"))
            ref[start : start + part["input_ids"].shape[0], : out.token_logps.shape[1]] = out.token_logps
        return ref

    def training_step(self, batch, batch_idx):
        rollout = batch.get("rollout") if isinstance(batch, dict) else None
        if rollout is None:
            raise PmetalError(f"{type(self).__name__} got a batch without a rollout: the RolloutCallback did not run "
                              "(it is added by configure_callbacks; check that no callback removed it)")
        num_prompts = len(batch["prompt_ids"])
        sync = sync_metrics(self)
        try:
            last_metrics = self._update(rollout)
            rollout.wait_for_rewards()  # the rollout's metrics need every reward
        finally:
            rollout.stop_scoring()  # a step that failed (a reward raised, NaN) leaves no worker behind
        if last_metrics is None:  # dynamic sampling found no group with a reward spread on any rank
            # No optimizer step, so the records' step is still the previous one: its row keeps its own
            # rollout metrics, and the skipped batch is counted under names of its own.
            self.log("train/skipped_steps", 1.0, batch_size=num_prompts, sync_dist=sync)
            if "reward" in rollout.metrics:
                self.log("train/skipped_reward", rollout.metrics["reward"], batch_size=num_prompts, sync_dist=sync)
            return None
        for name, value in rollout.metrics.items():
            self.log(f"train/{name}", value, batch_size=num_prompts, prog_bar=name == "reward", sync_dist=sync)
        self.log("train/loss", last_metrics.pop("loss", 0.0), prog_bar=True, batch_size=num_prompts, sync_dist=sync)
        for name, value in last_metrics.items():
            self.log(f"train/{name}", value, batch_size=num_prompts, sync_dist=sync)
        return None

    def _update(self, rollout) -> dict[str, float] | None:
        """`num_iterations` optimizer steps on the rollout; the last step's metrics (None: no update).

        With async rewards the rollout arrives while its later chunks are still scored. The
        reference forward needs no rewards, so it runs first; each micro-batch of the first pass
        then waits only for its own groups' rewards, so the update of the first chunks overlaps
        the scoring of the last. The operations and their order are those of in-line scoring.
        """
        from pmetal.callbacks.throughput import synchronize

        # Several processes: each rank's rollout holds whole groups (its own prompts); the loss is
        # normalized by the counts of the whole world's rollout, summed by the strategy's all-reduce.
        world = world_size(self)
        num_sequences = int(global_sum(self, rollout.num_sequences))
        num_tokens = int(global_sum(self, rollout.num_completion_tokens))
        if num_sequences == 0:
            return None
        t0 = time.perf_counter()
        if self.hparams.beta and rollout.num_sequences:
            rollout.ref_logps = self._reference_token_logps(rollout)
            synchronize(self.device)
        reference_seconds = time.perf_counter() - t0
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        size = self.hparams.micro_batch_size
        parts = rollout.micro_batches(size) if rollout.num_sequences else []
        # every rank runs as many backward passes (the strategy's gradient sync is a collective)
        num_parts = len(parts) if world == 1 else int(self.trainer.strategy.reduce(
            torch.tensor(float(len(parts)), device=self.device), reduce_op=torch.distributed.ReduceOp.MAX))
        scale = world if self.hparams.loss_type != "bnpo" else 1  # DDP averages the ranks' gradients
        self.iteration_metrics = []
        t0, waited = time.perf_counter(), 0.0
        for iteration in range(self.hparams.num_iterations):
            totals: dict[str, float] = defaultdict(float)
            for k in range(num_parts):
                last = k == num_parts - 1
                sync_context = contextlib.nullcontext() if last or world == 1 else self.trainer.strategy.block_backward_sync()
                with sync_context:
                    if k >= len(parts):  # this rank has fewer completions: a zero-weight pass joins the sync
                        self.manual_backward(self._idle_loss())
                        continue
                    part = parts[k]
                    if iteration == 0:  # the first pass may reach a micro-batch before its groups are scored
                        rows = slice(k * size, k * size + part["input_ids"].shape[0])
                        waited += rollout.wait_for_rewards(rows.stop)
                        part["advantages"] = rollout.advantages[rows]
                    loss, metrics = self.micro_batch_loss(part, num_sequences, num_tokens)
                    if self.hparams.loss_type == "bnpo":
                        loss = loss / len(parts)  # bnpo normalizes per micro-batch: average them
                    # NanGuard stops a non-finite loss here, before backward
                    self.manual_backward(loss * scale if scale != 1 else loss)
                share = float((part["labels"] != IGNORE_INDEX).sum()) / max(rollout.num_completion_tokens, 1)
                totals["loss"] += float(loss.detach()) * scale
                for name, value in metrics.items():
                    totals[name] += float(value) * share
            optimizer.step()  # clips in on_before_optimizer_step
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            self.iteration_metrics.append(dict(totals))
        synchronize(self.device)
        # the device side of the step (generation is timed by the rollout); docs/metrics.md
        rollout.metrics["rollout/reference_seconds"] = reference_seconds
        rollout.metrics["rollout/update_seconds"] = time.perf_counter() - t0 - waited
        if rollout.started_at is not None:
            rollout.metrics["rollout/step_seconds"] = time.perf_counter() - rollout.started_at
        return dict(self.iteration_metrics[-1])

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this inside optimizer.step(), after a gradient scaler (16-mixed) has unscaled
        # the gradients: clipping before the step would clip them times the scale (2^16), shrinking the update.
        if self.hparams.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")

    def _idle_loss(self) -> torch.Tensor:
        """A zero loss through a real forward (one pad token), for a rank without completions this step."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((1, 2), pad, dtype=torch.long, device=self.device)
        part = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([[IGNORE_INDEX, pad]], device=self.device)}
        return self.token_logps(part).sum() * 0.0

    def validation_step(self, batch, batch_idx):
        """Held-out prompts every `--eval-every` steps: eval/reward, eval/accuracy, eval/pass@k, ...
        (``pmetal.rl.evaluate``: the rollout's temperature, num_generations completions per prompt)."""
        from pmetal.rl.evaluate import evaluate_prompts

        metrics = evaluate_prompts(self.policy, self.tokenizer, self.rewards, self.rollout_settings(), batch)
        sync = sync_metrics(self)
        for name, value in metrics.items():
            self.log(f"eval/{name}", value, batch_size=len(batch["prompt_ids"]), on_epoch=True, on_step=False,
                     prog_bar=name == "reward", sync_dist=sync)
        return None


class DapoModule(GrpoModule):
    """DAPO (Yu et al. 2025): GRPO with clip-higher, the token-level loss, overlong reward shaping and
    dynamic sampling. The same arguments as GrpoModule with DAPO's defaults."""

    def __init__(
        self,
        model: str = "default",
        epsilon: float = 0.2,
        epsilon_high: Optional[float] = 0.28,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo",
        dynamic_sampling: bool = True,
        overlong_punishment: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, epsilon=epsilon, epsilon_high=epsilon_high, loss_type=loss_type,
                         dynamic_sampling=dynamic_sampling, overlong_punishment=overlong_punishment, **kwargs)


class RlooModule(GrpoModule):
    """RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline, as GrpoModule's update with
    `advantage_estimator="rloo"` and unscaled advantages. The same arguments as GrpoModule."""

    def __init__(
        self,
        model: str = "default",
        advantage_estimator: Literal["grpo", "rloo", "reinforce_pp"] = "rloo",
        scale_rewards: Literal["group", "batch", "none"] = "none",
        **kwargs: Any,
    ) -> None:
        super().__init__(model, advantage_estimator=advantage_estimator, scale_rewards=scale_rewards, **kwargs)
