"""Train a reward model (Bradley–Terry) on preference pairs; it scores with `pmetal grpo --reward-model`.

    pmetal reward-train --dataset pairs.jsonl --val-fraction 0.1 --output-dir runs/rm
    pmetal grpo --reward-model runs/rm/final --dataset prompts.jsonl

The model (default: the embedded SmolLM2-135M-Instruct) gets a one-score head; LoRA trains its body
and the head is trained fully (--full trains every weight). The data is DPO's: chosen/rejected pairs,
with an optional `margin` column. Logs `accuracy` (pairs scored chosen above rejected) and `margin`
under train/ and val/. The saved `final/` is a merged `AutoModelForSequenceClassification` with its
tokenizer. Flags are derived from RewardModule, PreferenceDataModule and build_trainer, the
settings of `pmetal fit --method reward`.
"""

from __future__ import annotations

import argparse

from pmetal.cli.commands.train import ADAPTER_SHORTCUTS, build
from pmetal.cli.flags import CommandFlags, add_overwrite_argument, add_resume_argument

_UNSUPPORTED = "reward models train on a full-precision text model (RewardModule refuses it)"
FLAGS = CommandFlags(methods=("reward",), shortcuts=ADAPTER_SHORTCUTS, hidden={
    name: _UNSUPPORTED for name in ("quantization", "quant_block_size", "double_quant", "quant_backend", "vlm",
                                    "train_projector", "train_vision_tower")})


def add_arguments(p: argparse.ArgumentParser) -> None:
    FLAGS.add_to(p)
    add_resume_argument(p)
    add_overwrite_argument(p)


def run(args) -> int:
    from pmetal.cli.preflight import check_command
    from pmetal.cli.runner import launch

    checks = lambda settings: check_command(args, settings, "reward", flag_names=FLAGS.flag_names)  # noqa: E731
    settings, module, datamodule = build(FLAGS, args, checks=checks)
    launch(args, settings, "reward", module, datamodule)
    return 0
