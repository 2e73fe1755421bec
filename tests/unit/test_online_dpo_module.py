"""OnlineDpoModule / XpoModule: pairs from the rollout, the loss against a direct computation, the CLI."""

from __future__ import annotations


import pytest
import torch

from pmetal.callbacks.rollout import make_rollout
from pmetal.data.prompts import PromptDataModule, collate_prompts
from pmetal.errors import PmetalError
from tests.unit.test_grpo_module import _trainer, char_parity_reward, prompt_file  # noqa: F401 (prompt_file: a fixture)


def length_reward(prompts, completions, **kwargs):  # rarely ties: distinct lengths rank
    return [float(len(c)) for c in completions]


def _prompts(module, texts):
    from pmetal.data.render import render_prompt

    return collate_prompts([{"prompt_ids": render_prompt(module.tokenizer, [{"role": "user", "content": t}]),
                             "prompt": t, "columns": {}, "index": i} for i, t in enumerate(texts)])


def test_settings_are_checked_before_the_model_loads():
    from pmetal.modules.online_dpo import OnlineDpoModule, XpoModule

    for kwargs, match in ((dict(num_generations=4), "num_generations does not apply"),
                          (dict(epsilon=0.3), "epsilon does not apply"),
                          (dict(micro_batch_size=3), "must be even"),
                          (dict(beta=0.0), "beta"),
                          (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing")):
        with pytest.raises(PmetalError, match=match):
            OnlineDpoModule("/nonexistent", reward_fns=[char_parity_reward], **kwargs)
    with pytest.raises(PmetalError, match="dynamic_sampling"):
        XpoModule("/nonexistent", reward_fns=[char_parity_reward], dynamic_sampling=True)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_micro_batch_losses_sum_to_the_dpo_loss_of_the_kept_pairs(tiny_model_dir, loss_type):
    """The update's micro-batch losses add up to dpo_loss over the untied pairs, computed directly."""
    from pmetal.losses.preference import dpo_loss
    from pmetal.modules.online_dpo import OnlineDpoModule
    from tests.tiny import randomize_lora_b

    torch.manual_seed(0)
    module = OnlineDpoModule(str(tiny_model_dir), reward_fns=[length_reward], max_completion_length=6,
                             micro_batch_size=2, loss_type=loss_type, gradient_checkpointing=False)
    randomize_lora_b(module)  # policy != reference
    rollout = make_rollout(module, _prompts(module, ["Hi", "Count to 3", "Name a colour", "Go"]))
    rollout.rewards[2:4] = 0.5  # the second prompt's pair ties: dropped
    pairs, metrics = module.pair_rollout(rollout)
    assert metrics["pairs/ties"] == 1.0 and pairs.num_sequences == 6
    pairs.ref_logps = module._reference_token_logps(pairs)
    module.policy.train()
    total = sum(module.micro_batch_loss(part, pairs.num_sequences, pairs.num_completion_tokens)[0]
                for part in pairs.micro_batches(2))

    with torch.no_grad():
        mask = pairs.completion_mask
        out = module.completion_logps(pairs.input_ids, pairs.attention_mask, pairs.labels, return_token_logps=True)
        ref = module.reference_logps(pairs.input_ids, pairs.attention_mask, pairs.labels, return_token_logps=True)
    sums, ref_sums = (out.token_logps * mask).sum(1), (ref.token_logps * mask).sum(1)
    if loss_type == "ipo":
        sums, ref_sums = sums / mask.sum(1), ref_sums / mask.sum(1)
    r = pairs.rewards.view(-1, 2)
    first_chosen = r[:, 0] > r[:, 1]
    rows = torch.arange(0, 6, 2)
    chosen = torch.where(first_chosen, rows, rows + 1)
    rejected = torch.where(first_chosen, rows + 1, rows)
    expected, _, _ = dpo_loss(sums[chosen], sums[rejected], ref_sums[chosen], ref_sums[rejected], beta=0.1,
                              loss_type=loss_type)
    torch.testing.assert_close(total.detach(), expected.mean(), rtol=1e-4, atol=1e-5)


def test_online_dpo_trains_and_logs_trl_names(tiny_model_dir, prompt_file):
    from pmetal.modules.online_dpo import OnlineDpoModule

    torch.manual_seed(0)
    module = OnlineDpoModule(str(tiny_model_dir), reward_fns=[length_reward], max_completion_length=6,
                             micro_batch_size=4, learning_rate=1e-2, gradient_checkpointing=False,
                             max_grad_norm=1.0)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer = _trainer(2)
    trainer.fit(module, PromptDataModule(str(prompt_file), batch_size=2))
    assert trainer.global_step == 2
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters() if p.requires_grad)
    for key in ("train/loss", "train/reward", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
                "train/rewards/accuracies", "train/logps/chosen", "train/logps/rejected", "train/objective/kl",
                "train/objective/entropy", "train/objective/scores", "train/objective/scores_margin",
                "train/val/contain_eos_token", "train/pairs/ties", "train/beta"):
        assert key in trainer.callback_metrics, key


def test_all_tied_pairs_skip_the_step(tiny_model_dir, prompt_file):
    from pmetal.modules.online_dpo import OnlineDpoModule

    module = OnlineDpoModule(str(tiny_model_dir), reward_fns=["tests.unit.test_online_dpo_module:constant"],
                             max_completion_length=4, micro_batch_size=2, gradient_checkpointing=False)
    trainer = _trainer(1, max_epochs=1, limit_train_batches=1)
    trainer.fit(module, PromptDataModule(str(prompt_file), batch_size=2))
    assert trainer.global_step == 0
    assert trainer.callback_metrics["train/skipped_steps"] == 1.0


def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def test_xpo_pairs_a_policy_and_a_reference_completion(tiny_model_dir, prompt_file):
    """XPO's rollout interleaves the policy's and the reference's samples; its loss adds alpha log pi(reference's)."""
    from pmetal.callbacks.reference_pairs import ReferencePairRollout
    from pmetal.modules.online_dpo import XpoModule
    from tests.tiny import randomize_lora_b

    torch.manual_seed(0)
    module = XpoModule(str(tiny_model_dir), reward_fns=[length_reward], max_completion_length=6, micro_batch_size=4,
                       alpha=0.5, learning_rate=1e-2, gradient_checkpointing=False)
    randomize_lora_b(module, scale=0.5)
    batch = _prompts(module, ["Hi", "Count to 3"])
    callback = ReferencePairRollout()
    callback.on_train_batch_start(None, module, batch, 0)
    rollout = batch["rollout"]
    assert rollout.num_sequences == 4 and rollout.group_size == 2
    with torch.no_grad():  # row 2p + 1 was sampled by the reference: its sampling log-probs are the base's
        ref = module.reference_logps(rollout.input_ids, rollout.attention_mask, rollout.labels, return_token_logps=True,
                                     temperature=module.hparams.temperature)
        pol = module.completion_logps(rollout.input_ids, rollout.attention_mask, rollout.labels,
                                      return_token_logps=True, temperature=module.hparams.temperature)
    mask = rollout.completion_mask
    for row, expected in ((1, ref), (3, ref), (0, pol), (2, pol)):
        torch.testing.assert_close(rollout.old_logps[row][mask[row]], expected.token_logps[row][mask[row]],
                                   rtol=1e-3, atol=1e-3)
    trainer = _trainer(1)
    trainer.fit(module, PromptDataModule(str(prompt_file), batch_size=2))
    assert trainer.global_step in (0, 1)
    if trainer.global_step:
        for key in ("train/loss/dpo", "train/loss/xpo", "train/objective/model_scores", "train/objective/ref_scores",
                    "train/alpha", "train/val/ref_contain_eos_token"):
            assert key in trainer.callback_metrics, key
        assert trainer.callback_metrics["train/loss/xpo"] < 0  # alpha times a log-prob


def test_cli_online_dpo_and_xpo_run_and_save(tiny_model_dir, prompt_file, tmp_path, capsys):
    from pmetal.cli import main

    for flag in ([], ["--xpo", "--alpha", "0.01"]):
        out = tmp_path / ("xpo" if flag else "odpo")
        code = main(["online-dpo", *flag, "--model", str(tiny_model_dir), "--dataset", str(prompt_file),
                     "--reward-fn", "tests.unit.test_online_dpo_module:length_reward", "--batch-size", "2",
                     "--max-completion-length", "4", "--micro-batch-size", "2", "--max-steps", "1",
                     "--no-gradient-checkpointing", "--accelerator", "cpu", "--no-progress-bar", "--output-dir",
                     str(out), "--logger", "csv"])
        assert code == 0, capsys.readouterr().err
        assert (out / "final" / "adapter_model.safetensors").is_file()
    assert '"alpha": 0.01' in (tmp_path / "xpo" / "final" / "pmetal_config.json").read_text()
    with pytest.raises(SystemExit) as exit_info:  # a GRPO-only setting has no flag here
        main(["online-dpo", "--model", str(tiny_model_dir), "--epsilon", "0.3"])
    assert exit_info.value.code == 2
