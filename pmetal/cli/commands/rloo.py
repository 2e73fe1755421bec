"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024), LoRA by default.

    pmetal rloo --model M --dataset D --reasoning-rewards [--num-generations 4] [--beta 0.05]

Each completion's advantage is its reward minus the mean reward of the other completions of its
prompt; the update is GRPO's (clipped ratio, micro-batches, optional KL to the base), so every
`pmetal grpo` flag applies. The flags are derived from RlooModule, PromptDataModule and
build_trainer, the settings of `pmetal fit --method rloo`.
"""

from __future__ import annotations

import argparse

from pmetal.cli.commands.grpo import rollout_checks
from pmetal.cli.commands.train import ADAPTER_SHORTCUTS, build
from pmetal.cli.flags import CommandFlags, add_overwrite_argument, add_resume_argument

FLAGS = CommandFlags(methods=("rloo",), shortcuts=ADAPTER_SHORTCUTS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    FLAGS.add_to(p)
    add_resume_argument(p)
    add_overwrite_argument(p)


def run(args) -> int:
    from pmetal.cli.runner import launch

    settings, module, datamodule = build(FLAGS, args, "rloo", checks=rollout_checks(args, "rloo", FLAGS))
    launch(args, settings, "rloo", module, datamodule)
    return 0
