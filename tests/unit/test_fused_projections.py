"""Fused q/k/v and gate/up projections change nothing but the kernel count: equal greedy tokens,
log-probs equal a training forward, the live weights after an optimizer step, the model untouched."""

from __future__ import annotations

import pytest
import torch

from pmetal.generation import SamplingConfig, generate_reference
from pmetal.generation.engine import RolloutEngine
from pmetal.generation.fused import FusedProjections
from tests.unit.test_engine import PAD, PROMPTS, _tiny, _training_logps


def _tiny_qwen2(seed=0):
    """Qwen2's layout: biases on q/k/v, none on gate/up."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=PAD, eos_token_id=1, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.normal_()  # biases that matter
    return model


@pytest.mark.parametrize("build", [_tiny, _tiny_qwen2], ids=["llama", "qwen2-bias"])
def test_fused_rounds_equal_the_reference_loop(build):
    model = build()
    engine = RolloutEngine(model, fuse_projections=True)
    fused = engine.fused(model)
    assert len(fused) == 2 * 2  # attention and MLP of both layers
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0)
    ref = generate_reference(model, PROMPTS, greedy, stop_ids=[], pad_token_id=PAD, num_return_sequences=2)
    for options in (dict(), dict(speculative=True, num_draft_tokens=3)):
        gen = RolloutEngine(model, fuse_projections=True, **options).generate(
            PROMPTS, greedy, stop_ids=[], pad_token_id=PAD, num_return_sequences=2)
        assert gen.completion_ids.tolist() == ref.completion_ids.tolist(), options
        torch.testing.assert_close(gen.logps, ref.logps, atol=1e-5, rtol=1e-5)
    sampled = SamplingConfig(max_new_tokens=12, temperature=0.8)
    gen = engine.generate(PROMPTS, sampled, stop_ids=[], pad_token_id=PAD, generator=torch.Generator().manual_seed(1))
    for row, prompt in enumerate(PROMPTS):
        expected = _training_logps(model, prompt, gen.completion_ids[row].tolist(), 0.8)
        torch.testing.assert_close(gen.logps[row], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compile_decode", [False, True], ids=["eager", "compiled"])
def test_the_fused_copy_follows_the_weights_after_an_optimizer_step(compile_decode):
    """Full fine-tuning: every rollout refreshes the fused copy from the live weights."""
    from pmetal.models import apply_adapter

    model = apply_adapter(_tiny(), "full").eval()
    engine = RolloutEngine(model, fuse_projections=True, compile_decode=compile_decode)
    config = SamplingConfig(max_new_tokens=10, temperature=0.0)
    before = engine.generate(PROMPTS, config, stop_ids=[], pad_token_id=PAD)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    ids = torch.tensor([PROMPTS[2]])
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = engine.generate(PROMPTS, config, stop_ids=[], pad_token_id=PAD)
    assert engine.compile_error is None
    assert not torch.equal(after.logps, before.logps)
    with torch.no_grad():
        for row, prompt in enumerate(PROMPTS):
            expected = _training_logps(model, prompt, after.completion_ids[row].tolist(), 1.0)
            torch.testing.assert_close(after.logps[row], expected, atol=1e-4, rtol=1e-4)


def test_the_model_is_left_as_it_was_and_adapted_groups_keep_their_modules():
    from pmetal.models import apply_adapter

    model = apply_adapter(_tiny(), "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # an adapter that changes the output
    modules = dict(model.named_modules())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = {n.split(".")[-1] for n, m in modules.items() if hasattr(m, "lora_A")}
    engine = RolloutEngine(model, fuse_projections=True)
    config = SamplingConfig(max_new_tokens=12, temperature=0.0)
    gen = engine.generate(PROMPTS, config, stop_ids=[], pad_token_id=PAD, num_return_sequences=2)
    ref = generate_reference(model, PROMPTS, config, stop_ids=[], pad_token_id=PAD, num_return_sequences=2)
    assert gen.completion_ids.tolist() == ref.completion_ids.tolist()
    torch.testing.assert_close(gen.logps, ref.logps, atol=1e-5, rtol=1e-5)
    fused = engine.fused(model)
    assert {names for _, names, *_ in fused.groups} == {("gate_proj", "up_proj")}  # the MLPs, twice
    assert len(fused) == 2 and adapted == {"q_proj", "v_proj", "o_proj"}  # adapted groups keep their modules
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_fusion_is_off_by_default_off_cuda_and_sized_before_it_is_made():
    model = _tiny()
    assert RolloutEngine(model).fuse_projections is False
    # per layer, float32: q 32x32, k and v 16x32 (2 KV heads of 8), gate and up 64x32
    assert FusedProjections.size_bytes(model) == 2 * 4 * (32 * 32 + 2 * 16 * 32 + 2 * 64 * 32)


def test_a_layer_that_calls_its_projections_out_of_order_is_served_unfused():
    """k before q, or v on another input: the stand-ins compute their own product, never a stale part."""

    class OddAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(8, n) for n in (8, 4, 4))

        def forward(self, x, y):
            return torch.cat([self.k_proj(x), self.q_proj(x), self.v_proj(y), self.k_proj(x)], dim=-1)

    torch.manual_seed(0)
    layer = OddAttention()
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    expected = layer(x, y)
    fused = FusedProjections(layer)
    assert len(fused) == 1
    with torch.no_grad(), fused:
        got = layer(x, y)
    torch.testing.assert_close(got, expected)
    assert isinstance(layer.q_proj, torch.nn.Linear) and isinstance(layer.k_proj, torch.nn.Linear)
