"""GKD: on-policy distillation from a frozen teacher of the same tokenizer (LoRA by default).

    pmetal distill --teacher-model TEACHER [--model STUDENT] [--dataset D] [--lmbda 0.5] [--beta 0.5]
        [--max-completion-length 128] [--temperature 0.9]

With probability --lmbda a batch's completions are the student's own samples (rollout engine),
else the dataset's; the student minimizes the generalized JSD to the teacher's token distributions
on the completion tokens (--beta 0: forward KL, 1: reverse KL), chunked over the tokens so the
vocabulary-sized logits never exist whole. --lmbda 0 is offline logit distillation. Data: any SFT
layout (prompt/completion, messages, ...). The flags are derived from DistillModule,
DistillDataModule and build_trainer, the settings of `pmetal fit --method distill`.
"""

from __future__ import annotations

import argparse

from pmetal.cli.commands.train import ADAPTER_SHORTCUTS, build
from pmetal.cli.flags import CommandFlags, add_overwrite_argument, add_resume_argument

# --max-new-tokens: GKD's name for it before it became the rollout methods' shared setting (and TRL GKDConfig's)
FLAGS = CommandFlags(methods=("distill",), shortcuts=ADAPTER_SHORTCUTS, required=("teacher_model",),
                     aliases={"max_completion_length": ("--max-completion-length", "--max-new-tokens")})


def add_arguments(p: argparse.ArgumentParser) -> None:
    FLAGS.add_to(p)
    add_resume_argument(p)
    add_overwrite_argument(p)


def run(args) -> int:
    from pmetal.cli.preflight import check_command
    from pmetal.cli.runner import launch

    def checks(settings) -> None:
        models = {"--model": settings.model.get("model"), "--teacher-model": settings.model.get("teacher_model")}
        check_command(args, settings, "distill", flag_names=FLAGS.flag_names, models=models)

    settings, module, datamodule = build(FLAGS, args, checks=checks)
    launch(args, settings, "distill", module, datamodule)
    return 0
