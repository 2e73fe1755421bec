"""One source of truth: every setting of every method reaches its PMetal command and `pmetal fit`.

The PMetal commands derive their flags from the module, datamodule and build_trainer signatures
(pmetal/cli/flags.py); `pmetal fit` reads the same signatures through LightningCLI. Here every
`__init__` argument of every module and datamodule in the method table, and every build_trainer
parameter, must be a flag of its PMetal command (or be hidden there, with the reason) and a key
of `pmetal fit --print_config`, with the same default in both.
"""

import argparse
import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from pmetal.cli.dispatch import COMMANDS
from pmetal.cli.flags import REQUIRED, CommandFlags, signature_settings
from pmetal.cli.lightning import run_lightning_cli
from pmetal.cli.methods import METHODS, Method
from pmetal.modules.sft import SftModule

DERIVED = {name: importlib.import_module(module) for name, module in COMMANDS.items()
           if isinstance(getattr(importlib.import_module(module), "FLAGS", None), CommandFlags)}
COMMAND_OF = {method: name for name, module in DERIVED.items() for method in module.FLAGS.methods}
# the values a command needs to parse at all (its required flags)
REQUIRED_ARGS = {"rlkd": ["--teacher-model", "teacher-dir"], "distill": ["--teacher-model", "teacher-dir"]}
# fit names a new run directory runs/<method>-<time>; a PMetal command does the same from --output-dir=None
NOT_COMPARED = {"default_root_dir"}


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    DERIVED[command].add_arguments(parser)
    return parser


def _printed_config(method: str, capsys) -> dict:
    with pytest.raises(SystemExit):
        run_lightning_cli(["fit", "--method", method, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_the_derived_commands_cover_the_language_and_embedding_methods():
    assert set(DERIVED) == {"train", "grpo", "rloo", "online-dpo", "rlkd", "distill", "reward-train", "embed-train"}
    assert COMMAND_OF == {"sft": "train", "grpo": "grpo", "dapo": "grpo", "agent": "grpo", "rloo": "rloo", "rlkd": "rlkd",
                          "online_dpo": "online-dpo", "xpo": "online-dpo", "distill": "distill",
                          "reward": "reward-train",
                          "embed": "embed-train"}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_setting_is_reachable_with_equal_defaults(method, capsys):
    printed = _printed_config(method, capsys)
    command = COMMAND_OF.get(method)
    flags = DERIVED[command].FLAGS if command else None
    resolved = None
    if command:
        parser = _parser(command)
        dests = {action.dest for action in parser._actions}
        args = parser.parse_args(REQUIRED_ARGS.get(command, []) + (["--dapo"] if method == "dapo" else []))
        resolved = flags.resolve(args, method)
    m = METHODS[method]
    targets = {"model": m.module_class(), "data": m.datamodule_class(),
               "trainer": importlib.import_module("pmetal.cli.runner").build_trainer}
    for section, target in targets.items():
        for name, setting in signature_settings(target).items():
            where = f"{method}: {section}.{name}"
            assert name in printed[section], f"{where} is missing from pmetal fit"
            if name not in NOT_COMPARED and setting.default is not REQUIRED:
                assert printed[section][name] == _plain(setting.default), f"{where}: fit's default differs"
            if command is None:
                continue
            if flags.hidden_reason(name):
                assert len(flags.hidden_reason(name)) > 10, f"{where}: hidden without a reason"
                continue
            assert name in dests, f"{where} has no flag in `pmetal {command}` (add an alias or a HIDDEN reason)"
            if name in flags.required or name in NOT_COMPARED:
                continue
            assert _plain(getattr(resolved, section)[name]) == _plain(setting.default), f"{where}: default differs"


# Every flag the PMetal commands had before they were derived (README, tests, users' scripts).
MODEL_FLAGS = ("--model --lora-r --lora-alpha --lora-dropout --target-modules --quantization --quant-block-size "
               "--no-double-quant --quant-backend --no-gradient-checkpointing --checkpoint-layers --compile "
               "--compile-scope --trust-remote-code --learning-rate --lr --weight-decay --warmup-steps --lr-schedule "
               "--epochs --max-steps --gradient-accumulation-steps --max-grad-norm --seed --output-dir --resume "
               "--checkpoint-every --accelerator --precision --no-progress-bar --dora --full")
RL_FLAGS = ("--dataset --batch-size --max-prompt-length --prompt-column --system-prompt --chat-template "
            "--reasoning-rewards --reward-fn --reward-weight --reward-model --num-generations --max-completion-length "
            "--temperature --top-p --top-k --min-p --num-iterations --micro-batch-size --beta --epsilon --epsilon-high "
            "--loss-type --scale-rewards")
EARLIER_FLAGS = {
    "train": MODEL_FLAGS + " --dataset --eval-dataset --val-fraction --batch-size --max-seq-len --prompt-column "
                           "--response-column --chat-template --no-packing",
    "grpo": MODEL_FLAGS + " " + RL_FLAGS + " --dapo --max-sampling-rounds --overlong-buffer",
    "rlkd": MODEL_FLAGS + " " + RL_FLAGS + " --teacher-model --alpha --final-alpha --teacher-temperature "
                                           "--distill-beta --teacher-quantization",
    "embed-train": "--dataset --eval-dataset --val-fraction --batch-size --max-seq-len --score-range --model --loss "
                   "--pooling --no-normalize --temperature --margin --triplet-distance --cosent-scale "
                   "--no-mask-duplicates --lora --dora --lora-r --lora-alpha --lora-dropout --target-modules "
                   "--gradient-checkpointing --trust-remote-code --learning-rate --lr --weight-decay --warmup-steps "
                   "--lr-schedule --epochs --max-steps --gradient-accumulation-steps --max-grad-norm --seed "
                   "--output-dir --resume --checkpoint-every --eval-every --accelerator --precision --no-progress-bar",
}


@pytest.mark.parametrize("command", list(EARLIER_FLAGS))
def test_every_earlier_pmetal_flag_stays(command):
    options = set(_parser(command)._option_string_actions)
    assert not set(EARLIER_FLAGS[command].split()) - options


def test_help_shows_each_docstring_and_default_once():
    help_text = " ".join(_parser("train").format_help().split())
    doc = signature_settings(METHODS["sft"].module_class())["weight_dtype"].doc
    assert doc and doc in help_text
    for flag in ("--weight-dtype", "--attn-implementation", "--logits-chunk-size", "--min-lr-ratio", "--logger",
                 "--lora-r", "--dataset", "--epochs", "--max-grad-norm", "--checkpoint-every", "--output-dir"):
        assert flag in help_text, flag
    assert "peak learning rate of AdamW. (default 0.0002); 0.0005 on pmetal's example dataset" in help_text
    grpo_help = " ".join(_parser("grpo").format_help().split())
    assert "(default none; dapo: 0.28)" in grpo_help  # epsilon_high: DapoModule's default, read from its signature


def test_pmetal_flags_map_to_the_settings():
    parser = _parser("train")
    settings = DERIVED["train"].FLAGS.resolve(parser.parse_args([
        "--lora-r", "8", "--dataset", "d.jsonl", "--epochs", "3", "--lr", "1e-3", "--dora", "--no-packing",
        "--target-modules", "q_proj", "--max-grad-norm", "0", "--logger", "csv,tensorboard", "--weight-dtype",
        "bfloat16", "--lora-alpha", "none"]))
    assert settings.model["lora_r"] == 8 and settings.model["adapter"] == "dora"
    assert settings.model["learning_rate"] == 1e-3
    assert settings.model["target_modules"] == ["q_proj"] and settings.model["lora_alpha"] is None
    assert settings.model["weight_dtype"] == "bfloat16"
    assert settings.data["path"] == "d.jsonl" and settings.data["packing"] is False
    assert settings.trainer["max_epochs"] == 3 and settings.trainer["gradient_clip_val"] == 0.0
    assert settings.trainer["logger"] == ["csv", "tensorboard"]
    assert settings.given >= {"lora_r", "path", "max_epochs", "learning_rate", "adapter"}
    assert DERIVED["train"].FLAGS.resolve(parser.parse_args([])).model["target_modules"] == "all-linear"
    for bad in (["--dora", "--full"], ["--adapter", "lora", "--full"], ["--weight-dtype", "float64"],
                ["--logger", "mlflow"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    embed = DERIVED["embed-train"].FLAGS.resolve(_parser("embed-train").parse_args(
        ["--lora", "--score-range", "1", "4", "--eval-every", "5"]))
    assert embed.model["adapter"] == "lora" and embed.data["score_range"] == [1.0, 4.0]
    assert embed.trainer["val_check_interval"] == 5


class KnobModule(SftModule):
    """An SFT module with one more setting, as a helper adding a parameter would write it.

    Args:
        new_knob: a new setting nobody wrote a flag for.
    """

    def __init__(self, model: str = "default", new_knob: int = 3, **kwargs) -> None:
        super().__init__(model, **kwargs)


def test_a_new_typed_parameter_gets_a_flag_with_no_edit(monkeypatch):
    monkeypatch.setitem(METHODS, "knob", Method("knob", f"{__name__}:KnobModule", METHODS["sft"].datamodule,
                                                "sft.yaml", "test", "sft"))
    flags = CommandFlags(methods=("knob",))
    parser = argparse.ArgumentParser()
    flags.add_to(parser)
    assert "a new setting nobody wrote a flag for. (default 3)" in " ".join(parser.format_help().split())
    assert flags.resolve(parser.parse_args(["--new-knob", "5"])).model["new_knob"] == 5
    assert flags.resolve(parser.parse_args([])).model["lora_r"] == 16  # the base's settings come through **kwargs


def test_a_variant_method_adds_its_own_parameters(monkeypatch):
    from pmetal.errors import PmetalError

    monkeypatch.setitem(METHODS, "knob", Method("knob", f"{__name__}:KnobModule", METHODS["sft"].datamodule,
                                                "sft.yaml", "test", "sft"))
    flags = CommandFlags(methods=("sft", "knob"))  # as grpo's --dapo picks DapoModule
    parser = argparse.ArgumentParser()
    flags.add_to(parser)
    assert "[knob only] a new setting nobody wrote a flag for." in " ".join(parser.format_help().split())
    args = parser.parse_args(["--new-knob", "5"])
    assert flags.resolve(args, "knob").model["new_knob"] == 5
    with pytest.raises(PmetalError, match="--new-knob applies to knob, not sft"):
        flags.resolve(args)
    assert "new_knob" not in flags.resolve(parser.parse_args([])).model


def test_union_types_try_each_member():
    parser = _parser("train")
    assert DERIVED["train"].FLAGS.resolve(parser.parse_args(["--devices", "auto"])).trainer["devices"] == "auto"
    assert DERIVED["train"].FLAGS.resolve(parser.parse_args(["--devices", "2"])).trainer["devices"] == 2
    assert DERIVED["train"].FLAGS.resolve(parser.parse_args(["--val-check-interval", "0.5"])).trainer[
        "val_check_interval"] == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora-r", "eight"])


def test_signatures_follow_kwargs_to_the_base_and_keep_the_derived_default():
    settings = signature_settings(METHODS["dapo"].module_class())
    assert settings["loss_type"].default == "dapo" and settings["loss_type"].owner == "DapoModule"
    assert settings["num_generations"].owner == "GrpoModule" and settings["lora_r"].owner == "PmetalModule"
    assert settings["epsilon_high"].doc.startswith("clip range above")  # the docstring of the class declaring it
    sft = METHODS["sft"].module_class()
    sft_settings = signature_settings(sft)
    assert {n for n, p in inspect.signature(sft).parameters.items() if p.kind is not p.VAR_KEYWORD} <= set(sft_settings)
    assert sft_settings["kernels"].owner == "SftModule" and sft_settings["lora_r"].owner == "PmetalModule"


def _shape(setting):
    """What the command line makes of a setting: its argparse action, nargs, choices."""
    from pmetal.cli.flags import argparse_kwargs

    read = argparse_kwargs(setting)
    if read is None:
        return None
    return (str(read.get("action")), read.get("nargs"), read.get("metavar"),
            getattr(read.get("type"), "__name__", None))


@pytest.mark.parametrize("target", sorted({t for m in METHODS.values() for t in (m.module, m.datamodule)}
                                          | {"pmetal.cli.runner:build_trainer", f"{__name__}:KnobModule",
                                             "pmetal.evaluation.api:evaluate"}))
def test_the_source_reader_sees_what_the_import_sees(target):
    """`pmetal train --help` reads signatures from source; they must equal the imported ones."""
    from pmetal.cli.flags import load
    from pmetal.cli.signatures import static_settings

    static, imported = static_settings(target), signature_settings(load(target))
    assert static is not None, f"{target}: the source reader gave up (the command would import it)"
    assert list(static) == list(imported)
    for name, setting in imported.items():
        other = static[name]
        assert (other.default, other.doc, other.owner) == (setting.default, setting.doc, setting.owner), name
        assert _shape(other) == _shape(setting), name


def test_building_a_command_parser_imports_no_heavy_library():
    import subprocess
    import sys

    probe = subprocess.run(
        [sys.executable, "-c", "import sys, pmetal.cli; [pmetal.cli.build_parser(c) for c in "
         "('train', 'grpo', 'rloo', 'online-dpo', 'rlkd', 'reward-train', 'embed-train', 'eval', 'merge')]; "
         "print(sorted(m for m in ('lightning', 'peft', 'transformers', 'torch') if m in sys.modules))"],
        capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]", probe.stdout


def test_logger_names_build_loggers(tmp_path, monkeypatch):
    import importlib.util

    from lightning.pytorch.loggers import CSVLogger

    from pmetal.cli import runner
    from pmetal.errors import PmetalError

    (csv,) = runner.build_loggers("csv", tmp_path)
    assert isinstance(csv, CSVLogger) and Path(csv.log_dir) == tmp_path
    assert runner.build_loggers(False, tmp_path) is False
    installed = importlib.util.find_spec("tensorboard") is not None
    assert len(runner.build_loggers(None, tmp_path)) == (2 if installed else 1)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(PmetalError, match="logger 'wandb' needs the wandb package.*pip install wandb"):
        runner.build_loggers(["csv", "wandb"], tmp_path)


def test_fit_accepts_ckpt_path_and_trainer_settings(tiny_model_dir, tmp_path, capsys):
    from pmetal.cli import main

    assert main(["fit", "--method", "sft", "--model", str(tiny_model_dir), "--trainer.default_root_dir",
                 str(tmp_path), "--trainer.checkpoint_every_n_steps", "7", "--trainer.logger", "csv",
                 "--ckpt_path", str(tmp_path / "nope.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    cli = run_lightning_cli(["fit", "--method", "sft", "--model", str(tiny_model_dir), "--trainer.default_root_dir",
                             str(tmp_path), "--trainer.checkpoint_every_n_steps", "7", "--trainer.logger", "csv"],
                            run=False)
    (checkpoint,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ModelCheckpoint"]
    assert checkpoint._every_n_train_steps == 7
    assert [type(x).__name__ for x in cli.trainer.loggers] == ["RunCSVLogger"]  # the CSV logger that appends across --resume
    assert any(type(cb).__name__ == "SaveConfigCallback" for cb in cli.trainer.callbacks)


def test_a_bool_or_text_setting_reads_true_and_false_as_booleans():
    """`chat_template: bool | str | None`: `--chat-template false` is False (raw text), not the
    template text "false"; other text stays text and `none` is None."""
    parser = _parser("reward-train")
    flags = DERIVED["reward-train"].FLAGS
    for given, expected in (("false", False), ("TRUE", True), ("chatml", "chatml"), ("none", None)):
        resolved = flags.resolve(parser.parse_args(["--chat-template", given]), "reward")
        assert resolved.data["chat_template"] == expected, given


def test_online_methods_list_their_settings_by_topic():
    """`pmetal rlkd --help` groups the ~50 rollout/update flags by topic (flags.GROUPS), whichever class
    declares them; a method without rollouts keeps its own groups (embed-train's temperature is InfoNCE's)."""
    from pmetal.cli import build_parser
    from pmetal.cli.flags import GROUPS

    def titles(command):
        sub = next(a for a in build_parser(command)._actions if a.dest == "command").choices[command]
        return {g.title: {o for a in g._group_actions for o in a.option_strings} for g in sub._action_groups}

    rlkd = titles("rlkd")
    assert "--temperature" in rlkd["rollout: sampling"] and "--async-rewards" in rlkd["rollout: engine"]
    assert "--reward-fn" in rlkd["rollout: rewards"] and "--tis-cap" in rlkd["update: policy loss"]
    assert "--alpha" in rlkd["model: RlkdModule"]
    assert not any(title in GROUPS for title in titles("embed-train"))
