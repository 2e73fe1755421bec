"""Async rewards: one GRPO rollout with a slow reward, scored in line and in the background worker.

The reward sleeps `--reward-ms` per completion (a stand-in for a remote judge or a sandboxed test
run). Both runs generate the same `--chunks` prompt chunks from the same seed; the table gives the
rollout's wall time beside its generation and scoring times, so the overlap reads directly:
inline is about generation + scoring, async about max(generation, scoring) plus the last chunk's
scoring. The rewards must come out identical.

    python benchmarks/bench_async_rewards.py --device cpu --prompts 8 --num-generations 4 --chunks 4
"""

from __future__ import annotations

import argparse
import sys
import time


def slow_reward(prompts, completions, **kwargs):
    time.sleep(slow_reward.seconds * len(completions))
    return [float(len(c) % 3) for c in completions]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="default")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--reward-ms", type=float, default=50.0)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    import torch

    from pmetal.callbacks.rollout import make_rollout
    from pmetal.data.prompts import collate_prompts
    from pmetal.data.render import render_prompt
    from pmetal.modules.grpo import GrpoModule

    slow_reward.seconds = args.reward_ms / 1000.0
    module = GrpoModule(args.model, reward_fns=[slow_reward], num_generations=args.num_generations,
                        max_completion_length=args.max_completion_length, rollout_chunks=args.chunks,
                        gradient_checkpointing=False)
    module.to(args.device)
    texts = [f"Write one sentence about the number {i}." for i in range(args.prompts)]
    batch = collate_prompts([{"prompt_ids": render_prompt(module.tokenizer, [{"role": "user", "content": t}]),
                              "prompt": t, "columns": {}, "index": i} for i, t in enumerate(texts)])
    rows, results = [], {}
    for mode in ("warm-up", "inline", "async"):
        module.hparams.async_rewards = mode == "async"
        torch.manual_seed(0)
        t0 = time.perf_counter()
        rollout = make_rollout(module, batch)
        wall = time.perf_counter() - t0
        results[mode] = rollout.rewards
        m = rollout.metrics
        if mode != "warm-up":
            rows.append(f"| {mode} | {wall:.2f} | {m['rollout/generation_seconds']:.2f} | {m['rollout/rewards_seconds']:.2f} "
                        f"| {m['rollout/generation_seconds'] + m['rollout/rewards_seconds']:.2f} "
                        f"| {max(m['rollout/generation_seconds'], m['rollout/rewards_seconds']):.2f} |")
    same = torch.equal(results["inline"], results["async"])
    text = (f"Async rewards, {args.model} on {args.device}: {args.prompts} prompts x {args.num_generations}, "
            f"{args.max_completion_length} new tokens, {args.chunks} chunks, reward {args.reward_ms:.0f} ms per "
            f"completion; rewards identical: {same}\n\n"
            "| scoring | rollout s | generation s | scoring s | sum | max |\n|---|---:|---:|---:|---:|---:|\n"
            + "\n".join(rows) + "\n")
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
