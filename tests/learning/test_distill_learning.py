"""GKD learns on the real SmolLM2-135M-Instruct: the student's KL to the teacher on held-out prompts falls.

The teacher is SmolLM2; the student is SmolLM2 whose frozen base was moved away from it: a random
rank-4 change, as large as the weights themselves, added to the attention output and MLP down
projections of its last four layers (KL(teacher || student) about 2 nats on the held-out
completions). LoRA on every linear layer (rank 16) can express the change, while the base and the
teacher stay frozen, so the KL can only fall through the adapter. lmbda 0.5 makes both kinds of
step (the student's own samples and the dataset's completions). A smaller perturbation (LoRA
B values, or a KL of a few tenths) is not used: Adam's first steps move each adapter weight by
about the learning rate, a KL change of the same size, so such a test could pass or fail by noise.
The held-out KL is the module's own `forward_kl` statistic (`chunked_jsd_loss`) on the completions of
questions about topics the training rows never show; it must fall below 0.7x its start.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from tasks import _ASK, _HELD_OUT, _TOPICS, write_rows

pytestmark = pytest.mark.slow

STEPS = 10
PERTURBED_LAYERS, PERTURBATION_RANK = 4, 4


def _rows(topics: list[tuple[str, str]], ask_offset: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": _ASK[(i + ask_offset) % len(_ASK)].format(topic)},
                          {"role": "assistant", "content": answer}]} for i, (topic, answer) in enumerate(topics)]


@pytest.fixture(scope="module")
def perturbed_student(smollm2_dir, tmp_path_factory):
    """SmolLM2 plus a seeded rank-4 change (std = the weight's std) of o_proj and down_proj in its last layers."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("distill-student")
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers[-PERTURBED_LAYERS:]:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                w = linear.weight
                change = (torch.randn(w.shape[0], PERTURBATION_RANK, generator=gen)
                          @ torch.randn(PERTURBATION_RANK, w.shape[1], generator=gen))
                w.add_(change / change.std() * w.std())
    model.save_pretrained(out)
    for f in Path(smollm2_dir).iterdir():  # the same tokenizer and chat template
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def distill_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-data")
    held_out = [(t, f"{t.capitalize()} is something people often ask about.") for t in _HELD_OUT]
    return write_rows(_rows(_TOPICS, 0), root / "train.jsonl"), write_rows(_rows(held_out, 1), root / "held.jsonl")


def _held_out_kl(module, batch) -> float:
    """Mean KL(teacher || student) over the batch's completion tokens, as the module logs it."""
    was_training = module.policy.training
    module.policy.eval()
    with torch.no_grad():
        _, metrics = module.compute_loss(batch)
    module.policy.train(was_training)
    return float(metrics["forward_kl"])


def _frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_gkd_lowers_the_held_out_kl_to_the_teacher(smollm2_dir, perturbed_student, distill_data):
    from pmetal.data.distill import DistillDataModule
    from pmetal.modules.distill import DistillModule

    train_path, held_path = distill_data
    L.seed_everything(0)
    module = DistillModule(str(perturbed_student), teacher_model=str(smollm2_dir), lmbda=0.5, beta=0.5,
                           max_completion_length=16, learning_rate=1e-3, lr_schedule="constant", lora_r=16,
                           target_modules="all-linear", gradient_checkpointing=False)
    held = DistillDataModule(str(held_path), batch_size=8, val_fraction=0.0, max_seq_len=128,
                             tokenizer=module.tokenizer)
    held.setup("fit")
    held_batch = next(iter(held.train_dataloader()))
    assert held_batch["input_ids"].shape[0] == len(_HELD_OUT)
    base, teacher = _frozen(module.policy), _frozen(module.teacher)

    before = _held_out_kl(module, held_batch)
    on_policy = []

    class OnPolicy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            on_policy.append(float(trainer.callback_metrics["train/on_policy"]))

    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[OnPolicy()])
    trainer.fit(module, DistillDataModule(str(train_path), batch_size=4, val_fraction=0.0, max_seq_len=128, seed=0,
                                          tokenizer=module.tokenizer))
    after = _held_out_kl(module, held_batch)
    print(f"held-out KL(teacher || student): {before:.3f} -> {after:.3f} ({after / before:.2f}x); "
          f"on-policy steps {on_policy}")

    assert before > 1.0  # the perturbation is far above the noise of a few LoRA steps
    assert 0.0 in on_policy and 1.0 in on_policy  # both kinds of GKD step ran
    assert after < 0.7 * before
    for name, value in _frozen(module.policy).items():
        assert torch.equal(value, base[name]), name
    for name, value in _frozen(module.teacher).items():
        assert torch.equal(value, teacher[name]), name
