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

`--help` is answered from the signatures read from source (`pmetal.cli.signatures`), without
importing Lightning, transformers or PEFT (seconds); `--print_config` writes the YAML with each
setting's documentation as a comment, and leaves `default_root_dir` null (a new
`runs/<method>-<time>` for each run), so `fit --config` of that file runs again and again.
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


def fit_help(subcommand: str, method_name: str) -> str:
    """`pmetal fit|validate --method M --help`: the settings of the three signatures, read from source."""
    import argparse

    from pmetal.cli.flags import TRAINER, load
    from pmetal.cli.signatures import REQUIRED, signature_settings, static_settings

    method = get_method(method_name)
    parser = argparse.ArgumentParser(
        prog=f"pmetal {subcommand} --method {method_name}",
        usage="%(prog)s [--config CONFIG] [--SECTION.NAME VALUE ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{method_name}: {method.summary}. Every setting is a flag and a YAML key "
                    f"(configs/{method.config} is an example config).",
        epilog="--trainer.* also takes every other lightning.Trainer argument (fast_dev_run, limit_train_batches, "
               "...); `--print_config` writes every setting, with its documentation, as YAML.")
    run = parser.add_argument_group("run")
    run.add_argument("--method", help=f"training method: {', '.join(METHODS)} (default: sft, or a config's method:)")
    run.add_argument("-c", "--config", metavar="CONFIG", help="a YAML config (repeatable; later values win)")
    run.add_argument("--print_config", metavar="[=flags]", help="print the configuration as YAML (with each "
                     "setting's documentation as a comment) and exit; flags: comments, skip_default, skip_unset")
    run.add_argument("--seed_everything", metavar="SEED", help="seed everything with this value (default: true, "
                     "a random seed)")
    run.add_argument("--resume", metavar="[PATH]", help="continue a killed run: the newest usable checkpoint in "
                     "<default_root_dir>/checkpoints, or the .ckpt named")
    run.add_argument("--ckpt_path", metavar="PATH", help="a checkpoint to continue from (Lightning's name)")
    run.add_argument("--overwrite", action="store_true", help="clear a default_root_dir holding an earlier run")
    for section, target in (("model", method.module), ("data", method.datamodule), ("trainer", TRAINER)):
        settings = static_settings(target) or signature_settings(load(target))
        group = parser.add_argument_group(f"{section}: {target}")
        for name, setting in settings.items():
            text = setting.doc or name.replace("_", " ")
            text += " (required)" if setting.default is REQUIRED else f" (default: {setting.default})"
            group.add_argument(f"--{section}.{name}", metavar=_type_name(setting.annotation),
                               help=text.replace("%", "%%"))
    return parser.format_help()


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return (text or str(annotation)).replace("typing.", "").replace("NoneType", "None")


def run_lightning_cli(argv: list[str], *, run: bool = True):
    """Parse `pmetal fit|validate ...` and run it (or only build the objects with run=False)."""
    subcommand, rest = argv[0], argv[1:]
    method_name, rest = _pop_option(rest, "--method")
    method_name = method_name or _method_from_configs(rest) or "sft"
    if method_name not in METHODS:
        raise PmetalError(f"unknown --method {method_name!r}; available: {', '.join(METHODS)}")
    method = get_method(method_name)
    if run and ("--help" in rest or "-h" in rest):
        print(fit_help(subcommand, method_name), end="")
        return None
    # a bare --print_config documents every setting (jsonargparse's "comments", through ruamel.yaml)
    rest = ["--print_config=comments" if arg == "--print_config" else arg for arg in rest]

    from lightning.pytorch.cli import LightningCLI

    from pmetal.cli.runner import (build_trainer, default_run_dir, fit, hand_clipping_to_module, report_outputs,
                                   resolve_resume)

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
            if not self.config["trainer"].get("default_root_dir"):  # a new folder for every run of a config
                self.config["trainer"]["default_root_dir"] = str(default_run_dir(method_name))
            check_fit_config(self.config, method_name, resume=resume or self.config.get("ckpt_path"),
                             overwrite=overwrite)
            hand_clipping_to_module(method.module_class(), self.config["model"], self.config["trainer"])

    cli = PmetalCLI(
        method.module_class(),
        method.datamodule_class(),
        trainer_class=build_trainer,  # its signature (and lightning.Trainer's, through **kwargs) is --trainer.*
        args=rest,  # run=False: LightningCLI has no subcommands; we call fit/validate ourselves
        run=False,
        save_config_kwargs={"overwrite": True},
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
