"""GRPO on a VLM learns what the image shows: "what colour is the square?" over red/green/blue.

The model is a tiny Idefics3 (SmolVLM shape) built here and pretrained briefly (full SFT, a few
seconds) to answer with a colour word while the answers are shuffled across the images: it learns
the answer format but not the mapping, so it is right about 1/3 of the time, the best a policy
that ignores the image can do. GRPO (LoRA on the language model, vision tower and projector
frozen) with a reward of 1 for the right colour must then raise the sampled accuracy clearly
above 1/3. No real VLM can be had offline here, hence the built-and-pretrained model.

Every prompt batch holds each colour once, so every update sees all three; with two copies of each
prompt shuffled into batches of three, a batch could miss a colour for several steps and some
prompt orders (PromptDataModule seeds 7, and 42 before the rollouts ran on the engine) stopped at
two colours out of three (0.65).

Measured on 2 cores (2026-12-01, rollouts through the engine): 20-30 s (40-50 s at load 5), accuracy
0.33 -> 1.00 for PromptDataModule seeds 0, 1, 2, 5, 7, 42 and for global seeds 0-5. The same run
with the pixel inputs withheld from every forward (`pmetal.vlm.forward_inputs` returning nothing)
stays at 0.33 -> 0.33 and fails, so the test measures the use of the image.
"""

from __future__ import annotations

import json

import pytest
import torch

COLOURS = ("red", "green", "blue")
QUESTION = "What colour is the square?"


def colour_reward(prompts, completions, answer, **columns):
    """1.0 when the completion starts with the right colour."""
    return [float(c.strip().lower().startswith(a)) for c, a in zip(completions, answer)]


@torch.no_grad()
def sampled_accuracy(module, datamodule, samples: int = 16) -> float:
    from pmetal.callbacks.rollout import make_rollout

    batch = datamodule._collate(datamodule.train_items[: len(COLOURS)])
    settings = module.rollout_settings

    def wider():
        s = settings.__func__(module)
        s.num_generations = samples
        return s

    module.rollout_settings = wider
    try:
        return float(make_rollout(module, batch).rewards.mean())
    finally:
        del module.rollout_settings


@pytest.mark.slow
def test_grpo_learns_the_colour_of_the_square(tmp_path):
    import lightning as L

    from pmetal.data.datamodule import SftDataModule
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.grpo import GrpoModule
    from pmetal.modules.sft import SftModule
    from tests.tiny_vlm import make_tiny_idefics3, write_colour_images

    L.seed_everything(0)
    write_colour_images(tmp_path)
    make_tiny_idefics3(tmp_path / "base", hidden_size=64)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    rows = [{"image": f"{image}.png", "messages": [user, {"role": "assistant", "content": COLOURS[(k + shift) % 3]}]}
            for shift in range(3) for k, image in enumerate(COLOURS) for _ in range(2)]  # every answer per image
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = lambda steps, root: L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,  # noqa: E731
                                            enable_checkpointing=False, enable_progress_bar=False,
                                            enable_model_summary=False, limit_val_batches=0, default_root_dir=str(root))
    sft = SftModule(model=str(tmp_path / "base"), adapter="full", learning_rate=3e-3, gradient_checkpointing=False)
    trainer(60, tmp_path / "sft-run").fit(sft, SftDataModule(path=str(tmp_path / "sft.jsonl"), batch_size=6,
                                                              val_fraction=0.0))
    sft.save_pretrained(tmp_path / "pretrained")

    prompts = [{"image": f"{c}.png", "prompt": QUESTION, "answer": c} for c in COLOURS]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))  # a batch: all three
    grpo = GrpoModule(model=str(tmp_path / "pretrained"), reward_fns=["test_vlm_learning:colour_reward"],
                      num_generations=8, max_completion_length=3, micro_batch_size=24, learning_rate=4e-3,
                      gradient_checkpointing=False, lora_r=8)
    data = PromptDataModule(path=str(tmp_path / "prompts.jsonl"), batch_size=3, tokenizer=grpo.tokenizer,
                            processor=grpo.processor)
    data.setup()
    before = sampled_accuracy(grpo, data)
    assert before < 0.55, f"the pretrained policy already knows the colours ({before:.2f}): the test proves nothing"
    trainer(60, tmp_path / "grpo-run").fit(grpo, data)
    after = sampled_accuracy(grpo, data)
    print(f"sampled accuracy before GRPO {before:.2f}, after {after:.2f}")
    assert after > 0.8, f"GRPO did not learn the colours: accuracy {before:.2f} -> {after:.2f} (text-only best: 0.33)"
