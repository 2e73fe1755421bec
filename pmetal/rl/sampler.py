"""The sampler: prompts -> sampled completions -> rewards -> advantages -> a scored rollout.

:class:`RolloutSampler` samples ``num_generations`` completions per prompt with the current policy
(eval mode, the rollout engine of ``pmetal.generation``, per-sequence stop), records the
sampling-time log-probs, scores the completions with the reward functions, computes the advantages
(``pmetal.losses.policy.estimate_advantages``) and returns a :class:`pmetal.rl.rollout.RolloutBatch`.

With dynamic sampling (DAPO, Yu et al. 2025, arXiv:2503.14476, §3.2) groups whose rewards are
all equal are dropped and more prompts are drawn (from the source's ``sample(n)``) until the
batch holds as many groups as prompts it started with, for at most ``max_sampling_rounds`` rounds;
the rounds and dropped groups are logged. If the rounds run out, the update uses the groups it has
(possibly none: the step is skipped and counted).

Speculative rollouts (a draft model or prompt lookup) are an option of the engine. With
``chunks > 1`` the prompts are generated chunk after chunk; with ``async_rewards`` each chunk is
scored in a background worker (:class:`pmetal.rl.scoring.RewardScoring`) while the next one is
generated, and the rollout can be handed to the update before the last chunks are scored
(``defer_rewards``): its reference forward and the micro-batches whose groups are scored run while
the worker finishes (``RolloutBatch.wait_for_rewards``). Dynamic sampling needs every reward to
choose its groups, so there the worker overlaps generation only. The chunks, not the worker, decide
what is sampled and how advantages are computed (per chunk of whole groups; over the batch for
``scale_rewards="batch"`` and REINFORCE++): the same seed gives the same rewards and advantages
with and without ``async_rewards``. A VLM's prompts carry their images (``pixel_inputs``): the
prefill sees them, and each rollout row keeps its prompt's images for the update and the reference.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch

from pmetal.generation.engine import engine_for
from pmetal.generation.sampling import Generation, stop_token_ids
from pmetal.losses.policy import estimate_advantages, zero_spread_groups
from pmetal.rl.metrics import rollout_metrics
from pmetal.rl.prompts import PromptBatch
from pmetal.rl.rollout import RolloutBatch, RolloutRow, assemble
from pmetal.rl.scoring import RewardScoring
from pmetal.rl.settings import RolloutSettings
from pmetal.vlm import collate_pixel_inputs, placeholder_token_ids

log = logging.getLogger("pmetal")


class RolloutSampler:
    """Turns prompt batches into scored rollouts of `model` (see the module docstring).

    `rewards`: a ``pmetal.rewards.RewardSet``; `stop_ids`: the tokens that end a completion (None:
    read from the tokenizer, ~0.1 s on a 50k-word vocabulary, so callers sampling every step pass them).
    """

    def __init__(self, model, tokenizer, rewards, settings: RolloutSettings, *,
                 stop_ids: list[int] | None = None) -> None:
        self.model, self.tokenizer, self.rewards, self.settings = model, tokenizer, rewards, settings
        self.stop_ids = stop_ids if stop_ids is not None else stop_token_ids(tokenizer, model)

    def sample(self, batch: PromptBatch | dict[str, Any], *, source=None, device=None,
               defer_rewards: bool = False) -> RolloutBatch:
        """Generate, score and assemble the rollout of one prompt batch.

        `source`: where dynamic sampling draws more prompts (``source.sample(n)``), None: nowhere.
        `device`: where the rollout's tensors go. `defer_rewards`: with async rewards (and no
        dynamic sampling) return once the completions are generated, while the worker still scores
        them; otherwise every reward is in on return.
        """
        batch = PromptBatch.of(batch)
        if self.settings.dynamic_sampling:
            return self._sample_dynamic(batch, source, device)
        start = time.perf_counter()
        scoring = self._generate_chunks(batch, first_group=0)
        rollout = assemble(scoring.rows, torch.zeros(len(scoring.rows)), pad_token_id=self.tokenizer.pad_token_id,
                           group_size=self.settings.num_generations, device=device)
        rollout.started_at = start
        scoring.attach(rollout)
        if not (defer_rewards and self.settings.async_rewards):
            rollout.wait_for_rewards()
        return rollout

    # ------------------------------------------------------------------ generation
    def generate(self, part: PromptBatch) -> tuple[Generation, dict[str, float]]:
        """Sample one chunk's completions: (generation, the engine's statistics)."""
        settings, policy = self.settings, self.model
        was_training = policy.training
        policy.eval()
        try:
            engine = engine_for(policy, speculative=settings.speculative, draft_model=settings.draft,
                                num_draft_tokens=settings.num_draft_tokens, compile_decode=settings.compile_decode,
                                cuda_graphs=settings.cuda_graphs)
            prefill_inputs = collate_pixel_inputs(part.pixel_inputs) if part.pixel_inputs else None
            sampling = settings.sampling
            placeholders = placeholder_token_ids(policy)  # a sampled image placeholder would break the update
            if placeholders:
                sampling = dataclasses.replace(sampling,
                                               suppress_ids=tuple(sorted({*sampling.suppress_ids, *placeholders})))
            if settings.episodes is not None:  # multi-turn tool episodes (pmetal.tools.agent)
                gen = settings.episodes.generate(engine, part, sampling, stop_ids=self.stop_ids, tokenizer=self.tokenizer,
                                                 pad_token_id=self.tokenizer.pad_token_id,
                                                 group=settings.num_generations)
                return gen, {**engine.last_stats, **gen.metrics}
            gen = engine.generate(part.prompt_ids, sampling, stop_ids=self.stop_ids,
                                  pad_token_id=self.tokenizer.pad_token_id,
                                  num_return_sequences=settings.num_generations, prefill_inputs=prefill_inputs)
            return gen, dict(engine.last_stats)
        finally:
            policy.train(was_training)

    def _generate_chunks(self, batch: PromptBatch, first_group: int) -> RewardScoring:
        """Generate chunk after chunk, each queued for scoring as soon as it is generated."""
        chunks = max(1, min(self.settings.chunks, len(batch)))
        size = -(-len(batch) // chunks)
        scoring = RewardScoring(self.rewards, self.tokenizer, self.settings)
        try:
            for start in range(0, len(batch), size):
                part = batch.chunk(start, size)
                t0 = time.perf_counter()
                gen, stats = self.generate(part)
                scoring.timing["generation"] += time.perf_counter() - t0
                for name, value in stats.items():
                    scoring.engine_stats.setdefault(name, []).append(value)
                scoring.add(part, gen, start, first_group + start)
        except BaseException:
            scoring.close()
            raise
        return scoring

    # ------------------------------------------------------------------ dynamic sampling
    def _sample_dynamic(self, batch: PromptBatch, source, device) -> RolloutBatch:
        settings, group = self.settings, self.settings.num_generations
        num_prompts = len(batch)
        start = time.perf_counter()
        kept: list[RolloutRow] = []
        kept_text: list[str] = []
        all_rows: list[RolloutRow] = []
        per_function_all: dict[str, list[float]] = {}
        rounds, dropped = 0, 0
        step_metrics: dict[str, float] = {}
        while True:
            scoring = self._generate_chunks(batch, first_group=rounds * num_prompts)
            scoring.wait()
            rows, completions = scoring.rows, scoring.completions
            for name, value in scoring.metrics().items():
                step_metrics[name] = step_metrics.get(name, 0.0) + value
            rounds += 1
            all_rows += rows
            for name, scores in scoring.per_function.items():
                per_function_all.setdefault(name, []).extend(scores)
            flat = zero_spread_groups(torch.tensor([r.reward for r in rows], dtype=torch.float32), group).tolist()
            for g, flat_group in enumerate(flat):
                if flat_group:
                    dropped += 1
                elif len(kept) < num_prompts * group:
                    kept += rows[g * group : (g + 1) * group]
                    kept_text += completions[g * group : (g + 1) * group]
            if len(kept) >= num_prompts * group or rounds >= settings.max_sampling_rounds:
                break
            if source is None or not hasattr(source, "sample"):
                log.warning("dynamic sampling: the datamodule cannot draw more prompts (no sample(n)); "
                            "using %d groups", len(kept) // group)
                break
            batch = PromptBatch.of(source.sample(num_prompts))

        rewards = torch.tensor([r.reward for r in kept], dtype=torch.float32)
        advantages = (estimate_advantages(rewards, group, estimator=settings.advantage_estimator,
                                          scale=settings.scale_rewards) if kept else rewards)
        rollout = assemble(kept, advantages, pad_token_id=self.tokenizer.pad_token_id, group_size=group,
                           device=device)
        rollout.started_at = start
        rollout.completions = kept_text
        rollout.metrics = rollout_metrics(all_rows, per_function_all, group, time.perf_counter() - start)
        rollout.metrics.update(step_metrics)
        rollout.metrics["dynamic_sampling/rounds"] = float(rounds)
        rollout.metrics["dynamic_sampling/dropped_groups"] = float(dropped)
        rollout.metrics["dynamic_sampling/kept_groups"] = float(len(kept) // group)
        return rollout
