"""The shared-prompt pair forward (`pmetal.shared_prompt`) equals the plain one (chosen and rejected
as separate padded rows): the layout itself, then per-pair policy and reference log-probs, losses,
metrics and LoRA gradients of every pair method (DPO's four losses, SimPO, ORPO's two NLL scopes),
in fp32 and under bf16 autocast, with "sdpa" and "eager" attention; and the reference cache that
`reuse_ref_logps` keeps across epochs."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from pmetal.data.preference import PreferenceDataModule
from pmetal.modules.dpo import DpoModule
from pmetal.modules.orpo import OrpoModule
from pmetal.modules.simpo import SimpoModule
from pmetal.shared_prompt import shared_attention_mask, shared_layout
from tests.tiny import randomize_lora_b

COMMON = dict(adapter="lora", lora_r=4, learning_rate=1e-2, gradient_checkpointing=False, weight_dtype="float32")


def test_layout_holds_the_common_prefix_once():
    # pair 0: prompt [5, 6], completions share their first word 7; pair 1: nothing in common; pad 0
    chosen = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 0, 0, 0]])
    rejected = torch.tensor([[5, 6, 7, 4, 0], [3, 4, 4, 0, 0]])
    layout = shared_layout(chosen, chosen != 0, rejected, rejected != 0)
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 9, 4], [1, 2, 3, 4, 4, 0]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 0, 1, 2, 0]]
    assert layout.segment.tolist() == [[0, 0, 0, 1, 1, 2], [1, 1, 2, 2, 2, -1]]
    assert layout.rejected_index.tolist() == [[0, 1, 2, 5, -1], [2, 3, 4, -1, -1]]
    assert layout.shared_tokens == 3
    mask = shared_attention_mask(layout.segment, "sdpa")[:, 0]
    assert mask[0, 5].tolist() == [True, True, True, False, False, True]  # rejected sees prefix + itself
    assert mask[0, 4].tolist() == [True, True, True, True, True, False]  # chosen never sees rejected
    assert mask[1, 2].tolist() == [False, False, True, False, False, False]  # no shared prefix in pair 1
    assert mask[1, 5].tolist() == [False] * 5 + [True]  # padding sees itself only: no empty softmax row
    additive = shared_attention_mask(layout.segment, "eager")[:, 0]
    assert torch.equal(additive == 0, mask)


@pytest.fixture(scope="module")
def batch_and_tokenizer(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("shared") / "pairs.jsonl"
    rows = [{"prompt": "What is two plus two?" * (1 + k % 3), "chosen": f"It is {k} and four.",
             "rejected": "It is five" if k % 2 else f"no idea {k}, sorry about that"} for k in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = DpoModule(model=str(tiny_model_dir), **COMMON)
    dm = PreferenceDataModule(str(path), batch_size=4, max_seq_len=96, tokenizer=module.tokenizer)
    dm.setup("fit")
    return next(iter(dm._loader(dm.train_items, shuffle=False)))


# (class, attention, settings switched on one module between steps): DPO's four losses, SimPO, ORPO's two scopes
CASES = [(DpoModule, "sdpa", [dict(loss_type="sigmoid", label_smoothing=0.1), dict(loss_type="hinge", label_smoothing=0.0),
                              dict(loss_type="ipo"), dict(loss_type="robust", label_smoothing=0.2)]),
         (SimpoModule, "sdpa", [{}]),
         (OrpoModule, "sdpa", [dict(nll_scope="completion"), dict(nll_scope="full")]),
         (OrpoModule, "eager", [dict(nll_scope="full")])]


def _step(module, batch, shared: bool, autocast: bool):
    module.hparams.shared_prompt = shared
    module.policy.zero_grad()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        loss, metrics = module.compute_loss(batch)
        chosen, rejected = module.pair_logps(batch)
        reference = module._compute_reference(batch) if isinstance(module, DpoModule) else torch.zeros(())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, torch.stack([chosen.sum, rejected.sum]).detach(), reference, grads


@pytest.mark.parametrize("cls,attention,variants", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_shared_prompt_equals_separate_rows(tiny_model_dir, batch_and_tokenizer, cls, attention, variants):
    batch = batch_and_tokenizer
    module = cls(model=str(tiny_model_dir), attn_implementation=attention, **COMMON)
    randomize_lora_b(module)
    assert module._shared_prompt_attention(module.policy) == attention
    for settings in variants:
        module.hparams.update(settings)
        for autocast in (False, True):
            tol = dict(rtol=3e-2, atol=3e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
            plain, shared = (_step(module, batch, flag, autocast) for flag in (False, True))
            name = f"{cls.__name__} {settings} autocast={autocast}"
            torch.testing.assert_close(shared[2], plain[2], **tol, msg=f"{name}: policy log-probs")
            torch.testing.assert_close(shared[3], plain[3], **tol, msg=f"{name}: reference log-probs")
            torch.testing.assert_close(shared[0], plain[0], **tol, msg=f"{name}: loss")
            for key in plain[1]:
                torch.testing.assert_close(shared[1][key], plain[1][key], **tol, msg=f"{name}: {key}")
            assert plain[4].keys() == shared[4].keys() and plain[4]
            for key in plain[4]:
                scale = plain[4][key].abs().max().clamp_min(1e-6)
                torch.testing.assert_close(shared[4][key] / scale, plain[4][key] / scale, **tol, msg=f"{name}: {key}")


def test_shared_prompt_saves_tokens_and_falls_back(tiny_model_dir, batch_and_tokenizer):
    from pmetal.shared_prompt import shared_prompt_supported

    batch = batch_and_tokenizer
    layout = shared_layout(batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["rejected_input_ids"],
                           batch["rejected_attention_mask"])
    separate = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    assert int((layout.segment >= 0).sum()) == separate - layout.shared_tokens
    assert layout.shared_tokens >= 4 * 10  # every prompt, rendered by the chat template
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    assert shared_prompt_supported(LlamaConfig(), "sdpa", is_vlm=False)
    assert not shared_prompt_supported(LlamaConfig(), "flash_attention_2", is_vlm=False)
    assert not shared_prompt_supported(LlamaConfig(), "sdpa", is_vlm=True)
    assert not shared_prompt_supported(MistralConfig(sliding_window=4096), "sdpa", is_vlm=False)
    assert shared_prompt_supported(Qwen3Config(), "sdpa", is_vlm=False)
    assert not shared_prompt_supported(Qwen3Config(use_sliding_window=True, max_window_layers=1), "sdpa", is_vlm=False)


def test_reference_reused_across_epochs_and_saved_in_checkpoints(tiny_model_dir, batch_and_tokenizer):
    batch = batch_and_tokenizer
    module = DpoModule(model=str(tiny_model_dir), **COMMON)
    assert module._caches_reference
    first = module.reference_values(batch)
    calls = []
    module._compute_reference = lambda b: calls.append(b) or torch.zeros(len(b["index"]), 4)
    torch.testing.assert_close(module.reference_values(batch), first)  # second epoch: from the cache
    assert not calls
    checkpoint = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    resumed = DpoModule(model=str(tiny_model_dir), **COMMON)
    resumed.on_load_checkpoint(checkpoint)
    resumed._compute_reference = module._compute_reference
    torch.testing.assert_close(resumed.reference_values(batch), first)
    assert not calls
    off = DpoModule(model=str(tiny_model_dir), reuse_ref_logps=False, **COMMON)
    assert not off._caches_reference
    dropout = DpoModule(model=str(tiny_model_dir), **COMMON)
    dropout.policy.get_base_model().config.attention_dropout = 0.1
    assert not dropout._caches_reference  # a recomputation would draw other dropout masks
