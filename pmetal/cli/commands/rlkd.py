"""RLKD: GRPO plus distillation from a frozen teacher of the same tokenizer (LoRA by default).

    pmetal rlkd --model STUDENT --teacher-model TEACHER --dataset D --reasoning-rewards [--alpha 0.3 --final-alpha 0.05]

The loss is (1 - alpha) * GRPO + alpha * T^2 * KL(teacher || student) on the student's own
rollouts (--distill-beta 1 for the reverse KL, in between the generalized JSD), at the teacher
temperature T (default 2.0). The teacher may be quantized (--teacher-quantization nf4). The other
flags are `pmetal grpo`'s; they build the same RlkdModule and PromptDataModule as
`pmetal fit --method rlkd`.
"""

from __future__ import annotations

import argparse

from pmetal.cli.commands.grpo import add_rl_arguments, prompt_datamodule, prompt_dataset_path, rl_module_kwargs
from pmetal.cli.commands.train import add_model_arguments, launch


def add_arguments(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("teacher")
    t.add_argument("--teacher-model", required=True, help="the frozen teacher (same tokenizer as --model)")
    t.add_argument("--alpha", type=float, default=0.3, help="weight of the distillation term (default %(default)s)")
    t.add_argument("--final-alpha", type=float, default=None, help="anneal alpha linearly to this value")
    t.add_argument("--teacher-temperature", type=float, default=2.0)
    t.add_argument("--distill-beta", type=float, default=0.0, help="0 forward KL, 1 reverse KL, between: JSD")
    t.add_argument("--teacher-quantization", choices=["nf4", "fp4", "int8"], default=None)
    add_rl_arguments(p)
    add_model_arguments(p, learning_rate=5e-6)


def run(args) -> int:
    from pmetal.cli.preflight import check_command, reward_functions

    check_command(args, "rlkd", data={"--dataset": prompt_dataset_path(args)},
                  models={"--model": args.model, "--teacher-model": args.teacher_model},
                  rewards=reward_functions(args.reward_fn, args.reasoning_rewards))
    import lightning as L

    from pmetal.modules.rlkd import RlkdModule

    L.seed_everything(args.seed, workers=True, verbose=False)
    module = RlkdModule(
        teacher_model=args.teacher_model, alpha=args.alpha, final_alpha=args.final_alpha,
        teacher_temperature=args.teacher_temperature, distill_beta=args.distill_beta,
        teacher_quantization=args.teacher_quantization, **rl_module_kwargs(args),
    )
    launch(args, "rlkd", module, prompt_datamodule(args))
    return 0
