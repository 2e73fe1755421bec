"""`pmetal fit` / `pmetal validate`: LightningCLI over the method table.

`--method NAME` (or a top-level `method:` key in a `--config` YAML) picks the LightningModule and
DataModule classes; every `__init__` argument of both becomes a flag (`--model.lora_r 8`,
`--data.path train.jsonl`) and a YAML key, with its docstring as help. `--model M` with a plain
value names the model to fine-tune (a directory, hub id, .gguf or "default"), as PMetal and TRL
users expect; it is rewritten to `--model.model M`. `--trainer.*` are the parameters of
`pmetal.cli.runner.build_trainer` (pmetal's Trainer defaults; every other `lightning.Trainer`
argument passes through). `--resume` continues from the newest usable checkpoint in
`<default_root_dir>/checkpoints`; `--ckpt_path PATH` (Lightning's name) from the checkpoint named.
`--overwrite` clears a `default_root_dir` that holds an earlier run (without it or `--resume`, such
a folder is refused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pmetal.errors import PmetalError
from pmetal.cli.methods import METHODS, get_method

_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _pop_option(argv: list[str], name: str) -> tuple[str | None, list[str]]:
    out, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == name:
            if i + 1 >= len(argv):
                raise PmetalError(f"{name} needs a value")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(name + "="):
            value, i = arg.split("=", 1)[1], i + 1
            continue
        out.append(arg)
        i += 1
    return value, out


def _pop_resume(argv: list[str]) -> tuple[str | None, list[str]]:
    """`--resume` alone means the run directory's last checkpoint; `--resume PATH` names one."""
    out, resume, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--resume":
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                resume, i = argv[i + 1], i + 2
            else:
                resume, i = "last", i + 1
            continue
        if argv[i].startswith("--resume="):
            resume = argv[i].split("=", 1)[1] or "last"
        else:
            out.append(argv[i])
        i += 1
    return resume, out


def _method_from_configs(argv: list[str]) -> str | None:
    import yaml

    method = None
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else (arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path and Path(path).is_file():
            data = yaml.safe_load(Path(path).read_text()) or {}
            if isinstance(data, dict) and data.get("method"):
                method = str(data["method"])
    return method


def rewrite_model_flag(argv: list[str]) -> list[str]:
    """`--model M` (a model name, not a config) -> `--model.model M`."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg == "--model" and i + 1 < len(argv):
            value, step = argv[i + 1], 2
        elif arg.startswith("--model="):
            value, step = arg.split("=", 1)[1], 1
        if value is not None and not value.startswith("{") and not value.endswith(_CONFIG_SUFFIXES):
            out += ["--model.model", value]
            i += step
            continue
        out.append(arg)
        i += 1
    return out


def run_lightning_cli(argv: list[str], *, run: bool = True):
    """Parse `pmetal fit|validate ...` and run it (or only build the objects with run=False)."""
    from lightning.pytorch.cli import LightningCLI

    from pmetal.cli.runner import build_trainer, default_run_dir, fit, report_outputs, resolve_resume

    subcommand, rest = argv[0], argv[1:]
    method_name, rest = _pop_option(rest, "--method")
    method_name = method_name or _method_from_configs(rest) or "sft"
    if method_name not in METHODS:
        raise PmetalError(f"unknown --method {method_name!r}; available: {', '.join(METHODS)}")
    method = get_method(method_name)
    resume, rest = _pop_resume(rest)
    overwrite = "--overwrite" in rest
    rest = [arg for arg in rest if arg != "--overwrite"]
    rest = rewrite_model_flag(rest)

    class PmetalCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--method", default=method_name, help=f"training method: {', '.join(METHODS)}")
            parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                                help="a checkpoint to continue from (Lightning's name; `--resume` alone takes the "
                                     "run directory's last one)")
            parser.add_argument("--checkpoint_every_n_steps", type=Optional[int], default=None,
                                help="older configs' place of trainer.checkpoint_every_n_steps (used when set)")

        def before_instantiate_classes(self) -> None:
            from pmetal.cli.preflight import check_fit_config

            legacy = self.config.get("checkpoint_every_n_steps")
            if legacy is not None:
                self.config["trainer"]["checkpoint_every_n_steps"] = legacy
            check_fit_config(self.config, method_name, resume=resume or self.config.get("ckpt_path"),
                             overwrite=overwrite)

    cli = PmetalCLI(
        method.module_class(),
        method.datamodule_class(),
        trainer_class=build_trainer,  # its signature (and lightning.Trainer's, through **kwargs) is --trainer.*
        args=rest,  # run=False: LightningCLI has no subcommands; we call fit/validate ourselves
        run=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"default_root_dir": str(default_run_dir(method_name))},
        # a config error's "tip: run ... --help" names the command that shows this method's settings
        parser_kwargs={"prog": f"pmetal {subcommand} --method {method_name}"},
        auto_configure_optimizers=False,
    )
    if not run:
        return cli
    ckpt_path = cli.config.get("ckpt_path")
    if ckpt_path and resume:
        raise PmetalError("pass --resume or --ckpt_path, not both")
    ckpt = resolve_resume(cli.trainer.default_root_dir, ckpt_path or resume)
    if subcommand == "fit":
        result = fit(cli.trainer, cli.model, cli.datamodule, ckpt_path=ckpt)
        report_outputs(result, getattr(cli.model, "artifact_kind", "model"))
    else:
        cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    return cli
