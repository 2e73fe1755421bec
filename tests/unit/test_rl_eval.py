"""GRPO's held-out evaluation during training (`--eval-every`): eval/reward, per-function reward,
accuracy and pass@k on the validation prompts, through the core sampler, plotted beside the loss."""

from __future__ import annotations

import json

import lightning as L
import pytest

from pmetal.data.prompts import PromptDataModule


def one_reward(prompts, completions, **kwargs):
    return [1.0 for _ in completions]


def answer_echo_reward(prompts, completions, answer=None, **kwargs):
    """0.5 for every completion of the prompts whose answer is even, else 0: the held-out mean
    depends on which prompts were held out, so a wrong split or wrong columns would show."""
    return [0.5 if int(a) % 2 == 0 else 0.0 for a in answer]


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Say {i}.", "answer": str(i)}) for i in range(8)))
    return path


def test_held_out_prompts_are_split_off_and_never_trained_on(tiny_model_dir, prompts):
    from pmetal.models import load_tokenizer

    dm = PromptDataModule(str(prompts), batch_size=2, val_fraction=0.25, tokenizer=load_tokenizer(str(tiny_model_dir)))
    dm.setup("fit")
    train = {item["index"] for item in dm.train_items}
    held = {item["index"] for item in dm.val_items}
    assert len(held) == 2 and len(train) == 6 and not train & held
    assert sum(len(b["prompt_ids"]) for b in dm.val_dataloader()) == 2


def test_eval_every_logs_held_out_reward_accuracy_and_pass_at_k(tiny_model_dir, prompts, tmp_path):
    from pmetal.callbacks.plots import LossHistory
    from pmetal.modules.grpo import GrpoModule

    L.seed_everything(0, verbose=False)
    module = GrpoModule(str(tiny_model_dir), reward_fns=[one_reward, answer_echo_reward], num_generations=2,
                        max_completion_length=3, micro_batch_size=4, gradient_checkpointing=False)
    dm = PromptDataModule(str(prompts), batch_size=2, val_fraction=0.25)
    history = LossHistory()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=1,
                        num_sanity_val_steps=0, callbacks=[history], default_root_dir=str(tmp_path))
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    held = [int(item["prompt_ids"] is not None) and int(item["columns"]["answer"]) for item in dm.val_items]
    expected = sum(1.0 + (0.5 if a % 2 == 0 else 0.0) for a in held) / len(held)  # weights 1 + 1
    assert float(metrics["eval/reward"]) == pytest.approx(expected)
    assert float(metrics["eval/rewards/one_reward/mean"]) == pytest.approx(1.0)
    assert 0.0 <= float(metrics["eval/accuracy"]) <= float(metrics["eval/pass@2"]) <= 1.0
    assert len(history.eval_reward) == 2  # one evaluation per step
    saved = json.loads((tmp_path / "loss_history.json").read_text())
    assert [v for _, v in saved["eval_reward"]] == pytest.approx([expected, expected])
    assert (tmp_path / "loss.png").exists()
