"""Rewards of a rollout's completions, scored chunk after chunk, in line or in a background worker.

:class:`RewardScoring` resolves the chunks in order; with a rollout attached it writes each chunk's
rewards and group advantages into it (``RolloutBatch.wait_for_rewards``), so the module's update of
the first chunks overlaps the scoring of the last. Both modes resolve through the same code: the
worker changes when rewards arrive, never what they are.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from pmetal.errors import PmetalError
from pmetal.losses.policy import estimate_advantages, needs_whole_batch
from pmetal.rl.metrics import rollout_metrics
from pmetal.rl.prompts import PromptBatch
from pmetal.rl.rollout import RolloutBatch, RolloutRow, rows_from_generation
from pmetal.rl.settings import RolloutSettings


def score_completions(rewards, tokenizer, part: PromptBatch, gen, settings: RolloutSettings, first_prompt: int):
    """Decode and score one chunk: ``(completions, total rewards, per-function scores)``.

    A reward that raises is reported with the function's name and the prompt it failed on.
    """
    group = settings.num_generations
    completion_ids = [row[: int(n)] for row, n in zip(gen.completion_ids.tolist(), gen.lengths.tolist())]
    completions = getattr(gen, "completions", None) or tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    repeat = lambda values: [v for v in values for _ in range(group)]  # noqa: E731
    columns = {name: repeat(values) for name, values in part.columns.items()}
    prompts = repeat(part.prompts)
    extra = dict(completion_lengths=gen.lengths.tolist(), max_completion_length=settings.sampling.max_new_tokens,
                 **getattr(gen, "reward_kwargs", {}))  # tool episodes: messages (and environments) per row
    try:
        total, per_function = rewards.score(prompts, completions, **columns, **extra)
    except PmetalError:
        raise
    except Exception as exc:  # noqa: BLE001 - find the function and the prompt, then report them
        raise _reward_error(rewards, prompts, completions, columns, extra, first_prompt, group, exc) from exc
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
    in.
    """

    def __init__(self, rewards, tokenizer, settings: RolloutSettings) -> None:
        self.rewards, self.tokenizer, self.settings = rewards, tokenizer, settings
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

    def add(self, part: PromptBatch, gen, first_prompt: int, first_group: int) -> None:
        """Queue a generated chunk for scoring (or score it now, in line)."""
        rows = rows_from_generation(gen, [0.0] * gen.completion_ids.shape[0], self.settings.num_generations,
                                    first_group=first_group)
        for row in rows if part.pixel_inputs else ():  # the update sees the images sampling saw
            row.pixel_inputs = part.pixel_inputs[row.group - first_group]
        start = len(self.rows)
        self.rows += rows
        args = (part, gen, first_prompt)
        self._chunks.append((start, len(self.rows), self.pool.submit(self._score, *args) if self.background
                             else self._score(*args)))

    def _score(self, part, gen, first_prompt):
        t0 = time.perf_counter()
        try:
            return score_completions(self.rewards, self.tokenizer, part, gen, self.settings, first_prompt)
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
        rollout.metrics.update(rollout_metrics(self.rows, self.per_function, self.settings.num_generations,
                                               self.seconds))
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
