"""Shared pieces of the DPO, GRPO, RLOO, Online DPO and GKD benchmarks: the Qwen3 shapes, a word-level
tokenizer, and the model directory both contenders load (identical token ids for pmetal and TRL).
Their step timing and worker processes are in `_timing.py`."""

from __future__ import annotations

import os
import time
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


# Random-weight shapes a benchmark writes to disk (`write_model_dir`): the Qwen3-0.6B/1.7B shapes on a
# GPU, tiny ones (the word-level vocabulary) for CPU smokes in seconds.
SHAPES = {
    "qwen3-0.6b-shape": QWEN3_06B_SHAPE,
    "qwen3-1.7b-shape": dict(QWEN3_06B_SHAPE, hidden_size=2048, intermediate_size=6144),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=WORDS, tie_word_embeddings=True, max_position_embeddings=4096),
    "tiny-wide": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, intermediate_size=256, vocab_size=WORDS, tie_word_embeddings=True,
                      max_position_embeddings=4096),
}


def write_model_dir(model: str, work: Path, name: str = "model", seed: int = 0, device: str = "cpu") -> Path:
    """`work/name`: random bf16 weights of one of `SHAPES` (built on `device`: a GPU makes a 1.7B model
    in a second, a CPU in tens of seconds), or links to a real model's files, plus the word-level
    tokenizer."""
    import torch

    model_dir = work / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if model in SHAPES:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(seed)
        config = Qwen3Config(**SHAPES[model], bos_token_id=None, eos_token_id=2, pad_token_id=0)
        if device == "cuda":
            with torch.device(device):
                built = Qwen3ForCausalLM._from_config(config, dtype=torch.bfloat16)
        else:
            built = Qwen3ForCausalLM(config).to(torch.bfloat16)
        built.save_pretrained(model_dir, safe_serialization=True)
        del built
    else:
        from pmetal.models import default_model_path

        source = default_model_path() if model == "default" else Path(model)
        for file in ("config.json", "model.safetensors", "generation_config.json"):
            if (source / file).exists() and not (model_dir / file).exists():
                os.symlink((source / file).resolve(), model_dir / file)
    word_tokenizer().save_pretrained(model_dir)
    return model_dir


class Profile:
    """torch.profiler over the timed steps when --profile is given; a no-op otherwise."""

    def __init__(self):
        self.profiler, self.path, self.busy = None, None, None

    def setup(self, directory: Path | None, name: str, device: str) -> None:
        if directory is None:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        self.profiler, self.path = profile(activities=activities), directory / f"{name}_ops.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        if self.profiler is not None:
            self.profiler.start()
            self.wall = time.perf_counter()

    def stop(self) -> None:
        if self.profiler is None:
            return
        self.profiler.stop()
        wall = time.perf_counter() - self.wall
        events = self.profiler.key_averages()
        from torch.autograd import DeviceType

        # kernels only: operator rows repeat their kernels' time, and GPU user annotations (the
        # optimizer's "Optimizer.step#AdamW.step" range) span whole queues of kernels
        device_us = sum(e.self_device_time_total for e in events
                        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                        and "#" not in e.key)  # fmt: skip
        self.busy = device_us / (wall * 1e6) if device_us else None
        sort = "self_cuda_time_total" if device_us else "self_cpu_time_total"
        busy = f", device busy {self.busy:.1%}" if self.busy is not None else ""
        self.path.write_text(f"wall {wall:.3f} s{busy}\n\n"
                             + events.table(sort_by=sort, row_limit=40, max_name_column_width=60)
                             + "\n\nBy CPU time (inclusive): where the host spends the step\n\n"
                             + events.table(sort_by="cpu_time_total", row_limit=60, max_name_column_width=80))
        self.profiler = None


def report(text: str, markdown: str | None) -> None:
    """Print a result table and, with `--markdown FILE`, append it to that file."""
    print(text)
    if markdown:
        with open(markdown, "a") as f:
            f.write("\n" + text)


def load_fp32_causal_lm(model: str, threads: int | None = None):
    """(tokenizer, fp32 causal LM in eval mode) of a model directory, or "default" (the embedded
    SmolLM2), for the GGUF benchmarks' source model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmetal.models import default_model_path

    if threads:
        torch.set_num_threads(threads)
    source = default_model_path() if model == "default" else Path(model)
    return (AutoTokenizer.from_pretrained(source),
            AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval())



# Llama-3.1-8B's shape (random weights: no download); Unsloth's maximum-context figure is for it.
LLAMA31_8B_SHAPE = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
                        max_position_embeddings=131072, rope_theta=500_000.0)
RANDOM_SHAPES = {"qwen3-0.6b": ("qwen3", QWEN3_06B_SHAPE), "llama3.1-8b": ("llama", LLAMA31_8B_SHAPE)}


def random_causal_lm(name: str, dtype, device, attn: str = "sdpa"):
    """A causal LM of one of `RANDOM_SHAPES`, random weights built in place on `device` (an 8B model
    in bf16 takes 16 GB there and seconds, not a download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    family, shape = RANDOM_SHAPES[name]
    config_class, model_class = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    torch.manual_seed(0)
    with torch.device(device):  # built in `dtype` directly: no fp32 copy of an 8B model
        return model_class._from_config(config_class(**shape), attn_implementation=attn, dtype=dtype)


def bnb_quantize_linears(model, compute_dtype):
    """Every linear layer of the decoder (not the LM head) replaced by a bitsandbytes NF4 `Linear4bit`
    holding the same weights, in place: what `from_pretrained(quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))` builds, for a model
    that exists only in memory. PEFT puts its bitsandbytes LoRA layers on them (HF QLoRA)."""
    import bitsandbytes as bnb
    import torch

    for name, linear in list(model.named_modules()):
        if not isinstance(linear, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True,
                                      device="meta")
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True).to(linear.weight.device)
        if linear.bias is not None:
            quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)
    return model
