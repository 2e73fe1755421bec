"""Tiny random models built in place, for unit tests that need no tokenizer."""

import torch


def tiny_llama(vocab_size: int = 97, seed: int = 0, **overrides):
    """A 2-layer, hidden-32 LlamaForCausalLM in eval mode; `overrides` go into its LlamaConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def save_bnb_4bit_copy(model_dir, target, quant_type: str = "nf4", double_quant: bool = True):
    """Save `model_dir`'s causal LM the way transformers + bitsandbytes save a `*-bnb-4bit` checkpoint
    (quantized on the CPU), with its tokenizer files; returns the bitsandbytes model (fp32 compute)."""
    import shutil
    from pathlib import Path

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32)
    model.save_pretrained(target, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(model_dir) / name).exists():
            shutil.copy(Path(model_dir) / name, Path(target) / name)
    return model


def randomize_lora_b(module, scale: float = 0.05, seed: int = 0) -> None:
    """Give a freshly built module's LoRA B matrices random values: a non-trivial adapter without a
    training run (B starts at zero, so an untrained adapter changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


def save_random_lora(base_dir, out, *, seed: int, r: int = 4, base_name=None, scale: float = 0.3,
                     targets=("q_proj", "v_proj", "down_proj")):
    """Save a PEFT LoRA adapter over the model in `base_dir` with random A and B (so it changes the
    logits); its adapter_config.json names `base_name` (default `base_dir`) as the base."""
    import json
    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    out = Path(out)
    peft_model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_name or base_dir)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out
