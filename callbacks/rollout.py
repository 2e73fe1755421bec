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
``async_rewards`` each chunk is scored in a background worker (``RewardScoring``) while the next
one is generated, and the rollout is handed to the module before the last chunks are scored: its
reference forward (which needs no rewards) and the update of the micro-batches whose groups are
scored run while the worker finishes (``RolloutBatch.wait_for_rewards``). Dynamic sampling needs
every reward to choose its groups, so there the worker overlaps generation only. The chunks, not
the worker, decide what is sampled and how advantages are computed (per chunk of whole groups;
over the batch for ``scale_rewards="batch"`` and REINFORCE++): the same seed gives the same rewards, advantages,
losses and weights with and without ``async_rewards``.

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
from pmetal.losses.policy import estimate_advantages, needs_whole_batch, zero_spread_groups
from pmetal.vlm import collate_pixel_inputs, placeholder_token_ids

log = logging.getLogger("pmetal")


class RolloutCallback(L.Callback):
    """Generates and scores the rollout of each training batch (see the module docstring)."""

    def __init__(self) -> None:
        self._stop_ids: tuple[object, list[int]] | None = None  # (tokenizer, its stop ids)
        self._rollout: RolloutBatch | None = None  # the current step's, while its rewards may be scored

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
        # with async rewards the module's reference forward and update overlap the scoring's tail
        self._rollout = make_rollout(pl_module, batch, source=source, stop_ids=self.stop_ids(pl_module),
                                     defer_rewards=True)
        batch["rollout"] = self._rollout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._rollout = None

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._rollout is not None:  # a step that failed before or inside the update leaves no worker
            self._rollout.stop_scoring()

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
                            num_draft_tokens=settings.num_draft_tokens, compile_decode=settings.compile_decode)
        prefill_inputs = collate_pixel_inputs(pixel_inputs) if pixel_inputs else None
        sampling = settings.sampling
        placeholders = placeholder_token_ids(policy)  # a sampled image placeholder would break the update
        if placeholders:
            sampling = dataclasses.replace(sampling, suppress_ids=tuple(sorted({*sampling.suppress_ids, *placeholders})))
        if settings.episodes is not None:  # multi-turn tool episodes (pmetal.tools.agent)
            gen = settings.episodes.generate(engine, part, sampling, stop_ids=stop_ids, tokenizer=module.tokenizer,
                                             pad_token_id=module.tokenizer.pad_token_id, group=settings.num_generations)
            return gen, {**engine.last_stats, **gen.metrics}
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
    completions = getattr(gen, "completions", None) or module.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    repeat = lambda values: [v for v in values for _ in range(group)]  # noqa: E731
    columns = {name: repeat(values) for name, values in batch.get("columns", {}).items()}
    prompts = repeat(batch["prompts"])
    extra = dict(completion_lengths=gen.lengths.tolist(), max_completion_length=settings.sampling.max_new_tokens,
                 **getattr(gen, "reward_kwargs", {}))  # tool episodes: messages (and environments) per row
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


class RewardScoring:
    """The rewards of one round of prompt chunks, scored chunk after chunk, in order.

    In line, a chunk is scored as soon as it is generated. With ``async_rewards`` one background
    worker scores it while the main thread generates the next chunk and then, once the rollout is
    handed to the module, runs the reference forward and the update. ``wait(rows)`` resolves chunks
    in order until the first ``rows`` rows have their rewards (all rows under
    ``scale_rewards="batch"``, whose std spans the batch). With a rollout attached, a resolved
    chunk's rewards and group advantages are written into it, and its metrics once every chunk is
    in. Both modes resolve through the same code, so the worker changes when rewards arrive, never
    what they are.
    """

    def __init__(self, module, settings: RolloutSettings) -> None:
        self.module, self.settings = module, settings
        self.background = settings.async_rewards
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pmetal-rewards") if self.background else None
        self.rows: list[RolloutRow] = []
        self.completions: list[str] = []
        self.per_function: dict[str, list[float]] = {}
        self.timing = {"generation": 0.0, "rewards": 0.0, "reward_wait": 0.0}
        self.engine_stats: dict[str, list[float]] = {}
        self.started = time.perf_counter()
        self.seconds: float | None = None  # from the start until the last reward was in
        self._chunks: list[tuple[int, int, Any]] = []  # (first row, end row, the scores or their future)
        self._resolved = 0
        self._rollout: RolloutBatch | None = None

    def add(self, part: dict[str, Any], gen, first_prompt: int, first_group: int) -> None:
        """Queue a generated chunk for scoring (or score it now, in line)."""
        rows = rows_from_generation(gen, [0.0] * gen.completion_ids.shape[0], self.settings.num_generations,
                                    first_group=first_group)
        for row in rows if part.get("pixel_inputs") else ():  # the update sees the images sampling saw
            row.pixel_inputs = part["pixel_inputs"][row.group - first_group]
        start = len(self.rows)
        self.rows += rows
        args = (part, gen, first_prompt)
        self._chunks.append((start, len(self.rows), self.pool.submit(self._score, *args) if self.background
                             else self._score(*args)))

    def _score(self, part, gen, first_prompt):
        t0 = time.perf_counter()
        try:
            return _score(self.module, part, gen, self.settings, first_prompt)
        finally:
            self.timing["rewards"] += time.perf_counter() - t0

    def attach(self, rollout: RolloutBatch) -> None:
        self._rollout = rollout
        rollout.scoring = self

    def wait(self, rows: int | None = None) -> float:
        """Resolve chunks until the first `rows` rows (None: all) have rewards; the seconds waited.

        A reward that raised is raised here (naming the function and the prompt), after the
        worker is shut down.
        """
        t0 = time.perf_counter()
        if rows is None or self._whole_batch:
            rows = len(self.rows)
        try:
            while self._resolved < len(self._chunks) and self._chunks[self._resolved][0] < rows:
                self._resolve(*self._chunks[self._resolved])
                self._resolved += 1
        except BaseException:
            self.close()
            raise
        waited = time.perf_counter() - t0
        self.timing["reward_wait"] += waited
        if self._resolved == len(self._chunks) and self.seconds is None:
            self._finish()
        return waited

    def _resolve(self, start: int, end: int, result) -> None:
        texts, total, scores = result.result() if self.background else result
        for row, value in zip(self.rows[start:end], total):
            row.reward = float(value)
        self.completions += texts
        for name, values in scores.items():
            self.per_function.setdefault(name, []).extend(values)
        if self._rollout is not None and not self._whole_batch:
            self._write(start, end)

    @property
    def _whole_batch(self) -> bool:  # a group's advantages need every group's rewards
        return needs_whole_batch(self.settings.advantage_estimator, self.settings.scale_rewards)

    def _write(self, start: int, end: int) -> None:
        """Rewards and group advantages of rows [start, end) (whole groups) into the rollout."""
        rewards = torch.tensor([r.reward for r in self.rows[start:end]], dtype=torch.float32)
        advantages = estimate_advantages(rewards, self.settings.num_generations,
                                         estimator=self.settings.advantage_estimator, scale=self.settings.scale_rewards)
        rollout = self._rollout
        rollout.rewards[start:end] = rewards.to(rollout.rewards.device)
        rollout.advantages[start:end] = advantages.to(rollout.advantages.device)

    def _finish(self) -> None:
        self.seconds = time.perf_counter() - self.started
        self.close()
        rollout = self._rollout
        if rollout is None:
            return
        if self._whole_batch:
            self._write(0, len(self.rows))
        rollout.completions = self.completions
        rollout.metrics.update(_metrics(self.rows, self.per_function, self.settings.num_generations, self.seconds))
        rollout.metrics.update(self.metrics())

    def metrics(self) -> dict[str, float]:
        """The pipeline's timing (rollout/<side>_seconds) and the engine's statistics (means over chunks)."""
        metrics = {f"rollout/{name}_seconds": value for name, value in self.timing.items()}
        metrics.update({name: sum(v) / len(v) for name, v in self.engine_stats.items()})
        return metrics

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)  # no worker outlives the step, even on an error
            self.pool = None


def _generate_chunks(module, batch, settings: RolloutSettings, first_group: int, stop_ids: list[int]) -> RewardScoring:
    """Generate chunk after chunk, each queued for scoring as soon as it is generated."""
    chunks = max(1, min(settings.chunks, len(batch["prompt_ids"])))
    size = -(-len(batch["prompt_ids"]) // chunks)
    scoring = RewardScoring(module, settings)
    try:
        for start in range(0, len(batch["prompt_ids"]), size):
            part = _chunk(batch, start, size)
            t0 = time.perf_counter()
            gen, stats = _generate(module, part, settings, stop_ids)
            scoring.timing["generation"] += time.perf_counter() - t0
            for name, value in stats.items():
                scoring.engine_stats.setdefault(name, []).append(value)
            scoring.add(part, gen, start, first_group + start)
    except BaseException:
        scoring.close()
        raise
    return scoring


def _chunk(batch: dict[str, Any], start: int, size: int) -> dict[str, Any]:
    rows = slice(start, start + size)
    part = {"prompt_ids": batch["prompt_ids"][rows], "prompts": batch["prompts"][rows],
            "columns": {name: values[rows] for name, values in batch.get("columns", {}).items()}}
    if batch.get("pixel_inputs"):
        part["pixel_inputs"] = batch["pixel_inputs"][rows]
    return part


def make_rollout(module, batch: dict[str, Any], *, source=None, stop_ids: list[int] | None = None,
                 defer_rewards: bool = False) -> RolloutBatch:
    """Generate, score and assemble the rollout of one prompt batch (the callback's work).

    `stop_ids`: the tokens that end a completion; None reads them from the module's tokenizer.
    `defer_rewards`: with async rewards (and no dynamic sampling, which needs every reward to choose
    its groups), return once the completions are generated, while the worker still scores them:
    the module's reference forward and update overlap the scoring, waiting for each micro-batch's
    groups (``RolloutBatch.wait_for_rewards``). Otherwise every reward is in on return.
    """
    settings: RolloutSettings = module.rollout_settings()
    if stop_ids is None:
        stop_ids = stop_token_ids(module.tokenizer, module.policy)
    group = settings.num_generations
    num_prompts = len(batch["prompt_ids"])
    start = time.perf_counter()
    if not settings.dynamic_sampling:
        scoring = _generate_chunks(module, batch, settings, first_group=0, stop_ids=stop_ids)
        rollout = assemble(scoring.rows, torch.zeros(len(scoring.rows)), pad_token_id=module.tokenizer.pad_token_id,
                           group_size=group, device=module.device)
        rollout.started_at = start
        scoring.attach(rollout)
        if not (defer_rewards and settings.async_rewards):
            rollout.wait_for_rewards()
        return rollout

    kept: list[RolloutRow] = []
    kept_text: list[str] = []
    all_rows: list[RolloutRow] = []
    per_function_all: dict[str, list[float]] = {}
    rounds, dropped = 0, 0
    prompt_batch = batch
    step_metrics: dict[str, float] = {}
    while True:
        scoring = _generate_chunks(module, prompt_batch, settings, first_group=rounds * num_prompts, stop_ids=stop_ids)
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
            log.warning("dynamic sampling: the datamodule cannot draw more prompts (no sample(n)); using %d groups",
                        len(kept) // group)
            break
        prompt_batch = source.sample(num_prompts)

    rewards = torch.tensor([r.reward for r in kept], dtype=torch.float32)
    advantages = (estimate_advantages(rewards, group, estimator=settings.advantage_estimator,
                                      scale=settings.scale_rewards) if kept else rewards)
    rollout = assemble(kept, advantages, pad_token_id=module.tokenizer.pad_token_id, group_size=group,
                       device=module.device)
    rollout.started_at = start
    rollout.completions = kept_text
    rollout.metrics = _metrics(all_rows, per_function_all, group, time.perf_counter() - start)
    rollout.metrics.update(step_metrics)
    rollout.metrics["dynamic_sampling/rounds"] = float(rounds)
    rollout.metrics["dynamic_sampling/dropped_groups"] = float(dropped)
    rollout.metrics["dynamic_sampling/kept_groups"] = float(len(kept) // group)
    return rollout


def _metrics(rows: list[RolloutRow], per_function: dict[str, list[float]], group: int,
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
    metrics.update(_nan_rewards(per_function, len(rows)))
    return metrics


def _nan_rewards(per_function: dict[str, list[float]], completions: int) -> dict[str, float]:
    """`rewards/<name>/nan_fraction` per function and `rewards/nan_fraction` (completions no function
    scored), with one warning a step naming the functions that returned NaN/None.

    A NaN score means "does not apply" (TRL's convention, summed as nansum); a completion that no
    function scores gets reward 0, so a function that fails on everything trains on nothing.
    """
    metrics, silent = {}, []
    unscored = [True] * completions
    for name, scores in per_function.items():
        missing = [math.isnan(s) for s in scores]
        unscored = [u and m for u, m in zip(unscored, missing)]
        metrics[f"rewards/{name}/nan_fraction"] = sum(missing) / max(len(scores), 1)
        if any(missing):
            silent.append(f"{name} ({sum(missing)} of {len(scores)})")
    metrics["rewards/nan_fraction"] = sum(unscored) / max(completions, 1) if per_function else 0.0
    if silent:
        log.warning("rewards: NaN/None scores this step from %s; %d of %d completions have no reward at all "
                    "(they get 0 and teach nothing); a NaN means the function does not apply",
                    ", ".join(silent), sum(unscored), completions)
    return metrics
