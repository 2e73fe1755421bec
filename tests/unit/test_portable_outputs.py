"""Outputs that work elsewhere: adapters record where their base really is (not a path relative to
the directory the training ran in), and files get the modes the user's umask gives."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.unit.test_sft_end_to_end import ROOT, write_chat_data

TRAIN_FLAGS = ["--max-steps", "1", "--max-seq-len", "64", "--batch-size", "2", "--accelerator", "cpu",
               "--precision", "32-true", "--no-progress-bar", "--val-fraction", "0", "--logger", "csv"]


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_outputs_get_the_modes_the_umask_gives(tmp_path, mask):
    from pmetal.atomic import atomic_output, write_text_atomic

    with umask(mask):
        with atomic_output(tmp_path / "final", directory=True) as staging:
            (staging / "adapter_model.safetensors").write_bytes(b"x")
        with atomic_output(tmp_path / "model.gguf", directory=False) as staging:
            staging.write_bytes(b"x")
        write_text_atomic(tmp_path / "loss_history.json", "{}")
    assert mode(tmp_path / "final") == 0o777 & ~mask
    for name in ("final/adapter_model.safetensors", "model.gguf", "loss_history.json"):
        assert mode(tmp_path / name) == 0o666 & ~mask, name


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_trained_adapter_and_its_export_get_the_modes_the_umask_gives(tiny_model_dir, tmp_path, mask):
    from pmetal.cli import main

    data = write_chat_data(tmp_path / "chat.jsonl", rows=4)
    run, out = tmp_path / "run", tmp_path / "merged"
    with umask(mask):
        assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(run),
                     *TRAIN_FLAGS]) == 0
        assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    assert mode(run / "final") == mode(out) == 0o777 & ~mask
    for path in (run / "final" / "adapter_model.safetensors", run / "final" / "adapter_config.json",
                 out / "model.safetensors", out / "config.json", run / "checkpoints" / "last.ckpt"):
        assert mode(path) == 0o666 & ~mask, path


def test_an_adapter_trained_from_a_relative_path_loads_from_another_directory(tiny_model_dir, tmp_path, monkeypatch):
    """`pmetal train --model base` in A/, then `pmetal generate --model A/run/final` from A's parent,
    and PEFT's own loader from there too."""
    from peft import AutoPeftModelForCausalLM

    from pmetal.cli import main

    work = tmp_path / "A"
    shutil.copytree(tiny_model_dir, work / "base")
    write_chat_data(work / "chat.jsonl", rows=4)
    monkeypatch.chdir(work)
    assert main(["train", "--model", "base", "--dataset", "chat.jsonl", "--output-dir", "run", *TRAIN_FLAGS]) == 0
    final = work / "run" / "final"
    recorded = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((work / "base").resolve())
    assert json.loads((final / "pmetal_config.json").read_text())["model"] == str((work / "base").resolve())

    monkeypatch.chdir(tmp_path)
    model = AutoPeftModelForCausalLM.from_pretrained("A/run/final")
    assert type(model).__name__ == "PeftModelForCausalLM"
    done = subprocess.run([sys.executable, "-m", "pmetal", "generate", "--model", "A/run/final", "--prompt", "Hi",
                           "--max-new-tokens", "2", "--accelerator", "cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert ">>> Hi" in done.stdout


def test_an_adapter_trained_on_a_relative_gguf_records_the_absolute_file(tiny_model_dir, tmp_path, monkeypatch):
    from pmetal.cli import main
    from pmetal.cli.commands.generate import load_for_inference
    from pmetal.export import export_model

    work = tmp_path / "A"
    work.mkdir()
    export_model(str(tiny_model_dir), "gguf", work / "model.gguf", dtype="f32")
    write_chat_data(work / "chat.jsonl", rows=4)
    monkeypatch.chdir(work)
    assert main(["train", "--model", "model.gguf", "--dataset", "chat.jsonl", "--output-dir", "run",
                 *TRAIN_FLAGS]) == 0
    final = work / "run" / "final"
    gguf = str((work / "model.gguf").resolve())
    assert json.loads((final / "pmetal_config.json").read_text())["model"] == gguf
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == gguf
    monkeypatch.chdir(tmp_path)
    model, _ = load_for_inference("A/run/final")
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_a_hub_id_and_the_default_are_recorded_as_hub_ids(tmp_path):
    from pmetal.models import DEFAULT_HUB_ID, portable_base_name

    assert portable_base_name("default", None) == DEFAULT_HUB_ID
    assert portable_base_name("org/name", "org/name") == "org/name"


def test_an_embedding_adapter_from_a_relative_base_records_its_absolute_path(tiny_bert_dir, tmp_path, monkeypatch):
    from pmetal.modules.embed import EmbedModule

    shutil.copytree(tiny_bert_dir, tmp_path / "A" / "bert")
    monkeypatch.chdir(tmp_path / "A")
    out = EmbedModule(model="bert", adapter="lora").save_pretrained(tmp_path / "A" / "out")
    absolute = str((tmp_path / "A" / "bert").resolve())
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == absolute
    assert json.loads((out / "pmetal_config.json").read_text())["model"] == absolute
