"""pmetal.logps against a plain Hugging Face forward (log_softmax of the full logits)."""

from __future__ import annotations

import pytest
import torch

from pmetal.errors import PmetalError
from pmetal.logps import backbone_and_head, backbone_hidden, completion_logps, lm_loss

from tests.tiny import tiny_llama

VOCAB = 97


def _tiny_llama(seed=0, **overrides):
    return tiny_llama(VOCAB, seed, **{"max_position_embeddings": 128, "tie_word_embeddings": False, **overrides})


def _lora(model, target_modules=("q_proj", "v_proj", "up_proj")):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules)))
    # LoRA starts as the identity (B = 0); make it change the model so the test can tell.
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return peft_model


def _batch(seed=0, batch=3, length=11):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 8:] = 0  # right padding
    attention_mask[2, 5:] = 0
    labels = input_ids.clone()
    labels[:, :3] = -100  # a prompt
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def _reference_token_logps(model, input_ids, attention_mask, labels, temperature=1.0):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / temperature
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ref = torch.zeros(labels.shape)
    ref[:, 1:] = torch.where(labels[:, 1:] != -100, logps, 0.0)
    return ref


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_equals_hf_log_softmax(temperature):
    model = _tiny_llama()
    input_ids, attention_mask, labels = _batch()
    out = completion_logps(model, input_ids, attention_mask, labels, temperature=temperature, return_token_logps=True)
    ref = _reference_token_logps(model, input_ids, attention_mask, labels, temperature)
    torch.testing.assert_close(out.token_logps, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.sum, ref.sum(-1), atol=1e-5, rtol=1e-5)
    assert out.num_tokens.tolist() == [8, 5, 2]
    torch.testing.assert_close(out.mean, ref.sum(-1) / torch.tensor([8.0, 5.0, 2.0]), atol=1e-5, rtol=1e-5)
    assert completion_logps(model, input_ids, attention_mask, labels).token_logps is None


def test_peft_adapter_active_and_disabled():
    base_logps = _reference_token_logps(_tiny_llama(), *_batch())
    peft_model = _lora(_tiny_llama())
    input_ids, attention_mask, labels = _batch()
    with_adapter = completion_logps(peft_model, input_ids, attention_mask, labels, return_token_logps=True)
    ref = _reference_token_logps(peft_model, input_ids, attention_mask, labels)
    torch.testing.assert_close(with_adapter.token_logps, ref, atol=1e-5, rtol=1e-5)
    assert (with_adapter.token_logps - base_logps).abs().max() > 1e-2  # the adapter matters
    with peft_model.disable_adapter():
        without = completion_logps(peft_model, input_ids, attention_mask, labels, return_token_logps=True)
    torch.testing.assert_close(without.token_logps, base_logps, atol=1e-5, rtol=1e-5)


def test_lm_loss_and_lora_grads_equal_hf():
    peft_model = _lora(_tiny_llama())
    input_ids, attention_mask, labels = _batch()
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    loss, num_tokens = lm_loss(peft_model, batch)
    assert num_tokens.item() == 15
    params = [p for p in peft_model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    hf_loss = peft_model(**batch).loss
    hf_grads = torch.autograd.grad(hf_loss, params)
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)
    for g, h in zip(grads, hf_grads):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)


def test_full_finetune_head_grad_equals_hf():
    model = _tiny_llama(tie_word_embeddings=True).train()
    input_ids, attention_mask, labels = _batch(seed=3)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    params = list(model.parameters())
    loss, _ = lm_loss(model, batch)
    grads = torch.autograd.grad(loss, params)
    hf_grads = torch.autograd.grad(model(**batch).loss, params)
    for g, h in zip(grads, hf_grads):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)


def test_lora_on_lm_head_uses_the_module_path():
    peft_model = _lora(_tiny_llama(), target_modules=("q_proj", "lm_head"))
    input_ids, attention_mask, labels = _batch()
    out = completion_logps(peft_model, input_ids, attention_mask, labels, return_token_logps=True)
    torch.testing.assert_close(out.token_logps, _reference_token_logps(peft_model, input_ids, attention_mask, labels))
    loss, _ = lm_loss(peft_model, dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels))
    torch.testing.assert_close(loss, peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)


def test_final_logit_softcapping_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=0.5,  # small, so that capping changes the result
        attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(config).eval()
    input_ids, attention_mask, labels = _batch()
    out = completion_logps(model, input_ids, attention_mask, labels, return_token_logps=True)
    torch.testing.assert_close(out.token_logps, _reference_token_logps(model, input_ids, attention_mask, labels))


def test_backbone_hidden_shape_and_bad_models():
    model = _tiny_llama()
    input_ids, attention_mask, _ = _batch()
    assert backbone_hidden(model, input_ids, attention_mask).shape == (3, 11, 32)
    backbone, head = backbone_and_head(model)
    assert backbone is model.model and head is model.lm_head
    with pytest.raises(PmetalError, match="causal language model"):
        backbone_and_head(model.model)  # a bare decoder has no LM head
    with pytest.raises(ValueError, match="shape of input_ids"):
        completion_logps(model, input_ids, attention_mask, input_ids[:, :5])


def test_selective_gradient_checkpointing_recomputes_only_chosen_layers():
    from pmetal.perf import decoder_layers, enable_gradient_checkpointing

    peft_model = _lora(_tiny_llama(num_hidden_layers=4)).train()
    input_ids, attention_mask, labels = _batch()
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(lm_loss(peft_model, batch)[0], params)

    assert enable_gradient_checkpointing(peft_model, "every:2") == [0, 2]
    calls = [0] * 4
    for index, layer in enumerate(decoder_layers(peft_model)):
        layer.self_attn.register_forward_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    checkpointed = torch.autograd.grad(lm_loss(peft_model, batch)[0], params)
    assert calls == [2, 1, 2, 1]  # checkpointed layers run again in backward
    for g, h in zip(checkpointed, plain):
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-5)
    assert enable_gradient_checkpointing(peft_model, "none") == []


def test_layer_selection_parsing():
    from pmetal.perf import parse_layer_selection

    assert parse_layer_selection(None, 4) == [0, 1, 2, 3]
    assert parse_layer_selection("none", 4) == []
    assert parse_layer_selection("every:3", 7) == [0, 3, 6]
    assert parse_layer_selection("0-2,5,-1", 8) == [0, 1, 2, 5, 7]
    assert parse_layer_selection([1, -2], 4) == [1, 2]
    with pytest.raises(PmetalError, match="out of range: the model has 4 layers"):
        parse_layer_selection("3-5", 4)
    with pytest.raises(PmetalError, match="not understood"):
        parse_layer_selection("first half", 4)


def test_maybe_compile_keeps_results():
    from pmetal.perf import maybe_compile

    model = _tiny_llama()
    input_ids, attention_mask, labels = _batch()
    before = completion_logps(model, input_ids, attention_mask, labels).sum
    assert not maybe_compile(model, enabled=False)
    assert maybe_compile(model, backend="eager")  # dynamo tracing without a slow inductor build
    torch.testing.assert_close(completion_logps(model, input_ids, attention_mask, labels).sum, before)


def test_whole_model_compile_keeps_training_results():
    """scope="model": the decoder stack compiled as one graph, checkpointing inside it, a LoRA
    adapter switched off for the reference: log-probs and gradients equal eager's."""
    from pmetal.models import apply_adapter
    from pmetal.perf import enable_gradient_checkpointing, maybe_compile

    input_ids, attention_mask, labels = _batch()
    results = []
    for compiled in (False, True):
        model = _tiny_llama()
        enable_gradient_checkpointing(model)
        policy = apply_adapter(model, "lora", r=4)
        for name, p in policy.named_parameters():  # nonzero B, so the adapter changes the output
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        policy.train()
        if compiled:
            assert maybe_compile(policy, scope="model", backend="eager")
        logps = completion_logps(policy, input_ids, attention_mask, labels).sum
        with torch.no_grad(), policy.disable_adapter():
            reference = completion_logps(policy, input_ids, attention_mask, labels).sum
        logps.sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        results.append((logps.detach(), reference, grads))
    (eager, eager_ref, eager_grads), (comp, comp_ref, comp_grads) = results
    assert not torch.allclose(eager, eager_ref)
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(comp_ref, eager_ref)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(comp_grads[name], grad, msg=name)
    with pytest.raises(PmetalError, match="compile scope"):
        maybe_compile(_tiny_llama(), scope="everything")


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_token_mean_logits_are_trl_mean_logits(softcap):
    # TRL's logits/chosen|rejected: the mean over the vocabulary of each completion position's logits
    model = _tiny_llama(final_logit_softcapping=softcap) if softcap else _tiny_llama()
    input_ids, attention_mask, labels = _batch()
    out = completion_logps(model, input_ids, attention_mask, labels, return_mean_logits=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    if softcap:  # Llama's forward ignores the setting; pmetal applies it wherever the config has it
        logits = torch.tanh(logits / softcap) * softcap
    expected = torch.zeros(labels.shape)
    expected[:, 1:] = torch.where(labels[:, 1:] != -100, logits[:, :-1].mean(-1), 0.0)
    torch.testing.assert_close(out.token_mean_logits, expected, atol=1e-5, rtol=1e-5)
    assert not out.token_mean_logits.requires_grad
    assert completion_logps(model, input_ids, attention_mask, labels).token_mean_logits is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["linear-mean", "chunked-mean"])
def test_autocast_results_are_fp32_and_close_to_fp32(dtype, softcap):
    """Under autocast (bf16 on CUDA and recent MPS, fp16 on older MPS; CPU autocast stands in) every
    result stays fp32: the mean logits once crashed masked_scatter (fp32 target, bf16 source)."""
    model = _tiny_llama(final_logit_softcapping=softcap) if softcap else _tiny_llama()
    input_ids, attention_mask, labels = _batch()
    exact = completion_logps(model, input_ids, attention_mask, labels, return_token_logps=True, return_mean_logits=True)
    with torch.autocast("cpu", dtype=dtype):
        out = completion_logps(model, input_ids, attention_mask, labels, return_token_logps=True,
                               return_mean_logits=True)
        loss, _ = lm_loss(model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    for name in ("sum", "mean", "token_logps", "token_mean_logits"):
        value = getattr(out, name)
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, getattr(exact, name), atol=0.1, rtol=0.05, msg=name)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
