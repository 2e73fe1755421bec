"""Failures of the machine or of the input end in one line naming what, where and what was expected
(exit 2), never a library traceback: a full disk while checkpointing (the previous checkpoint kept)
or exporting, a read-only export target, a folder with a bogus config.json, out-of-range
generation settings."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from tests.unit.test_sft_end_to_end import write_chat_data


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pmetal")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_says_what_was_needed(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    from pmetal.callbacks import checkpoint
    from pmetal.cli import main

    real_save, writes = torch.save, []

    def save(obj, f):  # the first checkpoint (step-2.ckpt, last.ckpt) fits, then the disk is full mid-write
        writes.append(1)
        if len(writes) <= 2:
            return real_save(obj, f)
        f.write(b"PK\x03\x04 cut off")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", save)
    data = write_chat_data(tmp_path / "chat.jsonl", rows=12)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(run),
                 "--max-steps", "4", "--checkpoint-every", "2", "--batch-size", "2", "--max-seq-len", "64",
                 "--accelerator", "cpu", "--no-progress-bar", "--val-fraction", "0"]) == 2
    line = one_error_line(capsys)
    ckpts = run / "checkpoints"
    assert f"{ckpts}: disk full while writing step-4.ckpt at step 4" in line, line
    assert "needs about" in line and "MB" in line and f"kept: {ckpts / 'last.ckpt'}" in line, line
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-2.ckpt"]  # no temporary file left
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 2
    assert not (run / "final").exists()


@pytest.mark.parametrize("failure", ["disk full", "read-only"])
def test_export_to_a_full_disk_or_a_read_only_target_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                   failure):
    from pmetal import atomic
    from pmetal.cli import main
    from pmetal.export import api

    out = tmp_path / "exports" / "merged"
    if failure == "disk full":
        real = api.save_hf

        def full(fused, path, *args):
            real(fused, path, *args)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(api, "save_hf", full)
    else:
        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(atomic.tempfile, "mkdtemp", read_only)
        monkeypatch.setattr(atomic.Path, "mkdir", read_only)
    assert main(["export", str(tiny_model_dir), "--format", "hf", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"--out {out}" in line, line
    if failure == "disk full":
        assert "disk full" in line and "needs about" in line and "free" in line, line
        assert list(out.parent.iterdir()) == []  # the partial output went with the error
    else:
        assert "Read-only file system" in line and "expected a writable location" in line, line


@pytest.mark.parametrize("config, expected", [
    ("{not json", "config.json: not valid JSON"),
    ('["a list"]', "config.json: no 'model_type'"),
    ('{"model_type": "bogus"}', "config.json: unknown model_type 'bogus'"),
])
def test_a_folder_with_a_bogus_config_given_to_export_is_one_line(tmp_path, capsys, config, expected):
    from pmetal.cli import main

    folder = tmp_path / "bogus"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    assert main(["export", str(folder), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert f"{folder / expected}" in line and "expected a Hugging Face model" in line, line


def test_a_config_without_weights_or_tokenizer_is_one_line(tiny_model_dir, tmp_path, capsys):
    from pmetal.cli import main

    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert main(["export", str(folder), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert str(folder) in line and "expected" in line, line


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flag, value, expected", [
    ("--max-new-tokens", "0", "--max-new-tokens 0: expected a number >= 1"),
    ("--max-new-tokens", "-5", "--max-new-tokens -5: expected a number >= 1"),
    ("--temperature", "-1", "--temperature -1: expected a number >= 0"),
])
def test_generation_settings_out_of_range_are_refused_before_loading(command, flag, value, expected, capsys,
                                                                     monkeypatch):
    from pmetal.cli import main
    from pmetal.cli.commands import generate

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the settings were checked")

    monkeypatch.setattr(generate, "load_for_inference", no_loading)
    argv = [command, "--model", "default", flag, value] + (["--prompt", "Hi"] if command == "generate" else [])
    assert main(argv) == 2
    assert expected in one_error_line(capsys)


def test_the_generation_ranges_live_in_the_preflight_table():
    from pmetal.cli.preflight import RANGES

    assert not RANGES["max_new_tokens"].contains(0) and RANGES["max_new_tokens"].contains(1)
    assert json.dumps(RANGES["temperature"].describe())
