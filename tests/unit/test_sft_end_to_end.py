"""SFT end to end on a tiny random model: learning, saving, reloading, resuming, NaN guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def write_chat_data(path: Path, rows: int = 24) -> Path:
    colours = ["red", "green", "blue", "amber", "violet", "teal"]
    with path.open("w") as f:
        for i in range(rows):
            c = colours[i % len(colours)]
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Name colour number {i}."},
                {"role": "assistant", "content": f"Colour {c}. Done."},
            ]}) + "\n")
    return path


def _base_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_train_reload_and_frozen_base(tiny_model_dir, tmp_path):
    import lightning as L
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pmetal.data.datamodule import SftDataModule
    from pmetal.modules import SftModule
    from pmetal.cli.runner import build_trainer, fit

    L.seed_everything(0)
    data = write_chat_data(tmp_path / "chat.jsonl")
    module = SftModule(model=str(tiny_model_dir), learning_rate=1e-2, lr_schedule="constant")
    lora_before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    base_before = _base_params(module.policy)
    assert lora_before and all("lora_" in n for n in lora_before)
    trainer = build_trainer(tmp_path / "run", max_steps=30, max_epochs=None, enable_progress_bar=False)
    result = fit(trainer, module, SftDataModule(path=str(data), batch_size=4, max_seq_len=64, val_fraction=0.0))

    history = json.loads((tmp_path / "run" / "loss_history.json").read_text())["train"]
    first = sum(v for _, v in history[:3]) / 3
    last = sum(v for _, v in history[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "metrics.csv").is_file()

    changed = [n for n, p in module.policy.named_parameters() if p.requires_grad and not torch.equal(p.detach(), lora_before[n])]
    assert len(changed) == len(lora_before)
    for name, value in _base_params(module.policy).items():
        assert torch.equal(value, base_before[name]), f"frozen base weight {name} changed"

    export = result["export_dir"]
    assert (export / "adapter_config.json").is_file() and (export / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), export).eval()
    ids = torch.randint(0, 1000, (2, 12))
    module.policy.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, module.policy(ids).logits, atol=1e-5)

    # the run's output is usable at once: `pmetal generate` loads base + adapter from it
    from pmetal.cli import main

    assert main(["generate", "--model", str(export), "--prompt", "Name colour number 3.", "--max-new-tokens", "4",
                 "--accelerator", "cpu"]) == 0


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(tiny_model_dir, tmp_path):
    from pmetal.data.datamodule import SftDataModule
    from pmetal.errors import NonFiniteLossError
    from pmetal.modules import SftModule
    from pmetal.cli.runner import build_trainer

    class NanAtStep3(SftModule):
        def compute_loss(self, batch):
            loss, metrics = super().compute_loss(batch)
            return (loss * float("nan") if self.global_step == 3 else loss), metrics

    data = write_chat_data(tmp_path / "chat.jsonl")
    module = NanAtStep3(model=str(tiny_model_dir))
    trainer = build_trainer(tmp_path / "run", max_steps=6, max_epochs=None, checkpoint_every_n_steps=2,
                            enable_progress_bar=False)
    with pytest.raises(NonFiniteLossError, match="at step 3") as info:
        trainer.fit(module, datamodule=SftDataModule(path=str(data), batch_size=2, max_seq_len=64, val_fraction=0.0))
    assert "last good checkpoint" in str(info.value)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and str(ckpt) in str(info.value)
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert not (tmp_path / "run" / "final").exists()


def _fit(tiny_model_dir, data, root, *extra):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests' / 'support'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "pmetal", "fit", "--method", "sft", "--model", str(tiny_model_dir),
           "--data.path", str(data), "--data.batch_size", "2", "--data.max_seq_len", "64", "--data.val_fraction", "0",
           "--model.learning_rate", "3e-3", "--trainer.max_steps", "8", "--trainer.enable_progress_bar", "false",
           "--checkpoint_every_n_steps", "2", "--seed_everything", "7", "--trainer.default_root_dir", str(root), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_killed_run_resumes_to_identical_result(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_chat_data(tmp_path / "chat.jsonl", rows=40)
    straight = _fit(tiny_model_dir, data, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _fit(tiny_model_dir, data, tmp_path / "killed", "--trainer.callbacks+=killer.KillAtStep",
                  "--trainer.callbacks.step", "5")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "killed" / "final").exists()
    resumed = _fit(tiny_model_dir, data, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    curve_a = json.loads((tmp_path / "straight" / "loss_history.json").read_text())["train"]
    curve_b = json.loads((tmp_path / "killed" / "loss_history.json").read_text())["train"]
    assert [s for s, _ in curve_a] == [s for s, _ in curve_b] == list(range(1, 9))
    assert [v for _, v in curve_a] == pytest.approx([v for _, v in curve_b], abs=1e-6)


def test_mixed_precision_step_with_gradient_clipping(tiny_model_dir, tmp_path):
    """bf16 autocast + clipping at 1.0, as on CUDA and MPS (Lightning refuses clipping with a fused optimizer)."""
    from pmetal.data.datamodule import SftDataModule
    from pmetal.modules import SftModule
    from pmetal.cli.runner import build_trainer

    data = write_chat_data(tmp_path / "chat.jsonl", rows=8)
    module = SftModule(model=str(tiny_model_dir))
    trainer = build_trainer(tmp_path / "run", precision="bf16-mixed", max_steps=2, max_epochs=None,
                            enable_progress_bar=False)
    assert trainer.gradient_clip_val == 1.0
    trainer.fit(module, datamodule=SftDataModule(path=str(data), batch_size=2, max_seq_len=64, val_fraction=0.0))
    assert trainer.global_step == 2


def test_pmetal_train_defaults_to_the_example_dataset_and_reports_outputs(tiny_model_dir, tmp_path, capsys):
    from pmetal.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--max-steps", "2", "--output-dir", str(out),
                 "--no-progress-bar"]) == 0
    printed = capsys.readouterr().out
    assert f"adapter: {out / 'final'}" in printed and f"loss plot: {out / 'loss.png'}" in printed
    assert (out / "final" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    settings = json.loads((out / "final" / "pmetal_config.json").read_text())
    assert settings["learning_rate"] == 5e-4 and settings["lora_r"] == 16 and settings["lora_alpha"] is None
