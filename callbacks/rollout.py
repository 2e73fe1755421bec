"""RolloutCallback: prompts -> sampled completions -> rewards -> group advantages -> rollout batch.

Before each training batch (``on_train_batch_start``) the callback takes the batch's prompts (a
``PromptDataModule`` batch), samples ``num_generations`` completions per prompt with the current
policy (eval mode, KV cache, batched, per-sequence stop; ``pmetal.generation``), records the
sampling-time log-probs, scores the completions with the module's reward functions, computes
group-relative advantages and stores the result in ``batch["rollout"]`` (a
``pmetal.generation.rollout.RolloutBatch``) for the module's ``training_step``.

With dynamic sampling (DAPO, Yu et al. 2025, arXiv:2503.14476, §3.2) groups whose rewards are
all equal are dropped and more prompts are drawn (from the datamodule's ``sample(n)``) until the
batch holds as many groups as prompts it started with, for at most ``max_sampling_rounds`` rounds;
the rounds and dropped groups are logged. If the rounds run out, the update uses the groups it has
(possibly none: the step is skipped and counted).

Speculative rollouts (``speculative``, a draft model or prompt lookup) are an option of the engine
(``pmetal.generation``). With ``chunks > 1`` the prompts are generated chunk after chunk; with
``async_rewards`` each chunk is scored in a background worker while the next one is generated, so
a slow reward overlaps generation. The chunks, not the worker, decide what is sampled: the same
seed gives the same rewards and advantages with and without ``async_rewards``.

The module supplies the settings (``rollout_settings()``), the reward set (``rewards``), the
policy and the tokenizer; the callback keeps only a cache of the tokenizer's stop ids, so it can
be added by the module itself (``configure_callbacks``) and plain
``Trainer().fit(GrpoModule(...), dm)`` works. A VLM's prompts carry their images
(``pixel_inputs``): the prefill sees them, and each rollout row keeps its prompt's images for
the update and the reference.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lightning as L
import torch

from pmetal.generation.rollout import RolloutBatch, RolloutRow, assemble, rows_from_generation
from pmetal.errors import PmetalError
from pmetal.generation.engine import engine_for
from pmetal.generation.sampling import stop_token_ids
from pmetal.generation.settings import RolloutSettings
from pmetal.losses.policy import group_advantages, zero_spread_groups
from pmetal.vlm import collate_pixel_inputs, placeholder_token_ids

log = logging.getLogger("pmetal")


class RolloutCallback(L.Callback):
    """Generates and scores the rollout of each training batch (see the module docstring)."""

    def __init__(self) -> None:
        self._stop_ids: tuple[object, list[int]] | None = None  # (tokenizer, its stop ids)

    def stop_ids(self, module) -> list[int]:
        # reading the vocabulary costs ~0.1 s on a 50k-word tokenizer: once per tokenizer
        if self._stop_ids is None or self._stop_ids[0] is not module.tokenizer:
            self._stop_ids = (module.tokenizer, stop_token_ids(module.tokenizer, module.policy))
        return self._stop_ids[1]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not isinstance(batch, dict) or "prompt_ids" not in batch:
            raise TypeError(
                "RolloutCallback expects prompt batches from pmetal.data.prompts.PromptDataModule "
                f"(a dict with 'prompt_ids'), got {type(batch).__name__}"
            )
        source = getattr(trainer, "datamodule", None)
        batch["rollout"] = make_rollout(pl_module, batch, source=source, stop_ids=self.stop_ids(pl_module))

    def on_fit_start(self, trainer, pl_module) -> None:
        for fn in getattr(getattr(pl_module, "rewards", None), "functions", []):
            if hasattr(fn, "to") and not isinstance(fn, torch.nn.Module):
                fn.to(pl_module.device)  # a reward model runs beside the policy


def _generate(module, part: dict[str, Any], settings: RolloutSettings, stop_ids: list[int]):
    """Sample one chunk's completions; (generation, the engine's statistics)."""
    policy = module.policy
    pixel_inputs = part.get("pixel_inputs")  # a VLM: one dict of image tensors per prompt
    was_training = policy.training
    policy.eval()
    try:
        engine = engine_for(policy, speculative=settings.speculative, draft_model=settings.draft,
                            num_draft_tokens=settings.num_draft_tokens)
        prefill_inputs = collate_pixel_inputs(pixel_inputs) if pixel_inputs else None
        sampling = settings.sampling
        placeholders = placeholder_token_ids(policy)  # a sampled image placeholder would break the update
        if placeholders:
            sampling = dataclasses.replace(sampling, suppress_ids=tuple(sorted({*sampling.suppress_ids, *placeholders})))
        gen = engine.generate(part["prompt_ids"], sampling, stop_ids=stop_ids,
                              pad_token_id=module.tokenizer.pad_token_id, num_return_sequences=settings.num_generations,
                              prefill_inputs=prefill_inputs)
        return gen, dict(engine.last_stats)
    finally:
        policy.train(was_training)


def _score(module, batch, gen, settings: RolloutSettings, first_prompt: int):
    """Decode and score one chunk; a reward that raises is named with the prompt it failed on."""
    group = settings.num_generations
    completion_ids = [row[: int(n)] for row, n in zip(gen.completion_ids.tolist(), gen.lengths.tolist())]
    completions = module.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    repeat = lambda values: [v for v in values for _ in range(group)]  # noqa: E731
    columns = {name: repeat(values) for name, values in batch.get("columns", {}).items()}
    prompts = repeat(batch["prompts"])
    extra = dict(completion_lengths=gen.lengths.tolist(), max_completion_length=settings.sampling.max_new_tokens)
    try:
        total, per_function = module.rewards.score(prompts, completions, **columns, **extra)
    except PmetalError:
        raise
    except Exception as exc:  # noqa: BLE001 - find the function and the prompt, then report them
        raise _reward_error(module.rewards, prompts, completions, columns, extra, first_prompt, group, exc) from exc
    return completions, total, per_function


def _reward_error(rewards, prompts, completions, columns, extra, first_prompt, group, exc) -> PmetalError:
    for name, fn in zip(rewards.names, rewards.functions):
        for i in range(len(completions)):
            one = {k: v[i: i + 1] for k, v in {**columns, **extra}.items() if isinstance(v, list)}
            try:
                rewards.score_one(fn, prompts[i: i + 1], completions[i: i + 1], **{**extra, **one})
            except Exception as inner:  # noqa: BLE001
                return PmetalError(f"reward function {name!r} raised {type(inner).__name__}: {inner} "
                                   f"(prompt {first_prompt + i // group} of the step, completion {i % group})")
    return PmetalError(f"the rewards raised {type(exc).__name__}: {exc}")


def _generate_and_score(module, batch, settings: RolloutSettings, first_group: int, stop_ids: list[int]):
    """Generate chunk after chunk; score each in line or, with async_rewards, in a background worker."""
    group, chunks = settings.num_generations, max(1, min(settings.chunks, len(batch["prompt_ids"])))
    size = -(-len(batch["prompt_ids"]) // chunks)
    parts = [_chunk(batch, start, size) for start in range(0, len(batch["prompt_ids"]), size)]
    timing = {"generation": 0.0, "rewards": 0.0, "reward_wait": 0.0}
    engine_stats: dict[str, list[float]] = {}

    def timed_score(part, gen, first):
        t0 = time.perf_counter()
        out = _score(module, part, gen, settings, first)
        timing["rewards"] += time.perf_counter() - t0
        return out

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmetal-rewards") if settings.async_rewards else None
    pending = []
    try:
        for k, part in enumerate(parts):
            t0 = time.perf_counter()
            gen, stats = _generate(module, part, settings, stop_ids)
            timing["generation"] += time.perf_counter() - t0
            for name, value in stats.items():
                engine_stats.setdefault(name, []).append(value)
            args = (part, gen, k * size)
            pending.append((part, gen, pool.submit(timed_score, *args) if pool else timed_score(*args)))
        rows, completions, per_function = [], [], {}
        for k, (part, gen, result) in enumerate(pending):
            t0 = time.perf_counter()
            texts, total, scores = result.result() if pool else result
            timing["reward_wait"] += time.perf_counter() - t0
            first = first_group + k * size
            chunk_rows = rows_from_generation(gen, total, group, first_group=first)
            for row in chunk_rows if part.get("pixel_inputs") else ():  # the update sees the images sampling saw
                row.pixel_inputs = part["pixel_inputs"][row.group - first]
            rows += chunk_rows
            completions += texts
            for name, values in scores.items():
                per_function.setdefault(name, []).extend(values)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # no worker outlives the step, even on an error
    metrics = {f"rollout/{name}_seconds": value for name, value in timing.items()}
    metrics.update({name: sum(v) / len(v) for name, v in engine_stats.items()})
    return rows, completions, per_function, metrics


def _chunk(batch: dict[str, Any], start: int, size: int) -> dict[str, Any]:
    rows = slice(start, start + size)
    part = {"prompt_ids": batch["prompt_ids"][rows], "prompts": batch["prompts"][rows],
            "columns": {name: values[rows] for name, values in batch.get("columns", {}).items()}}
    if batch.get("pixel_inputs"):
        part["pixel_inputs"] = batch["pixel_inputs"][rows]
    return part


def make_rollout(module, batch: dict[str, Any], *, source=None, stop_ids: list[int] | None = None) -> RolloutBatch:
    """Generate, score and assemble the rollout of one prompt batch (the callback's work).

    `stop_ids`: the tokens that end a completion; None reads them from the module's tokenizer.
    """
    settings: RolloutSettings = module.rollout_settings()
    if stop_ids is None:
        stop_ids = stop_token_ids(module.tokenizer, module.policy)
    group = settings.num_generations
    num_prompts = len(batch["prompt_ids"])
    start = time.perf_counter()
    kept: list[RolloutRow] = []
    kept_text: list[str] = []
    all_rows: list[RolloutRow] = []
    per_function_all: dict[str, list[float]] = {}
    rounds, dropped = 0, 0
    prompt_batch = batch
    step_metrics: dict[str, float] = {}
    while True:
        rows, completions, per_function, timing = _generate_and_score(module, prompt_batch, settings,
                                                                      first_group=rounds * num_prompts,
                                                                      stop_ids=stop_ids)
        for name, value in timing.items():
            step_metrics[name] = step_metrics.get(name, 0.0) + value
        rounds += 1
        all_rows += rows
        for name, scores in per_function.items():
            per_function_all.setdefault(name, []).extend(scores)
        if not settings.dynamic_sampling:
            kept, kept_text = rows, completions
            break
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
            log.warning("dynamic sampling: the datamodule cannot draw more prompts (no sample(n)); using %d groups",
                        len(kept) // group)
            break
        prompt_batch = source.sample(num_prompts)

    rewards = torch.tensor([r.reward for r in kept], dtype=torch.float32)
    advantages = group_advantages(rewards, group, scale=settings.scale_rewards) if kept else rewards
    rollout = assemble(kept, advantages, pad_token_id=module.tokenizer.pad_token_id, group_size=group,
                       device=module.device)
    rollout.completions = kept_text
    rollout.metrics = _metrics(all_rows, per_function_all, group, settings, time.perf_counter() - start)
    rollout.metrics.update(step_metrics)
    if settings.dynamic_sampling:
        rollout.metrics["dynamic_sampling/rounds"] = float(rounds)
        rollout.metrics["dynamic_sampling/dropped_groups"] = float(dropped)
        rollout.metrics["dynamic_sampling/kept_groups"] = float(len(kept) // group)
    return rollout


def _metrics(rows: list[RolloutRow], per_function: dict[str, list[float]], group: int, settings: RolloutSettings,
             seconds: float) -> dict[str, float]:
    """Reward and completion statistics over every completion sampled this step."""
    rewards = torch.tensor([r.reward for r in rows], dtype=torch.float32)
    lengths = torch.tensor([len(r.completion_ids) for r in rows], dtype=torch.float32)
    terminated = torch.tensor([len(r.completion_ids) for r in rows if not r.truncated], dtype=torch.float32)
    metrics = {  # TRL's GRPOTrainer names (docs/metrics.md)
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()) if len(rows) > 1 else 0.0,
        "frac_reward_zero_std": float(zero_spread_groups(rewards, group).float().mean()),
        "completions/mean_length": float(lengths.mean()),
        "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/clipped_ratio": sum(r.truncated for r in rows) / len(rows),
        "completions/mean_terminated_length": float(terminated.mean()) if len(terminated) else 0.0,
        "completions/min_terminated_length": float(terminated.min()) if len(terminated) else 0.0,
        "completions/max_terminated_length": float(terminated.max()) if len(terminated) else 0.0,
        "rollout/tokens_per_s": float(lengths.sum()) / max(seconds, 1e-9),
        "rollout/seconds": seconds,
    }
    for name, scores in per_function.items():
        finite = torch.tensor([s for s in scores if not math.isnan(s)], dtype=torch.float32)
        metrics[f"rewards/{name}/mean"] = float(finite.mean()) if len(finite) else float("nan")
        metrics[f"rewards/{name}/std"] = float(finite.std()) if len(finite) > 1 else 0.0
    return metrics
