"""Supervised fine-tuning (LoRA by default; --dora, --full, --quantization nf4 for QLoRA).

With no arguments it fine-tunes the embedded SmolLM2-135M-Instruct with LoRA on the example
dataset shipped with pmetal, and says where the adapter and the loss plot went. Its flags are
derived from the signatures of SftModule, SftDataModule and build_trainer, the settings of
`pmetal fit --method sft`, under PMetal's names (pmetal/cli/flags.py).
"""

from __future__ import annotations

import argparse

from pmetal.cli.flags import CommandFlags, Shortcut, add_resume_argument

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


def build(flags: CommandFlags, args, method: str | None = None, learning_rate_rule=None):
    """(settings, module, datamodule) of a command: resolve the flags, seed everything, build both.

    `learning_rate_rule(settings)` may give the learning rate to use when --learning-rate is not
    passed (an app-level recipe); None keeps the module's default.
    """
    import lightning as L

    settings = flags.resolve(args, method)
    rule = learning_rate_rule(settings) if learning_rate_rule and "learning_rate" not in settings.given else None
    if rule is not None:
        settings.model["learning_rate"] = rule
    L.seed_everything(settings.data["seed"], workers=True, verbose=False)
    classes = flags.targets(method)
    return settings, classes["model"](**settings.model), classes["data"](**settings.data)


def run(args) -> int:
    from pmetal.cli.runner import launch

    example = lambda settings: EXAMPLE_LEARNING_RATE if settings.data.get("path") is None else None  # noqa: E731
    settings, module, datamodule = build(FLAGS, args, learning_rate_rule=example)
    launch(args, settings, "sft", module, datamodule)
    return 0
