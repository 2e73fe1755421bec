"""A GRPO prompt chunk as tool episodes: `AgentRollout.generate` is what `RolloutCallback` calls in place
of one engine call when the module has tools (`RolloutSettings.episodes`).

Per prompt, `num_generations` episodes start from the prompt's messages rendered with the tool
schemas (a string prompt is one user turn); with an environment, each episode gets its own
instance, built in a tool worker from the row's columns (`reset(**columns)`; a returned string is
appended to the last user message, as in TRL). The result is an `EpisodeGeneration`: the engine's
`Generation` layout (so the rollout batch is assembled as for one turn) plus `model_mask`, the
final assistant texts, the per-row `messages` and `environments` for the rewards, and the step's
tool metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pmetal.errors import PmetalError
from pmetal.generation.sampling import Generation
from pmetal.tools.episodes import Episode, EpisodeSettings, episode_metrics, run_episodes, start_episode
from pmetal.tools.format import function_schema
from pmetal.tools.runner import EnvironmentHandle, ToolRunner, environment_tools, resolve_tool
from pmetal.tools.turns import TurnSource


@dataclass
class EpisodeGeneration(Generation):
    model_mask: torch.Tensor | None = None  # [N, L] True on model tokens (False on tool tokens and padding)
    completions: list[str] = field(default_factory=list)  # each episode's final assistant text
    reward_kwargs: dict[str, list] = field(default_factory=dict)  # messages (and environments) per row
    metrics: dict[str, float] = field(default_factory=dict)


def prompt_messages(prompt: Any, system_prompt: str | None = None) -> list[dict]:
    """A dataset prompt (a string or a message list) as messages, `system_prompt` first when the
    prompt has no system turn (as `PromptDataModule` renders its prompts)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system_prompt and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


class AgentRollout:
    """Tools (and an environment factory) for GRPO episodes; owns the tool workers.

    Args:
        tools: functions or `package.module:function` strings.
        environment: `package.module:Factory` (a class with `reset(**row)`, public methods as tools,
            optionally `get_reward()`), one instance per rollout row.
        settings: turns and token budgets.
        timeout, max_result_chars, workers: the `ToolRunner`'s.
        system_prompt: the prompt data's system prompt (`PromptDataModule.system_prompt`), put first
            in every episode whose prompt has no system turn.
    """

    def __init__(self, tools: Sequence[str | Callable] = (), environment: str | None = None, *,
                 settings: EpisodeSettings, timeout: float = 10.0, max_result_chars: int = 2000,
                 workers: int = 2, system_prompt: str | None = None) -> None:
        if not tools and not environment:
            raise PmetalError("tool episodes need tools (--tools package.module:fn,...) or an environment")
        self.runner = ToolRunner(tools, timeout=timeout, max_result_chars=max_result_chars, workers=workers)
        self.environment = environment
        self.env_tools = environment_tools(environment) if environment else {}
        self.schemas = [function_schema(resolve_tool(t)) for t in tools]
        self.schemas += [function_schema(fn) for fn in self.env_tools.values()]
        self.settings, self.system_prompt = settings, system_prompt
        self._live: list[int] = []  # the previous step's environments (its rewards may still read them)
        self.turns = TurnSource()  # the decode session, kept from one rollout to the next

    def episodes(self, prompts: Sequence[Any], columns: dict[str, list], group: int, tokenizer) -> list[Episode]:
        for env_id in self._live:
            self.runner.close_environment(env_id)
        self._live = []
        out = []
        for p, prompt in enumerate(prompts):
            for _ in range(group):
                messages, handle = prompt_messages(prompt, self.system_prompt), None
                if self.environment:
                    row = {name: values[p] for name, values in columns.items()}
                    env_id, observation = self.runner.new_environment(self.environment, row)
                    self._live.append(env_id)
                    handle = EnvironmentHandle(self.runner, env_id, self.environment)
                    if observation:
                        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + observation}
                out.append(start_episode(tokenizer, messages, self.schemas, handle))
        return out

    def generate(self, engine, part, sampling, *, stop_ids, pad_token_id: int, tokenizer,
                 group: int) -> EpisodeGeneration:
        """The episodes of a prompt chunk (a `pmetal.rl.prompts.PromptBatch`), `group` per prompt, in the engine's Generation layout."""
        episodes = self.episodes(part.prompts, part.columns, group, tokenizer)
        capacity = max(len(ep.prompt_ids) for ep in episodes) + self.settings.max_episode_tokens + 1
        turns = self.turns.driver(engine, sampling, stop_ids=stop_ids, pad_token_id=pad_token_id, rows=len(episodes),
                                  capacity=capacity)
        run_episodes(turns, episodes, tokenizer, self.runner, self.settings, tools=self.schemas,
                     env_tools=list(self.env_tools))
        return to_generation(episodes, pad_token_id)

    def close(self) -> None:
        self.runner.close()
        self.turns.close()
        self._live = []


def to_generation(episodes: Sequence[Episode], pad_token_id: int) -> EpisodeGeneration:
    n = len(episodes)
    p = max(len(ep.prompt_ids) for ep in episodes)
    width = max(1, max(len(ep.completion_ids) for ep in episodes))
    prompt_ids = torch.full((n, p), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, p), dtype=torch.long)
    completion_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    logps = torch.zeros((n, width), dtype=torch.float32)
    model_mask = torch.zeros((n, width), dtype=torch.bool)
    for r, ep in enumerate(episodes):
        k, c = len(ep.prompt_ids), len(ep.completion_ids)
        prompt_ids[r, p - k:] = torch.tensor(ep.prompt_ids)  # left-padded, as the engine's
        prompt_mask[r, p - k:] = 1
        if c:
            completion_ids[r, :c] = torch.tensor(ep.completion_ids)
            completion_mask[r, :c] = 1
            logps[r, :c] = torch.tensor(ep.logps)
            model_mask[r, :c] = torch.tensor(ep.model_mask)
    kwargs: dict[str, list] = {"messages": [ep.messages for ep in episodes]}
    if any(ep.environment is not None for ep in episodes):
        kwargs["environments"] = [ep.environment for ep in episodes]
    return EpisodeGeneration(prompt_ids, prompt_mask, completion_ids, completion_mask, logps,
                             torch.tensor([ep.stopped for ep in episodes]), model_mask=model_mask,
                             completions=[ep.final_text for ep in episodes], reward_kwargs=kwargs,
                             metrics=episode_metrics(episodes))


ENVIRONMENT_REWARD = "pmetal.tools.agent:environment_reward"  # an import string: hyperparameters stay plain data


def environment_reward(prompts, completions, environments=None, **kwargs) -> list[float | None]:
    """Each rollout's environment's own reward (its `get_reward()`, weight 1, as TRL); None (no
    reward) for a row without one or whose environment was lost with a killed worker."""
    out = []
    for env in environments or [None] * len(completions):
        try:
            out.append(None if env is None else float(env.get_reward()))
        except PmetalError:
            out.append(None)
    return out
