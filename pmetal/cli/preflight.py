"""Checks every command runs at the start of `run()`, before a model or tokenizer loads.

A wrong flag should cost the user a second, not a model load: the numeric settings against a
table of valid ranges (applied to whatever settings the command parsed, by name), the data files
(they exist, their format reads, the columns the rewards need are there), the output folder
(it can be created; no other run holds its lock; it holds no earlier run unless `--resume` or
`--overwrite`) and the model
name (a missing local path, or a hub id that cannot be fetched offline). Each failure is a
`PmetalError` with one line naming the flag and value and what was expected; the CLI prints it
and exits 2.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from pmetal.errors import PmetalError

log = logging.getLogger("pmetal")


@dataclass(frozen=True)
class Range:
    """Valid values of a numeric setting: low/high bounds (open or closed) and allowed specials."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    special: tuple = ()  # values allowed outside the range (-1 = "no limit")
    meaning: str = ""

    def contains(self, value: float) -> bool:
        if value in self.special:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = "a number " + " and ".join(parts) if parts else "a finite number"
        if self.special:
            text += " (or " + ", ".join(str(s) for s in self.special) + ")"
        return text + (f": {self.meaning}" if self.meaning else "")


def _at_least(low: float, meaning: str = "", **kw: Any) -> Range:
    return Range(low=low, meaning=meaning, **kw)


def _positive(meaning: str = "") -> Range:
    return Range(low=0, low_open=True, meaning=meaning)


def _fraction(meaning: str = "", *, high_open: bool = False) -> Range:
    return Range(low=0, high=1, high_open=high_open, meaning=meaning)


# Keyed by setting name: the argparse dest of a PMetal flag or the module/datamodule argument;
# both spellings are listed where they differ, so the table holds for either layout of the CLI.
RANGES: dict[str, Range] = {
    "lora_r": _at_least(1, "the LoRA rank"),
    "lora_alpha": _positive("the LoRA alpha"),
    "lora_dropout": _fraction("a dropout probability", high_open=True),
    "quant_block_size": _at_least(1, "values per quantization block"),
    "learning_rate": _positive("the peak learning rate"),
    "weight_decay": _at_least(0),
    "warmup_steps": _at_least(0),
    "min_lr_ratio": _fraction("a fraction of the peak learning rate"),
    "epochs": _at_least(1, "training epochs (0 would train nothing)"),
    "max_epochs": _at_least(1, "training epochs", special=(-1,)),
    "max_steps": _at_least(1, "optimizer steps (0 would train nothing); -1 lets the epochs decide", special=(-1,)),
    "gradient_accumulation_steps": _at_least(1),
    "accumulate_grad_batches": _at_least(1),
    "max_grad_norm": _at_least(0, "0 turns clipping off"),
    "seed": Range(low=0, high=2**32 - 1),
    "checkpoint_every": _at_least(1, "optimizer steps between checkpoints"),
    "checkpoint_every_n_steps": _at_least(1, "optimizer steps between checkpoints"),
    "val_fraction": _fraction("the held-out share of the rows", high_open=True),
    "batch_size": _at_least(1, "rows per batch"),
    "max_seq_len": _at_least(2, "tokens per row (a row of one token has no next token to learn)"),
    "max_length": _at_least(1, "tokens per row"),
    "max_prompt_length": _at_least(1, "prompt tokens"),
    "max_completion_length": _at_least(1, "new tokens per completion"),
    "max_new_tokens": _at_least(1, "tokens to generate"),
    "num_generations": _at_least(2, "completions per prompt; a group of 1 has no relative advantage"),
    "num_iterations": _at_least(1),
    "micro_batch_size": _at_least(1),
    "top_p": Range(low=0, high=1, low_open=True),
    "top_k": _at_least(0, "0 turns top-k off"),
    "min_p": _fraction(high_open=True),
    "beta": _at_least(0),
    "epsilon": _at_least(0),
    "epsilon_high": _at_least(0),
    "max_sampling_rounds": _at_least(1),
    "overlong_buffer": _at_least(0),
    "alpha": _fraction("the distillation weight"),
    "final_alpha": _fraction("the distillation weight"),
    "teacher_temperature": _positive(),
    "distill_beta": _fraction("0 forward KL, 1 reverse KL"),
    "temperature": _at_least(0, "0 samples greedily"),
    "margin": _at_least(0),
    "cosent_scale": _positive(),
    "eval_every": _at_least(1, "optimizer steps between evaluations"),
    "n": _at_least(0),
}
# An embedding loss divides by its temperature: 0 is no "greedy" there.
EMBED_RANGES = {**RANGES, "temperature": _positive("the InfoNCE temperature")}
# Settings whose flag is not `--` + the name with dashes.
FLAG_NAMES = {"learning_rate": "--learning-rate", "double_quant": "--no-double-quant", "dataset": "--dataset"}


def flag_name(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _settings(args: Any) -> dict[str, Any]:
    return dict(args) if isinstance(args, Mapping) else dict(vars(args))


def check_ranges(args: Any, ranges: Mapping[str, Range] = RANGES, *, prefix: str | None = None,
                 flag_of: Any = None) -> None:
    """Every parsed numeric setting named in `ranges` lies in its range (None means "default").

    The flag in a message is `flag_of(name)` (a command's PMetal flag, `--lora-r`), or
    `prefix + name` (`--model.lora_r`) for LightningCLI.
    """
    for name, value in _settings(args).items():
        rule = ranges.get(name)
        if rule is None or value is None or isinstance(value, bool):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if isinstance(item, (int, float)) and not rule.contains(item):
                flag = prefix + name if prefix is not None else (flag_of or flag_name)(name)
                raise PmetalError(f"{flag} {item:g}: expected {rule.describe()}")


def check_data_path(path: str | None, flag: str | None = "--dataset"):
    """The data file exists (or is a hub dataset id) and its format reads, before any model loads.

    `flag` names the option in the message; None for a positional file (the error names the path).
    Returns the rows read (None for no path or a hub dataset id).
    """
    if path is None:
        return None
    from pmetal.data.formats import EXTENSIONS, load_rows
    from pmetal.errors import DataError

    p = Path(path).expanduser()
    if not p.exists():
        if looks_like_local_path(path) or p.suffix.lower() in EXTENSIONS:
            where = f"{flag} {path}" if flag else str(path)
            raise PmetalError(f"{where}: no such file or directory; expected an existing data file "
                              f"({', '.join(EXTENSIONS)}), a directory of them, or a hub dataset id org/name")
        return None  # a hub dataset id: read (or refused) by the data module
    try:
        return load_rows(p)
    except DataError as exc:
        if flag is None:
            raise
        raise PmetalError(f"{flag}: {exc}") from None


def looks_like_local_path(name: str) -> bool:
    """A name no hub id can be: absolute, relative with ./ or ../, ~, a backslash, or deeper than org/name."""
    text = str(name)
    return text.startswith(("/", "./", "../", "~", ".\\")) or "\\" in text or text.count("/") > 1


def check_output_dir(run_dir: str | Path, *, resume: Any = None, overwrite: bool = False,
                     flag: str = "--output-dir") -> None:
    """The run folder can be created, no other run is writing into it, and it holds no earlier run
    unless resuming or overwriting.

    The folder's lock (`pmetal.runlock`) is taken first and held until the process ends, so a second
    run into it is refused before anything is written or cleared. `--overwrite` clears the folder
    (all but the lock), so nothing of the old run (a `last.ckpt` that a later `--resume` would pick,
    rows in metrics.csv) mixes with the new one.
    """
    from pmetal.runlock import LOCK_FILE, hold_run_lock

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise PmetalError(f"{flag} {run_dir}: exists and is a file; expected a directory (or a new path)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PmetalError(f"{flag} {run_dir}: cannot be created ({exc.strerror or exc}); "
                          "expected a writable location") from None
    try:
        hold_run_lock(run_dir, flag)
    except OSError as exc:
        raise PmetalError(f"{flag} {run_dir}: not writable ({exc.strerror or exc})") from None
    holds_run = any((run_dir / name).exists() for name in ("checkpoints", "metrics.csv", "final", "loss_history.json"))
    if holds_run and not resume:
        if not overwrite:
            raise PmetalError(f"{flag} {run_dir} already holds a run; pass --resume to continue it, "
                              f"--overwrite to replace it, or choose a new {flag}")
        log.info("--overwrite: clearing %s", run_dir)
        for entry in run_dir.iterdir():
            if entry.name != LOCK_FILE:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    probe = run_dir / ".pmetal-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PmetalError(f"{flag} {run_dir}: not writable ({exc.strerror or exc})") from None


def check_training_rows(rows: Any, kind: str, data: Mapping[str, Any], flag: str) -> None:
    """Every row of a training file converts to the `kind` of example its method trains on.

    The DataModule's own converters run here (without a tokenizer), so a bad row is reported
    before any model loads. `rows` as `load_rows` returns them; None (a hub dataset) is left to
    the DataModule.
    """
    if rows is None:
        return
    from pmetal.data.check import check_rows
    from pmetal.errors import DataError

    options = {k: data.get(k) for k in ("prompt_column", "response_column", "system_prompt") if data.get(k)}
    if kind == "embedding" and "score_range" in data:
        options["score_range"] = data["score_range"]
    if kind in ("preference", "kto"):
        options["raw"] = data.get("chat_template") is False
    try:
        check_rows(rows, kind, path=rows.locate(0)[0] if rows else None, **options)
    except DataError as exc:
        raise PmetalError(f"{flag}: {exc}") from None


def check_epoch_batches(rows: Any, data: Mapping[str, Any], accumulate: Any, flag: str) -> None:
    """Gradient accumulation no longer than an epoch.

    Lightning steps the optimizer after `accumulate` batches or at the last batch of an epoch,
    and divides every batch's loss by `accumulate`. With more batches to accumulate than an epoch
    holds, each epoch is one optimizer step on a gradient scaled down by batches/accumulate: the
    run computes a whole epoch (minutes on a CPU, without a step to show) for one tiny update.
    """
    if rows is None or not isinstance(accumulate, int) or accumulate <= 1:
        return
    from pmetal.data.base import held_out_split

    val_fraction = 0.0 if data.get("eval_path") else float(data.get("val_fraction") or 0.0)
    train_rows = len(held_out_split(range(len(rows)), val_fraction, int(data.get("seed") or 0))[0])
    batch_size = int(data.get("batch_size") or 1)
    batches = math.ceil(train_rows / batch_size)
    if accumulate > batches:
        raise PmetalError(
            f"{flag} {accumulate}: larger than the {batches} batches of an epoch ({train_rows} training rows, "
            f"batch size {batch_size}); each epoch would be one optimizer step on a gradient scaled by "
            f"{batches}/{accumulate}; expected at most {batches} (or more rows, or a smaller batch size)")


def check_model_name(name: str | None, flag: str = "--model") -> None:
    """A local-looking path exists; a hub id can be fetched (or is cached) before anything loads it."""
    if name is None:
        return
    from pmetal.models import DEFAULT_MODEL_NAMES, check_hub_model

    text = str(name)
    if text in DEFAULT_MODEL_NAMES:
        return
    path = Path(text).expanduser()
    if path.exists():
        return
    if looks_like_local_path(text) or text.endswith(".gguf"):
        raise PmetalError(f"{flag} {text}: model not found (no such file or directory); expected a local model "
                          "directory, a .gguf file, a hub id (org/name) or 'default'")
    if text.count("/") == 1:
        check_hub_model(text, flag=flag)


def check_reward_columns(rows: Any, functions: Iterable[Any]) -> None:
    """Every row has a value for the columns each reward function reads (e.g. accuracy's answer).

    `rows` as `load_rows` returns them; None (a hub dataset) is left to the data module.
    """
    from pmetal.rewards import required_columns, reward_name

    needs = [(reward_name(fn), cols) for fn in functions if (cols := required_columns(fn))]
    for name, columns in needs if rows is not None else []:
        for i, row in enumerate(rows):
            if not any(row.get(c) is not None and str(row.get(c)).strip() for c in columns):
                file, number, line = rows.locate(i)
                wanted = f"'{columns[0]}'" + (f" (or {', '.join(repr(c) for c in columns[1:])})" if columns[1:] else "")
                raise PmetalError(f"--dataset {file}, {'line' if line else 'row'} {number}: the {name} reward "
                                  f"needs the column {wanted} with a value; add it or choose other rewards")


def check_command(args: Any, settings: Any, method: str, *, flag_names: Any = None,
                  data_paths: Mapping[str, str | None] | None = None,
                  models: Mapping[str, str | None] | None = None, rewards: Iterable[Any] = (),
                  ranges: Mapping[str, Range] = RANGES) -> Path:
    """A PMetal command's up-front checks on its resolved settings, in the order a user fixes them.

    `settings` is `CommandFlags.resolve`'s result (model, data and trainer keyword arguments);
    `flag_names(name)` gives a setting's PMetal flags for the messages. `data_paths` maps a flag to
    the file it names (default: the data settings `path` and `eval_path`). The run folder checked
    is written back as `settings.trainer["default_root_dir"]`, so the launch uses that folder.
    """
    from pmetal.cli.runner import run_dir_for

    from pmetal.cli.methods import get_method

    name_of = (lambda name: flag_names(name)[0]) if flag_names else flag_name
    resume = getattr(args, "resume", None)
    check_ranges({**settings.model, **settings.data, **settings.trainer}, ranges, flag_of=name_of)
    if data_paths is None:
        data_paths = {name_of(key): settings.data.get(key) for key in ("path", "eval_path") if key in settings.data}
    rows = {flag: check_data_path(path, flag) for flag, path in data_paths.items()}
    kind = get_method(method).data_kind
    for flag, file_rows in rows.items():
        check_training_rows(file_rows, kind, settings.data, flag)
    check_epoch_batches(_training_rows(rows, settings.data, kind), settings.data,
                        settings.trainer.get("accumulate_grad_batches"), name_of("accumulate_grad_batches"))
    for flag, name in (models if models is not None else {"--model": settings.model.get("model")}).items():
        check_model_name(name, flag)
    run_dir = run_dir_for(settings.trainer.get("default_root_dir"), resume, method)
    check_output_dir(run_dir, resume=resume, overwrite=bool(getattr(args, "overwrite", False)))
    check_reward_columns(next(iter(rows.values()), None), rewards)
    settings.trainer["default_root_dir"] = str(run_dir)
    return run_dir


def _training_rows(rows: Mapping[str, Any], data: Mapping[str, Any], kind: str) -> Any:
    """The rows of the training file (the first checked), or of the shipped example when none is given."""
    if data.get("path") is None:
        from pmetal.data.check import KINDS
        from pmetal.data.formats import example_path, load_rows

        return load_rows(example_path(KINDS[kind].example))
    return next(iter(rows.values()), None)


def reward_functions(specs: Iterable[str], reasoning: bool = False) -> list:
    """The reward functions `--reasoning-rewards`/`--reward-fn` name (imported now, so a bad path fails now)."""
    from pmetal.rewards import BUILTIN_REWARDS, REASONING_REWARDS, resolve_reward

    functions = [BUILTIN_REWARDS[name]() for name, _ in REASONING_REWARDS] if reasoning else []
    return functions + [resolve_reward(spec) for spec in specs]


def check_fit_config(config: Any, method: str, *, resume: Any = None, overwrite: bool = False) -> None:
    """`pmetal fit`'s up-front checks on LightningCLI's parsed config, before its classes are built."""
    sections = {name: _settings(config.get(name) or {}) for name in ("model", "data", "trainer")}
    ranges = EMBED_RANGES if method == "embed" else RANGES
    for name, settings in sections.items():
        check_ranges(settings, ranges, prefix=f"--{name}.")
    check_ranges({"checkpoint_every_n_steps": config.get("checkpoint_every_n_steps")}, prefix="--")
    from pmetal.cli.methods import get_method

    kind = get_method(method).data_kind
    rows = {}
    for key in ("path", "eval_path"):
        rows[f"--data.{key}"] = check_data_path(sections["data"].get(key), f"--data.{key}")
        check_training_rows(rows[f"--data.{key}"], kind, sections["data"], f"--data.{key}")
    check_epoch_batches(_training_rows({"--data.path": rows["--data.path"]}, sections["data"], kind), sections["data"],
                        sections["trainer"].get("accumulate_grad_batches"), "--trainer.accumulate_grad_batches")
    if method != "embed":
        check_model_name(sections["model"].get("model"))
    root = sections["trainer"].get("default_root_dir")
    if root:
        check_output_dir(root, resume=resume, overwrite=overwrite, flag="--trainer.default_root_dir")
