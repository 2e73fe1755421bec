"""The README and the shipped examples agree with the tool (issue 25, item 7): `dataset validate`
reads every method's data, row errors come before any model loads, `fit --print_config` writes a
config a second `fit --config` runs, reward modules are found in the current directory, and every
`--help` is fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pmetal.cli import main
from pmetal.data.formats import example_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def no_model_load(monkeypatch):
    import pmetal.models

    def refuse(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the data was checked")

    for name in ("load_model_and_tokenizer", "load_tokenizer"):
        monkeypatch.setattr(pmetal.models, name, refuse)


@pytest.mark.parametrize("name,kind,count", [
    ("dpo.jsonl", "preference pairs", 150), ("grpo.jsonl", "prompts for rollouts", 256),
    ("embed.jsonl", "embedding pairs", 256), ("kto.jsonl", "unpaired feedback", 150),
])
def test_dataset_validate_detects_every_shipped_example(name, kind, count, capsys, no_model_load):
    assert main(["dataset", "validate", str(example_path(name))]) == 0
    out = capsys.readouterr().out
    assert kind in out and f"ok: {count} rows ready for training" in out


def test_dataset_validate_takes_a_method(tmp_path, capsys, no_model_load):
    assert main(["dataset", "validate", str(example_path("dpo.jsonl")), "--method", "orpo"]) == 0
    assert "preference pairs" in capsys.readouterr().out
    # the wrong method for the file is a one-line error naming the file, line and field
    assert main(["dataset", "validate", str(example_path("grpo.jsonl")), "--method", "dpo"]) == 2
    err = capsys.readouterr().err
    assert "grpo.jsonl, line 1" in err and "chosen" in err and "Traceback" not in err
    bad = tmp_path / "kto.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b", "label": True}) + "\n"
                   + json.dumps({"prompt": "c", "completion": "d", "label": "maybe"}) + "\n")
    assert main(["dataset", "validate", str(bad)]) == 2
    assert f"{bad}, line 2" in capsys.readouterr().err


def _bad_preference_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    rows[3] = {"prompt": "q3", "chosen": "good 3"}  # no rejected
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_row_errors_come_before_the_model_loads(tmp_path, capsys, no_model_load):
    data = _bad_preference_file(tmp_path)
    assert main(["fit", "--method", "dpo", "--data.path", str(data), "--trainer.default_root_dir",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{data}, line 4" in err and "rejected" in err
    chat = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    chat.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n")
    assert main(["train", "--dataset", str(chat), "--output-dir", str(tmp_path / "run2")]) == 2
    assert f"{chat}, line 2" in capsys.readouterr().err


def _run(*argv, cwd=None, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "pmetal", *argv], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_fit_help_of_every_method_is_fast():
    # fast because nothing heavy is imported (timings on a shared machine would make a flaky test)
    code = ("import sys, io, contextlib\nfrom pmetal.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    rc = main(sys.argv[1:])\n"
            "heavy = sorted(m for m in ('lightning', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules)\n"
            "print(rc, heavy, len(out.getvalue()))\nprint(out.getvalue())")
    for method in ("dpo", "sft", "grpo"):
        done = subprocess.run([sys.executable, "-c", code, "fit", "--method", method, "--help"], capture_output=True,
                              text=True, timeout=300)
        first, _, text = done.stdout.partition("\n")
        assert first.startswith("0 []"), (method, first, done.stderr[-2000:])
        assert "--model.learning_rate" in text and "--data.path" in text and "--trainer.max_steps" in text
        assert ("--model.beta" in text) == (method in ("dpo", "grpo"))


def test_reward_module_in_the_current_directory_is_found_by_the_pmetal_script(tmp_path):
    from pmetal.cli.preflight import reward_functions

    (tmp_path / "mymod_silent.py").write_text("def fn(prompts, completions, **kw):\n"
                                              "    return [1.0] * len(completions)\n")
    code = ("import os, sys; sys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]\n"
            "from pmetal.cli.preflight import reward_functions\n"
            "print(reward_functions(['mymod_silent:fn'])[0]([], ['a', 'b']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0 and "[1.0, 1.0]" in done.stdout, done.stderr[-2000:]
    assert reward_functions  # imported here too: the module is importable in-process


def test_print_config_documents_the_settings_and_the_file_runs(tiny_model_dir, tmp_path):
    import yaml

    from tests.unit.test_sft_end_to_end import write_chat_data

    data = write_chat_data(tmp_path / "chat.jsonl", rows=4)
    printed = _run("fit", "--method", "sft", "--model", str(tiny_model_dir), "--data.path", str(data),
                   "--data.batch_size", "2", "--data.max_seq_len", "64", "--data.val_fraction", "0",
                   "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false", "--print_config", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr[-2000:]
    text = printed.stdout
    assert "# the LoRA rank" in text or "# LoRA rank" in text.lower() or "lora_r" in text
    assert "# stop after this many optimizer steps (-1: the epochs decide)." in text  # build_trainer's docstring
    config = yaml.safe_load(text)
    assert config["trainer"]["default_root_dir"] is None  # no timestamped folder frozen into the file
    (tmp_path / "run.yaml").write_text(text)
    done = _run("fit", "--config", "run.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("sft-") and (runs[0] / "final").is_dir()


def test_the_readme_rlkd_example_builds(tiny_model_dir, tmp_path, monkeypatch):
    import shlex

    import pmetal.cli.runner

    line = next(l for l in (ROOT / "README.md").read_text().splitlines() if l.startswith("pmetal rlkd "))
    argv = shlex.split(line.split("#")[0])[1:]
    stand_ins = {"default": str(tiny_model_dir), "./teacher": str(tiny_model_dir),
                 "math.jsonl": str(example_path("grpo.jsonl"))}
    argv = [stand_ins.get(a, a) for a in argv] + ["--output-dir", str(tmp_path / "run")]
    built = {}
    monkeypatch.setattr(pmetal.cli.runner, "launch", lambda args, settings, method, module, dm: built.update(m=module))
    assert main(argv) == 0
    assert built["m"].rewards.names  # the example names its rewards


def test_image_rows_are_left_to_the_vision_language_renderer():
    from pmetal.data.check import check_rows

    sft = [{"images": ["a.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": "red"}]}]
    assert check_rows(sft, "sft")[1] == 1
    assert check_rows([{"image": "a.png", "prompt": "What colour?"}], "prompts")[1] == 1
