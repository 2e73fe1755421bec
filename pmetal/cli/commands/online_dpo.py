"""Online DPO (default) or XPO (--xpo): DPO on pairs the policy samples and the rewards rank, LoRA by default.

    pmetal online-dpo --model M --dataset D --reward-fn accuracy [--beta 0.1] [--loss-type ipo]
    pmetal online-dpo --model M --dataset D --reward-model RM [--xpo --alpha 1e-5]

Each step samples two completions per prompt with the current policy (with --xpo: one from the
policy, one from the reference, the base without the adapter), scores them with the reward
functions or the reward model, drops the pairs whose rewards tie, and takes a DPO step on the
rest (any of DPO's --loss-type); XPO adds alpha times the policy's log-prob of the reference's
completion. The dataset needs a prompt per row, as `pmetal grpo`'s. The flags are derived from
OnlineDpoModule (XpoModule with --xpo), PromptDataModule and build_trainer, the settings of
`pmetal fit --method online_dpo|xpo`.
"""

from __future__ import annotations

import argparse

from pmetal.cli.commands.grpo import rollout_checks
from pmetal.cli.commands.train import ADAPTER_SHORTCUTS, build
from pmetal.cli.flags import CommandFlags, add_overwrite_argument, add_resume_argument
from pmetal.modules.online_dpo_settings import GRPO_ONLY

FLAGS = CommandFlags(methods=("online_dpo", "xpo"), shortcuts=ADAPTER_SHORTCUTS,
                     hidden={name: f"GRPO only: {why}" for name, why in GRPO_ONLY.items()})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--xpo", action="store_true",
                   help="XPO: pairs of a policy and a reference completion, plus the exploration term (--alpha)")
    FLAGS.add_to(p)
    add_resume_argument(p)
    add_overwrite_argument(p)


def run(args) -> int:
    from pmetal.cli.runner import launch

    method = "xpo" if args.xpo else "online_dpo"
    settings, module, datamodule = build(FLAGS, args, method, checks=rollout_checks(args, method, FLAGS))
    launch(args, settings, method, module, datamodule)
    return 0
