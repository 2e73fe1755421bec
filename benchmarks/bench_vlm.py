"""VLM step throughput: pmetal's GRPO and SFT steps on a vision-language model beside TRL's
GRPOTrainer and SFTTrainer, same model, images, data and settings.

The model is a random-weight Idefics3 (SmolVLM shape; `--hidden`, `--layers`), built in place with
its processor, so both libraries load the same directory with `AutoProcessor`. Data: coloured
squares (`--image-size` pixels) with "What colour is the square?". Shared settings: LoRA r16
(alpha 32) on the language model's attention and MLP projections, vision tower and projector
frozen, `--prompts` prompts x `--num-generations` completions per GRPO step sampled at temperature 1
up to `--max-completion-length` tokens, beta 0, one update per rollout in one micro-batch; SFT
batches of `--batch-size` rows, padded. The first `--warmup` steps are not timed. Each library runs
in its own subprocess.

    # CPU
    python benchmarks/bench_vlm.py --device cpu --steps 2 --warmup 1
    # GPU (a SmolVLM-256M-like shape)
    python benchmarks/bench_vlm.py --device cuda --hidden 576 --layers 30 --image-size 512 --prompts 8 \
        --num-generations 8 --max-completion-length 128 --batch-size 8 --steps 5 --warmup 2

Prints a table (GRPO: seconds per step and generated tokens/s; SFT: seconds per step and non-padding
input tokens/s; peak GPU memory on CUDA); `--markdown FILE` appends it as Markdown. TRL's numbers come
from its own counters (`completions/mean_length`, `num_input_tokens_seen`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parent.parent
COLOURS = ("red", "green", "blue")
QUESTION = "What colour is the square?"


def length_reward(prompts, completions, **kwargs):
    return [(len(c) % 7) / 7.0 for c in completions]


def prepare(args, work: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.tiny_vlm import make_tiny_idefics3, write_colour_images

    write_colour_images(work, size=args.image_size)
    make_tiny_idefics3(work / "model", hidden_size=args.hidden, num_layers=args.layers, image_size=args.image_size)
    n = max(args.prompts, args.batch_size) * (args.steps + args.warmup + 1)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    with open(work / "prompts.jsonl", "w") as f:
        for k in range(n):
            f.write(json.dumps({"image": str(work / f"{COLOURS[k % 3]}.png"), "prompt": [user]}) + "\n")
    with open(work / "sft.jsonl", "w") as f:
        for k in range(n):
            f.write(json.dumps({"images": [str(work / f"{COLOURS[k % 3]}.png")],
                                "messages": [user, {"role": "assistant", "content": f"The square is {COLOURS[k % 3]}."
                                                    * 4}]}) + "\n")
    return work


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device):
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def timed_steps(args, module, batches, step) -> tuple[float, float, float | None]:
    """(seconds per step, tokens/s, peak GiB) of `step(batch) -> tokens` + an AdamW step, after the warm-up."""
    import torch

    _reset_peak(args.device)
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=1e-5)
    times, tokens = [], []
    for index, batch in enumerate(batches):
        if index >= args.steps + args.warmup:
            break
        _sync(args.device)
        start = time.perf_counter()
        n = step(batch)
        optimizer.step()
        optimizer.zero_grad()
        _sync(args.device)
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(n)
    return sum(times) / len(times), sum(tokens) / sum(times), _peak(args.device)


def run_pmetal(args, work: Path) -> dict:
    import lightning as L
    import torch

    from pmetal.callbacks.rollout import make_rollout
    from pmetal.data.datamodule import SftDataModule
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.grpo import GrpoModule
    from pmetal.modules.sft import SftModule

    L.seed_everything(0)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    common = dict(model=str(work / "model"), lora_r=16, weight_dtype=dtype, gradient_checkpointing=False)
    out = {}
    grpo = GrpoModule(reward_fns=["bench_vlm:length_reward"], num_generations=args.num_generations,
                      max_completion_length=args.max_completion_length, micro_batch_size=args.prompts * args.num_generations,
                      **common).to(args.device)
    # no prompt is cut (TRL keeps a VLM's prompt whole): a 512-pixel image alone is ~1000 tokens
    data = PromptDataModule(path=str(work / "prompts.jsonl"), batch_size=args.prompts, tokenizer=grpo.tokenizer,
                            processor=grpo.processor, max_prompt_length=8192)
    data.setup()

    def grpo_step(batch):
        rollout = make_rollout(grpo, batch)
        for part in rollout.micro_batches(grpo.hparams.micro_batch_size):
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                loss, _ = grpo.micro_batch_loss(part, rollout.num_sequences, rollout.num_completion_tokens)
            loss.backward()
        return rollout.num_completion_tokens

    out["grpo"] = timed_steps(args, grpo, data.train_dataloader(), grpo_step)
    del grpo
    sft = SftModule(**common).to(args.device)
    dm = SftDataModule(path=str(work / "sft.jsonl"), batch_size=args.batch_size, val_fraction=0.0,
                       tokenizer=sft.tokenizer, processor=sft.processor, max_seq_len=8192)  # rows are not cut (TRL: max_length=None)
    dm.setup()

    def sft_step(batch):
        batch = {k: (v.to(args.device) if hasattr(v, "to") else {n: t.to(args.device) for n, t in v.items()})
                 for k, v in batch.items()}
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss, _ = sft.compute_loss(batch)
        loss.backward()
        return int(batch["attention_mask"].sum())

    out["sft"] = timed_steps(args, sft, dm._loader(dm.train_rows, shuffle=False), sft_step)
    return out


def run_trl(args, work: Path) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    class Timer(TrainerCallback):
        """Seconds of each timed step, and the input tokens seen before the first timed one."""

        def __init__(self):
            self.starts, self.times, self.tokens_before = {}, [], 0

        def on_step_begin(self, a, state, control, **kw):
            _sync(args.device)
            if state.global_step == args.warmup:
                self.tokens_before = state.num_input_tokens_seen
            self.starts[state.global_step] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            _sync(args.device)
            if state.global_step > args.warmup:
                self.times.append(time.perf_counter() - self.starts[state.global_step - 1])

    lora = LoraConfig(r=16, lora_alpha=32, target_modules=r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                      task_type="CAUSAL_LM")
    bf16 = args.device == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    processor = AutoProcessor.from_pretrained(work / "model")
    out = {}

    def load(image_column: str, file: str):
        from datasets import Image, Sequence

        ds = load_dataset("json", data_files=str(work / file), split="train")
        return ds.cast_column(image_column, Sequence(Image()) if image_column == "images" else Image())

    model = AutoModelForImageTextToText.from_pretrained(work / "model", dtype=dtype).to(args.device)
    steps = args.steps + args.warmup
    config = GRPOConfig(output_dir=str(work / "trl-grpo"), per_device_train_batch_size=args.prompts * args.num_generations,
                        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                        max_steps=steps, learning_rate=1e-5, beta=0.0, loss_type="grpo", logging_steps=1,
                        report_to=[], save_strategy="no", bf16=bf16, use_cpu=args.device == "cpu",
                        gradient_checkpointing=False, temperature=1.0, dataloader_num_workers=0)
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=config, train_dataset=load("image", "prompts.jsonl"),
                          processing_class=processor, peft_config=lora, callbacks=[timer])
    _reset_peak(args.device)
    trainer.train()
    per_step = sum(timer.times) / len(timer.times)
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history
               if "completions/mean_length" in h and h.get("step", 0) > args.warmup]
    generated = sum(lengths) * args.prompts * args.num_generations
    out["grpo"] = (per_step, generated / sum(timer.times), _peak(args.device))
    model = AutoModelForImageTextToText.from_pretrained(work / "model", dtype=dtype).to(args.device)
    config = SFTConfig(output_dir=str(work / "trl-sft"), per_device_train_batch_size=args.batch_size, max_steps=steps,
                       learning_rate=1e-5, logging_steps=1000, report_to=[], save_strategy="no", bf16=bf16,
                       use_cpu=args.device == "cpu", gradient_checkpointing=False, assistant_only_loss=False,
                       max_length=None, dataloader_num_workers=0, include_num_input_tokens_seen="non_padding")
    timer = Timer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=load("images", "sft.jsonl"),
                         processing_class=processor, peft_config=lora, callbacks=[timer])
    _reset_peak(args.device)
    trainer.train()
    per_step = sum(timer.times) / len(timer.times)
    out["sft"] = (per_step, (trainer.state.num_input_tokens_seen - timer.tokens_before) / sum(timer.times),
                  _peak(args.device))
    return out


def child(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    work = Path(args.work)
    try:
        result = run_pmetal(args, work) if args.child == "pmetal" else run_trl(args, work)
    except Exception as exc:  # reported in the table, not hidden
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--markdown", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    work = Path(tempfile.mkdtemp(prefix="bench-vlm-"))
    prepare(args, work)
    results = {}
    for name in ("pmetal", "trl"):
        argv = [sys.executable, __file__, *sys.argv[1:], "--child", name, "--work", str(work)]
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(Path(__file__).resolve().parent))
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        results[name] = json.loads(line[7:]) if line else {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]}
    rows = ["| library | GRPO s/step | GRPO generated tok/s | GRPO peak GiB | SFT s/step | SFT tok/s | SFT peak GiB | note |",
            "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | | | | | | | {r['error']} |")
            continue
        cells = [fmt(v, spec) for part in ("grpo", "sft") for v, spec in zip(r[part], (".3f", ".0f", ".2f"))]
        rows.append(f"| {name} | {' | '.join(cells)} | |")
    report("\n".join(rows) + "\n", args.markdown)


if __name__ == "__main__":
    main()
