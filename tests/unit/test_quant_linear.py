"""QuantLinear, quantize_model and QLoRA/DoRA adapters on quantized layers (tiny random models)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from pmetal.errors import PmetalError
from pmetal.quant import QuantLinear, dequantize_model, prepare_peft, quantize_model, quantized_memory
from pmetal.quant import functional as QF

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def tiny_llama(seed: int = 0, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_forward_and_input_grad_equal_dequantized_linear(quant_type):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    layer = QuantLinear.from_linear(linear, quant_type=quant_type, block_size=32)
    w = layer.dequantize(torch.float32)
    x = torch.randn(3, 5, 96, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), torch.nn.functional.linear(x_ref, w, linear.bias.detach())
    assert torch.allclose(y, y_ref, atol=1e-6)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())
    assert list(layer.parameters()) == [layer.bias]  # codes and scales are buffers, never optimizer state


def test_backward_keeps_no_dequantized_weight():
    layer = QuantLinear.from_linear(nn.Linear(256, 512))
    x = torch.randn(2, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(x).sum().backward()
    assert all(n < 256 * 512 for n in saved)


def test_buffers_survive_dtype_moves_and_state_dict_round_trip():
    layer = QuantLinear.from_linear(nn.Linear(64, 32, bias=True), double_quant=True)
    x = torch.randn(4, 64)
    expected = layer(x)
    layer.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.uint8 and layer.absmax.dtype == torch.uint8
    assert layer.nested_absmax.dtype == torch.float32 and layer.nested_offset.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    state = layer.state_dict()
    assert set(state) == {"qweight", "absmax", "nested_absmax", "nested_offset", "bias"}
    fresh = QuantLinear(64, 32, bias=True, double_quant=True)
    fresh.load_state_dict({k: v.float() if k == "bias" else v for k, v in state.items()})
    assert torch.allclose(fresh(x), expected, atol=1e-2)
    assert torch.equal(fresh.dequantize(), layer.dequantize())


def test_autocast_runs_in_bf16():
    layer = QuantLinear.from_linear(nn.Linear(64, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 64)).dtype == torch.bfloat16
    assert QuantLinear.from_linear(nn.Linear(64, 32), compute_dtype=torch.bfloat16)(torch.randn(2, 64)).dtype == torch.bfloat16


def test_unregistered_peft_still_trains_through_quantlinear():
    # PEFT's own lora.Linear wraps QuantLinear (an nn.Linear) when register_peft was not called
    from peft import LoraConfig, get_peft_model

    model = quantize_model(tiny_llama(), "nf4")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, QuantLinear)
    peft_model(**_batch()).loss.backward()
    assert layer.lora_B["default"].weight.grad is not None


def test_quantize_model_replaces_linears_but_lm_head_and_saves_memory():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    quantize_model(model, "nf4", block_size=64, double_quant=True)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds.pop("lm_head") is nn.Linear and set(kinds.values()) == {QuantLinear} and len(kinds) == 14
    memory = quantized_memory(model)
    assert 0.51 < memory["bytes_per_param"] < 0.53  # 4 bits + 8-bit absmax per 64 + fp32 per 64*256
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - reference).abs().mean() < 0.2 * reference.abs().mean()  # 4-bit on random init: ~10%
    dequantize_model(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, logits, atol=1e-5)


def test_quantize_model_rejects_bad_settings():
    with pytest.raises(PmetalError, match="unknown quantization 'q4'"):
        quantize_model(tiny_llama(), "q4")
    with pytest.raises(PmetalError, match="block size 100 is not supported"):
        quantize_model(tiny_llama(), "nf4", block_size=100)


def _batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (4, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_training_moves_only_adapters(use_dora):
    model = quantize_model(tiny_llama(), "nf4")
    frozen = [(m, {k: b.clone() for k, b in m.named_buffers()}) for m in model.modules() if isinstance(m, QuantLinear)]
    peft_model = prepare_peft(model, r=8, use_dora=use_dora)
    wrapped = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(wrapped).__name__ == "QuantLoraLinear" and isinstance(wrapped.base_layer, QuantLinear)
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    batch = _batch()
    losses = []
    for _ in range(8):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    for name, p in peft_model.named_parameters():
        if name in trainable:
            continue
        assert not p.requires_grad
    changed = [n for n, p in peft_model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert any("lora_B" in n for n in changed)
    assert len(frozen) == 14
    for module, before in frozen:  # the packed base bytes and scales are untouched
        assert all(torch.equal(b, before[k]) for k, b in module.named_buffers())


def test_dora_magnitude_uses_dequantized_weight_norm():
    model = quantize_model(tiny_llama(), "nf4")
    peft_model = prepare_peft(model, r=4, use_dora=True)
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    norm = layer.base_layer.dequantize().norm(dim=1)
    assert torch.allclose(layer.lora_magnitude_vector["default"].weight, norm, atol=1e-5)


def test_adapter_save_load_round_trip(tmp_path):
    from pmetal.quant import load_adapter

    model = quantize_model(tiny_llama(), "fp4", block_size=32)
    peft_model = prepare_peft(copy.deepcopy(model), r=4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = _batch()
    expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    loaded = load_adapter(model, tmp_path / "adapter")
    assert torch.allclose(loaded(**batch).logits, expected, atol=1e-5)


def test_merge_on_quantized_layer_requantizes_and_dora_merge_is_refused():
    model = quantize_model(tiny_llama(), "nf4")
    peft_model = prepare_peft(copy.deepcopy(model), r=4)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    expected = layer.base_layer.dequantize() + layer.get_delta_weight("default")
    with pytest.warns(UserWarning, match="requantizes"):
        layer.merge()
    codes, state = QF.quantize_nf4(expected, double_quant=True)
    assert torch.equal(layer.base_layer.qweight, codes)
    dora = prepare_peft(copy.deepcopy(model), r=4, use_dora=True)
    with pytest.raises(PmetalError, match="DoRA adapter into quantized weights"):
        dora.base_model.model.model.layers[0].self_attn.q_proj.merge()


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_bitsandbytes_backend_gives_the_same_values(quant_type, double_quant):
    """`quant_backend="bitsandbytes"` dequantizes with bitsandbytes' kernel (its native CPU kernel
    here; rows hold whole blocks): outputs and input gradients equal pmetal's, bit for bit."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    weight = torch.randn(48, 128) * 0.05
    layers = {backend: QuantLinear.from_weight(weight, quant_type=quant_type, double_quant=double_quant, backend=backend)
              for backend in ("pmetal", "bitsandbytes")}  # fmt: skip
    assert layers["bitsandbytes"]._use_bitsandbytes() and not layers["pmetal"]._use_bitsandbytes()
    results = {}
    for backend, layer in layers.items():
        x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = layer(x)
        out.square().sum().backward()
        results[backend] = (out.detach(), x.grad)
    assert torch.equal(results["pmetal"][0], results["bitsandbytes"][0])
    assert torch.equal(results["pmetal"][1], results["bitsandbytes"][1])


def test_quant_backend_reaches_every_quantized_layer(tiny_model_dir):
    from pmetal.cli.commands import train
    from pmetal.modules import SftModule

    parser = __import__("argparse").ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--model", str(tiny_model_dir), "--quantization", "nf4", "--quant-backend", "pmetal"])
    module = SftModule(**train.FLAGS.resolve(args).model)
    layers = [m for m in module.policy.modules() if isinstance(m, QuantLinear)]
    assert layers and {layer.backend for layer in layers} == {"pmetal"}
