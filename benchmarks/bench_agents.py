"""Multi-turn tool rollouts: pmetal's AgentGrpoModule beside TRL's GRPOTrainer(tools=...), same model,
prompts, tool, turns and token budgets (issue 28).

Per optimizer step each trainer runs `--prompts` x `--num-generations` episodes: the model writes a
turn, its `<tool_call>` runs the lookup tool of "Train an agent" (`pmetal.examples.agent_tools:lookup`;
pmetal runs it in its tool worker processes, TRL in the trainer), the result is appended as a tool
turn and the row goes on, up to `--max-tool-turns` tool turns (TRL's `max_tool_calling_iterations`)
within `--max-episode-tokens` completion tokens, model and tool tokens together (TRL's
`max_completion_length`, which TRL also uses as each turn's limit, so pmetal's per-turn limit
`max_completion_length` is set to the same number). Then one GRPO update (LoRA r16 on every linear
layer, beta 0, loss "grpo", the whole rollout in one micro-batch, gradient checkpointing, bf16 on
CUDA / fp32 on CPU). The table gives the rollout phase as episodes/s, new model tokens/s (tool
tokens excluded) and tool calls and model turns per episode, and the whole step in s/step. Each
trainer runs in its own subprocess; the first `--warmup` steps are not timed. Both call their public
entry points (pmetal: `AgentGrpoModule` and its rollout sampler, `pmetal.tools.episodes`; TRL:
`GRPOTrainer(tools=...)`), so a faster episode engine in either shows up here unchanged.

How the random model calls tools. A model with random weights never writes a tool call, and one
trained briefly would call tools a random number of times, so the two trainers would not do the same
work. The model is therefore scripted in its weights, identically for both trainers: a Qwen3-shaped
model (`--model qwen3-0.6b-shape`: Qwen3-0.6B's layers, heads and vocabulary, with an untied LM
head, so the same matmuls and 0.3 GB more weights; `tiny` for the CPU smoke) whose attention output
and MLP down projections are zero, so that the residual stream carries the current token's
embedding unchanged to the head, and whose LM head maps the embedding of each token of a fixed
script to the next one with a margin of `SCRIPT_MARGIN` logits (orthonormal embeddings for the
script's tokens, so no two steps interfere). It is a bigram machine that still runs every matmul of
the real shape (attention, MLP, the 151,936-word head): the cost per token is a Qwen3-0.6B's, and at
temperature 1 it samples the script with probability 1 - 1e-10 per token. After every assistant
header it writes `--think-tokens` words of "reasoning", then
`<tool_call>{"name": "lookup", "arguments": {"name": "zorblat"}}</tool_call>` and its end-of-turn
token. So every episode calls the tool on every turn until `--max-tool-turns` is reached, then
writes one more turn (whose call neither trainer runs): each episode has max_tool_turns calls and
max_tool_turns + 1 model turns on both sides, which the table shows (`calls/episode`,
`turns/episode`; a warning line when the trainers differ). The tokenizer is a byte-level BPE trained
here on pmetal's example data (`tests/tiny.py`; no model hub on the GPU machines) with Qwen2.5's
chat template (the one TRL ships, which renders tools and whose tool calls TRL's parser knows) and
the script's words as added tokens. The prompts are "Tell me the registry code for <name>." over the
example registry's names (each trainer shuffles the file its own way; the rendered prompts differ by
a few tokens at most), rendered with the tool's schema into the same ids by both trainers. Rewards
are a fixed spread over each group's rows (never all equal, so neither trainer skips an update),
the same for both.

    # CPU smoke (under a minute): a tiny Qwen3-shaped model
    python benchmarks/bench_agents.py --device cpu --model tiny --threads 1
    # GPU: the Qwen3-0.6B shape, 8 prompts x 8 episodes, 3 tool turns of 32 thinking tokens each
    python benchmarks/bench_agents.py --device cuda --model qwen3-0.6b-shape --prompts 8 --num-generations 8 \\
        --max-tool-turns 3 --think-tokens 32 --max-episode-tokens 512 --steps 3 --warmup 1

Prints a table; `--markdown FILE` appends it as Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from _common import QWEN3_06B_SHAPE, report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from _timing import add_worker_arguments, load_peer_model, peak_gib, run_contenders, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOOL = "pmetal.examples.agent_tools:lookup"
CALLED_NAME = "zorblat"
SCRIPT_MARGIN = 40.0  # logits between the script's next token and any other
TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, vocab_size=4096, max_position_embeddings=4096)
SHAPES = {"tiny": TINY_SHAPE, "qwen3-0.6b-shape": QWEN3_06B_SHAPE}


def spread_reward(prompts, completions, **kwargs):
    """A fixed spread over the rows (never constant within a group): the work timed is the trainer's."""
    return [(i % 4) / 3.0 for i in range(len(completions))]


# ------------------------------------------------------------------ the scripted model
def script_words(think_tokens: int) -> list[str]:
    """The added tokens the model writes in each turn, in order (its end-of-turn token follows)."""
    call = json.dumps({"name": "lookup", "arguments": {"name": CALLED_NAME}})
    return [f" think{i:03d}" for i in range(think_tokens)] + ["<tool_call>", f"\n{call}\n", "</tool_call>"]


def agent_tokenizer(think_tokens: int):
    """A byte-level BPE trained on pmetal's example data, Qwen2.5's chat template (tools), the script's words."""
    sys.path.insert(0, str(ROOT))  # tests/tiny.py builds the tokenizer (as scripts/cuda_smoke.py does)
    from tests.tiny import bpe_tokenizer
    from transformers import AddedToken
    from trl.chat_template_utils import qwen2_5_chat_template

    tokenizer = bpe_tokenizer()
    tokenizer.add_tokens([AddedToken(w, normalized=False) for w in ["<tool_response>", "</tool_response>",
                                                                     *script_words(think_tokens)]])
    tokenizer.chat_template = qwen2_5_chat_template
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def script_pairs(tokenizer, think_tokens: int) -> list[tuple[int, int]]:
    """(token, next token) of the script: the assistant header's last token starts it, end-of-turn ends it."""
    header = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                           tokenize=False)
    start = tokenizer(header, add_special_tokens=False)["input_ids"][-1]
    ids = [start] + tokenizer.convert_tokens_to_ids(script_words(think_tokens)) + [tokenizer.eos_token_id]
    return list(zip(ids[:-1], ids[1:]))


def plant_script(model, pairs: list[tuple[int, int]], margin: float = SCRIPT_MARGIN) -> None:
    """Make `model` (a Qwen3 with an untied head) write `pairs`' next token after each token (module docstring)."""
    import torch

    d = model.config.hidden_size
    if len(pairs) > d:
        raise ValueError(f"a script of {len(pairs)} tokens needs hidden_size >= {len(pairs)} (this model: {d})")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        generator = torch.Generator().manual_seed(0)
        basis = torch.linalg.qr(torch.randn(d, len(pairs), generator=generator, dtype=torch.float64))[0].T  # orthonormal
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        for (token, following), direction in zip(pairs, basis):
            # the token's embedding: entries of the init's size; after the final RMSNorm it is
            # sqrt(d) * direction, so this head row gives `margin` on it and 0 on every other script token
            embed[token] = (direction * 0.02 * math.sqrt(d)).to(embed.device, embed.dtype)
            head[following] = (direction * margin / math.sqrt(d)).to(head.device, head.dtype)


def check_script(model, tokenizer, pairs, prompt_ids: list[int]) -> None:
    """One forward over a prompt followed by the script: every next token is the script's argmax."""
    import torch

    ids = prompt_ids + [following for _, following in pairs]
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0].float()
    start = len(prompt_ids) - 1
    predicted = logits[start: start + len(pairs)].argmax(-1).tolist()
    expected = [following for _, following in pairs]
    if prompt_ids[-1] != pairs[0][0] or predicted != expected:
        raise RuntimeError(f"the scripted model does not follow its script: {predicted} != {expected}")
    top2 = logits[start: start + len(pairs)].topk(2, dim=-1).values
    print(f"script of {len(pairs)} tokens, smallest margin {float((top2[:, 0] - top2[:, 1]).min()):.1f} logits",
          file=sys.stderr)


def prompt_rows(count: int) -> list[dict]:
    from pmetal.examples.agent_tools import NAMES

    return [{"prompt": f"Tell me the registry code for {NAMES[i % len(NAMES)]}."} for i in range(count)]


def prepare(args, work: Path) -> None:
    """`work/model` (the scripted model and its tokenizer) and `work/prompts.jsonl`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pmetal.examples.agent_tools import lookup

    tokenizer = agent_tokenizer(args.think_tokens)
    shape = dict(SHAPES[args.model], tie_word_embeddings=False)
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    config = Qwen3Config(**shape, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(args.device):  # built in place on the device: seconds, not a CPU init of 0.75B weights
        model = Qwen3ForCausalLM._from_config(config, dtype=dtype)
    pairs = script_pairs(tokenizer, args.think_tokens)
    plant_script(model, pairs)
    rows = prompt_rows(args.prompts * (args.steps + args.warmup + 1))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": rows[0]["prompt"]}], tools=[lookup],
                                           add_generation_prompt=True, tokenize=False)
    check_script(model.eval(), tokenizer, pairs, tokenizer(prompt, add_special_tokens=False)["input_ids"])
    model_dir = work / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    with open(work / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


# ------------------------------------------------------------------ the contenders
def run_pmetal(args, model_dir: Path, prompts: Path) -> dict:
    import lightning as L

    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.agent import AgentGrpoModule

    steps: list[dict] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync(args.device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(args.device)
            rollout = batch["rollout"]
            episodes = rollout.num_sequences
            calls = rollout.metrics["tools/call_frequency"] * episodes
            steps.append(dict(step=time.perf_counter() - self.t0, rollout=rollout.metrics["rollout/seconds"],
                              episodes=episodes, model_tokens=int(rollout.completion_mask.sum()),
                              update_tokens=int(rollout.attention_mask.sum()),
                              calls=calls, failed=calls * (1 - rollout.metrics["tools/success_rate"]),
                              turns=rollout.metrics["episodes/mean_turns"] * episodes))

    L.seed_everything(0, verbose=False)
    module = AgentGrpoModule(str(model_dir), tools=[TOOL], max_tool_turns=args.max_tool_turns,
                             max_episode_tokens=args.max_episode_tokens, reward_fns=[spread_reward],
                             num_generations=args.num_generations, max_completion_length=args.max_episode_tokens,
                             temperature=1.0, micro_batch_size=args.prompts * args.num_generations,
                             learning_rate=1e-6, lora_r=16, max_grad_norm=1.0, gradient_checkpointing=True,
                             weight_dtype="bfloat16" if args.device == "cuda" else "float32")
    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator=args.device, devices=1,
                        precision="bf16-mixed" if args.device == "cuda" else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Timer()])
    trainer.fit(module, PromptDataModule(str(prompts), batch_size=args.prompts, max_prompt_length=4096))
    return summary("pmetal AgentGrpoModule", steps[args.warmup:], args.device)


def run_trl(args, model_dir: Path, prompts: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pmetal.examples.agent_tools import lookup

    model, tokenizer = load_peer_model(model_dir, args.device)
    rows = [{"prompt": [{"role": "user", "content": json.loads(line)["prompt"]}]} for line in open(prompts)]
    steps: list[dict] = []
    current: dict = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(args.device)
            current.clear()
            current.update(t0=time.perf_counter(), rollout=0.0, episodes=0, model_tokens=0, update_tokens=0,
                           calls=0.0, failed=0.0, turns=0)

        def on_step_end(self, *a, **k):
            sync(args.device)
            steps.append(dict(current, step=time.perf_counter() - current["t0"]))

    config = GRPOConfig(
        output_dir=str(model_dir.parent / "trl_out"), per_device_train_batch_size=args.prompts * args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_episode_tokens,
        max_tool_calling_iterations=args.max_tool_turns, temperature=1.0, learning_rate=1e-6,
        max_steps=args.warmup + args.steps, logging_steps=1, report_to=[], save_strategy="no",
        bf16=args.device == "cuda", use_cpu=args.device == "cpu", gradient_checkpointing=True, beta=0.0,
        loss_type="grpo", num_iterations=1, max_grad_norm=1.0, seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=spread_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, tools=[lookup], callbacks=[Timer()],
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    generate = trainer._generate

    def timed_generate(prompt_batch):
        sync(args.device)
        t0 = time.perf_counter()
        out = generate(prompt_batch)
        sync(args.device)
        prompt_ids, completion_ids, tool_mask, completions = out[0], out[1], out[2], out[3]
        current["rollout"] += time.perf_counter() - t0
        current["episodes"] += len(completion_ids)
        current["model_tokens"] += sum(sum(mask) for mask in tool_mask)
        current["update_tokens"] += sum(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
        metrics = trainer._metrics["train"]  # this call's values are the last ones
        calls = metrics["tools/call_frequency"][-1] * len(completion_ids)
        current["calls"] += calls
        current["failed"] += metrics["tools/failure_frequency"][-1] * calls
        current["turns"] += sum(m["role"] == "assistant" for episode in completions for m in episode)
        return out

    trainer._generate = timed_generate
    trainer.train()
    return summary("TRL GRPOTrainer", steps[args.warmup:], args.device)


def summary(name: str, steps: list[dict], device: str) -> dict:
    total = {key: sum(s[key] for s in steps) for key in ("step", "rollout", "episodes", "model_tokens",
                                                           "update_tokens", "calls", "failed", "turns")}
    episodes = max(total["episodes"], 1)
    return dict(name=name, steps=len(steps), step_s=total["step"] / max(len(steps), 1),
                episodes_s=total["episodes"] / max(total["rollout"], 1e-9),
                model_tok_s=total["model_tokens"] / max(total["rollout"], 1e-9),
                update_tok_s=total["update_tokens"] / max(total["step"] - total["rollout"], 1e-9),
                calls_per_episode=total["calls"] / episodes, failed_calls=round(total["failed"]),
                turns_per_episode=total["turns"] / episodes,
                model_tokens_per_episode=total["model_tokens"] / episodes, peak_gib=peak_gib(device))


def results_table(results: list[dict]) -> str:
    table = ["| trainer | rollout episodes/s | new model tokens/s | calls/episode | turns/episode | "
             "failed calls | model tokens/episode | s/step | update tokens/s | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            table.append(f"| {r['name']} | failed: {r['error'][:200]} | | | | | | | | |")
        else:
            table.append(f"| {r['name']} | {r['episodes_s']:.2f} | {r['model_tok_s']:.1f} | {r['calls_per_episode']:.2f} | "
                         f"{r['turns_per_episode']:.2f} | {r['failed_calls']} | {r['model_tokens_per_episode']:.1f} | {r['step_s']:.2f} | "
                         f"{r['update_tok_s']:.1f} | {r['peak_gib']:.2f} |")
    ok = [r for r in results if "error" not in r]
    if len(ok) == 2:
        pm, trl = ok
        table.append(f"\npmetal / TRL: rollout episodes/s {pm['episodes_s'] / trl['episodes_s']:.2f}x, "
                     f"step {trl['step_s'] / pm['step_s']:.2f}x")
        if (round(pm["calls_per_episode"], 2), round(pm["turns_per_episode"], 2)) != \
                (round(trl["calls_per_episode"], 2), round(trl["turns_per_episode"], 2)):
            table.append("WARNING: the trainers did not make the same tool calls and turns: not the same work")
    return "\n".join(table)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=sorted(SHAPES), default="tiny",
                   help="tiny (CPU smoke) or qwen3-0.6b-shape (random, scripted weights)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=2, help="episodes per prompt")
    p.add_argument("--max-tool-turns", type=int, default=2)
    p.add_argument("--think-tokens", type=int, default=4, help="words the model writes before each call")
    p.add_argument("--max-episode-tokens", type=int, default=256, help="completion tokens per episode (model + tool)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--only", choices=["pmetal", "trl"], default=None)
    p.add_argument("--markdown", default=None, help="append the table to this Markdown file")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    add_worker_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    results = run_contenders(__file__, argv, args, prepare, {"pmetal": run_pmetal, "trl": run_trl})
    if results is None:
        return 0
    header = (f"Multi-turn tool rollouts, {args.model} on {args.device}: {args.prompts} prompts x "
              f"{args.num_generations} episodes, {args.max_tool_turns} tool turns (lookup) of {args.think_tokens} "
              f"thinking tokens + the call, <= {args.max_episode_tokens} completion tokens, {args.steps} timed steps")
    report(header + "\n\n" + results_table(results) + "\n", args.markdown)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
