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


def _no_whole_model_load(monkeypatch):
    """Make the whole-model path (from_pretrained) fail, so a test proves it was not taken."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("the whole model was loaded before quantizing")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_training_loads_quantize_layer_by_layer(tiny_model_dir, monkeypatch):
    """`--quantization` (load_model_and_tokenizer) reads a safetensors directory through the
    quantizing loader, never holding the whole full-precision model, with the same result as
    quantizing the loaded model."""
    from transformers import AutoModelForCausalLM

    from pmetal.models import load_model_and_tokenizer

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    quantize_model(reference, "nf4", block_size=64, double_quant=True, compute_dtype=torch.float32)
    _no_whole_model_load(monkeypatch)
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, quantization="nf4")
    assert model.config._attn_implementation == "sdpa"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.pmetal_quantization["quant_type"] == "nf4"
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == len([m for m in reference.modules() if isinstance(m, QuantLinear)]) > 0
    ids = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference.eval()(ids).logits)


def test_a_bitsandbytes_checkpoint_trains_as_qlora_without_quantization_flag(tiny_model_dir, tmp_path, monkeypatch):
    """A `*-bnb-4bit` directory is read by pmetal's loader (any device, bitsandbytes not needed at
    run time), its packed bytes kept; full fine-tuning of it is refused with a clear error."""
    from pmetal.modules import SftModule
    from tests.tiny import save_bnb_4bit_copy

    bnb_model = save_bnb_4bit_copy(tiny_model_dir, tmp_path)
    _no_whole_model_load(monkeypatch)
    module = SftModule(model=str(tmp_path), learning_rate=1e-3)
    layer = module.policy.get_base_model().model.layers[0].mlp.down_proj.base_layer
    assert isinstance(layer, QuantLinear) and layer.quant_type == "nf4"
    assert torch.equal(layer.qweight, bnb_model.model.layers[0].mlp.down_proj.weight.data.view(-1))
    with pytest.raises(PmetalError, match="is quantized and cannot be fully fine-tuned"):
        SftModule(model=str(tmp_path), adapter="full")


def test_a_checkpoint_without_safetensors_is_quantized_after_a_whole_load(tiny_model_dir, tmp_path):
    """Weights only in pytorch_model.bin (no safetensors): the whole-model path, then quantization."""
    from transformers import AutoModelForCausalLM

    from pmetal.models import load_model_and_tokenizer

    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    full.config.save_pretrained(tmp_path)
    torch.save(full.state_dict(), tmp_path / "pytorch_model.bin")
    for path in tiny_model_dir.iterdir():
        if path.name.startswith("tokenizer") or path.name in ("special_tokens_map.json", "chat_template.jinja"):
            (tmp_path / path.name).write_bytes(path.read_bytes())
    model, _ = load_model_and_tokenizer(tmp_path, quantization="int8")
    assert any(isinstance(m, QuantLinear) and m.quant_type == "int8" for m in model.modules())


def test_host_memory_release_is_safe_everywhere(monkeypatch):
    import sys

    from pmetal.quant.model import release_freed_host_memory

    assert release_freed_host_memory() is (sys.platform == "linux")  # glibc on the Linux test machines
    monkeypatch.setattr(sys, "platform", "darwin")
    assert release_freed_host_memory() is False


def test_bitsandbytes_bits_reads_the_config():
    from pmetal.quant.bnb_compat import bitsandbytes_bits

    assert bitsandbytes_bits({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}) == 4
    assert bitsandbytes_bits({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}) == 8
    assert bitsandbytes_bits({"quantization_config": {"quant_method": "gptq"}}) is None
    assert bitsandbytes_bits({"model_type": "llama"}) is None


def test_quantized_loading_errors_name_the_file_or_model(tmp_path, monkeypatch):
    import huggingface_hub

    from pmetal.models import _layerwise_quantization_source

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PmetalError, match=r"config\.json: not a readable JSON model config .*line 1 column 2"):
        _layerwise_quantization_source(str(tmp_path), "nf4")

    def offline(*args, **kwargs):
        raise OSError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(PmetalError, match="could not fetch config.json of the model 'org/model': offline"):
        _layerwise_quantization_source("org/model", "nf4")
