"""Train a sentence-embedding model (InfoNCE, triplet or CoSENT loss).

With no arguments it fine-tunes all-MiniLM-L6-v2 (shipped offline) with InfoNCE on pmetal's example
pairs (made-up codes and their descriptions), evaluates retrieval on a held-out tenth before and
during training, and saves a directory that `SentenceTransformer(path)` loads as it is. The flags
are derived from EmbedModule, EmbeddingDataModule and build_trainer, the settings of
`pmetal fit --method embed`.

    pmetal embed-train --dataset pairs.jsonl --eval-dataset dev.jsonl --loss infonce
    pmetal embed-train --dataset sts.csv --loss cosent --score-range 0 5
    pmetal embed-train --model Qwen/Qwen3-0.6B --pooling lasttoken --lora
"""

from __future__ import annotations

import argparse

from pmetal.cli.flags import CommandFlags, Shortcut, add_overwrite_argument, add_resume_argument

ADAPTER_LEARNING_RATE = 2e-4  # LoRA/DoRA's usual rate; full fine-tuning keeps the module's default

FLAGS = CommandFlags(
    methods=("embed",),
    aliases={"val_check_interval": ("--eval-every",)},
    shortcuts=[
        Shortcut("--lora", "adapter", "lora", "train a LoRA adapter instead of every weight: --adapter lora"),
        Shortcut("--dora", "adapter", "dora", "train a DoRA adapter instead of every weight: --adapter dora"),
    ],
    notes={"learning_rate": f"{ADAPTER_LEARNING_RATE:g} with a LoRA/DoRA adapter",
           "accumulate_grad_batches": "accumulation does not add in-batch negatives; raise --batch-size for that"},
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    FLAGS.add_to(p)
    add_resume_argument(p)
    add_overwrite_argument(p)
    from pmetal.cli.commands.export import ANE_HELP

    p.add_argument("--ane", action="store_true", help=ANE_HELP)


def run(args) -> int:
    from pathlib import Path

    from pmetal.cli.commands.train import build
    from pmetal.cli.preflight import EMBED_RANGES, check_command
    from pmetal.cli.runner import launch
    from pmetal.data.embedding import check_informative_batches, check_loss_layout
    from pmetal.embedding import DEFAULT_EMBEDDING_MODEL_NAMES

    def checks(settings) -> None:
        model = settings.model.get("model")
        check_command(args, settings, "embed", flag_names=FLAGS.flag_names, ranges=EMBED_RANGES,
                      models={"--model": None if model in DEFAULT_EMBEDDING_MODEL_NAMES else model})

    if getattr(args, "ane", False):
        from pmetal.cli.commands.export import check_ane_export

        check_ane_export()  # before training: a missing coremltools is found now, not after the fit

    def data_checks(settings, datamodule) -> None:
        datamodule.setup("fit")  # read and check the data before the model loads
        check_loss_layout(settings.model["loss"], datamodule.kind, datamodule.path)
        check_informative_batches(settings.model["loss"], datamodule)

    adapter_rate = lambda s: ADAPTER_LEARNING_RATE if s.model.get("adapter") != "full" else None  # noqa: E731
    settings, module, datamodule = build(FLAGS, args, learning_rate_rule=adapter_rate, checks=checks,
                                         data_checks=data_checks)
    result = launch(args, settings, "embed", module, datamodule)
    metrics = Path(result["run_dir"]) / "eval_metrics.json"
    if metrics.is_file():
        print(f"  held-out metrics: {metrics} (every evaluation in eval_metrics.jsonl)", flush=True)
    if getattr(args, "ane", False):
        from pmetal.cli.commands.export import export_for_neural_engine

        export_for_neural_engine(result, settings.trainer.get("accelerator", "auto"), "embedding")
    return 0
