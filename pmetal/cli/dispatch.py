"""The `pmetal` command.

    pmetal train [--model M --dataset D ...]       LoRA/DoRA/QLoRA/full SFT with PMetal's flags
    pmetal grpo | rloo | online-dpo | rlkd | distill | embed-train ...  the other PMetal commands
    pmetal fit --method dpo --model M --data.path D [--config configs/dpo.yaml] [--print_config]
    pmetal dataset validate|preview FILE           what pmetal would see in a data file
    pmetal export MODEL_OR_ADAPTER --format coreml|gguf|hf --out PATH
    pmetal chat --model RUN_OR_MODEL               interactive chat (generate: one-shot)
    pmetal serve --model RUN_OR_MODEL              an OpenAI-compatible HTTP server

`fit`/`validate` are LightningCLI: `--method` picks the LightningModule class from the method
table and `--model M` names the model to fine-tune (it becomes `--model.model M`). Heavy libraries
are imported only by the command that runs, so `pmetal --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pmetal.cli.methods import METHODS
from pmetal.errors import PmetalError

# command name -> module with add_arguments(parser) and run(args) -> int
COMMANDS = {
    "train": "pmetal.cli.commands.train",
    "grpo": "pmetal.cli.commands.grpo",
    "rlkd": "pmetal.cli.commands.rlkd",
    "rloo": "pmetal.cli.commands.rloo",
    "online-dpo": "pmetal.cli.commands.online_dpo",
    "distill": "pmetal.cli.commands.distill",
    "reward-train": "pmetal.cli.commands.reward_train",
    "embed-train": "pmetal.cli.commands.embed_train",
    "dataset": "pmetal.cli.commands.dataset",
    "merge": "pmetal.cli.commands.merge",
    "eval": "pmetal.cli.commands.eval",
    "bench": "pmetal.cli.commands.bench",
    "generate": "pmetal.cli.commands.generate",
    "export": "pmetal.cli.commands.export",
    "chat": "pmetal.cli.commands.chat",
    "serve": "pmetal.cli.commands.serve",
}
LIGHTNING_COMMANDS = ("fit", "validate")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(format="%(message)s", level=logging.INFO if not verbose else logging.DEBUG)
    logging.getLogger("pmetal").setLevel(logging.INFO)
    # the signal connector logs "Received SIGTERM" twice: pmetal says what it did in one line instead
    for noisy in ("bitsandbytes", "httpx", "urllib3", "lightning.pytorch.utilities.rank_zero",
                  "lightning.pytorch.trainer.connectors.signal_connector"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    silence_library_deprecations()


# Deprecations raised inside the libraries by their own calls (peft reads transformers'
# `is_gradient_checkpointing`; Lightning's pytree helper builds torch's `LeafSpec`): nothing a pmetal
# user can act on, so the first screen they see is pmetal's own.
LIBRARY_DEPRECATIONS = (
    r"`is_gradient_checkpointing` is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def silence_library_deprecations() -> None:
    import warnings

    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")


def configure_cuda_allocator() -> None:
    """Use PyTorch's expandable segments on Linux unless the allocator is configured already.

    The default caching allocator keeps a block whole when little of it would be left over and
    keeps a segment while any block in it lives. Loading a model quantizes it layer by layer, so
    short-lived full-precision weights and long-lived packed ones alternate, which leaves unsplit
    blocks and extra reserved segments with the default allocator (measured for QLoRA in
    benchmarks/RESULTS.md, "Quantization"). Expandable segments split any block. It must be set
    before CUDA's first allocation; set any of ALLOCATOR_VARIABLES (even to "") to
    keep your own setting.
    """
    if sys.platform == "linux" and not any(name in os.environ for name in ALLOCATOR_VARIABLES):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `pmetal` parser; only `command`'s flags are added (deriving them imports its method)."""
    parser = argparse.ArgumentParser(
        prog="pmetal",
        description="Fine-tune language and embedding models on Apple Silicon, CUDA and CPU.",
        epilog="`pmetal fit --method METHOD --help` shows every setting of a method "
        f"(methods: {', '.join(METHODS)}).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("fit", help="train any method through LightningCLI (--method, --config, --print_config)", add_help=False)
    sub.add_parser("validate", help="validate a method's model on its data through LightningCLI", add_help=False)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # a command whose optional part is not installed
        doc = (module.__doc__ or "").strip().splitlines()
        p = sub.add_parser(name, help=doc[0] if doc else name, description=(module.__doc__ or "").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


ROLLOUT_FLAGS = ("--speculative", "--draft-model", "--num-draft-tokens", "--async-rewards", "--rollout-chunks")
ROLLOUT_COMMANDS = ("grpo", "rloo", "rlkd", "online-dpo")


def _refuse_rollout_flags_without_rollouts(argv: list[str]) -> None:
    """Rollout-engine flags on a command that samples no rollouts: say so, not just "unrecognized"."""
    if not argv or argv[0] in ROLLOUT_COMMANDS or argv[0].startswith("-"):
        return
    used = [a.split("=")[0] for a in argv[1:] if a.split("=")[0] in ROLLOUT_FLAGS]
    if used:
        raise PmetalError(f"{used[0]} applies to commands that sample rollouts ({', '.join(ROLLOUT_COMMANDS)}); "
                          f"'pmetal {argv[0]}' samples none")


def main(argv: list[str] | None = None) -> int:
    from pmetal.cli.interrupts import message, sigterm_raises
    from pmetal.errors import Interrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    configure_cuda_allocator()
    try:
        with sigterm_raises():  # as Ctrl+C does: cleanups (temporary outputs) run, then one line below
            return _run(argv)
    except PmetalError as exc:
        print(f"pmetal: error: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        import signal

        exc = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
        print(message(exc, argv), file=sys.stderr, flush=True)
        return exc.exit_code


def _run(argv: list[str]) -> int:
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from pmetal.cli.lightning import run_lightning_cli

        run_lightning_cli(argv)
        return 0
    _refuse_rollout_flags_without_rollouts(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if not argv else 2
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
