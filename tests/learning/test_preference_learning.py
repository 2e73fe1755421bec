"""DPO, SimPO, ORPO and KTO with LoRA on the real SmolLM2-135M-Instruct learn a preference it does not have.

The task (examples/make_preference_data.py): the chosen answer is written in capitals, the rejected
one is the same answer in ordinary case. The instruction-tuned model prefers ordinary case, so on
held-out questions it ranks the pairs the wrong way round before training. Each method must make it
prefer the chosen answers on questions it never trained on, by the measure the method optimizes:
- DPO and KTO: the implicit reward beta*(log pi - log pi_ref) of chosen above rejected (0 for every
  pair before training), and for DPO a mean reward margin that grows;
- SimPO and ORPO (no reference): the average per-token log-prob of chosen above rejected (which
  for ORPO is the sign of the log odds ratio).
"""

from __future__ import annotations

import json
import time

import pytest
import torch

pytestmark = pytest.mark.slow

TRAIN_PAIRS, HELD_OUT = 96, 24
SYSTEM = "Answer briefly."  # shorter than SmolLM2's default system prompt: fewer tokens per step
STEPS, BATCH = 12, 4  # all four methods reached 1.00 held-out accuracy at 12 steps; ORPO needs more than 8


def _rows():
    from pmetal.examples.make_preference_data import kto_rows, preference_pairs, questions

    pairs = preference_pairs(TRAIN_PAIRS + HELD_OUT, seed=0)
    held_out_questions = {p["prompt"] for p in pairs[TRAIN_PAIRS:]}
    kto = [r for r in kto_rows(len(questions()), seed=0) if r["prompt"] not in held_out_questions][:TRAIN_PAIRS]
    return pairs[:TRAIN_PAIRS], pairs[TRAIN_PAIRS:], kto


def _write(rows, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@torch.no_grad()
def held_out_logps(module, loader) -> torch.Tensor:
    """`[N, 4]` policy log-probs of the held-out pairs: chosen sum, rejected sum, chosen mean, rejected mean."""
    module.policy.eval()
    rows = []
    for batch in loader:
        chosen, rejected = module.pair_logps(batch)
        rows.append(torch.stack([chosen.sum, rejected.sum, chosen.mean, rejected.mean], dim=1))
    module.policy.train()
    return torch.cat(rows)


def scores(policy: torch.Tensor, reference: torch.Tensor, beta: float = 0.1) -> tuple[float, float, float]:
    """(implicit-reward accuracy, mean implicit reward margin, average-log-prob accuracy)."""
    margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    avg_wins = (policy[:, 2] > policy[:, 3]).float().mean().item()
    return (margin > 0).float().mean().item(), margin.mean().item(), avg_wins


CASES = {
    "dpo": ("pmetal.modules.dpo:DpoModule", {"beta": 0.1}, 5e-4),
    "simpo": ("pmetal.modules.simpo:SimpoModule", {"beta": 2.5, "gamma_beta_ratio": 0.5}, 5e-4),
    "orpo": ("pmetal.modules.orpo:OrpoModule", {"beta": 0.1}, 5e-4),
    "kto": ("pmetal.modules.kto:KtoModule", {"beta": 0.1}, 5e-4),
}


@pytest.mark.parametrize("method", list(CASES))
def test_preference_method_learns_the_held_out_preference(method, smollm2_dir, tmp_path):
    import importlib

    import lightning as L

    from pmetal.data.kto import KtoDataModule
    from pmetal.data.preference import PreferenceDataModule

    start = time.time()
    L.seed_everything(0)
    target, kwargs, lr = CASES[method]
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    module = cls(model=str(smollm2_dir), lora_r=16, learning_rate=lr, warmup_steps=2, lr_schedule="constant",
                 gradient_checkpointing=False, weight_dtype="float32", **kwargs)
    train, held_out, kto = _rows()
    held = PreferenceDataModule(_write(held_out, tmp_path / "held.jsonl"), batch_size=12, max_seq_len=96,
                                tokenizer=module.tokenizer, system_prompt=SYSTEM)
    held.setup("validate")
    loader = held.train_dataloader()  # a plain loader over the held-out pairs (no training on them)

    # LoRA starts as the identity, so this is also the reference (which training never changes)
    reference = held_out_logps(module, loader)
    reward_acc0, margin0, avg_acc0 = scores(reference, reference)
    assert avg_acc0 <= 0.25, f"the base model already prefers the capitals ({avg_acc0}): the task proves nothing"
    assert reward_acc0 == 0.0 and margin0 == pytest.approx(0.0, abs=1e-4)

    if method == "kto":
        data = KtoDataModule(_write(kto, tmp_path / "kto.jsonl"), batch_size=BATCH, max_seq_len=96,
                             system_prompt=SYSTEM)
    else:
        data = PreferenceDataModule(_write(train, tmp_path / "train.jsonl"), batch_size=BATCH, max_seq_len=96,
                                    system_prompt=SYSTEM)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, gradient_clip_val=1.0)
    trainer.fit(module, datamodule=data)

    reward_acc, margin, avg_acc = scores(held_out_logps(module, loader), reference)
    report = (f"{method}: held-out reward accuracy {reward_acc0:.2f} -> {reward_acc:.2f}, margin {margin0:.3f} -> "
              f"{margin:.3f}, avg-logp accuracy {avg_acc0:.2f} -> {avg_acc:.2f} ({time.time() - start:.0f} s)")
    print(report)
    if method in ("dpo", "kto"):
        assert reward_acc >= 0.8, report
    else:
        assert avg_acc >= 0.75, report
    if method == "dpo":
        assert margin > 0.5, report
