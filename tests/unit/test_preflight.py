"""Bad flags, files and folders are refused up front: one line naming the flag, exit 2, no model load."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from pmetal.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads a model or tokenizer: the checks must come first."""
    import pmetal.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the up-front checks finished")

    for name in ("load_model_and_tokenizer", "load_tokenizer"):
        monkeypatch.setattr(pmetal.models, name, refuse)


def _chat(path: Path, rows: int = 4) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(rows)))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("pmetal: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("flags, expected", [
    (["--lora-r", "0"], "--lora-r 0: expected a number >= 1: the LoRA rank"),
    (["--learning-rate", "-1"], "--learning-rate -1: expected a number > 0"),
    (["--max-seq-len", "0"], "--max-seq-len 0: expected a number >= 2"),
    (["--batch-size", "0"], "--batch-size 0: expected a number >= 1"),
    (["--epochs", "0"], "--epochs 0: expected a number >= 1"),
    (["--max-steps", "0"], "--max-steps 0: expected a number >= 1"),
    (["--lora-dropout", "1.5"], "--lora-dropout 1.5: expected a number >= 0 and < 1"),
    (["--val-fraction", "1"], "--val-fraction 1: expected a number >= 0 and < 1"),
    (["--warmup-steps", "-3"], "--warmup-steps -3: expected a number >= 0"),
])
def test_out_of_range_settings_are_refused_before_the_model_loads(flags, expected, tmp_path, capsys, no_model_load):
    data = _chat(tmp_path / "chat.jsonl")
    assert main(["train", "--dataset", str(data), "--output-dir", str(tmp_path / "run"), *flags]) == 2
    assert expected in _one_error_line(capsys)


def test_rl_and_embedding_ranges(tmp_path, capsys, no_model_load):
    assert main(["grpo", "--num-generations", "1", "--output-dir", str(tmp_path / "g")]) == 2
    assert "--num-generations 1: expected a number >= 2" in _one_error_line(capsys)
    assert main(["embed-train", "--temperature", "0", "--output-dir", str(tmp_path / "e")]) == 2
    assert "--temperature 0: expected a number > 0" in _one_error_line(capsys)


def test_data_path_and_format_are_checked_first(tmp_path, capsys, no_model_load):
    assert main(["train", "--dataset", str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "r")]) == 2
    assert f"--dataset {tmp_path / 'missing.jsonl'}: no such file" in _one_error_line(capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n{not json\n')
    assert main(["train", "--dataset", str(bad), "--output-dir", str(tmp_path / "r")]) == 2
    assert f"{bad}, line 2: malformed JSON" in capsys.readouterr().err


def test_output_dir_that_cannot_be_created(tmp_path, capsys, no_model_load):
    data = _chat(tmp_path / "chat.jsonl")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["train", "--dataset", str(data), "--output-dir", str(a_file)]) == 2
    assert "exists and is a file" in _one_error_line(capsys)
    assert main(["train", "--dataset", str(data), "--output-dir", str(a_file / "run")]) == 2
    assert f"--output-dir {a_file / 'run'}: cannot be created" in _one_error_line(capsys)
    assert main(["train", "--dataset", str(data), "--output-dir", "/proc/pmetal-run"]) == 2
    assert "--output-dir /proc/pmetal-run: cannot be created" in _one_error_line(capsys)


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path, capsys, no_model_load):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.csv").write_text("step\n1\n")
    assert main(["train", "--dataset", str(_chat(tmp_path / "chat.jsonl")), "--output-dir", str(run)]) == 2
    err = _one_error_line(capsys)
    assert f"--output-dir {run} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (run / "metrics.csv").is_file()


def test_overwrite_clears_the_old_run_and_train_prints_no_library_deprecations(tiny_model_dir, tmp_path):
    import os
    import subprocess

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"an older run")
    cmd = [sys.executable, "-m", "pmetal", "train", "--model", str(tiny_model_dir), "--dataset",
           str(_chat(tmp_path / "chat.jsonl")), "--max-steps", "1", "--max-seq-len", "64", "--output-dir", str(run),
           "--overwrite", "--no-progress-bar"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (run / "checkpoints" / "last.ckpt").read_bytes().startswith(b"an older run")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert "deprecated" not in done.stderr.lower(), done.stderr


def test_reward_columns_are_checked_before_the_model_loads(tmp_path, capsys, no_model_load):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2?"}) + "\n")
    assert main(["grpo", "--dataset", str(prompts), "--reasoning-rewards", "--output-dir", str(tmp_path / "g")]) == 2
    err = _one_error_line(capsys)
    assert f"{prompts}, line 2: the accuracy reward needs the column 'answer' (or 'solution') with a value" in err


def test_hub_id_offline_fails_at_once_and_local_paths_are_not_hub_ids(tmp_path, capsys, monkeypatch, no_model_load):
    import time

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    data = str(_chat(tmp_path / "chat.jsonl"))
    start = time.time()
    assert main(["train", "--model", "someorg/not-cached", "--dataset", data, "--output-dir", str(tmp_path / "r")]) == 2
    assert time.time() - start < 5
    err = _one_error_line(capsys)
    assert "--model someorg/not-cached: not a local directory" in err and "HF_HUB_OFFLINE" in err
    for local in ("./models/mine", str(tmp_path / "models" / "mine"), "runs/a/final"):
        assert main(["train", "--model", local, "--dataset", data, "--output-dir", str(tmp_path / "r")]) == 2
        assert f"--model {local}: model not found (no such file or directory)" in _one_error_line(capsys)


def test_hub_id_offline_fails_at_load_too(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from pmetal.errors import PmetalError
    from pmetal.models import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(PmetalError, match="not in the local cache while HF_HUB_OFFLINE is set"):
        load_tokenizer("someorg/not-cached")


def test_non_utf8_data_names_line_and_byte_offset(tmp_path, capsys, no_model_load):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert main(["train", "--dataset", str(data), "--output-dir", str(tmp_path / "r")]) == 2
    err = _one_error_line(capsys)
    assert f"{data}, line 2: byte 0xe9 at byte offset 30 (byte 14 of the line) is not valid UTF-8" in err


def test_dataset_validate_names_the_non_utf8_byte(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "latin1.csv"
    data.write_bytes(b"prompt,response\nhi,there\nna\xefve,ok\n")
    assert main(["dataset", "validate", str(data), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{data}, line 3: byte 0xef at byte offset 27 (byte 3 of the line) is not valid UTF-8" in err
    assert "Traceback" not in err


def test_lightning_config_errors_point_to_the_method_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--method", "dpo", "--model.lora_r", "abc"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "pmetal fit --method dpo --help" in err and "__main__.py" not in err


def test_reward_module_shadowed_by_a_local_file_is_reported(tmp_path, monkeypatch, caplog):
    from pmetal.rewards import resolve_reward

    installed, here = tmp_path / "site", tmp_path / "project"
    for root, value in ((installed, 1.0), (here, 2.0)):
        (root / "shadowedrewards").mkdir(parents=True)
        (root / "shadowedrewards" / "__init__.py").write_text(f"def score(prompts, completions, **kw):\n"
                                                              f"    return [{value}] * len(completions)\n")
    monkeypatch.chdir(here)
    monkeypatch.setattr(sys, "path", [str(here), str(installed), *sys.path])
    monkeypatch.delitem(sys.modules, "shadowedrewards", raising=False)
    with caplog.at_level(logging.INFO, logger="pmetal"):
        fn = resolve_reward("shadowedrewards:score")
    assert fn([], ["x"]) == [2.0]
    text = caplog.text
    assert str(here / "shadowedrewards" / "__init__.py") in text and "shadows" in text
    assert str(installed / "shadowedrewards" / "__init__.py") in text


def test_pmetal_fit_checks_its_config_before_building_anything(tmp_path, capsys, no_model_load):
    data = str(_chat(tmp_path / "chat.jsonl"))
    assert main(["fit", "--method", "sft", "--data.path", data, "--model.lora_r", "0"]) == 2
    assert "--model.lora_r 0: expected a number >= 1: the LoRA rank" in capsys.readouterr().err
    assert main(["fit", "--method", "sft", "--data.path", data, "--trainer.max_steps", "0"]) == 2
    assert "--trainer.max_steps 0: expected a number >= 1" in capsys.readouterr().err
    assert main(["fit", "--method", "sft", "--data.path", str(tmp_path / "missing.jsonl")]) == 2
    assert "--data.path" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert main(["fit", "--method", "sft", "--data.path", data, "--trainer.default_root_dir", str(run)]) == 2
    assert f"--trainer.default_root_dir {run} already holds a run" in capsys.readouterr().err
