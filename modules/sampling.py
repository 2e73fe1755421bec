"""The sampling settings of every method that samples completions from the policy while it trains.

GRPO and its family (DAPO, RLOO, RLKD, Online DPO, XPO, agents) and GKD all sample from the student
with the rollout engine; `SamplingModule` declares the settings once (names, types, defaults,
range checks, and the docstring that is their `--help`), and `sampling_config()` turns them into
the core's typed :class:`pmetal.generation.SamplingConfig`, the `sampling` of the
:class:`pmetal.rl.settings.RolloutSettings` the GRPO family hands to the sampler. A method changes a
default by restating the parameter with the new default (GKD samples at TRL's 0.9), never its
name or text.
"""

from __future__ import annotations

from typing import Any

from pmetal.modules.base import PmetalModule


class SamplingModule(PmetalModule):
    """A module that samples completions from its policy during training (see the module docstring).

    Args:
        model: the model to fine-tune (a local HF directory, hub id, .gguf, or "default").
        max_completion_length: the most tokens generated per completion.
        temperature: sampling temperature (0 samples greedily).
        top_p: nucleus sampling threshold (1 = off).
        top_k: sample from the k most likely tokens only (0 = off).
        min_p: drop tokens less likely than min_p times the most likely one (0 = off).
        **kwargs: the base module's settings (adapter, lora_r, quantization, warmup_steps, ...).
    """

    def __init__(
        self,
        model: str = "default",
        max_completion_length: int = 512,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        **kwargs: Any,
    ) -> None:
        from pmetal.ranges import check_settings

        check_settings(type(self).__name__, dict(max_completion_length=max_completion_length, temperature=temperature,
                                                 top_p=top_p, top_k=top_k, min_p=min_p))
        super().__init__(model, **kwargs)

    def sampling_config(self):
        """The settings above as the rollout engine's :class:`pmetal.generation.SamplingConfig`."""
        from pmetal.generation import SamplingConfig

        hp = self.hparams
        return SamplingConfig(max_new_tokens=hp.max_completion_length, temperature=hp.temperature, top_p=hp.top_p,
                              top_k=hp.top_k, min_p=hp.min_p)
