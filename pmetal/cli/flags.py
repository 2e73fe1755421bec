"""PMetal command flags derived from typed signatures: one source of truth for every setting.

A PMetal command (`pmetal train`, `grpo`, `rlkd`, `embed-train`) names the method(s) it runs. Its
flags are read from three signatures, the same ones `pmetal fit` reads:

- the method's LightningModule `__init__` (following `**kwargs` up to its base classes),
- its DataModule `__init__`,
- `pmetal.cli.runner.build_trainer` (the Trainer settings).

Each parameter becomes `--name-with-dashes` (or its PMetal alias from `ALIASES`), typed from its
annotation, with its docstring text as `--help` and its signature default; nothing is restated
here. A parameter the command should not offer goes into `HIDDEN` with the reason. A new typed
parameter in any of the three signatures gets a flag with no edit here.

One-line entries:
- a PMetal alias: `ALIASES["lora_r"] = "--lora-r"` (or in one command's `CommandFlags(aliases=...)`);
- an app-level flag setting a parameter to a value: `Shortcut("--dora", "adapter", "dora", "...")`;
- any other app-level flag: a plain `parser.add_argument(...)` line in the command's add_arguments.

Signatures are read from the source files (pmetal/cli/signatures.py; importing the method
only when that fails), and only for the command that runs, so `pmetal --help` and
`pmetal train --help` import neither Lightning nor transformers.
"""

from __future__ import annotations

import argparse
import importlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union

from pmetal.cli.signatures import REQUIRED, Setting, signature_settings, static_settings
from pmetal.errors import PmetalError

TRAINER = "pmetal.cli.runner:build_trainer"

# PMetal's flag names for parameters whose flag is not simply --name-with-dashes.
ALIASES: dict[str, tuple[str, ...]] = {
    "path": ("--dataset",),
    "eval_path": ("--eval-dataset",),
    "learning_rate": ("--learning-rate", "--lr"),
    "max_epochs": ("--epochs",),
    "accumulate_grad_batches": ("--gradient-accumulation-steps",),
    "gradient_clip_val": ("--max-grad-norm",),
    "checkpoint_every_n_steps": ("--checkpoint-every",),
    "default_root_dir": ("--output-dir",),
    "enable_progress_bar": ("--progress-bar",),
    "val_check_interval": ("--val-check-interval", "--eval-every"),
    "reward_fns": ("--reward-fn",),
    "reward_weights": ("--reward-weight",),
}

# The online methods' settings by topic: a PMetal command lists these flags under these headings
# in --help, whichever class declares them (GRPO, DAPO, RLOO, RLKD and the methods built on
# GrpoModule share one set of rollout settings; the sampler receives them as pmetal.rl's RolloutSettings;
# the sampling ones are declared once in modules/sampling.py, which GKD shares too).
GROUPS: dict[str, tuple[str, ...]] = {
    "rollout: sampling": ("num_generations", "max_completion_length", "temperature", "top_p", "top_k", "min_p"),
    "rollout: engine": ("speculative", "draft_model", "num_draft_tokens", "compile_rollouts", "async_rewards",
                        "rollout_chunks"),
    "rollout: rewards": ("reward_fns", "reward_weights", "reasoning_rewards", "reward_model", "overlong_punishment",
                         "overlong_buffer"),
    "rollout: advantages and group filtering": ("advantage_estimator", "scale_rewards", "dynamic_sampling",
                                                "max_sampling_rounds"),
    "update: policy loss": ("num_iterations", "micro_batch_size", "beta", "epsilon", "epsilon_high", "loss_type",
                            "importance_sampling_level", "tis_cap", "top_entropy_quantile"),
}
GROUP_OF = {name: title for title, names in GROUPS.items() for name in names}

# Parameters a PMetal command does not offer, and why (pmetal fit still takes them).
HIDDEN: dict[str, str] = {
    "tokenizer": "a Python object: the DataModule takes the LightningModule's tokenizer",
    "processor": "a Python object: the DataModule takes the LightningModule's VLM processor",
    "callbacks": "Python objects: the command builds pmetal's callbacks",
    "plugins": "Python objects: the command adds pmetal's atomic checkpoint writer",
    "use_distributed_sampler": "pmetal's batch samplers shard batches by rank themselves; Lightning must not wrap them",
    "max_grad_norm": "set by --gradient-clip-val (--max-grad-norm): the command hands the Trainer's clip value to a "
                     "module that steps its own optimizer (runner.hand_clipping_to_module)",
}


@dataclass(frozen=True)
class Shortcut:
    """An app-level flag that sets one parameter to one value (`--dora` -> adapter="dora")."""

    flag: str
    param: str
    value: Any
    help: str


def load(target: str):
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


# ---------------------------------------------------------------------------------- types -> argparse
def _members(annotation) -> tuple[list, bool]:
    """(the union's members without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = typing.get_args(annotation)
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], annotation is None


def _scalar(annotation) -> Callable[[str], Any] | None:
    if annotation is bool:
        return None
    if annotation in (int, float, str):
        return annotation
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)

        def choice(text: str):
            for c in choices:
                if str(c) == text:
                    return c
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(map(str, choices))})")

        choice.choices = choices  # type: ignore[attr-defined]
        return choice
    return None


def _specificity(annotation) -> int:
    """Literal choices first, then int, float, str: "8" is 8 for `int | str`, "auto" stays a str."""
    return 0 if typing.get_origin(annotation) is Literal else {int: 1, float: 2}.get(annotation, 3)


def _first_of(converters: list[Callable[[str], Any]]) -> Callable[[str], Any]:
    if len(converters) == 1:
        return converters[0]

    def convert(text: str):
        for one in converters[:-1]:
            try:
                return one(text)
            except (ValueError, argparse.ArgumentTypeError):
                continue
        return converters[-1](text)

    convert.__name__ = " or ".join(getattr(c, "__name__", "value") for c in converters)
    convert.choices = None  # type: ignore[attr-defined]
    return convert


def argparse_kwargs(setting: Setting) -> dict[str, Any] | None:
    """How argparse reads the value of one setting; None when the type has no command-line form."""
    members, nullable = _members(setting.annotation)
    scalars = [m for m in members if _scalar(m) is not None]
    lists = [m for m in members if typing.get_origin(m) is list and _scalar(typing.get_args(m)[0]) is not None]
    tuples = [m for m in members if typing.get_origin(m) is tuple]
    kwargs: dict[str, Any]
    if members == [bool]:
        return {"action": argparse.BooleanOptionalAction}
    if lists and not scalars:  # list[X]: the flag is repeated, one value each time
        convert = _scalar(typing.get_args(lists[0])[0])
        kwargs = {"action": "append", "type": convert}
        return _with_metavar(kwargs, convert)
    elif tuples and not scalars and all(_scalar(a) for a in typing.get_args(tuples[0])):
        parts = typing.get_args(tuples[0])
        return {"nargs": len(parts), "type": _scalar(parts[0])}
    elif scalars:
        first = _first_of([_scalar(m) for m in sorted(scalars, key=_specificity)])
        if lists:  # X | list[X]: a comma-separated list; the default's own string stays a string

            def convert(text: str, _one=first, _keep=setting.default):
                return text if text == _keep else [_one(t) for t in text.split(",")]

            convert.choices = getattr(first, "choices", None)  # type: ignore[attr-defined]
        else:
            convert = first
    else:
        return None
    if bool in members:  # `bool | str`: true/false are the booleans, any other text goes to the string
        text_only = convert

        def convert(text: str, _text=text_only):
            return text.lower() == "true" if text.lower() in ("true", "false") else _text(text)

        convert.__name__ = getattr(text_only, "__name__", "value")
        convert.choices = getattr(text_only, "choices", None)  # type: ignore[attr-defined]
    if nullable:
        inner = convert

        def convert(text: str, _inner=inner):
            return None if text.lower() in ("none", "null") else _inner(text)

        convert.__name__ = getattr(inner, "__name__", "value")
        convert.choices = getattr(inner, "choices", None)  # type: ignore[attr-defined]
    return _with_metavar({"type": convert}, convert)


def _with_metavar(kwargs: dict, convert) -> dict:
    choices = getattr(convert, "choices", None)
    if choices:
        kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
    return kwargs


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


# ---------------------------------------------------------------------------------- a command's flags
@dataclass
class Resolved:
    """The keyword arguments of a command's three targets after parsing, and what the user gave."""

    model: dict[str, Any]
    data: dict[str, Any]
    trainer: dict[str, Any]
    given: set[str]


@dataclass
class CommandFlags:
    """The flags of a PMetal command, derived from its method(s)' signatures and build_trainer's.

    `methods[0]` is the method the command runs by default; the others (e.g. GRPO's `--dapo`)
    share its flags and only change defaults, which the help notes.
    """

    methods: tuple[str, ...]
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hidden: dict[str, str] = field(default_factory=dict)
    shortcuts: list[Shortcut] = field(default_factory=list)
    required: tuple[str, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)  # param -> extra help text (an app-level rule)

    # -------------------------------------------------------------- signatures
    def targets(self, method: str | None = None) -> dict[str, Any]:
        from pmetal.cli.methods import get_method

        m = get_method(method or self.methods[0])
        return {"model": m.module_class(), "data": m.datamodule_class(), "trainer": load(TRAINER)}

    def settings(self, method: str | None = None) -> dict[str, dict[str, Setting]]:
        """The three signatures, read from source (no import) where possible, else imported."""
        from pmetal.cli.methods import get_method

        m = get_method(method or self.methods[0])
        sections = {"model": m.module, "data": m.datamodule, "trainer": TRAINER}
        return {section: static_settings(t) or signature_settings(load(t)) for section, t in sections.items()}

    def hidden_reason(self, name: str) -> str | None:
        return self.hidden.get(name) or HIDDEN.get(name)

    def flag_names(self, name: str) -> tuple[str, ...]:
        return self.aliases.get(name) or ALIASES.get(name) or ("--" + name.replace("_", "-"),)

    # -------------------------------------------------------------- parser
    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add one flag per shown parameter, grouped by the class or function that declares it."""
        sections = self.settings()
        others = {m: self.settings(m) for m in self.methods[1:]}
        variant_only: dict[str, list[str]] = {}  # a variant's own parameters get flags too
        for method, variant in others.items():
            for section, settings in variant.items():
                for name, setting in settings.items():
                    if name not in sections[section]:
                        sections[section][name] = setting
                        variant_only.setdefault(name, []).append(method)
        seen: set[str] = set()
        groups: dict[str, Any] = {}
        rollouts = "num_generations" in sections["model"]  # an online method: its settings by topic (GROUPS)
        for section, settings in sections.items():
            for name, setting in settings.items():
                if name in seen or self.hidden_reason(name):
                    continue
                read = argparse_kwargs(setting)
                if read is None:
                    continue  # no command-line form: tests/unit/test_cli_flags.py asks for a HIDDEN entry
                seen.add(name)
                title = (rollouts and GROUP_OF.get(name)) or f"{section}: {setting.owner}"
                if title in GROUPS and title not in groups:  # the topics in their order (empty ones are not shown)
                    groups.update({t: parser.add_argument_group(t) for t in GROUPS if t not in groups})
                group = groups.get(title) or groups.setdefault(title, parser.add_argument_group(title))
                shortcuts = [s for s in self.shortcuts if s.param == name]
                target = group.add_mutually_exclusive_group() if shortcuts else group
                names = self.flag_names(name)
                if "metavar" not in read and read.get("action") is not argparse.BooleanOptionalAction:
                    read["metavar"] = names[0].lstrip("-").replace("-", "_").upper()
                target.add_argument(*names, dest=name, default=argparse.SUPPRESS,
                                    required=name in self.required,
                                    help=self._help(setting, others, section, repeated=read.get("action") == "append",
                                                    only=variant_only.get(name)),
                                    **read)
                for s in shortcuts:
                    target.add_argument(s.flag, dest=name, action="store_const", const=s.value,
                                        default=argparse.SUPPRESS, help=s.help)

    def _help(self, setting: Setting, others: dict, section: str, repeated: bool = False,
              only: list[str] | None = None) -> str:
        text = setting.doc or setting.name.replace("_", " ")
        if only:
            text = f"[{', '.join(only)} only] {text}"
        if repeated:
            text += " Repeat the flag for each value."
        if setting.name in self.required:
            text += " (required)"
        elif setting.default is not REQUIRED:
            text += f" (default {_show(setting.default)}"
            for method, sections in others.items():
                other = sections[section].get(setting.name)
                if other is not None and other.default != setting.default:
                    text += f"; {method}: {_show(other.default)}"
            text += ")"
        if setting.name in self.notes:
            text += f"; {self.notes[setting.name]}"
        return text.replace("%", "%%")

    # -------------------------------------------------------------- values
    def resolve(self, args: argparse.Namespace, method: str | None = None) -> Resolved:
        """Keyword arguments for the method's module, datamodule and build_trainer.

        Every shown parameter gets the user's value or the default of the class that will be built
        (so `--dapo` gets DapoModule's own defaults); hidden parameters are left to their defaults.
        """
        values = vars(args)
        chosen = method or self.methods[0]
        out: dict[str, dict[str, Any]] = {}
        applies = {name for settings in self.settings(chosen).values() for name in settings}
        for other in self.methods:
            for settings in self.settings(other).values():
                stray = sorted(n for n in settings if n in values and n not in applies and not self.hidden_reason(n))
                if stray:
                    raise PmetalError(f"{self.flag_names(stray[0])[0]} applies to {other}, not {chosen}")
        for section, settings in self.settings(method).items():
            out[section] = {
                name: values[name] if name in values else s.default
                for name, s in settings.items()
                if not self.hidden_reason(name) and (name in values or s.default is not REQUIRED)
            }
        given = {name for s in out.values() for name in s if name in values}
        return Resolved(out["model"], out["data"], out["trainer"], given)


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="clear --output-dir first when it holds an earlier run (without it pmetal refuses)")


def add_resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", nargs="?", const="last", default=None,
                        help="continue a killed run: its last checkpoint in --output-dir, or a .ckpt path")


def add_function_flags(parser: argparse.ArgumentParser, target: str,
                       aliases: dict[str, tuple[str, ...]] | None = None) -> dict[str, Setting]:
    """One flag per parameter of the function "package.module:name" (a command that runs one core
    function, like `pmetal eval`), typed, documented and defaulted from its signature as above.
    Values the user gave land in the namespace under the parameter's name; the others are left out,
    so calling the function with `function_values(args, settings)` keeps its own defaults."""
    settings = static_settings(target) or signature_settings(load(target))
    for name, setting in settings.items():
        read = argparse_kwargs(setting)
        if read is None:
            continue
        names = (aliases or {}).get(name) or ALIASES.get(name) or ("--" + name.replace("_", "-"),)
        if "metavar" not in read and read.get("action") is not argparse.BooleanOptionalAction:
            read["metavar"] = names[0].lstrip("-").replace("-", "_").upper()
        text = setting.doc or name.replace("_", " ")
        text += " Repeat the flag for each value." if read.get("action") == "append" else ""
        text += f" (default {_show(setting.default)})" if setting.default is not REQUIRED else " (required)"
        parser.add_argument(*names, dest=name, default=argparse.SUPPRESS, required=setting.default is REQUIRED,
                            help=text.replace("%", "%%"), **read)
    return settings


def function_values(args: argparse.Namespace, settings: dict[str, Setting]) -> dict[str, Any]:
    """The values the user gave for `add_function_flags`' parameters."""
    return {name: value for name, value in vars(args).items() if name in settings}
