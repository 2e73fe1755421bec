"""Online RL with reward functions: GRPO (default) or DAPO (--dapo), LoRA by default.

    pmetal grpo --model M --dataset D --reasoning-rewards [--dapo] [--num-generations 8] [--beta 0.001]
    pmetal grpo --dataset D --reward-fn accuracy --reward-fn mypkg.rewards:brevity --reward-weight 1 --reward-weight 0.5
    pmetal grpo --dataset D --tools mypkg.tools:lookup,mypkg.tools:add --max-tool-turns 2 --reward-fn mypkg.rewards:score

Each step samples --num-generations completions per prompt with the current policy, scores them
with the reward functions (built-ins: think_format, accuracy, length, overlong; or any
package.module:function taking (prompts, completions, **columns)), and updates the policy with
the clipped group-relative objective. The dataset needs a prompt per row (`prompt`, `question`,
`problem`, `instruction` or `messages`) and, for the accuracy reward, an `answer` or `solution`
column. With --tools (or --environment) each row is a multi-turn episode: the model's tool calls run
in worker processes and their results are appended as tool turns (AgentGrpoModule). With no --dataset, pmetal's small arithmetic example is used. The flags are derived from
GrpoModule (DapoModule with --dapo), PromptDataModule and build_trainer, the settings of
`pmetal fit --method grpo|dapo`.
"""

from __future__ import annotations

import argparse

from pmetal.cli.commands.train import ADAPTER_SHORTCUTS, build
from pmetal.cli.flags import CommandFlags, add_overwrite_argument, add_resume_argument

FLAGS = CommandFlags(methods=("grpo", "dapo", "agent"), shortcuts=ADAPTER_SHORTCUTS)
AGENT_FLAGS = ("tools", "environment")  # either one makes the run multi-turn episodes (AgentGrpoModule)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dapo", action="store_true",
                   help="DAPO: clip-higher 0.2/0.28, token-level loss, overlong shaping, dynamic sampling")
    FLAGS.add_to(p)
    add_resume_argument(p)
    add_overwrite_argument(p)


def rollout_checks(args, method: str, flags: CommandFlags, models=None):
    """The up-front checks of a rollout command: pmetal.cli.preflight plus the columns the rewards need."""
    from pmetal.cli.preflight import check_command, reward_functions
    from pmetal.data.formats import example_path

    def checks(settings) -> None:
        path = settings.data.get("path") or str(example_path("grpo.jsonl"))
        rewards = reward_functions(settings.model.get("reward_fns") or [], bool(settings.model.get("reasoning_rewards")))
        check_command(args, settings, method, flag_names=flags.flag_names, data_paths={"--dataset": path},
                      models=models(settings) if models else None, rewards=rewards)

    return checks


def run(args) -> int:
    from pmetal.cli.runner import launch

    from pmetal.errors import PmetalError

    agent = any(getattr(args, name, None) for name in AGENT_FLAGS)
    if agent and args.dapo:
        raise PmetalError("--dapo does not run with --tools/--environment yet: pass the DAPO settings you want instead")
    method = "agent" if agent else "dapo" if args.dapo else "grpo"
    settings, module, datamodule = build(FLAGS, args, method, checks=rollout_checks(args, method, FLAGS))
    launch(args, settings, method, module, datamodule)
    return 0
