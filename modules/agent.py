"""GRPO with tools: multi-turn episodes where the model calls tools, trained on the outcome.

The update is GRPO's (Shao et al. 2024, arXiv:2402.03300, `GrpoModule`); what changes is the
rollout. Each rollout row is an episode (`pmetal.tools.episodes`): the model writes a turn, its
`<tool_call>` blocks run in tool worker processes (`pmetal.tools.runner`: a timeout, a cap on the
result, errors as text), the results are appended as a tool turn and the row continues, up to
`max_tool_turns` tool turns and `max_episode_tokens`. The shape follows TRL's GRPOTrainer
(`tools=`, `environment_factory=`, `max_tool_calling_iterations`), with these departures:

- tools run in separate processes (TRL runs them in the trainer), so a tool that hangs is killed
  and counted, and one that crashes its process does not end the run;
- tool-result tokens carry label -100: they are outside the loss and the importance ratio, and
  their sampling-time log-probs are never used (TRL masks them the same way with its tool mask);
- rewards receive `messages` (each episode's conversation) and, with an environment,
  `environments` (handles whose method calls run in the environment's worker); the completion a
  reward reads is the final assistant turn's text;
- episodes decode on one decode session (`pmetal.tools.turns.SessionTurns`, kept between steps with
  the engine's options: CUDA graphs, compiled rounds): a row waiting for its tools keeps its KV
  while the others decode, its tool turn is appended without re-prefilling the conversation, and
  its draws come from per-row hashed uniforms (TRL generates each turn again from the whole
  conversation). Models no session serves (sliding-window, hybrid caches) run turn-synchronously.
"""

from __future__ import annotations

from typing import Any, Optional

from pmetal.errors import PmetalError
from pmetal.modules.grpo import GrpoModule


class AgentGrpoModule(GrpoModule):
    """GRPO over multi-turn tool episodes (see the module docstring).

    Args:
        tools: the tools the model may call: import paths "package.module:function" (type hints and
            a docstring with an Args: section make each function's JSON schema).
        environment: "package.module:Factory": one environment per rollout row, built with
            reset(**row columns); its public methods are tools and its get_reward(), if any, is a
            reward (weight 1), as TRL's environment_factory.
        max_tool_turns: tool turns an episode may take (the model then writes one more turn).
        max_episode_tokens: completion tokens (model and tool results together) per episode.
        tool_timeout: seconds a tool call may run; a call that hangs longer is killed and counted.
        max_tool_result_chars: a tool's result (or error) is cut to this many characters.
        tool_workers: tool worker processes (the calls of one turn run side by side).
    """

    def __init__(
        self,
        model: str = "default",
        tools: Optional[list[str]] = None,
        environment: Optional[str] = None,
        max_tool_turns: int = 2,
        max_episode_tokens: int = 512,
        tool_timeout: float = 10.0,
        max_tool_result_chars: int = 2000,
        tool_workers: int = 2,
        reward_fns: Optional[list[str]] = None,
        reward_weights: Optional[list[float]] = None,
        **kwargs: Any,
    ) -> None:
        from pmetal.tools.agent import ENVIRONMENT_REWARD
        from pmetal.tools.runner import resolve_tool

        tools = [t.strip() for spec in (tools or []) for t in str(spec).split(",") if t.strip()]
        if not tools and not environment:
            raise PmetalError("AgentGrpoModule needs tools (--tools package.module:fn,...) or an environment")
        if max_tool_turns < 0 or max_episode_tokens < 1 or tool_timeout <= 0 or max_tool_result_chars < 1 or tool_workers < 1:
            raise PmetalError("max_tool_turns >= 0, max_episode_tokens >= 1, tool_timeout > 0, max_tool_result_chars >= 1 "
                              "and tool_workers >= 1 are required")
        for tool in tools:  # a wrong path is reported before the model loads
            resolve_tool(tool)
        fns, weights = list(reward_fns or []), list(reward_weights) if reward_weights else None
        if environment and hasattr(resolve_tool(environment), "get_reward") and ENVIRONMENT_REWARD not in fns:
            fns.append(ENVIRONMENT_REWARD)
            weights = weights + [1.0] if weights else None
        super().__init__(model, reward_fns=fns, reward_weights=weights, **kwargs)
        self._agent = None  # the tool workers, started with the first rollout

    def agent_rollout(self):
        from pmetal.tools.agent import AgentRollout
        from pmetal.tools.episodes import EpisodeSettings

        if self._agent is None:
            hp = self.hparams
            tools = [t.strip() for spec in (hp.tools or []) for t in str(spec).split(",") if t.strip()]
            settings = EpisodeSettings(max_tool_turns=hp.max_tool_turns, max_episode_tokens=hp.max_episode_tokens,
                                       max_new_tokens=hp.max_completion_length)
            data = getattr(self._trainer, "datamodule", None)  # its system prompt, as its rendered prompts have it
            self._agent = AgentRollout(tools, hp.environment, settings=settings, timeout=hp.tool_timeout,
                                       max_result_chars=hp.max_tool_result_chars, workers=hp.tool_workers,
                                       system_prompt=getattr(data, "system_prompt", None))
        return self._agent

    def rollout_settings(self):
        import dataclasses

        settings = super().rollout_settings()
        if settings.speculative or settings.async_rewards:
            raise PmetalError("tool episodes do not run with speculative rollouts or async rewards yet")
        return dataclasses.replace(settings, episodes=self.agent_rollout())

    def teardown(self, stage: str) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        super().teardown(stage)
