"""VLM training on tiny random models of two families (Idefics3/SmolVLM shape, Qwen2-VL).

What is frozen and what trains, QLoRA on the language model only, an SFT and a GRPO step through
Lightning, the rollout's sampling-time log-probs equal to the update's with the same images, and
the commands (`pmetal train --vlm`, `pmetal grpo --vlm`, `pmetal fit --method grpo`).
"""

from __future__ import annotations

import json

import pytest
import torch

FAMILIES = ["idefics3", "qwen2_vl"]
ALL_FAMILIES = [*FAMILIES, "qwen2_5_vl", "qwen3_vl"]
SEEN: list[dict] = []


def capture_reward(prompts, completions, **columns):
    """A reward function that records what it was given (the row's columns) and scores length."""
    SEEN.append(dict(columns))
    return [float(len(c)) for c in completions]


def _prompts(folder, colours=("red", "green", "blue", "red")):
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps({"image": f"{c}.png", "prompt": "What colour is the square?" + " Say it." * k,
                                        "answer": c}) + "\n" for k, c in enumerate(colours)))
    return str(path)


def _sft(folder):
    path = folder / "sft.jsonl"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}
    path.write_text("".join(json.dumps({"images": [f"{c}.png"], "messages": [user, {"role": "assistant", "content": c}]})
                            + "\n" for c in ("red", "green", "blue", "red")))
    return str(path)


def _trainer(tmp_path, **kwargs):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     default_root_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_the_language_model_and_flags_for_the_vision_parts(family, tiny_vlm_dirs):
    from pmetal.modules.sft import SftModule
    from pmetal.vlm import vision_parts

    module = SftModule(model=str(tiny_vlm_dirs[family]))
    assert module.is_vlm and module.processor is not None
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and (".language_model." in n or ".text_model." in n) for n in trainable)
    module = SftModule(model=str(tiny_vlm_dirs[family]), train_projector=True)
    projector = vision_parts(module.policy.get_base_model())["projector"]
    extra = [n for n, p in module.policy.named_parameters() if p.requires_grad and "lora_" not in n]
    assert extra and all(projector.split(".")[-1] in n for n in extra)
    module = SftModule(model=str(tiny_vlm_dirs[family]), train_vision_tower=True)
    tower = vision_parts(module.policy.get_base_model())["vision_tower"]
    assert any(tower.split(".")[-1] in n and p.requires_grad for n, p in module.policy.named_parameters())
    full = SftModule(model=str(tiny_vlm_dirs[family]), adapter="full")
    frozen = {n for n, p in full.policy.named_parameters() if not p.requires_grad}
    assert frozen and all(tower.split(".")[-1] in n or projector.split(".")[-1] in n for n in frozen)


def test_qlora_quantizes_the_language_model_only(tiny_vlm_dirs):
    from pmetal.modules.sft import SftModule
    from pmetal.quant import QuantLinear

    module = SftModule(model=str(tiny_vlm_dirs["qwen2_vl"]), quantization="nf4", quant_backend="pmetal")
    names = [n for n, m in module.policy.named_modules() if isinstance(m, QuantLinear)]
    assert names and all(".language_model." in n for n in names)
    assert not any(isinstance(m, QuantLinear) for n, m in module.policy.named_modules() if ".visual." in n)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_sft_step_trains_the_adapter_and_the_images_matter(family, tiny_vlm_dirs, colour_images, tmp_path):
    from pmetal.data.datamodule import SftDataModule
    from pmetal.logps import lm_loss
    from pmetal.modules.sft import SftModule

    torch.manual_seed(0)
    module = SftModule(model=str(tiny_vlm_dirs[family]), learning_rate=1e-2)
    dm = SftDataModule(path=_sft(colour_images), batch_size=2, val_fraction=0.0)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    _trainer(tmp_path).fit(module, datamodule=dm)
    changed = {n for n, p in module.policy.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    batch = next(iter(dm.train_dataloader()))
    assert "pixel_inputs" in batch and "seq_lens" not in batch  # padded, never packed
    with torch.no_grad():
        loss, tokens = lm_loss(module.policy, batch)
        other = {k: v.flip(0) if k != "image_grid_thw" else v for k, v in batch["pixel_inputs"].items()}
        swapped, _ = lm_loss(module.policy, {**batch, "pixel_inputs": other})
    assert int(tokens) == int((batch["labels"][:, 1:] != -100).sum())
    assert not torch.isclose(loss, swapped), "the loss does not depend on the images"


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_rollout_logps_with_images_equal_the_update_and_rewards_see_images(family, tiny_vlm_dirs, colour_images):
    from pmetal.callbacks.rollout import make_rollout
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.grpo import GrpoModule

    torch.manual_seed(0)
    module = GrpoModule(model=str(tiny_vlm_dirs[family]), reward_fns=["tests.unit.test_vlm:capture_reward"],
                        num_generations=3, max_completion_length=6, micro_batch_size=4)
    dm = PromptDataModule(path=_prompts(colour_images), batch_size=4, tokenizer=module.tokenizer,
                          processor=module.processor)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert len({len(p) for p in batch["prompt_ids"]}) > 1  # prompts of different lengths: left padding
    SEEN.clear()
    rollout = make_rollout(module, batch)
    assert sorted(SEEN[0]["image"]) == sorted([im for im in batch["columns"]["image"] for _ in range(3)])
    module.policy.eval()
    with torch.no_grad():
        for start, part in zip(range(0, rollout.num_sequences, 4), rollout.micro_batches(4)):
            assert "pixel_inputs" in part
            mask = part["labels"] != -100
            new = module.token_logps(part)
            assert torch.allclose(new[mask], part["old_logps"][mask], atol=2e-4), (new[mask] - part["old_logps"][mask]).abs().max()
            without = module.completion_logps(part["input_ids"], part["attention_mask"], part["labels"],
                                              return_token_logps=True, pixel_inputs=None)
            if family == "idefics3":  # Qwen's text-only forward cannot even place its image tokens
                assert not torch.allclose(without.token_logps[mask], part["old_logps"][mask], atol=1e-3)


def _prompt_batch(tokenizer, processor, folder, colours=("red", "green", "blue")):
    from pmetal.data.prompts import PromptDataModule

    dm = PromptDataModule(path=_prompts(folder, colours), batch_size=len(colours), tokenizer=tokenizer,
                          processor=processor)
    dm.setup()
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_engine_with_images_gives_the_reference_loops_greedy_tokens(family, tiny_vlm_dirs, colour_images):
    """The engine's VLM prefill (pixel inputs, M-RoPE positions) and decode equal `generate_reference`,
    with fused projections and through the Triton decode-attention kernel too."""
    from pmetal.generation import SamplingConfig, generate_reference
    from pmetal.generation.decode_attention import kernel_supported
    from pmetal.generation.engine import RolloutEngine
    from pmetal.vlm import collate_pixel_inputs, load_vlm_and_processor

    model, processor = load_vlm_and_processor(tiny_vlm_dirs[family])
    model.eval()
    batch = _prompt_batch(processor.tokenizer, processor, colour_images)
    assert len({len(p) for p in batch["prompt_ids"]}) > 1  # left padding
    images = collate_pixel_inputs(batch["pixel_inputs"])
    config = SamplingConfig(max_new_tokens=10, temperature=0.0)
    common = dict(pad_token_id=processor.tokenizer.pad_token_id, num_return_sequences=2, prefill_inputs=images)
    free = generate_reference(model, batch["prompt_ids"], config, stop_ids=[], **common)
    stop = int(free.completion_ids[0, 3])  # rows stop at different steps: compaction moves the rest
    ref = generate_reference(model, batch["prompt_ids"], config, stop_ids=[stop], **common)
    assert len(set(ref.lengths.tolist())) > 1
    variants = [dict(sync_every=1), dict(speculative=True, num_draft_tokens=2), dict(fuse_projections=True)]
    if kernel_supported(torch.device("cpu")):  # the Triton decode-attention kernel, in its interpreter
        variants.append(dict(attention_kernel=True, speculative=True, num_draft_tokens=2))
    for options in variants:
        engine = RolloutEngine(model, **options)
        gen = engine.generate(batch["prompt_ids"], config, stop_ids=[stop], **common)
        assert "rollout/decode_rounds" in engine.last_stats, "the engine fell back to the reference loop"
        assert gen.completion_ids.tolist() == ref.completion_ids.tolist(), options
        assert gen.lengths.tolist() == ref.lengths.tolist() and gen.stopped.tolist() == ref.stopped.tolist()
        torch.testing.assert_close(gen.logps, ref.logps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,speculative", [(f, False) for f in ALL_FAMILIES] + [("qwen2_vl", True)])
def test_engine_rollout_logps_with_images_equal_the_update_forward(family, speculative, tiny_vlm_dirs,
                                                                    colour_images):
    """Sampled through the engine, the recorded log-probs give the update's ratio 1 (fp32, CPU)."""
    from pmetal.callbacks.rollout import make_rollout
    from pmetal.modules.grpo import GrpoModule

    torch.manual_seed(0)
    module = GrpoModule(model=str(tiny_vlm_dirs[family]), reward_fns=["tests.unit.test_vlm:capture_reward"],
                        num_generations=2, max_completion_length=8, temperature=0.8, top_k=50,
                        speculative=speculative, micro_batch_size=6)
    batch = _prompt_batch(module.tokenizer, module.processor, colour_images)
    rollout = make_rollout(module, batch)
    assert "rollout/decode_rounds" in rollout.metrics  # the engine sampled, not the reference loop
    module.policy.eval()
    with torch.no_grad():
        for part in rollout.micro_batches(6):
            mask = part["labels"] != -100
            ratio = (module.token_logps(part) - part["old_logps"])[mask].exp()
            torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_policy_that_favours_an_image_placeholder_never_samples_it(family, tiny_vlm_dirs, colour_images):
    """A sampled placeholder would give the update one more image token than the images have features."""
    from pmetal.callbacks.rollout import make_rollout
    from pmetal.modules.grpo import GrpoModule
    from pmetal.vlm import placeholder_token_ids

    torch.manual_seed(0)
    module = GrpoModule(model=str(tiny_vlm_dirs[family]), reward_fns=["tests.unit.test_vlm:capture_reward"],
                        num_generations=2, max_completion_length=6, micro_batch_size=6)
    placeholders = placeholder_token_ids(module.policy)
    config = module.policy.get_base_model().config
    assert placeholders == tuple(sorted({config.image_token_id, getattr(config, "video_token_id", None) or
                                         config.image_token_id}))

    head = module.policy.get_base_model().get_output_embeddings()  # sampling's head and the update's
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features), requires_grad=False)
    with torch.no_grad():
        head.bias[list(placeholders)] = 20.0  # the placeholders are the policy's favourites
    rollout = make_rollout(module, _prompt_batch(module.tokenizer, module.processor, colour_images))
    completions = rollout.labels[rollout.labels != -100]
    assert completions.numel() and not torch.isin(completions, torch.tensor(placeholders)).any()
    module.policy.eval()
    with torch.no_grad():
        part = next(iter(rollout.micro_batches(6)))
        mask = part["labels"] != -100
        torch.testing.assert_close(module.token_logps(part)[mask], part["old_logps"][mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_grpo_step_through_lightning(family, tiny_vlm_dirs, colour_images, tmp_path):
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.grpo import GrpoModule

    module = GrpoModule(model=str(tiny_vlm_dirs[family]), reward_fns=["tests.unit.test_vlm:capture_reward"],
                        num_generations=2, max_completion_length=5, micro_batch_size=2, beta=0.1, learning_rate=1e-3)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    _trainer(tmp_path).fit(module, datamodule=PromptDataModule(path=_prompts(colour_images), batch_size=2))
    assert any(not torch.equal(p.detach(), before[n]) for n, p in module.policy.named_parameters() if n in before)


def test_commands_train_grpo_and_fit_with_a_vlm(tiny_vlm_dirs, colour_images, tmp_path):
    from pmetal.cli import main

    model = str(tiny_vlm_dirs["idefics3"])
    common = ["--model", model, "--max-steps", "1", "--accelerator", "cpu", "--no-progress-bar"]
    assert main(["train", "--vlm", "--dataset", _sft(colour_images), "--batch-size", "2",
                 "--output-dir", str(tmp_path / "sft"), *common]) == 0
    saved = tmp_path / "sft" / "final"
    assert (saved / "adapter_model.safetensors").is_file() and (saved / "processor_config.json").is_file()
    assert main(["grpo", "--vlm", "--dataset", _prompts(colour_images), "--reward-fn", "accuracy",
                 "--num-generations", "2", "--max-completion-length", "4", "--batch-size", "2",
                 "--output-dir", str(tmp_path / "grpo"), *common]) == 0
    assert main(["grpo", "--vlm", "--dapo", "--max-sampling-rounds", "2", "--dataset", _prompts(colour_images),
                 "--reward-fn", "tests.unit.test_vlm:capture_reward", "--num-generations", "2",
                 "--max-completion-length", "4", "--batch-size", "2", "--output-dir", str(tmp_path / "dapo"),
                 *common]) == 0
    assert main(["fit", "--method", "grpo", "--model", model, "--model.reward_fns", "[accuracy]",
                 "--model.num_generations", "2", "--model.max_completion_length", "4", "--data.path",
                 _prompts(colour_images), "--data.batch_size", "2", "--trainer.max_steps", "1",
                 "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "fit"),
                 "--trainer.enable_progress_bar", "false"]) == 0


def test_rlkd_step_with_a_vlm_teacher(tiny_vlm_dirs, colour_images, tmp_path):
    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.rlkd import RlkdModule
    from pmetal.vlm import multimodal_model

    model = str(tiny_vlm_dirs["qwen2_vl"])
    module = RlkdModule(model=model, teacher_model=model, reward_fns=["tests.unit.test_vlm:capture_reward"],
                        num_generations=2, max_completion_length=5, micro_batch_size=4, learning_rate=1e-3)
    assert multimodal_model(module.teacher) is not None
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    _trainer(tmp_path).fit(module, datamodule=PromptDataModule(path=_prompts(colour_images), batch_size=2))
    assert any(not torch.equal(p.detach(), before[n]) for n, p in module.policy.named_parameters() if n in before)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapter_with_projector_reloads_and_reference_is_the_base(family, tiny_vlm_dirs, colour_images,
                                                                        tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from pmetal.data.vlm import VlmCollator, render_vlm_dataset
    from pmetal.modules.sft import SftModule

    torch.manual_seed(0)
    module = SftModule(model=str(tiny_vlm_dirs[family]), train_projector=True)
    with torch.no_grad():
        for p in module.policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # a trained adapter and projector
    module.save_pretrained(tmp_path / "out")
    rows = [{"image": "red.png", "messages": [{"role": "user", "content": "Colour?"},
                                               {"role": "assistant", "content": "red"}]}]
    rendered, _ = render_vlm_dataset(module.processor, rows, path=str(colour_images / "d.jsonl"), max_seq_len=256)
    batch = VlmCollator(module.processor, pad_token_id=0)(rendered.rows)
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dirs[family]).eval()
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_vlm_dirs[family]),
                                         tmp_path / "out").eval()
    labels = batch["labels"]
    args = (batch["input_ids"], batch["attention_mask"], labels)
    module.policy.eval()
    with torch.no_grad():
        trained = module.completion_logps(*args, pixel_inputs=batch["pixel_inputs"]).sum
        reference = module.reference_logps(*args, pixel_inputs=batch["pixel_inputs"]).sum
        from pmetal.logps import completion_logps

        assert torch.allclose(completion_logps(reloaded, *args, pixel_inputs=batch["pixel_inputs"]).sum, trained,
                              atol=1e-4)
        assert torch.allclose(completion_logps(base, *args, pixel_inputs=batch["pixel_inputs"]).sum, reference,
                              atol=1e-4)
    assert not torch.allclose(trained, reference, atol=1e-3)
