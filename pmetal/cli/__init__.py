"""The application layer: the `pmetal` command, the PMetal commands, LightningCLI and the Trainer.

It sits on top of everything: it may import the methods (`pmetal.modules`), the callbacks
(`pmetal.callbacks`) and the core; nothing below imports it (tests/unit/test_layers.py).
"""

from pmetal.cli.dispatch import build_parser, main

__all__ = ["build_parser", "main"]
