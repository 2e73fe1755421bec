"""Supervised fine-tuning (LoRA by default; --dora, --full, --quantization nf4 for QLoRA).

With no arguments it fine-tunes the embedded SmolLM2-135M-Instruct with LoRA on the example
dataset shipped with pmetal, and says where the adapter and the loss plot went. Its flags are
derived from the signatures of SftModule, SftDataModule and build_trainer, the settings of
`pmetal fit --method sft`, under PMetal's names (pmetal/cli/flags.py).
"""

from __future__ import annotations

import argparse

from pmetal.cli.flags import CommandFlags, Shortcut, add_overwrite_argument, add_resume_argument

# 5e-4 for the short example dataset, which then teaches its persona in one epoch.
EXAMPLE_LEARNING_RATE = 5e-4

ADAPTER_SHORTCUTS = [
    Shortcut("--dora", "adapter", "dora", "weight-decomposed LoRA (DoRA): --adapter dora"),
    Shortcut("--full", "adapter", "full", "full fine-tuning instead of an adapter: --adapter full"),
]

FLAGS = CommandFlags(
    methods=("sft",),
    shortcuts=ADAPTER_SHORTCUTS,
    notes={"learning_rate": f"{EXAMPLE_LEARNING_RATE:g} on pmetal's example dataset"},
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    FLAGS.add_to(p)
    add_resume_argument(p)
    add_overwrite_argument(p)
    from pmetal.cli.commands.export import ANE_HELP

    p.add_argument("--ane", action="store_true", help=ANE_HELP)


def build(flags: CommandFlags, args, method: str | None = None, learning_rate_rule=None, *,
          checks=None, data_checks=None):
    """(settings, module, datamodule) of a command: resolve the flags, check, seed everything, build both.

    `learning_rate_rule(settings)` may give the learning rate to use when --learning-rate is not
    passed (an app-level recipe); None keeps the module's default. `checks(settings)` runs before
    anything is built (pmetal.cli.preflight), `data_checks(settings, datamodule)` after the
    DataModule is built and before the model loads.
    """
    import lightning as L

    from pmetal.cli.runner import hand_clipping_to_module

    settings = flags.resolve(args, method)
    rule = learning_rate_rule(settings) if learning_rate_rule and "learning_rate" not in settings.given else None
    if rule is not None:
        settings.model["learning_rate"] = rule
    if checks is not None:
        checks(settings)
    L.seed_everything(settings.data["seed"], workers=True, verbose=False)
    classes = flags.targets(method)
    hand_clipping_to_module(classes["model"], settings.model, settings.trainer)
    datamodule = classes["data"](**settings.data)
    if data_checks is not None:
        data_checks(settings, datamodule)
    return settings, classes["model"](**settings.model), datamodule


def run(args) -> int:
    from pmetal.cli.preflight import check_command
    from pmetal.cli.runner import launch

    if getattr(args, "ane", False):
        from pmetal.cli.commands.export import check_ane_export

        check_ane_export()  # before training: a missing coremltools is found now, not after the fit
    example = lambda settings: EXAMPLE_LEARNING_RATE if settings.data.get("path") is None else None  # noqa: E731
    checks = lambda settings: check_command(args, settings, "sft", flag_names=FLAGS.flag_names)  # noqa: E731
    settings, module, datamodule = build(FLAGS, args, learning_rate_rule=example, checks=checks)
    result = launch(args, settings, "sft", module, datamodule)
    if getattr(args, "ane", False):
        from pmetal.cli.commands.export import export_for_neural_engine

        export_for_neural_engine(result, settings.trainer.get("accelerator", "auto"))
    return 0
