"""`pmetal export --format gguf|hf`: round trips through transformers' own GGUF loader, fused
adapters (QLoRA bases dequantized first), `train --model x.gguf` then export, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

PROMPT = "<|im_start|>user\nWhat is the capital of France? Answer in 12 words.<|im_end|>\n<|im_start|>assistant\n"


def _tiny(kind: str, path, tokenizer):
    """A tiny random decoder of `kind` with SmolLM2's tokenizer, default (small) init, saved to `path`.
    Qwen3 keeps its default head_dim of 128: transformers' GGUF reader does not read key_length."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    config, cls = {"llama": (LlamaConfig(**common, tie_word_embeddings=True), LlamaForCausalLM),
                   "qwen2": (Qwen2Config(**common, tie_word_embeddings=False), Qwen2ForCausalLM),
                   "qwen3": (Qwen3Config(**common, head_dim=128), Qwen3ForCausalLM)}[kind]  # fmt: skip
    torch.manual_seed(0)
    model = cls(config).eval()
    if kind == "qwen2":  # Qwen2 has q/k/v biases: make them non-zero so the round trip checks them
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.1)
                layer.self_attn.k_proj.bias.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from pmetal.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def _load_gguf(path, tokenizer: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name) if tokenizer else None


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_gguf_f16_round_trip_through_transformers(kind, tmp_path, smollm2_tokenizer):
    from pmetal.export import export_model

    model = _tiny(kind, tmp_path / "m", smollm2_tokenizer)
    out = tmp_path / "m.gguf"
    # transformers loads a Qwen2 model directory's tokenizer as Qwen2Tokenizer, which splits text by
    # Qwen2's rule whatever tokenizer.json says: SmolLM2's vocabulary split that way is no tokenizer
    # llama.cpp lists, so its name is given
    result = export_model(str(tmp_path / "m"), "gguf", out, pre_tokenizer=None if kind == "llama" else "qwen2")
    assert result.dtype == "f16" and out.is_file()
    loaded, tokenizer = _load_gguf(out, tokenizer=kind == "llama")  # the same tokenizer: read it back once
    assert type(loaded).__name__ == type(model).__name__
    if tokenizer is not None:
        for text in (PROMPT, "Hello world! 12345  tabs\tand ünïcödé <|im_end|>"):
            assert tokenizer(text)["input_ids"] == smollm2_tokenizer(text)["input_ids"]
        assert tokenizer.chat_template == smollm2_tokenizer.chat_template
        assert (tokenizer.eos_token, tokenizer.bos_token) == (smollm2_tokenizer.eos_token, smollm2_tokenizer.bos_token)
    ids = torch.tensor([smollm2_tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max() < 1e-2


def test_gguf_q8_0_is_smaller_and_close(tmp_path, smollm2_tokenizer):
    from pmetal.export import export_model

    model = _tiny("llama", tmp_path / "m", smollm2_tokenizer)
    out = tmp_path / "q8.gguf"
    export_model(str(tmp_path / "m"), "gguf", out, quantize="q8_0")
    loaded, _ = _load_gguf(out, tokenizer=False)
    ids = torch.tensor([smollm2_tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        expected = model(ids).logits
        assert (loaded(ids).logits - expected).abs().max() < 0.02 * expected.abs().max()
    from gguf import GGUFReader

    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay float32, as llama.cpp keeps them


@pytest.mark.slow
def test_smollm2_gguf_f16_logits_and_q8_0_greedy_continuation(smollm2_dir, tmp_path):
    """The real SmolLM2-135M-Instruct: f16 logits as close as float16 weights allow; q8_0 keeps the
    greedy answer (up to 32 tokens, stopping at its end of turn).

    On longer free-form answers q8_0 greedy decoding leaves fp32's after 7-8 tokens; the same
    blockwise int8 rounding applied in PyTorch does exactly that too, so it is the quantization,
    not the file (benchmarks/RESULTS.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmetal.export import export_model

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    question = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                             add_generation_prompt=True, tokenize=True)["input_ids"]  # fmt: skip
    question = torch.tensor([question])
    settings = dict(max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        reference_logits = model(ids).logits
        reference = model.generate(question, **settings)
    assert "Paris" in tokenizer.decode(reference[0, question.shape[1] :])
    export_model(str(smollm2_dir), "gguf", tmp_path / "f16.gguf")
    f16, read_tokenizer = _load_gguf(tmp_path / "f16.gguf")
    assert read_tokenizer(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    rounded = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in rounded.parameters():  # what float16 storage alone does to the weights
            p.copy_(p.half().float()) if p.ndim == 2 else None
        diff = (f16(ids).logits - reference_logits).abs()
        # Rounding SmolLM2's weights to float16 moves its fp32 logits (magnitude ~30) by up to 0.036
        # (mean 0.006); the file adds nothing to that: it matches the rounded model within 1e-3.
        assert diff.mean() < 1e-2 and diff.max() < 5e-2
        assert (f16(ids).logits - rounded(ids).logits).abs().max() < 1e-3
    del f16, rounded
    export_model(str(smollm2_dir), "gguf", tmp_path / "q8.gguf", quantize="q8_0")
    q8, _ = _load_gguf(tmp_path / "q8.gguf", tokenizer=False)
    with torch.no_grad():
        assert torch.equal(q8.generate(question, **settings), reference)


def test_gguf_q4_0_loads_and_bf16_holds_the_weights(tiny_model_dir, tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from pmetal.export import export_model

    export_model(str(tiny_model_dir), "gguf", tmp_path / "q4.gguf", quantize="q4_0")
    loaded, _ = _load_gguf(tmp_path / "q4.gguf", tokenizer=False)
    assert torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).logits).all()
    export_model(str(tiny_model_dir), "gguf", tmp_path / "bf16.gguf", dtype="bf16")
    weights = load_file(tiny_model_dir / "model.safetensors")
    tensor = next(t for t in GGUFReader(str(tmp_path / "bf16.gguf")).tensors if t.name == "blk.1.ffn_down.weight")
    assert tensor.tensor_type.name == "BF16"
    values = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
    assert torch.equal(values, weights["model.layers.1.mlp.down_proj.weight"].bfloat16().float())


def _chat_data(path, rows=8):
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say {i % 2}."},
                                             {"role": "assistant", "content": f"Code {'AB'[i % 2]}."}]}) + "\n")  # fmt: skip
    return path


@pytest.mark.slow  # four GGUF reads of SmolLM2's vocabulary: about a minute
def test_train_on_a_gguf_then_export_gguf_gives_the_fine_tuned_model(tiny_model_dir, tmp_path):
    """`pmetal train --model x.gguf`, then `pmetal export RUN --format gguf`: the file holds the
    base with the trained adapter fused in (equal logits to the adapter on its base)."""
    from transformers import AutoModelForCausalLM

    from pmetal.cli import main
    from pmetal.export import export_model
    from pmetal.quant import load_adapter

    base_gguf = tmp_path / "base.gguf"
    export_model(str(tiny_model_dir), "gguf", base_gguf, dtype="f32")
    run = tmp_path / "run"
    assert main(["train", "--model", str(base_gguf), "--dataset", str(_chat_data(tmp_path / "d.jsonl")),
                 "--max-steps", "3", "--max-seq-len", "48", "--batch-size", "2", "--lr", "5e-2",
                 "--accelerator", "cpu", "--precision", "32-true", "--output-dir", str(run),
                 "--no-progress-bar", "--val-fraction", "0"]) == 0  # fmt: skip
    out = tmp_path / "tuned.gguf"
    assert main(["export", str(run), "--format", "gguf", "--dtype", "f32", "--out", str(out)]) == 0
    tuned, _ = _load_gguf(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # what base.gguf holds (f32)
    reference = load_adapter(base, run / "final").eval()
    ids = torch.tensor([[1, 20, 300, 4000, 5, 6]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert (tuned(ids).logits - expected).abs().max() < 1e-4
        with reference.disable_adapter():
            assert (expected - reference(input_ids=ids).logits).abs().max() > 1e-3  # training changed the model


def test_hf_export_of_a_qlora_adapter_is_dequantized_fused_and_loadable(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from pmetal.cli import main
    from pmetal.modules import SftModule
    from pmetal.quant import QuantLinear
    from tests.tiny import randomize_lora_b

    module = SftModule(model=str(tiny_model_dir), quantization="nf4")
    randomize_lora_b(module)  # a non-trivial adapter without a training run
    adapter = module.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "fused"
    assert main(["export", str(adapter), "--format", "hf", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nf4 base was dequantized" in printed and "fused into" in printed
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = torch.tensor([[1, 20, 300, 4000, 5, 6]])
    module.policy.eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, module.policy(input_ids=ids).logits, atol=1e-4)
    # the output exists now: a second export refuses it without --force, and replaces it with --force
    assert main(["export", str(adapter), "--format", "hf", "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(adapter), "--format", "hf", "--out", str(out), "--force", "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_bad_input_gets_clear_errors_and_leaves_nothing(tiny_model_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pmetal.cli import main

    def error(*argv):
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    assert "--format gguf has no quantization 'int4'; it supports: q8_0, q5_1, q4_1, q4_0" in error(
        "export", str(tiny_model_dir), "--format", "gguf", "--quantize", "int4", "--out", str(tmp_path / "a.gguf"))
    assert "--format hf has no quantization 'q8_0'; it supports: none" in error(
        "export", str(tiny_model_dir), "--format", "hf", "--quantize", "q8_0", "--out", str(tmp_path / "h"))
    assert "--format coreml has no dtype 'f32'" in error(
        "export", str(tiny_model_dir), "--format", "coreml", "--dtype", "f32", "--out", str(tmp_path / "c.mlpackage"))
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(gpt2)
    for fmt, out in (("gguf", tmp_path / "g.gguf"), ("coreml", tmp_path / "g.mlpackage")):
        message = error("export", str(gpt2), "--format", fmt, "--out", str(out))
        assert "does not know the architecture 'GPT2LMHeadModel'" in message and "supported" in message
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_export_of_a_bnb_4bit_checkpoint_is_dequantized_and_says_so(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from pmetal.cli import main
    from tests.tiny import save_bnb_4bit_copy

    from pmetal.quant import load_quantized_model

    save_bnb_4bit_copy(tiny_model_dir, tmp_path / "bnb")
    out = tmp_path / "plain"
    assert main(["export", str(tmp_path / "bnb"), "--format", "hf", "--out", str(out)]) == 0
    assert "bitsandbytes nf4 checkpoint: dequantized to float32" in capsys.readouterr().out
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 20, 300, 4000, 5, 6]])
    packed = load_quantized_model(tmp_path / "bnb").eval()  # the 4-bit checkpoint as pmetal trains on it
    with torch.no_grad():  # the same function, now in plain float32 weights
        assert torch.allclose(plain(ids).logits, packed(ids).logits.float(), atol=1e-4)


def _gguf_field(path, key: str):
    from gguf import GGUFReader

    return GGUFReader(str(path)).fields[key].contents()


def test_gguf_names_the_pre_tokenizer_llama_cpp_knows(tiny_model_dir, tmp_path):
    """Regression (issue 24): pmetal wrote `gpt2`, a name llama.cpp refuses; SmolLM2's tokenizer is
    llama.cpp's `smollm` (the shipped SmolLM2 GGUF says so too)."""
    from pmetal.export import export_model
    from pmetal.models import _smollm2_gguf

    export_model(str(tiny_model_dir), "gguf", tmp_path / "m.gguf", dtype="f32")
    assert _gguf_field(tmp_path / "m.gguf", "tokenizer.ggml.pre") == "smollm"
    assert _gguf_field(_smollm2_gguf(), "tokenizer.ggml.pre") == "smollm"


def _with_pre_tokenizer(tokenizer, pre_tokenizer: dict):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)  # fmt: skip


def test_an_unknown_pre_tokenizer_is_a_clear_error_naming_the_override(tiny_model_dir, tmp_path, capsys):
    """A tokenizer llama.cpp's table does not know is refused with the flag to pass; passing it writes
    that name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmetal.cli import main
    from pmetal.export import export_model
    from pmetal.export.source import FusedModel
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    llama3_split = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}  # fmt: skip
    tokenizer = _with_pre_tokenizer(AutoTokenizer.from_pretrained(tiny_model_dir), llama3_split)
    source = tmp_path / "src"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "m.gguf"
    assert main(["export", str(source), "--format", "gguf", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert "--gguf-pre-tokenizer NAME" in message and "pre_tokenizer=NAME" in message
    assert "names with its split rule: " in message and "llama-bpe" in message
    assert not out.exists()
    assert main(["export", str(source), "--format", "gguf", "--out", str(out), "--gguf-pre-tokenizer", "llama-bpe"]) == 0
    assert _gguf_field(out, "tokenizer.ggml.pre") == "llama-bpe"
    fused = FusedModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer, str(source))
    export_model(fused, "gguf", tmp_path / "py.gguf", pre_tokenizer="llama-bpe")
    assert _gguf_field(tmp_path / "py.gguf", "tokenizer.ggml.pre") == "llama-bpe"
