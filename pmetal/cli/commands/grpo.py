"""Online RL with reward functions: GRPO (default) or DAPO (--dapo), LoRA by default.

    pmetal grpo --model M --dataset D --reasoning-rewards [--dapo] [--num-generations 8] [--beta 0.001]
    pmetal grpo --dataset D --reward-fn accuracy --reward-fn mypkg.rewards:brevity --reward-weight 1 --reward-weight 0.5

Each step samples --num-generations completions per prompt with the current policy, scores them
with the reward functions (built-ins: think_format, accuracy, length, overlong; or any
package.module:function taking (prompts, completions, **columns)), and updates the policy with
the clipped group-relative objective. The dataset needs a prompt per row (`prompt`, `question`,
`problem`, `instruction` or `messages`) and, for the accuracy reward, an `answer` or `solution`
column. With no --dataset, pmetal's small arithmetic example is used. The flags build the same
GrpoModule/DapoModule and PromptDataModule as `pmetal fit --method grpo|dapo`.
"""

from __future__ import annotations

import argparse

from pmetal.cli.commands.train import add_model_arguments, launch, module_kwargs


def add_rl_arguments(p: argparse.ArgumentParser) -> None:
    """Data, reward and rollout flags shared by grpo and rlkd."""
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None, help="prompt file (JSONL/JSON/Parquet/CSV); default: pmetal's arithmetic example")
    d.add_argument("--batch-size", type=int, default=4, help="prompts per step (default %(default)s)")
    d.add_argument("--max-prompt-length", type=int, default=512)
    d.add_argument("--prompt-column", default=None, help="the column holding the prompt, if not prompt/question/problem")
    d.add_argument("--system-prompt", default=None, help="a system message added to every prompt")
    d.add_argument("--chat-template", default=None, help="'chatml' to use a ChatML template when the model has none")
    r = p.add_argument_group("rewards")
    r.add_argument("--reasoning-rewards", action="store_true",
                   help="think-format (1.0) + answer accuracy (1.0) + length shaping (0.2)")
    r.add_argument("--reward-fn", action="append", default=[], metavar="NAME|package.module:function",
                   help="a reward function (repeatable): think_format, accuracy, length, overlong, or an import path")
    r.add_argument("--reward-weight", action="append", type=float, default=[],
                   help="weight of each --reward-fn, in order (default 1 each)")
    r.add_argument("--reward-model", default=None, help="a sequence-classification reward model directory")
    g = p.add_argument_group("rollouts and policy update")
    g.add_argument("--num-generations", type=int, default=8, help="completions per prompt, the group size (default %(default)s)")
    g.add_argument("--max-completion-length", type=int, default=512)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--num-iterations", type=int, default=1, help="optimizer steps per rollout (GRPO's mu)")
    g.add_argument("--micro-batch-size", type=int, default=8, help="completions per forward/backward in the update")
    g.add_argument("--beta", type=float, default=0.0,
                   help="KL coefficient to the base model (default 0, as DAPO/Dr. GRPO/TRL; PMetal used 0.001)")
    g.add_argument("--epsilon", type=float, default=0.2, help="clip range")
    g.add_argument("--epsilon-high", type=float, default=None, help="upper clip range (clip-higher; --dapo: 0.28)")
    g.add_argument("--loss-type", choices=["grpo", "bnpo", "dr_grpo", "dapo"], default=None,
                   help="token aggregation (default grpo; --dapo: dapo)")
    g.add_argument("--scale-rewards", choices=["group", "batch", "none"], default="group")
    g.add_argument("--importance-sampling-level", choices=["token", "sequence"], default="token",
                   help="importance ratio per token (GRPO) or per sequence (GSPO)")
    s = p.add_argument_group("rollout engine")
    s.add_argument("--speculative", action="store_true",
                   help="speculative rollouts: draft tokens, verify them in one policy forward (exact sampling)")
    s.add_argument("--draft-model", default=None,
                   help="draft model for --speculative (same tokenizer); default: n-grams of the prompt (prompt lookup)")
    s.add_argument("--num-draft-tokens", type=int, default=4, help="tokens drafted per speculative round (default %(default)s)")
    s.add_argument("--async-rewards", action="store_true",
                   help="score rewards in a background worker while the next prompt chunk is generated")
    s.add_argument("--rollout-chunks", type=int, default=None,
                   help="prompt chunks generated one after another per step (default: 2 with --async-rewards, else 1)")


def rl_module_kwargs(args) -> dict:
    kwargs = module_kwargs(args)
    kwargs.update(
        reward_fns=args.reward_fn, reward_weights=args.reward_weight or None,
        reasoning_rewards=args.reasoning_rewards, reward_model=args.reward_model,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        num_iterations=args.num_iterations, micro_batch_size=args.micro_batch_size, beta=args.beta,
        epsilon=args.epsilon, scale_rewards=args.scale_rewards,
        importance_sampling_level=args.importance_sampling_level, speculative=args.speculative,
        draft_model=args.draft_model, num_draft_tokens=args.num_draft_tokens, async_rewards=args.async_rewards,
        rollout_chunks=args.rollout_chunks,
    )
    if args.epsilon_high is not None:
        kwargs["epsilon_high"] = args.epsilon_high
    if args.loss_type is not None:
        kwargs["loss_type"] = args.loss_type
    return kwargs


def prompt_datamodule(args):
    from pmetal.data.formats import example_path
    from pmetal.data.prompts import PromptDataModule

    return PromptDataModule(
        path=args.dataset or str(example_path("grpo.jsonl")), batch_size=args.batch_size,
        max_prompt_length=args.max_prompt_length, prompt_column=args.prompt_column,
        system_prompt=args.system_prompt, chat_template=args.chat_template, seed=args.seed,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_rl_arguments(p)
    p.add_argument("--dapo", action="store_true",
                   help="DAPO: clip-higher 0.2/0.28, token-level loss, overlong shaping, dynamic sampling")
    p.add_argument("--max-sampling-rounds", type=int, default=4, help="DAPO dynamic sampling: most rounds per step")
    p.add_argument("--overlong-buffer", type=int, default=None, help="DAPO overlong buffer in tokens (default: max/4)")
    add_model_arguments(p, learning_rate=5e-6)


def run(args) -> int:
    import lightning as L

    from pmetal.modules.grpo import DapoModule, GrpoModule

    L.seed_everything(args.seed, workers=True, verbose=False)
    kwargs = rl_module_kwargs(args)
    if args.dapo:
        module = DapoModule(max_sampling_rounds=args.max_sampling_rounds, overlong_buffer=args.overlong_buffer, **kwargs)
    else:
        module = GrpoModule(**kwargs)
    launch(args, "dapo" if args.dapo else "grpo", module, prompt_datamodule(args))
    return 0
