"""The valid range of every numeric setting, stated once, by setting name.

The commands check what they parsed against this table before any model loads
(``pmetal.cli.preflight.check_ranges``, naming the flag); the modules and datamodules check their
arguments against the same table when built from Python (:func:`check_settings`), so a range is
never restated in a constructor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pmetal.errors import PmetalError


@dataclass(frozen=True)
class Range:
    """Valid values of a numeric setting: low/high bounds (open or closed) and allowed specials."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple = ()  # values allowed outside the range (-1 = "no limit")
    meaning: str = ""

    def contains(self, value: float) -> bool:
        if value in self.special:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = "a number " + " and ".join(parts) if parts else "a finite number"
        if self.special:
            text += " (or " + ", ".join(str(s) for s in self.special) + ")"
        return text + (f": {self.meaning}" if self.meaning else "")


def _at_least(low: float, meaning: str = "", **kw: Any) -> Range:
    return Range(low=low, meaning=meaning, **kw)


def _positive(meaning: str = "") -> Range:
    return Range(low=0, low_open=True, meaning=meaning)


def _fraction(meaning: str = "", *, high_open: bool = False) -> Range:
    return Range(low=0, high=1, high_open=high_open, meaning=meaning)


# Keyed by setting name: the argparse dest of a PMetal flag or the module/datamodule argument;
# both spellings are listed where they differ, so the table holds for either layout of the CLI.
RANGES: dict[str, Range] = {
    "lora_r": _at_least(1, "the LoRA rank"),
    "lora_alpha": _positive("the LoRA alpha"),
    "lora_dropout": _fraction("a dropout probability", high_open=True),
    "quant_block_size": _at_least(1, "values per quantization block"),
    "learning_rate": _positive("the peak learning rate"),
    "weight_decay": _at_least(0),
    "warmup_steps": _at_least(0),
    "min_lr_ratio": _fraction("a fraction of the peak learning rate"),
    "epochs": _at_least(1, "training epochs (0 would train nothing)"),
    "max_epochs": _at_least(1, "training epochs", special=(-1,)),
    "max_steps": _at_least(1, "optimizer steps (0 would train nothing); -1 lets the epochs decide", special=(-1,)),
    "gradient_accumulation_steps": _at_least(1),
    "accumulate_grad_batches": _at_least(1),
    "max_grad_norm": _at_least(0, "0 turns clipping off"),
    "seed": Range(low=0, high=2**32 - 1),
    "checkpoint_every": _at_least(1, "optimizer steps between checkpoints"),
    "checkpoint_every_n_steps": _at_least(1, "optimizer steps between checkpoints"),
    "val_fraction": _fraction("the held-out share of the rows", high_open=True),
    "batch_size": _at_least(1, "rows per batch"),
    "max_seq_len": _at_least(2, "tokens per row (a row of one token has no next token to learn)"),
    "max_length": _at_least(1, "tokens per row"),
    "max_prompt_length": _at_least(1, "prompt tokens"),
    "max_completion_length": _at_least(1, "new tokens per completion"),
    "max_new_tokens": _at_least(1, "tokens to generate"),
    "num_generations": _at_least(2, "completions per prompt; a group of 1 has no relative advantage"),
    "num_iterations": _at_least(1),
    "micro_batch_size": _at_least(1),
    "top_p": Range(low=0, high=1, low_open=True),
    "top_k": _at_least(0, "0 turns top-k off"),
    "min_p": _fraction(high_open=True),
    "beta": _at_least(0),
    "epsilon": _at_least(0),
    "epsilon_high": _at_least(0),
    "max_sampling_rounds": _at_least(1),
    "overlong_buffer": _at_least(0),
    "alpha": _fraction("the distillation weight"),
    "final_alpha": _fraction("the distillation weight"),
    "teacher_temperature": _positive(),
    "distill_beta": _fraction("0 forward KL, 1 reverse KL"),
    "lmbda": _fraction("the on-policy fraction"),
    "temperature": _at_least(0, "0 samples greedily"),
    "margin": _at_least(0),
    "cosent_scale": _positive(),
    "eval_every": _at_least(1, "optimizer steps between evaluations"),
    "n": _at_least(0),
    "tis_cap": _positive("the cap of the importance weight (none turns it off)"),
    "top_entropy_quantile": Range(low=0, high=1, low_open=True, meaning="the share of tokens trained on"),
    "rollout_chunks": _at_least(1, "prompt chunks per rollout"),
}
# An embedding loss divides by its temperature: 0 is no "greedy" there.
EMBED_RANGES = {**RANGES, "temperature": _positive("the InfoNCE temperature")}


def out_of_range(name: str, value: Any, ranges: Mapping[str, Range] = RANGES) -> Range | None:
    """The rule `value` breaks (None: in range, not a number, or a setting without a range)."""
    rule = ranges.get(name)
    if rule is None or value is None or isinstance(value, bool):
        return None
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, (int, float)) and not rule.contains(item):
            return rule
    return None


def check_settings(owner: str, settings: Mapping[str, Any], ranges: Mapping[str, Range] = RANGES) -> None:
    """Every setting of `owner` (a class name) named in the table lies in its range, or a one-line PmetalError."""
    for name, value in settings.items():
        rule = out_of_range(name, value, ranges)
        if rule is not None:
            raise PmetalError(f"{owner}: {name}={value}: expected {rule.describe()}")
