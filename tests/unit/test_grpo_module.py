"""GrpoModule / DapoModule: the manual update (micro-batches, num_iterations, clipping) under a Trainer."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from pmetal.callbacks.rollout import RolloutCallback, make_rollout
from pmetal.data.prompts import PromptDataModule, collate_prompts


def char_parity_reward(prompts, completions, **kwargs):
    return [float(len(c) % 2) for c in completions]


@pytest.fixture()
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Say a word number {i}.", "answer": str(i)}) for i in range(4)))
    return path


def _trainer(max_steps, **kwargs):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_num_iterations_moves_the_ratio_and_engages_clipping(tiny_model_dir, prompt_file):
    """Iteration 1 of a rollout is on-policy (ratio 1, nothing clipped); iteration 2 reuses it after an
    update, so the ratio departs from 1 and the clip engages. The module clips from its own max_grad_norm."""
    from pmetal.modules.grpo import GrpoModule

    torch.manual_seed(1)  # seed 0 samples (exponential race) completions whose mean ratio moves under 1e-2
    module = GrpoModule(str(tiny_model_dir), reward_fns=[char_parity_reward], num_generations=4,
                        max_completion_length=6, num_iterations=2, micro_batch_size=4, learning_rate=0.05,
                        lr_schedule="constant", gradient_checkpointing=False, max_grad_norm=1.0)
    trainer = _trainer(2)
    trainer.fit(module, PromptDataModule(str(prompt_file), batch_size=2))
    assert trainer.global_step == 2  # one rollout, two optimizer steps
    first, second = module.iteration_metrics
    assert first["ratio"] == pytest.approx(1.0, abs=1e-3) and first["clip_ratio/region_mean"] == 0.0
    assert abs(second["ratio"] - 1.0) > 1e-2
    assert second["clip_ratio/region_mean"] > 0.0
    assert module.hparams.max_grad_norm == 1.0 and trainer.gradient_clip_val is None
    assert sum(isinstance(cb, RolloutCallback) for cb in trainer.callbacks) == 1
    for key in ("train/loss", "train/reward", "train/rewards/char_parity_reward/mean", "train/clip_ratio/high_mean",
                "train/completions/clipped_ratio", "train/frac_reward_zero_std"):
        assert key in trainer.callback_metrics


def test_micro_batches_give_the_full_batch_gradient(tiny_model_dir):
    from pmetal.data.render import render_prompt
    from pmetal.modules.grpo import GrpoModule

    torch.manual_seed(0)
    module = GrpoModule(str(tiny_model_dir), reward_fns=[char_parity_reward], num_generations=4,
                        max_completion_length=5, beta=0.05, gradient_checkpointing=False)
    with torch.no_grad():  # a non-zero adapter, so the KL term has a gradient too
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = collate_prompts([{"prompt_ids": render_prompt(module.tokenizer, [{"role": "user", "content": t}]),
                              "prompt": t, "columns": {}, "index": i} for i, t in enumerate(["Hi", "Count to 3"])])
    rollout = make_rollout(module, batch)
    rollout.old_logps = rollout.old_logps + 0.1 * torch.randn_like(rollout.old_logps) * rollout.completion_mask
    rollout.ref_logps = module._reference_token_logps(rollout)
    module.policy.train()

    def gradient(micro_batch_size, loss_type):
        module.hparams.loss_type = loss_type
        module.policy.zero_grad(set_to_none=True)
        parts = rollout.micro_batches(micro_batch_size)
        for part in parts:
            loss, _ = module.micro_batch_loss(part, rollout.num_sequences, rollout.num_completion_tokens)
            (loss / len(parts) if loss_type == "bnpo" else loss).backward()
        return torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])

    for loss_type in ("grpo", "dr_grpo", "dapo", "bnpo"):
        full, split = gradient(8, loss_type), gradient(4, loss_type)
        assert full.abs().sum() > 0
        # bnpo normalizes each micro-batch by its own tokens (as TRL): equal only when they hold equal tokens
        if loss_type != "bnpo":
            torch.testing.assert_close(split, full, atol=1e-6, rtol=1e-4)


def test_dapo_is_grpo_with_dapo_settings(tiny_model_dir):
    from pmetal.modules.grpo import DapoModule

    module = DapoModule(str(tiny_model_dir), reward_fns=[char_parity_reward], num_generations=4,
                        gradient_checkpointing=False)
    hp = module.hparams
    assert (hp.epsilon, hp.epsilon_high, hp.loss_type, hp.dynamic_sampling) == (0.2, 0.28, "dapo", True)
    assert module.rewards.names == ["char_parity_reward", "overlong"]
    settings = module.rollout_settings()
    assert settings.dynamic_sampling and settings.num_generations == 4


def test_rlkd_loss_blends_grpo_and_distillation(tiny_model_dir):
    from pmetal.data.render import render_prompt
    from pmetal.modules.rlkd import RlkdModule

    torch.manual_seed(0)
    module = RlkdModule(str(tiny_model_dir), teacher_model=str(tiny_model_dir), reward_fns=[char_parity_reward],
                        num_generations=4, max_completion_length=5, alpha=0.0, final_alpha=0.5,
                        gradient_checkpointing=False)
    batch = collate_prompts([{"prompt_ids": render_prompt(module.tokenizer, [{"role": "user", "content": "Hi"}]),
                              "prompt": "Hi", "columns": {}, "index": 0}])
    rollout = make_rollout(module, batch)
    part = rollout.micro_batches(8)[0]
    n, t = rollout.num_sequences, rollout.num_completion_tokens
    # alpha 0: exactly GrpoModule's loss (the completion-only logits path agrees with pmetal.logps)
    loss, metrics = module.micro_batch_loss(part, n, t)
    from pmetal.modules.grpo import GrpoModule

    grpo_loss_value, _ = GrpoModule.micro_batch_loss(module, part, n, t)
    torch.testing.assert_close(loss, grpo_loss_value, atol=1e-6, rtol=1e-5)
    assert metrics["distill_loss"].item() == pytest.approx(0.0, abs=1e-6)  # student == teacher so far
    # a different student: the distillation term is positive and carries a gradient
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    module.hparams.alpha, module.hparams.final_alpha = 1.0, None
    loss, metrics = module.micro_batch_loss(part, n, t)
    assert metrics["distill_loss"].item() > 1e-4
    torch.testing.assert_close(loss, metrics["distill_loss"] * 1.0, atol=1e-6, rtol=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.parameters())
    # linear annealing of alpha
    module.hparams.alpha, module.hparams.final_alpha = 0.3, 0.1
    module._total_steps = lambda: 10
    assert module.current_alpha() == pytest.approx(0.3)


def test_rlkd_teacher_with_another_tokenizer_is_a_clear_error(tiny_model_dir):
    from transformers import AutoTokenizer

    from pmetal.errors import PmetalError
    from pmetal.modules.rlkd import check_same_vocabulary

    student = AutoTokenizer.from_pretrained(tiny_model_dir)
    teacher = AutoTokenizer.from_pretrained(tiny_model_dir)
    teacher.add_tokens(["<teacher_only>"])
    with pytest.raises(PmetalError, match="does not share the tokenizer.*'<teacher_only>'"):
        check_same_vocabulary(student, teacher, "student-dir", "teacher-dir")


def test_cli_grpo_without_reward_exits_with_a_clear_message(capsys):
    from pmetal.cli import main

    assert main(["grpo", "--max-steps", "1"]) == 2
    assert "no reward function" in capsys.readouterr().err
    assert main(["grpo", "--reward-fn", "nowhere.mod:fn"]) == 2
    assert "cannot import module 'nowhere.mod'" in capsys.readouterr().err


def test_cli_grpo_dapo_runs_and_saves_the_adapter(tiny_model_dir, prompt_file, tmp_path, capsys):
    from pmetal.cli import main

    out = tmp_path / "run"
    code = main(["grpo", "--dapo", "--model", str(tiny_model_dir), "--dataset", str(prompt_file), "--reward-fn",
                 "tests.unit.test_grpo_module:char_parity_reward", "--num-generations", "2", "--batch-size", "2",
                 "--max-completion-length", "4", "--max-steps", "1", "--no-gradient-checkpointing",
                 "--accelerator", "cpu", "--no-progress-bar", "--output-dir", str(out), "--logger", "csv",
                 "--val-fraction", "0.5", "--eval-every", "1", "--max-grad-norm", "0.5"])
    assert code == 0, capsys.readouterr().err
    assert (out / "metrics.csv").is_file() and not (out / "tensorboard").exists()  # --logger csv: CSV only
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/reward" in header and "eval/reward" in header and "eval/rewards/char_parity_reward/mean" in header
    config = json.loads((out / "final" / "pmetal_config.json").read_text())
    assert config["max_grad_norm"] == 0.5  # the command handed its clip value to the module


def test_rlkd_teacher_can_be_quantized(tiny_model_dir):
    from pmetal.data.render import render_prompt
    from pmetal.modules.rlkd import RlkdModule
    from pmetal.quant import QuantLinear

    torch.manual_seed(0)
    module = RlkdModule(str(tiny_model_dir), teacher_model=str(tiny_model_dir), reward_fns=[char_parity_reward],
                        num_generations=2, max_completion_length=4, alpha=1.0, teacher_quantization="nf4",
                        gradient_checkpointing=False)
    quantized = [m for m in module.teacher.modules() if isinstance(m, QuantLinear)]
    assert quantized and not any(isinstance(m, QuantLinear) for m in module.policy.modules())
    batch = collate_prompts([{"prompt_ids": render_prompt(module.tokenizer, [{"role": "user", "content": "Hi"}]),
                              "prompt": "Hi", "columns": {}, "index": 0}])
    rollout = make_rollout(module, batch)
    loss, metrics = module.micro_batch_loss(rollout.micro_batches(8)[0], rollout.num_sequences,
                                            rollout.num_completion_tokens)
    # the NF4 teacher is close to, but not exactly, the full-precision student it was copied from
    assert 0.0 < metrics["distill_loss"].item() < 1.0 and torch.isfinite(loss)


def test_compile_rollouts_reaches_the_engine(tiny_model_dir, monkeypatch):
    from pmetal.callbacks.rollout import sampler_for
    from pmetal.modules.grpo import GrpoModule
    from pmetal.rl import sampler as installed
    from pmetal.rl.prompts import PromptBatch

    module = GrpoModule(str(tiny_model_dir), reward_fns=[char_parity_reward], num_generations=2,
                        gradient_checkpointing=False, compile_rollouts=False)
    settings = module.rollout_settings()
    assert settings.compile_decode is False
    seen = {}

    def fake_engine_for(policy, **options):
        seen.update(options)
        raise RuntimeError("stop here")

    monkeypatch.setattr(installed, "engine_for", fake_engine_for)
    module.setup("fit")
    with pytest.raises(RuntimeError, match="stop here"):
        sampler_for(module, stop_ids=[], settings=settings).generate(PromptBatch([[5, 6]], ["p"]))
    assert seen["compile_decode"] is False


def test_truncated_importance_sampling_keeps_the_trainer_side_across_passes(tiny_model_dir, prompt_file):
    """With tis_cap the first pass's ratio is exactly 1 (the trainer's own log-probs are its old side,
    the sampler's only weigh the tokens); the second pass reuses them, so its ratio moves."""
    from pmetal.modules.grpo import GrpoModule

    torch.manual_seed(1)
    module = GrpoModule(str(tiny_model_dir), reward_fns=[char_parity_reward], num_generations=4,
                        max_completion_length=6, num_iterations=2, micro_batch_size=4, learning_rate=0.05,
                        lr_schedule="constant", gradient_checkpointing=False, tis_cap=2.0,
                        top_entropy_quantile=0.5, loss_type="cispo")
    trainer = _trainer(2)
    trainer.fit(module, PromptDataModule(str(prompt_file), batch_size=2))
    first, second = module.iteration_metrics
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6)  # trainer vs itself, not vs the engine
    assert abs(second["ratio"] - 1.0) > 1e-3
    assert 0.0 < first["tis/weight_mean"] <= 2.0 and first["tis/weight_mean"] == pytest.approx(1.0, abs=1e-2)
    assert 0.4 <= first["entropy/kept_fraction"] <= 0.75  # the top half of the tokens (ties kept)
    assert first["entropy/kept_fraction"] == pytest.approx(second["entropy/kept_fraction"])  # the mask is kept


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
def test_the_advantage_estimator_reaches_the_rollout(tiny_model_dir, estimator):
    from pmetal.callbacks.rollout import make_rollout
    from pmetal.data.prompts import collate_prompts
    from pmetal.data.render import render_prompt
    from pmetal.losses.policy import estimate_advantages
    from pmetal.modules.grpo import GrpoModule, RlooModule

    torch.manual_seed(0)
    if estimator == "rloo":
        module = RlooModule(str(tiny_model_dir), reward_fns=[char_parity_reward], num_generations=4,
                            max_completion_length=6, gradient_checkpointing=False)
        assert module.hparams.scale_rewards == "none"
    else:
        module = GrpoModule(str(tiny_model_dir), reward_fns=[char_parity_reward], num_generations=4,
                            max_completion_length=6, gradient_checkpointing=False, advantage_estimator=estimator)
    texts = ["What is 2+2?", "Name a colour."]
    batch = collate_prompts([{"prompt_ids": render_prompt(module.tokenizer, [{"role": "user", "content": t}]),
                              "prompt": t, "columns": {}, "index": i} for i, t in enumerate(texts)])
    rollout = make_rollout(module, batch)
    expected = estimate_advantages(rollout.rewards, 4, estimator=estimator, scale=module.hparams.scale_rewards)
    torch.testing.assert_close(rollout.advantages, expected)
    assert rollout.rewards.std() > 0  # a spread, so the estimators differ from zero


def test_cli_rloo_runs_and_saves_the_adapter(tiny_model_dir, prompt_file, tmp_path, capsys):
    from pmetal.cli import main

    out = tmp_path / "run"
    code = main(["rloo", "--model", str(tiny_model_dir), "--dataset", str(prompt_file), "--reward-fn",
                 "tests.unit.test_grpo_module:char_parity_reward", "--num-generations", "2", "--batch-size", "2",
                 "--max-completion-length", "4", "--max-steps", "1", "--no-gradient-checkpointing",
                 "--accelerator", "cpu", "--no-progress-bar", "--output-dir", str(out), "--logger", "csv"])
    assert code == 0, capsys.readouterr().err
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert '"advantage_estimator": "rloo"' in (out / "final" / "pmetal_config.json").read_text()


def test_the_trainers_clipping_is_refused_with_the_modules_setting_named(tiny_model_dir, prompt_file):
    """Lightning cannot clip a manual update: a Trainer with gradient_clip_val gets a one-line error
    naming max_grad_norm, and the Trainer's setting is left as it was (nothing taken over)."""
    from pmetal.errors import PmetalError
    from pmetal.modules.grpo import GrpoModule

    module = GrpoModule(str(tiny_model_dir), reward_fns=[char_parity_reward], num_generations=2,
                        max_completion_length=2, gradient_checkpointing=False)
    trainer = _trainer(1, gradient_clip_val=0.5)
    with pytest.raises(PmetalError, match="max_grad_norm=0.5"):
        trainer.fit(module, PromptDataModule(str(prompt_file), batch_size=2))
    assert trainer.gradient_clip_val == 0.5


def test_the_commands_hand_the_trainers_clip_value_to_a_module_that_clips_itself():
    from pmetal.cli.runner import hand_clipping_to_module
    from pmetal.modules.grpo import GrpoModule
    from pmetal.modules.sft import SftModule

    model, trainer = {"max_grad_norm": None}, {"gradient_clip_val": 1.0}
    hand_clipping_to_module(GrpoModule, model, trainer)
    assert model == {"max_grad_norm": 1.0} and trainer == {"gradient_clip_val": None}
    model, trainer = {"max_grad_norm": 0.3}, {"gradient_clip_val": 1.0}  # the module's own value wins
    hand_clipping_to_module(GrpoModule, model, trainer)
    assert model == {"max_grad_norm": 0.3} and trainer == {"gradient_clip_val": None}
    model, trainer = {}, {"gradient_clip_val": 1.0}  # SFT: Lightning clips
    hand_clipping_to_module(SftModule, model, trainer)
    assert model == {} and trainer == {"gradient_clip_val": 1.0}
