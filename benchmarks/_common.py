"""Shared pieces of the DPO and GRPO benchmarks: the Qwen3-0.6B shape, a word-level tokenizer, and the
model directory both contenders load (identical token ids for pmetal and TRL)."""

from __future__ import annotations

import os
from pathlib import Path

QWEN3_06B_SHAPE = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=40960, rope_theta=1_000_000.0)
WORDS = 8000
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def word_tokenizer():
    """`w3 w17 ...` -> one id per word; a chat template that concatenates contents."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_model_dir(model: str, work: Path) -> Path:
    """`work/model`: random Qwen3-0.6B-shaped bf16 weights, or links to a real model's files, plus the
    word-level tokenizer."""
    import torch

    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    if model == "qwen3-0.6b-shape":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(0)
        config = Qwen3Config(**QWEN3_06B_SHAPE, bos_token_id=None, eos_token_id=2, pad_token_id=0)
        Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    else:
        from pmetal.models import default_model_path

        source = default_model_path() if model == "default" else Path(model)
        for name in ("config.json", "model.safetensors", "generation_config.json"):
            if (source / name).exists() and not (model_dir / name).exists():
                os.symlink((source / name).resolve(), model_dir / name)
    word_tokenizer().save_pretrained(model_dir)
    return model_dir
