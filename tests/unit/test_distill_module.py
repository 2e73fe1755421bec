"""GKD (`DistillModule`): the loss on a batch equals TRL's, the teacher stays frozen, lmbda picks the
path (dataset completions or the student's samples), prompts come back out of SFT batches, the CLI."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from pmetal.tokens import IGNORE_INDEX

ROWS = [{"messages": [{"role": "user", "content": f"Name colour {i}."},
                      {"role": "assistant", "content": f"Colour {('red', 'green', 'blue')[i % 3]}."}]} for i in range(6)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random Llama with the student's tokenizer and other weights (seed 1)."""
    from tests.tiny import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-teacher"), seed=1)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("distill-data") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(path)


def _module(student, teacher, **kwargs):
    from pmetal.modules.distill import DistillModule

    kwargs.setdefault("gradient_checkpointing", False)
    return DistillModule(str(student), teacher_model=str(teacher), max_completion_length=5, **kwargs)


def _batch(module, path, **data):
    from pmetal.data.distill import DistillDataModule

    dm = DistillDataModule(path, batch_size=3, val_fraction=0, tokenizer=module.tokenizer, **data)
    dm.setup()
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_on_a_batch_equals_trl_gkd(beta, tiny_model_dir, teacher_dir, sft_file):
    """TRL's GKDTrainer.compute_loss: full logits of both models, shifted, generalized_jsd_loss over
    the label tokens; pmetal's chunked path gives the same number (and the statistics by hand)."""
    from trl.experimental.gkd import GKDTrainer

    module = _module(tiny_model_dir, teacher_dir, beta=beta, teacher_temperature=1.5)
    batch = _batch(module, sft_file)
    loss, metrics = module.compute_loss(batch)
    with torch.no_grad():
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        student, teacher = module.policy(**inputs).logits, module.teacher(**inputs).logits
        theirs = GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels=batch["labels"][:, 1:],
                                                 beta=beta, temperature=1.5)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        s, t = (student[:, :-1][mask] / 1.5).log_softmax(-1), (teacher[:, :-1][mask] / 1.5).log_softmax(-1)
    torch.testing.assert_close(loss.detach(), theirs, rtol=1e-5, atol=1e-6)
    assert loss.item() > 1e-3 and metrics["tokens"] == mask.sum().item()
    torch.testing.assert_close(metrics["forward_kl"], (t.exp() * (t - s)).sum(-1).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["entropy"], -(s.exp() * s).sum(-1).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.policy.named_parameters() if "lora_" in n)
    assert all(p.grad is None for p in module.teacher.parameters())


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_training_moves_the_adapter_only(lmbda, tiny_model_dir, teacher_dir, sft_file):
    """lmbda=0 trains on the dataset's completions, lmbda=1 on the student's samples: the adapter
    changes, the student's base and the teacher do not, and the logged path says which it was."""
    from pmetal.data.distill import DistillDataModule

    L.seed_everything(0)
    module = _module(tiny_model_dir, teacher_dir, lmbda=lmbda, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in module.teacher.named_parameters()}
    seen = []

    class Batches(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Batches()])
    trainer.fit(module, DistillDataModule(sft_file, batch_size=3, val_fraction=0))
    changed = {n for n, p in module.policy.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.equal(p, teacher_before[n]) for n, p in module.teacher.named_parameters())
    assert not module.teacher.training and not any(p.requires_grad for p in module.teacher.parameters())
    assert [s["train/on_policy"] for s in seen] == [lmbda, lmbda]
    assert all(("train/completions/mean_length" in s) == (lmbda == 1.0) for s in seen)
    assert all(s["train/loss"] > 0 and s["train/forward_kl"] > 0 for s in seen)
    assert "teacher" not in " ".join(module.state_dict())  # not checkpointed


def test_on_policy_batch_keeps_the_prompts_and_labels_the_samples(tiny_model_dir, teacher_dir, sft_file):
    from pmetal.data.distill import batch_prompts

    torch.manual_seed(0)
    module = _module(tiny_model_dir, teacher_dir, lmbda=1.0, temperature=1.0)
    batch = _batch(module, sft_file)
    prompts = batch_prompts(batch)
    sampled, metrics = module.sample_batch(batch)
    assert len(prompts) == 3 and sampled["input_ids"].shape[0] == 3
    assert 1 <= metrics["completions/mean_length"] <= 5 and 0 <= metrics["completions/clipped_ratio"] <= 1
    for i, prompt in enumerate(prompts):
        row = sampled["input_ids"][i][sampled["attention_mask"][i].bool()].tolist()
        assert row[: len(prompt)] == prompt
        labels = sampled["labels"][i]
        assert (labels[: len(prompt)] == IGNORE_INDEX).all()
        assert labels[len(prompt): len(row)].tolist() == row[len(prompt):] and len(row) > len(prompt)
    text = module.tokenizer.decode(prompts[0])
    assert text.rstrip().endswith("assistant") and "Colour" not in text  # the generation prompt, no answer


def test_gkd_samples_with_the_sampling_settings_grpo_declares(tiny_model_dir, teacher_dir, sft_file):
    """One declaration (modules/sampling.py): GKD's sampling flags have GRPO's names, types and help
    (GKD restates only two defaults), TRL's --max-new-tokens still sets the length, and top_k reaches
    the engine (top_k=1 samples the same completions under any seed)."""
    from pmetal.cli.dispatch import build_parser
    from pmetal.cli.flags import CommandFlags

    distill = CommandFlags(methods=("distill",)).settings()["model"]
    grpo = CommandFlags(methods=("grpo",)).settings()["model"]
    for name in ("max_completion_length", "temperature", "top_p", "top_k", "min_p"):
        assert (distill[name].annotation, distill[name].doc) == (grpo[name].annotation, grpo[name].doc)
    assert (distill["temperature"].default, distill["max_completion_length"].default) == (0.9, 128)
    for flag in ("--max-new-tokens", "--max-completion-length"):
        args = build_parser("distill").parse_args(["distill", "--teacher-model", "t", flag, "7"])
        assert args.max_completion_length == 7

    module = _module(tiny_model_dir, teacher_dir, lmbda=1.0, temperature=1.0, top_k=1)
    batch = _batch(module, sft_file)
    samples = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        samples.append(module.sample_batch(batch)[0]["input_ids"])
    assert torch.equal(samples[0], samples[1])


def test_lmbda_draws_the_coin_only_between_0_and_1(tiny_model_dir, teacher_dir):
    module = _module(tiny_model_dir, teacher_dir, lmbda=0.0)
    state = torch.get_rng_state()
    assert not any(module.on_policy_step() for _ in range(20))
    assert torch.equal(state, torch.get_rng_state())  # offline distillation draws nothing
    module.hparams.lmbda = 0.5
    torch.manual_seed(0)
    draws = [module.on_policy_step() for _ in range(400)]
    assert 0.4 < sum(draws) / 400 < 0.6


def test_batch_prompts_padded_packed_and_multi_turn():
    from pmetal.data.distill import batch_prompts, sampled_batch

    x = IGNORE_INDEX
    padded = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 0, 0, 0]]),
              "attention_mask": torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]]),
              "labels": torch.tensor([[x, x, 3, x, x, 6, 7], [x, x, 10, 11, x, x, x]])}
    assert batch_prompts(padded) == [[1, 2, 3, 4, 5], [8, 9]]  # the last assistant turn's prompt
    packed = {"input_ids": torch.tensor([[1, 2, 3, 8, 9, 10, 0]]), "seq_lens": torch.tensor([3, 3, 1]),
              "labels": torch.tensor([[x, x, 3, x, 9, 10, x]])}
    assert batch_prompts(packed) == [[1, 2], [8]]  # the bin's padding segment has no prompt
    out = sampled_batch([[1, 2], [8]], torch.tensor([[5, 6, 0], [7, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]), 0)
    assert out["input_ids"].tolist() == [[1, 2, 5, 6], [8, 7, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["labels"].tolist() == [[x, x, 5, 6], [x, 7, x, x]]


def test_teacher_with_another_tokenizer_is_a_one_line_error(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from pmetal.errors import PmetalError
    from tests.tiny import make_tiny_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens(["<teacher_only>"])
    other = make_tiny_causal_lm(tmp_path / "other", tokenizer=tokenizer)
    with pytest.raises(PmetalError, match=r"does not share the tokenizer.*'<teacher_only>'.*GKD compares"):
        _module(tiny_model_dir, other)
    with pytest.raises(PmetalError, match="lmbda=1.5"):
        _module(tiny_model_dir, tiny_model_dir, lmbda=1.5)


def test_cli_distill_trains_and_saves_the_adapter(tiny_model_dir, teacher_dir, sft_file, tmp_path, capsys):
    from pmetal.cli import main

    out = tmp_path / "run"
    rc = main(["distill", "--model", str(tiny_model_dir), "--teacher-model", str(teacher_dir), "--dataset", sft_file,
               "--lmbda", "0.5", "--max-new-tokens", "4", "--max-steps", "2", "--batch-size", "2", "--val-fraction",
               "0", "--accelerator", "cpu", "--output-dir", str(out), "--no-progress-bar", "--epochs", "none",
               "--no-gradient-checkpointing"])
    assert rc == 0
    assert (out / "final" / "adapter_model.safetensors").is_file()
    settings = json.loads((out / "final" / "pmetal_config.json").read_text())
    assert settings["method"] == "DistillModule" and settings["lmbda"] == 0.5
    assert main(["distill", "--model", str(tiny_model_dir), "--teacher-model", str(teacher_dir), "--beta", "2",
                 "--dataset", sft_file, "--output-dir", str(tmp_path / "bad")]) == 2
    assert "beta=2.0 is out of range" in capsys.readouterr().err


def test_the_readme_distill_example_builds(tiny_model_dir, teacher_dir, tmp_path, monkeypatch):
    """README's `pmetal distill` line parses and builds its module (the teacher stands in for the fused run)."""
    import shlex
    from pathlib import Path

    import pmetal.cli.runner
    from pmetal.cli import main

    readme = Path(__file__).resolve().parents[2] / "README.md"
    line = next(l for l in readme.read_text().splitlines() if l.startswith("pmetal distill "))
    argv = [{"runs/pip-hf": str(teacher_dir)}.get(a, a) for a in shlex.split(line.split("#")[0])[1:]]
    built = {}
    monkeypatch.setattr(pmetal.cli.runner, "launch", lambda args, settings, method, module, dm: built.update(m=module))
    assert main(argv + ["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run")]) == 0
    assert built["m"].hparams.lmbda == 0.5 and built["m"].hparams.teacher_model == str(teacher_dir)
