"""Nothing lost: checkpoint fallback on resume, a real last good checkpoint on NaN, metrics.csv across a kill."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from tests.unit.test_sft_end_to_end import _fit as _fit_cli
from tests.unit.test_sft_end_to_end import write_chat_data


def _fit(tiny_model_dir, data, run, *, max_steps=4, every=2, ckpt_path=None, **module_kwargs):
    from pmetal.cli.runner import build_trainer
    from pmetal.data.datamodule import SftDataModule
    from pmetal.modules import SftModule

    module = SftModule(model=str(tiny_model_dir), **module_kwargs)
    trainer = build_trainer(run, max_steps=max_steps, max_epochs=None, checkpoint_every_n_steps=every,
                            enable_progress_bar=False)
    trainer.fit(module, datamodule=SftDataModule(path=str(data), batch_size=2, max_seq_len=64, val_fraction=0.0),
                ckpt_path=ckpt_path)
    return trainer


def _trained_run(tiny_model_dir, tmp_path, steps):
    """(data file, run folder, its checkpoints folder) after `steps` steps, checkpointing every 2."""
    data = write_chat_data(tmp_path / "chat.jsonl", rows=12)
    run = tmp_path / "run"
    _fit(tiny_model_dir, data, run, max_steps=steps, every=2)
    return data, run, run / "checkpoints"


def test_truncated_last_checkpoint_falls_back_to_the_newest_readable_one(tiny_model_dir, tmp_path, caplog):
    from pmetal.cli.runner import resolve_resume

    data, run, ckpts = _trained_run(tiny_model_dir, tmp_path, 4)
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut off, as a full disk would leave it
    with caplog.at_level(logging.INFO, logger="pmetal"):
        chosen = resolve_resume(run, "last")
    assert chosen == str(ckpts / "step-4.ckpt")
    assert f"skipped {last}: unreadable" in caplog.text
    assert f"continuing from {ckpts / 'step-4.ckpt'}" in caplog.text
    trainer = _fit(tiny_model_dir, data, run, max_steps=6, every=2, ckpt_path=chosen)
    assert trainer.global_step == 6


def test_kill_during_the_first_checkpoint_write(tiny_model_dir, tmp_path, caplog):
    """step-2.ckpt was renamed into place, the kill came while last.ckpt was being written."""
    from pmetal.cli.runner import resolve_resume

    _, run, ckpts = _trained_run(tiny_model_dir, tmp_path, 2)
    partial = ckpts / ".last.ckpt.k9x2.tmp"
    partial.write_bytes((ckpts / "last.ckpt").read_bytes()[:1000])
    (ckpts / "last.ckpt").unlink()
    with caplog.at_level(logging.INFO, logger="pmetal"):
        assert resolve_resume(run, "last") == str(ckpts / "step-2.ckpt")
    assert not partial.exists() and f"removed {partial}" in caplog.text


def test_unreadable_checkpoint_path_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    from pmetal.cli import main

    bad = tmp_path / "run" / "checkpoints" / "step-3.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    data = write_chat_data(tmp_path / "chat.jsonl", rows=4)
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--resume", str(bad),
                 "--no-progress-bar"]) == 2
    err = capsys.readouterr().err
    assert f"--resume {bad}: unreadable" in err and "Traceback" not in err
    empty = tmp_path / "empty-run"
    (empty / "checkpoints").mkdir(parents=True)
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--resume", "--output-dir",
                 str(empty), "--no-progress-bar"]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err


def test_diverging_run_keeps_only_checkpoints_with_finite_weights_and_writes_the_curve(tiny_model_dir, tmp_path):
    from pmetal.errors import NonFiniteLossError

    data = write_chat_data(tmp_path / "chat.jsonl", rows=12)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        _fit(tiny_model_dir, data, run, max_steps=6, every=1, learning_rate=1e30, lr_schedule="constant")
    message = str(info.value)
    # the weights after the first update (about 1e30) are the ones that gave the NaN: not a good checkpoint
    assert "No checkpoint with finite weights from before the divergence exists" in message
    assert "last.ckpt.diverged" in message
    assert not list((run / "checkpoints").glob("*.ckpt"))
    history = json.loads((run / "loss_history.json").read_text())["train"]
    assert [s for s, _ in history] == [1] and (run / "loss.png").stat().st_size > 1000


def test_a_checkpoint_with_non_finite_parameters_is_never_written(tiny_model_dir, tmp_path):
    from lightning.pytorch import Callback

    from pmetal.errors import NonFiniteLossError

    class CorruptAfterStep2(Callback):  # an overflow in the update, which no loss or gradient check sees
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("inf"))

    from pmetal.cli.runner import build_trainer
    from pmetal.data.datamodule import SftDataModule
    from pmetal.modules import SftModule

    data = write_chat_data(tmp_path / "chat.jsonl", rows=12)
    run = tmp_path / "run"
    trainer = build_trainer(run, max_steps=4, max_epochs=None, checkpoint_every_n_steps=1, enable_progress_bar=False,
                            callbacks=[CorruptAfterStep2()])
    with pytest.raises(NonFiniteLossError, match="is not finite at step 2, so step-2.ckpt was not written") as info:
        trainer.fit(SftModule(model=str(tiny_model_dir)),
                    datamodule=SftDataModule(path=str(data), batch_size=2, max_seq_len=64, val_fraction=0.0))
    assert f"is kept: {run / 'checkpoints' / 'last.ckpt'}" in str(info.value)
    for path in (run / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, weights_only=True)
        assert state["global_step"] == 1
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_nanguard_stops_a_manual_optimization_method_before_backward(tiny_model_dir, tmp_path):
    """GRPO steps its optimizer itself: the one check (NanGuard, at manual_backward) still stops it."""
    from pmetal.cli.runner import build_trainer
    from pmetal.data.prompts import PromptDataModule
    from pmetal.errors import NonFiniteLossError
    from pmetal.modules.grpo import GrpoModule

    class NanLoss(GrpoModule):
        def micro_batch_loss(self, *args, **kwargs):
            loss, metrics = super().micro_batch_loss(*args, **kwargs)
            return loss * float("nan"), metrics

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(2)))
    module = NanLoss(str(tiny_model_dir), reward_fns=[lambda p, c, **k: [float(len(x) % 2) for x in c]],
                     num_generations=2, max_completion_length=4, gradient_checkpointing=False)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    trainer = build_trainer(tmp_path / "run", max_steps=2, max_epochs=None, enable_progress_bar=False,
                            gradient_clip_val=None)  # GRPO clips from its own max_grad_norm
    with pytest.raises(NonFiniteLossError, match="the loss became nan at step 0"):
        trainer.fit(module, PromptDataModule(str(prompts), batch_size=2))
    for name, param in module.policy.named_parameters():
        if name in before:
            assert torch.equal(param.detach(), before[name]), name


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_manual_optimization_methods_get_a_loss_curve(tiny_model_dir, tmp_path, num_iterations):
    """GRPO with num_iterations optimizer steps a batch: every record counts optimizer steps."""
    from pmetal.cli.runner import build_trainer, fit, report_outputs
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.grpo import GrpoModule

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(4)))
    module = GrpoModule(str(tiny_model_dir), reward_fns=[lambda p, c, **k: [float(len(x) % 2) for x in c]],
                        num_generations=2, max_completion_length=4, gradient_checkpointing=False,
                        num_iterations=num_iterations)
    run = tmp_path / "run"
    trainer = build_trainer(run, max_steps=2 * num_iterations, max_epochs=None, enable_progress_bar=False,
                            gradient_clip_val=None,  # GRPO clips from its own max_grad_norm
                            checkpoint_every_n_steps=num_iterations, logger="csv")
    result = fit(trainer, module, PromptDataModule(str(prompts), batch_size=2))
    steps = [num_iterations, 2 * num_iterations]  # optimizer steps after each of the 2 rollout batches
    history = json.loads((run / "loss_history.json").read_text())["train"]
    assert [s for s, _ in history] == steps and (run / "loss.png").is_file()
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == steps  # one row per logged step, numbered as the history
    assert [v for _, v in history] == pytest.approx([float(r["train/loss"]) for r in rows])
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.ckpt")) == [f"step-{steps[-1]}.ckpt"]
    assert result["steps"] == trainer.global_step == steps[-1]


def test_a_batch_skipped_by_dynamic_sampling_leaves_the_previous_step_s_metrics_alone(tiny_model_dir, tmp_path):
    """Dynamic sampling that finds no reward spread makes no optimizer step; the records' step is
    then the previous one, whose row must keep its own reward and loss."""
    from pmetal.cli.runner import build_trainer, fit
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.grpo import GrpoModule

    calls = []

    def spread_once(prompts, completions, **kwargs):  # a spread on the first batch only
        calls.append(1)
        return [float(i % 2) for i in range(len(completions))] if len(calls) == 1 else [0.25] * len(completions)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(4)))
    module = GrpoModule(str(tiny_model_dir), reward_fns=[spread_once], num_generations=2, max_completion_length=4,
                        gradient_checkpointing=False, dynamic_sampling=True, max_sampling_rounds=1)
    run = tmp_path / "run"
    trainer = build_trainer(run, max_steps=5, max_epochs=1, enable_progress_bar=False, logger="csv", gradient_clip_val=None)
    fit(trainer, module, PromptDataModule(str(prompts), batch_size=2))
    assert trainer.global_step == 1  # the second batch had no spread: skipped
    rows = _rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1]
    assert float(rows[0]["train/reward"]) == pytest.approx(0.5)  # the first batch's, not the skipped 0.25
    assert float(rows[0]["train/skipped_steps"]) == 1.0 and float(rows[0]["train/skipped_reward"]) == 0.25


def test_the_finite_loss_check_lives_in_nanguard_only():
    import inspect

    from pmetal.modules import base, embed, grpo

    for module in (base, embed, grpo):
        assert "isfinite(loss" not in inspect.getsource(module), module.__name__


def _cli_fit(tiny_model_dir, data, root, *extra):
    """`pmetal fit` as the SFT kill test runs it, with a validation split and 4 epochs instead of 8 steps."""
    return _fit_cli(tiny_model_dir, data, root, "--data.val_fraction", "0.25", "--trainer.max_steps", "-1",
                    "--trainer.max_epochs", "4", *extra)


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_killed_run_with_validation_over_several_epochs_keeps_metrics_csv(tiny_model_dir, tmp_path):
    data = write_chat_data(tmp_path / "chat.jsonl", rows=8)  # 6 train rows: 3 steps an epoch, 12 in all
    straight = _cli_fit(tiny_model_dir, data, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _cli_fit(tiny_model_dir, data, tmp_path / "killed", "--trainer.callbacks+=killer.KillAtStep",
                      "--trainer.callbacks.step", "9")
    assert killed.returncode == -9, killed.stderr[-3000:]
    before = [int(r["step"]) for r in _rows(tmp_path / "killed" / "metrics.csv")]
    assert before and before[0] == 1  # rows up to the last checkpoint are on disk at the kill
    resumed = _cli_fit(tiny_model_dir, data, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    for run in ("straight", "killed"):
        rows = _rows(tmp_path / run / "metrics.csv")
        steps = [int(r["step"]) for r in rows]
        assert steps == list(range(1, 13)), (run, steps)  # one row per optimizer step, in order
        history = json.loads((tmp_path / run / "loss_history.json").read_text())
        assert [s for s, _ in history["train"]] == steps
        train = {int(r["step"]): float(r["train/loss"]) for r in rows}
        assert [train[s] for s, _ in history["train"]] == pytest.approx([v for _, v in history["train"]])
        val_steps = [int(r["step"]) for r in rows if r.get("val/loss")]
        assert val_steps == [s for s, _ in history["val"]] and len(val_steps) >= 3, (run, val_steps)
    a, b = _rows(tmp_path / "straight" / "metrics.csv"), _rows(tmp_path / "killed" / "metrics.csv")
    assert [float(r["train/loss"]) for r in a] == pytest.approx([float(r["train/loss"]) for r in b], abs=1e-5)
    assert [float(r["val/loss"]) for r in a if r["val/loss"]] == pytest.approx(
        [float(r["val/loss"]) for r in b if r["val/loss"]], abs=1e-5)


def test_max_steps_alone_runs_past_the_first_epoch(tiny_model_dir, tmp_path):
    """`--max-steps 8` on 3 batches an epoch trains 8 steps (as Hugging Face's Trainer), not 3;
    with neither setting a run makes one pass, and an explicit epoch count still stops it."""
    from pmetal.cli.runner import build_trainer
    from pmetal.data.datamodule import SftDataModule
    from pmetal.modules import SftModule

    data = write_chat_data(tmp_path / "chat.jsonl", rows=6)  # batches of 2: 3 steps an epoch

    def steps(run, **limits):
        trainer = build_trainer(tmp_path / run, enable_progress_bar=False, logger=False, **limits)
        trainer.fit(SftModule(model=str(tiny_model_dir)),
                    datamodule=SftDataModule(path=str(data), batch_size=2, max_seq_len=64, val_fraction=0.0))
        return trainer.global_step

    assert steps("max-steps", max_steps=8) == 8
    assert steps("default") == 3
    assert steps("both", max_steps=8, max_epochs=2) == 6
