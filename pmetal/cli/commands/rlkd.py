"""RLKD: GRPO plus distillation from a frozen teacher of the same tokenizer (LoRA by default).

    pmetal rlkd --model STUDENT --teacher-model TEACHER --dataset D --reasoning-rewards [--alpha 0.3 --final-alpha 0.05]

The loss is (1 - alpha) * GRPO + alpha * T^2 * KL(teacher || student) on the student's own
rollouts (--distill-beta 1 for the reverse KL, in between the generalized JSD), at the teacher
temperature T (default 2.0). The teacher may be quantized (--teacher-quantization nf4). The other
flags are `pmetal grpo`'s; all are derived from RlkdModule, PromptDataModule and build_trainer,
the settings of `pmetal fit --method rlkd`.
"""

from __future__ import annotations

import argparse

from pmetal.cli.commands.grpo import rollout_checks
from pmetal.cli.commands.train import ADAPTER_SHORTCUTS, build
from pmetal.cli.flags import CommandFlags, add_overwrite_argument, add_resume_argument

FLAGS = CommandFlags(methods=("rlkd",), shortcuts=ADAPTER_SHORTCUTS, required=("teacher_model",))


def add_arguments(p: argparse.ArgumentParser) -> None:
    FLAGS.add_to(p)
    add_resume_argument(p)
    add_overwrite_argument(p)


def run(args) -> int:
    from pmetal.cli.runner import launch

    models = lambda s: {"--model": s.model.get("model"), "--teacher-model": s.model.get("teacher_model")}  # noqa: E731
    settings, module, datamodule = build(FLAGS, args, checks=rollout_checks(args, "rlkd", FLAGS, models))
    launch(args, settings, "rlkd", module, datamodule)
    return 0
