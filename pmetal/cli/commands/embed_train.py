"""Train a sentence-embedding model (InfoNCE, triplet or CoSENT loss).

With no arguments it fine-tunes all-MiniLM-L6-v2 (shipped offline) with InfoNCE on pmetal's example
pairs (made-up codes and their descriptions), evaluates retrieval on a held-out tenth before and
during training, and saves a directory that `SentenceTransformer(path)` loads as it is. The flags
build the same EmbedModule and EmbeddingDataModule as `pmetal fit --method embed`.

    pmetal embed-train --dataset pairs.jsonl --eval-dataset dev.jsonl --loss infonce
    pmetal embed-train --dataset sts.csv --loss cosent --score-range 0 5
    pmetal embed-train --model Qwen/Qwen3-0.6B --pooling lasttoken --lora
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None,
                   help="pairs, scored pairs or triplets in JSONL/JSON/Parquet/CSV (default: pmetal's example pairs)")
    d.add_argument("--eval-dataset", default=None, help="held-out file (default: a held-out fraction of --dataset)")
    d.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction without --eval-dataset")
    d.add_argument("--batch-size", type=int, default=32, help="pairs per batch (more in-batch negatives when larger)")
    d.add_argument("--max-seq-len", type=int, default=None, help="truncate texts to N tokens (default: the model's limit)")
    d.add_argument("--score-range", type=float, nargs=2, default=(0.0, 5.0), metavar=("LOW", "HIGH"),
                   help="allowed range of scores for scored pairs (default 0 5)")
    m = p.add_argument_group("model and loss")
    m.add_argument("--model", default="default",
                   help="sentence-transformers or HF directory, hub id, or 'default' (all-MiniLM-L6-v2)")
    m.add_argument("--loss", choices=["infonce", "triplet", "cosent"], default="infonce")
    m.add_argument("--pooling", choices=["cls", "mean", "lasttoken"], default=None,
                   help="default: the model's own; lasttoken for a decoder, mean for an encoder")
    m.add_argument("--no-normalize", dest="normalize", action="store_false", help="do not L2-normalize embeddings")
    m.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature (default %(default)s = scale 20)")
    m.add_argument("--margin", type=float, default=0.5, help="triplet margin (default %(default)s)")
    m.add_argument("--triplet-distance", choices=["euclidean", "cosine"], default="euclidean")
    m.add_argument("--cosent-scale", type=float, default=20.0)
    m.add_argument("--no-mask-duplicates", dest="mask_duplicates", action="store_false",
                   help="keep duplicated texts as InfoNCE negatives")
    kind = m.add_mutually_exclusive_group()
    kind.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of every weight")
    kind.add_argument("--dora", action="store_true", help="train a DoRA adapter instead of every weight")
    m.add_argument("--lora-r", type=int, default=16)
    m.add_argument("--lora-alpha", type=int, default=None, help="default 2 × rank")
    m.add_argument("--lora-dropout", type=float, default=0.0)
    m.add_argument("--target-modules", default="all-linear", help="comma-separated module names, or all-linear")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (large models)")
    m.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own code")
    o = p.add_argument_group("optimization")
    o.add_argument("--learning-rate", "--lr", type=float, default=None,
                   help="peak learning rate (default 2e-5 full, 2e-4 with --lora/--dora)")
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--lr-schedule", choices=["linear", "cosine", "constant"], default="linear")
    o.add_argument("--epochs", type=int, default=1)
    o.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs decide)")
    o.add_argument("--gradient-accumulation-steps", type=int, default=1,
                   help="note: accumulation does not add in-batch negatives; raise --batch-size for that")
    o.add_argument("--max-grad-norm", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=42)
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", default=None, help="run directory (default runs/embed-<time>)")
    r.add_argument("--resume", nargs="?", const="last", default=None,
                   help="continue a killed run: its last checkpoint in --output-dir, or a .ckpt path")
    r.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N optimizer steps")
    r.add_argument("--eval-every", type=int, default=None, help="evaluate every N optimizer steps (default: each epoch)")
    r.add_argument("--accelerator", choices=["auto", "mps", "cuda", "cpu"], default="auto")
    r.add_argument("--precision", default="auto", help="auto, 32-true, bf16-mixed, 16-mixed")
    r.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    from pmetal.cli.commands.export import ANE_HELP

    r.add_argument("--ane", action="store_true", help=ANE_HELP)


def build(args):
    """(EmbedModule, EmbeddingDataModule) from the parsed flags."""
    from pmetal.data.embedding import EmbeddingDataModule
    from pmetal.modules.embed import EmbedModule

    adapter = "lora" if args.lora else "dora" if args.dora else "full"
    learning_rate = args.learning_rate if args.learning_rate is not None else (2e-5 if adapter == "full" else 2e-4)
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    module = EmbedModule(
        model=args.model, loss=args.loss, pooling=args.pooling, normalize=args.normalize,
        temperature=args.temperature, margin=args.margin, triplet_distance=args.triplet_distance,
        cosent_scale=args.cosent_scale, mask_duplicates=args.mask_duplicates, max_seq_len=args.max_seq_len,
        adapter=adapter, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets, learning_rate=learning_rate, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
        gradient_checkpointing=args.gradient_checkpointing, trust_remote_code=args.trust_remote_code,
    )
    datamodule = EmbeddingDataModule(
        path=args.dataset, eval_path=args.eval_dataset, val_fraction=args.val_fraction, batch_size=args.batch_size,
        score_range=tuple(args.score_range), seed=args.seed,
    )
    return module, datamodule


def run(args) -> int:
    from pathlib import Path

    import lightning as L

    from pmetal.cli.commands.train import launch
    from pmetal.data.embedding import check_loss_layout

    if getattr(args, "ane", False):
        from pmetal.cli.commands.export import check_ane_export

        check_ane_export()
    L.seed_everything(args.seed, workers=True, verbose=False)
    module, datamodule = build(args)
    datamodule.setup("fit")  # read and check the data before the trainer starts
    check_loss_layout(args.loss, datamodule.kind, datamodule.path)
    result = launch(args, "embed", module, datamodule, val_check_interval=args.eval_every,
                    check_val_every_n_epoch=None if args.eval_every else 1)
    metrics = Path(result["run_dir"]) / "eval_metrics.json"
    if metrics.is_file():
        print(f"  held-out metrics: {metrics} (every evaluation in eval_metrics.jsonl)", flush=True)
    if getattr(args, "ane", False):
        from pmetal.cli.commands.export import export_for_neural_engine

        export_for_neural_engine(result, args.accelerator, "embedding")
    return 0
