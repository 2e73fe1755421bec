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
from pathlib import Path
from typing import Any, Iterable, Mapping

from pmetal.errors import PmetalError
from pmetal.ranges import EMBED_RANGES, RANGES, Range  # noqa: F401 (the table lives in the core)

log = logging.getLogger("pmetal")


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
