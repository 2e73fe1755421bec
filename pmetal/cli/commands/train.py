"""Supervised fine-tuning (LoRA by default; --dora, --full, --quantization nf4 for QLoRA).

With no arguments it fine-tunes the embedded SmolLM2-135M-Instruct with LoRA on the example
dataset shipped with pmetal, and says where the adapter and the loss plot went. The flags are
PMetal's; they build the same SftModule and SftDataModule as `pmetal fit --method sft`.
"""

from __future__ import annotations

import argparse


# LoRA SFT's usual 2e-4, and 5e-4 for the short example dataset, which then teaches its persona in one
# epoch of 21 steps (about 4 minutes on a 2-core CPU; measured 2026-11-26).
DEFAULT_LEARNING_RATE, EXAMPLE_LEARNING_RATE = 2e-4, 5e-4
EXAMPLE_RECIPE_HELP = "2e-4; 5e-4 on pmetal's example dataset"


def add_model_arguments(p: argparse.ArgumentParser, *, learning_rate: float, lora_r: int = 16) -> None:
    """Model, adapter and optimizer flags shared by train, grpo and rlkd."""
    g = p.add_argument_group("model and adapter")
    g.add_argument("--model", default="default", help="HF directory, hub id, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    g.add_argument("--lora-r", type=int, default=lora_r, help="LoRA rank (default %(default)s)")
    g.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (default 2 × rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--target-modules", default="all-linear", help="comma-separated module names, or all-linear")
    kind = g.add_mutually_exclusive_group()
    kind.add_argument("--dora", action="store_true", help="weight-decomposed LoRA (DoRA)")
    kind.add_argument("--full", action="store_true", help="full fine-tuning instead of an adapter")
    g.add_argument("--quantization", choices=["nf4", "fp4", "int8"], default=None, help="quantize the frozen base (QLoRA)")
    g.add_argument("--quant-block-size", type=int, default=64)
    g.add_argument("--no-double-quant", dest="double_quant", action="store_false")
    g.add_argument("--quant-backend", choices=["auto", "pmetal", "bitsandbytes"], default="auto",
                   help="4-bit dequantization kernels: auto (bitsandbytes on CUDA when installed, else pmetal's "
                        "pure PyTorch), pmetal, or bitsandbytes; the same values either way")
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    g.add_argument("--checkpoint-layers", default="all", help="layers to checkpoint: all, every:2, 0-11")
    g.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (fastest on CUDA)")
    g.add_argument("--compile-scope", choices=["layers", "model"], default="layers",
                   help="with --compile: each decoder layer (default), or the whole decoder stack as one graph")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own code")
    o = p.add_argument_group("optimization")
    o.add_argument("--learning-rate", "--lr", type=float, default=learning_rate,
                   help=f"peak learning rate (default {learning_rate or EXAMPLE_RECIPE_HELP})")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], default="cosine")
    o.add_argument("--epochs", type=int, default=1)
    o.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs decide)")
    o.add_argument("--gradient-accumulation-steps", type=int, default=1)
    o.add_argument("--max-grad-norm", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=42)
    r = p.add_argument_group("run")
    r.add_argument("--output-dir", default=None, help="run directory (default runs/<method>-<time>)")
    r.add_argument("--resume", nargs="?", const="last", default=None,
                   help="continue a killed run: its last checkpoint in --output-dir, or a .ckpt path")
    r.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N optimizer steps")
    r.add_argument("--accelerator", choices=["auto", "mps", "cuda", "cpu"], default="auto")
    r.add_argument("--precision", default="auto", help="auto, 32-true, bf16-mixed, 16-mixed, bf16-true")
    r.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")


def module_kwargs(args) -> dict:
    """Base-module settings from the shared flags."""
    adapter = "full" if args.full else ("dora" if args.dora else "lora")
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    return dict(
        model=args.model, adapter=adapter, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, target_modules=targets, quantization=args.quantization,
        quant_block_size=args.quant_block_size, double_quant=args.double_quant, quant_backend=args.quant_backend,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule, gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_layers=args.checkpoint_layers, compile=args.compile, compile_scope=args.compile_scope,
        trust_remote_code=args.trust_remote_code,
    )


def run_dir_for(args, method: str):
    """The run directory: --output-dir, the directory of a resumed checkpoint, or a new one."""
    from pathlib import Path

    from pmetal.cli.runner import default_run_dir

    if args.output_dir:
        return Path(args.output_dir)
    if args.resume and args.resume not in ("last",) and Path(args.resume).is_file():
        return Path(args.resume).resolve().parent.parent
    if args.resume:
        from pmetal.errors import PmetalError

        raise PmetalError("--resume needs --output-dir (the run to continue) or a checkpoint path")
    return default_run_dir(method)


def launch(args, method: str, module, datamodule, extra_callbacks=None, **trainer_kwargs) -> dict:
    """Build the trainer from the shared flags, fit, and report where the outputs went."""
    from pmetal.cli.runner import build_trainer, fit, report_outputs, resolve_resume

    run_dir = run_dir_for(args, method)
    trainer = build_trainer(
        run_dir,
        accelerator=args.accelerator,
        precision=args.precision,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accumulate_grad_batches=args.gradient_accumulation_steps,
        gradient_clip_val=args.max_grad_norm if args.max_grad_norm > 0 else None,
        checkpoint_every_n_steps=args.checkpoint_every,
        extra_callbacks=extra_callbacks,
        enable_progress_bar=args.progress_bar,
        **trainer_kwargs,
    )
    ckpt = resolve_resume(run_dir, args.resume)
    result = fit(trainer, module, datamodule, ckpt_path=ckpt)
    report_outputs(result, getattr(module, "artifact_kind", "model"))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None, help="JSONL/JSON/Parquet/CSV file (default: pmetal's example dataset)")
    d.add_argument("--eval-dataset", default=None, help="validation file (default: a held-out fraction)")
    d.add_argument("--val-fraction", type=float, default=0.05)
    d.add_argument("--batch-size", type=int, default=1,
                   help="packed rows of up to --max-seq-len tokens per step (rows per step with --no-packing)")
    d.add_argument("--max-seq-len", type=int, default=1024)
    d.add_argument("--prompt-column", default=None)
    d.add_argument("--response-column", default=None)
    d.add_argument("--chat-template", default=None, help="'chatml' to use a ChatML template when the model has none")
    d.add_argument("--no-packing", dest="packing", action="store_false",
                   help="pad each batch to its longest row instead of padding-free packing")
    add_model_arguments(p, learning_rate=None)
    from pmetal.cli.commands.export import ANE_HELP

    p.add_argument("--ane", action="store_true", help=ANE_HELP)


def run(args) -> int:
    import lightning as L

    from pmetal.data.datamodule import SftDataModule
    from pmetal.modules.sft import SftModule

    if getattr(args, "ane", False):
        from pmetal.cli.commands.export import check_ane_export

        check_ane_export()
    L.seed_everything(args.seed, workers=True, verbose=False)
    if args.learning_rate is None:
        args.learning_rate = EXAMPLE_LEARNING_RATE if args.dataset is None else DEFAULT_LEARNING_RATE
    module = SftModule(**module_kwargs(args))
    datamodule = SftDataModule(
        path=args.dataset, eval_path=args.eval_dataset, val_fraction=args.val_fraction,
        batch_size=args.batch_size, max_seq_len=args.max_seq_len, prompt_column=args.prompt_column,
        response_column=args.response_column, chat_template=args.chat_template, packing=args.packing,
        seed=args.seed,
    )
    result = launch(args, "sft", module, datamodule)
    if getattr(args, "ane", False):
        from pmetal.cli.commands.export import export_for_neural_engine

        export_for_neural_engine(result, args.accelerator)
    return 0
