"""load_quantized_model: quantize-while-loading, and checkpoints saved 4-bit by transformers + bitsandbytes."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from pmetal.errors import PmetalError
from pmetal.quant import QuantLinear, load_quantized_model, quantize_model

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _save_tiny_llama(path, *, tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()


IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 7], [3, 3, 64, 12, 90, 44, 8, 127]])


@pytest.mark.parametrize("tie", [False, True])
def test_quantize_while_loading_equals_quantize_in_place(tmp_path, tie):
    model = _save_tiny_llama(tmp_path, tie=tie)
    loaded = load_quantized_model(tmp_path, "nf4", block_size=64, double_quant=True)
    quantize_model(model, "nf4", block_size=64, double_quant=True)
    ours = dict(loaded.named_buffers())
    for name, buf in model.named_buffers():
        assert torch.equal(ours[name], buf), name
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert loaded.pmetal_quantization == {"quant_type": "nf4", "block_size": 64, "double_quant": True}
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_bitsandbytes_checkpoint_loads_without_requantizing(tmp_path, quant_type, double_quant):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _save_tiny_llama(tmp_path / "fp")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                    bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    bnb_model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=bnb_config, dtype=torch.float32)
    bnb_model.save_pretrained(tmp_path / "bnb", safe_serialization=True)
    # train mode: bnb's CPU eval path repacks weights and runs a bf16 kernel; training mode dequantizes
    bnb_model.train()
    with torch.no_grad():
        expected = bnb_model(IDS).logits

    model = load_quantized_model(tmp_path / "bnb", backend="pmetal")
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.quant_type == quant_type and layer.double_quant == double_quant
    bnb_layer = bnb_model.model.layers[1].mlp.down_proj
    assert torch.equal(layer.qweight, bnb_layer.weight.data.view(-1))
    import bitsandbytes.functional as bnbf

    assert torch.equal(layer.dequantize(), bnbf.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state))
    with torch.no_grad():
        logits = model(IDS).logits
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(PmetalError, match="no config.json; expected a Hugging Face model directory"):
        load_quantized_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(PmetalError, match="no model.safetensors or model.safetensors.index.json"):
        load_quantized_model(tmp_path)
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(PmetalError, match="quantized with 'gptq'; pmetal reads bitsandbytes 4-bit only"):
        load_quantized_model(tmp_path)


def test_constructed_buffers_follow_the_model_to_its_device():
    """The rotary inv_freq is built on the CPU at construction; the loader moves it where the weights
    go (here "meta" stands in for a GPU), parameters and dtypes untouched."""
    from pmetal.quant.model import move_buffers
    from tests.tiny import tiny_llama

    model = tiny_llama()
    dtypes = {n: b.dtype for n, b in model.named_buffers()}
    assert dtypes, "the tiny Llama has a rotary inv_freq buffer"
    move_buffers(model, "meta")
    assert all(b.device.type == "meta" for b in model.buffers())
    assert {n: b.dtype for n, b in model.named_buffers()} == dtypes
    assert all(p.device.type == "cpu" for p in model.parameters())
