"""Nothing silent, nothing hanging (issue 25, item 6): accumulation longer than an epoch, NaN rewards,
a one-token max_seq_len, a corrupt last.ckpt, a run killed during its first checkpoint write, and
the step count reported after a resume."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.unit.test_run_safety import _trained_run
from tests.unit.test_sft_end_to_end import write_chat_data


def _train(tiny_model_dir, data, out, *extra):
    from pmetal.cli import main

    return main(["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(out),
                 "--no-progress-bar", *extra])


def test_accumulation_longer_than_an_epoch_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys,
                                                                             monkeypatch):
    import pmetal.models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pmetal.models, "load_model_and_tokenizer", no_model)
    data = write_chat_data(tmp_path / "chat.jsonl", rows=12)  # 12 rows, batch 2: 6 batches an epoch
    assert _train(tiny_model_dir, data, tmp_path / "run", "--batch-size", "2", "--val-fraction", "0",
                  "--gradient-accumulation-steps", "100") == 2
    err = capsys.readouterr().err
    assert "--gradient-accumulation-steps 100" in err and "6 batches" in err and "Traceback" not in err


def test_accumulation_check_of_pmetal_fit(tmp_path):
    from pmetal.cli.preflight import check_fit_config
    from pmetal.errors import PmetalError

    data = write_chat_data(tmp_path / "chat.jsonl", rows=12)
    config = {"data": {"path": str(data), "batch_size": 4, "val_fraction": 0.25},
              "trainer": {"accumulate_grad_batches": 4}}  # 9 training rows: 3 batches of 4
    with pytest.raises(PmetalError, match=r"--trainer.accumulate_grad_batches 4: .*3 batches"):
        check_fit_config(config, "sft")
    check_fit_config({**config, "trainer": {"accumulate_grad_batches": 3}}, "sft")


def nan_reward(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def test_nan_rewards_are_warned_about_once_a_step_and_counted(tiny_model_dir, caplog):
    from pmetal.callbacks.rollout import make_rollout
    from pmetal.modules.grpo import GrpoModule
    from tests.unit.test_rollout import _prompt_batch, length_parity_reward

    torch.manual_seed(0)
    grpo = GrpoModule(str(tiny_model_dir), reward_fns=[nan_reward, length_parity_reward], num_generations=2,
                      max_completion_length=3, micro_batch_size=4, gradient_checkpointing=False)
    with caplog.at_level(logging.WARNING, logger="pmetal"):
        rollout = make_rollout(grpo, _prompt_batch(grpo, ["What is 2+2?", "Name a colour."]))
    assert rollout.metrics["rewards/nan_reward/nan_fraction"] == 1.0
    assert rollout.metrics["rewards/length_parity_reward/nan_fraction"] == 0.0
    assert rollout.metrics["rewards/nan_fraction"] == 0.0  # every completion has some reward
    warnings = [r for r in caplog.records if "NaN" in r.getMessage()]
    assert len(warnings) == 1 and "nan_reward" in warnings[0].getMessage()
    assert "4 of 4" in warnings[0].getMessage()

    grpo.rewards.functions, grpo.rewards.names, grpo.rewards.weights = [nan_reward], ["nan_reward"], [1.0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pmetal"):
        rollout = make_rollout(grpo, _prompt_batch(grpo, ["What is 2+2?"]))
    assert rollout.metrics["rewards/nan_fraction"] == 1.0
    assert len([r for r in caplog.records if "NaN" in r.getMessage()]) == 1


def test_max_seq_len_one_names_its_flag(tiny_model_dir, tmp_path, capsys):
    data = write_chat_data(tmp_path / "chat.jsonl", rows=4)
    assert _train(tiny_model_dir, data, tmp_path / "run", "--max-seq-len", "1") == 2
    err = capsys.readouterr().err
    assert "--max-seq-len 1: expected a number >= 2" in err


def test_corrupt_last_checkpoint_is_set_aside_and_done_counts_this_run(tiny_model_dir, tmp_path, caplog, capsys):
    """After the fallback the new state goes to last.ckpt (not last-v1.ckpt), and the closing line
    counts the steps of the resumed run only."""
    from pmetal.cli.runner import build_trainer, fit, report_outputs, resolve_resume
    from pmetal.data.datamodule import SftDataModule
    from pmetal.modules import SftModule

    data, run, ckpts = _trained_run(tiny_model_dir, tmp_path, 4)
    last = ckpts / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level(logging.INFO, logger="pmetal"):
        chosen = resolve_resume(run, "last")
    assert chosen == str(ckpts / "step-4.ckpt")
    assert not last.exists() and (ckpts / "last.ckpt.corrupt").is_file()
    assert "last.ckpt.corrupt" in caplog.text
    trainer = build_trainer(run, max_steps=6, max_epochs=None, checkpoint_every_n_steps=2, enable_progress_bar=False)
    result = fit(trainer, SftModule(model=str(tiny_model_dir)),
                 SftDataModule(path=str(data), batch_size=2, max_seq_len=64, val_fraction=0.0), ckpt_path=chosen)
    names = sorted(p.name for p in ckpts.iterdir())
    assert "last.ckpt" in names and not any("-v1" in n for n in names), names
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6
    assert result["steps"] == 2 and result["total_steps"] == 6
    capsys.readouterr()
    report_outputs(result)
    assert "done: 2 optimizer steps (6 in total, resumed at step 4)" in capsys.readouterr().out


def _killed_during_first_checkpoint(run):
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / ".last.ckpt.k9x2.tmp").write_bytes(b"PK\x03\x04 cut off")
    (run / "metrics.csv").write_text("step,train/loss\n1,3.0\n")


def test_a_run_killed_during_its_first_checkpoint_write_can_be_rerun(tiny_model_dir, tmp_path, capsys):
    from pmetal.cli import main
    from pmetal.cli.preflight import check_output_dir

    run = tmp_path / "run"
    _killed_during_first_checkpoint(run)
    data = write_chat_data(tmp_path / "chat.jsonl", rows=4)
    for extra in (["--resume"], []):  # both refusals say how to start over
        assert _train(tiny_model_dir, data, run, *extra) == 2
        err = capsys.readouterr().err
        assert "--overwrite" in err and "Traceback" not in err, err
    assert main(["fit", "--method", "sft", "--data.path", str(data), "--trainer.default_root_dir", str(run),
                 "--resume"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    check_output_dir(run, overwrite=True)  # what --overwrite does: the folder is cleared for the rerun
    assert not (run / "metrics.csv").exists() and not (run / "checkpoints").exists()
