"""Async rewards: GRPO training steps with a slow reward, scored in line and in the background worker.

The reward sleeps `--reward-ms` per completion (a stand-in for a remote judge or a sandboxed test
run). Both runs train the same steps from the same seed with the KL term on (`--beta` > 0, so
every step runs the reference forward), over the same `--chunks` prompt chunks. The table gives
each mode's step time beside its parts: the device side (generation + reference forward +
update) and the host side (scoring). In line a step takes about their sum; in the background
about their max, plus what cannot overlap: the first chunk's generation (nothing is scored yet)
and the update of the last chunk's micro-batches (their rewards come last). The rewards, losses
and final weights must come out identical.

    python benchmarks/bench_async_rewards.py --device cpu --prompts 8 --num-generations 4 --chunks 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def slow_reward(prompts, completions, **kwargs):
    time.sleep(slow_reward.seconds * len(completions))
    return [float(len(c) % 3) for c in completions]


PARTS = ("generation", "reference", "update", "rewards", "reward_wait", "step")


def _train(mode: str, args, data: Path) -> dict:
    """`--warmup + --steps` GRPO steps; per timed step its wall time and the pipeline's parts."""
    import lightning as L
    import torch

    from pmetal.callbacks.throughput import synchronize
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.grpo import GrpoModule

    class Timer(L.Callback):
        def __init__(self):
            self.steps, self.losses, self.rewards = [], [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            synchronize(pl_module.device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            synchronize(pl_module.device)
            wall = time.perf_counter() - self.t0
            rollout = batch["rollout"]
            self.losses.append(float(trainer.callback_metrics["train/loss"]))
            self.rewards.append(rollout.rewards.cpu().clone())
            if batch_idx >= args.warmup:
                self.steps.append({"wall": wall, **{p: rollout.metrics[f"rollout/{p}_seconds"] for p in PARTS}})

    L.seed_everything(0, verbose=False)
    module = GrpoModule(args.model, reward_fns=[slow_reward], num_generations=args.num_generations,
                        max_completion_length=args.max_completion_length, rollout_chunks=args.chunks,
                        micro_batch_size=args.micro_batch_size, beta=args.beta, learning_rate=1e-5,
                        async_rewards=mode == "async", gradient_checkpointing=False)
    timer = Timer()
    trainer = L.Trainer(max_steps=args.warmup + args.steps, max_epochs=None, accelerator=args.device, devices=1,
                        precision="bf16-mixed" if args.device == "cuda" else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer])
    trainer.fit(module, PromptDataModule(str(data), batch_size=args.prompts))
    weights = {n: p.detach().cpu().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    mean = {k: sum(s[k] for s in timer.steps) / len(timer.steps) for k in timer.steps[0]}
    return {"mean": mean, "losses": timer.losses, "rewards": timer.rewards, "weights": weights}


def _tiny_model(path: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pmetal.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="default",
                   help='a model path, "default" (SmolLM2-135M-Instruct) or "tiny-HIDDEN-LAYERS" (a random Llama '
                        "of that width and depth with SmolLM2's tokenizer, for a CPU where the 135M model's "
                        "steps dwarf any reward)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--reward-ms", type=float, default=50.0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--order", default="inline,async,inline,async",
                   help="the runs, in order (a mode run more than once is averaged: interleaving evens out load)")
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    import torch

    slow_reward.seconds = args.reward_ms / 1000.0
    work = Path(tempfile.mkdtemp(prefix="bench-async-"))
    name = args.model
    if args.model.startswith("tiny-"):
        args.model = str(_tiny_model(work / "model", *map(int, args.model.split("-")[1:3])))
    data = work / "prompts.jsonl"
    with data.open("w") as f:
        for i in range(args.prompts * (args.warmup + args.steps)):
            f.write(json.dumps({"prompt": f"Write one sentence about the number {i}."}) + "\n")
    runs = [(mode, _train(mode, args, data)) for mode in args.order.split(",")]
    a = runs[0][1]  # every run, in either mode, must give the first one's rewards, losses and weights
    same = all(b["losses"] == a["losses"] and all(torch.equal(x, y) for x, y in zip(a["rewards"], b["rewards"]))
               and b["weights"].keys() == a["weights"].keys()
               and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]) for _, b in runs)
    rows = []
    for mode in dict.fromkeys(mode for mode, _ in runs):  # a mode run several times (interleaved): the mean
        means = [r["mean"] for m, r in runs if m == mode]
        m = {k: sum(x[k] for x in means) / len(means) for k in means[0]}
        device = m["generation"] + m["reference"] + m["update"]
        rows.append(f"| {mode} | {m['wall']:.2f} | {m['generation']:.2f} | {m['reference']:.2f} | {m['update']:.2f} "
                    f"| {device:.2f} | {m['rewards']:.2f} | {m['reward_wait']:.2f} | {device + m['rewards']:.2f} "
                    f"| {max(device, m['rewards']):.2f} |")
    text = (f"Async rewards, GRPO steps of {name} on {args.device}: {args.prompts} prompts x {args.num_generations}, "
            f"{args.max_completion_length} new tokens, {args.chunks} chunks, micro-batches of {args.micro_batch_size}, "
            f"beta {args.beta}, reward {args.reward_ms:.0f} ms per completion; mean of {args.steps} steps after "
            f"{args.warmup} warm-up, runs {args.order}; torch threads {torch.get_num_threads()}; rewards, losses and final weights "
            f"identical: {same}\n\n"
            "| scoring | step s | generation s | reference s | update s | device side s | scoring s | waited s "
            "| sum s | max s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n")
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
