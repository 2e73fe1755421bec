"""Every GGUF type pmetal writes, loaded by llama.cpp itself (llama-cpp-python, built by the README's
set-up) and compared with transformers: the tokenizer (varied text, special tokens), greedy text
(f32 equal to the fp32 model's; f16 and bf16 equal to the rounded model's), logits of each type
against the same rounding done in PyTorch, and the chat template llama.cpp renders. Tiny random
Llama with SmolLM2's real tokenizer; the real SmolLM2 in the slow tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmetal.export.common import DTYPES, QUANTIZATIONS

TYPES = DTYPES["gguf"] + QUANTIZATIONS["gguf"]
TEXTS = [
    "Hello world! 12345 3.14159 1,000,000 and 0x1F  two  spaces\tand a tab",
    "ünïcödé: 我想在apple工作 нещо на Български កាន់តែពិសេស ¿Qué tal? ελληνικά",
    "emojis 🚀 😶‍🌫️ 🦙🦙 👩🏽‍💻 ✅ and a flag 🇫🇷",
    "def square(x: float) -> float:\n    return x ** 2  # squared\n\n\nprint(square(3))\r\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL    \n\n\n  trailing   ",
    " leading space",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?\nThink first."}],
]  # fmt: skip


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory):
    """Each GGUF type of the tiny model, written by `pmetal export`'s function."""
    from pmetal.export import export_model

    out = tmp_path_factory.mktemp("gguf")
    paths = {}
    for file_type in TYPES:
        quantized = file_type in QUANTIZATIONS["gguf"]
        paths[file_type] = export_model(str(tiny_model_dir), "gguf", out / f"{file_type}.gguf",
                                        dtype=None if quantized else file_type,
                                        quantize=file_type if quantized else None).path  # fmt: skip
    return paths


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _llama(path):
    from pmetal.export.agreement import open_llama_cpp

    return open_llama_cpp(path, n_ctx=256)


def _stored(model, file_type: str):
    """A copy of `model` whose 2-D weights are what a GGUF of `file_type` holds (decoded by gguf)."""
    import copy

    from gguf import quants

    from pmetal.export.gguf import tensor_bytes

    stored = copy.deepcopy(model)
    with torch.no_grad():
        for p in stored.parameters():
            if p.ndim == 2:
                data, raw = tensor_bytes("", p.numpy(), file_type)
                decoded = data.astype(np.float32) if raw is None else quants.dequantize(data, raw).reshape(p.shape)
                p.copy_(torch.from_numpy(np.ascontiguousarray(decoded, dtype=np.float32)))
    return stored


def _greedy_llama(llm, ids: list[int], n: int) -> list[int]:
    """Up to `n` greedy tokens, ending with the end-of-turn token if it comes (as transformers does)."""
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == n or token == llm.token_eos():
            return out
    return out


def _greedy_hf(model, ids: list[int], n: int, tokenizer) -> list[int]:
    with torch.no_grad():
        full = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return full[0, len(ids) :].tolist()


@pytest.mark.parametrize("file_type", TYPES)
def test_llama_cpp_loads_each_type_and_computes_what_its_weights_say(file_type, exports, reference):
    """The file loads (llama.cpp knows its pre-tokenizer, smollm), and llama.cpp's logits equal the
    source model's with the file's rounding applied in PyTorch: to float accuracy for the float types;
    for the block types within what llama.cpp's own rounding of the activations (q8 blocks) adds."""
    model, tokenizer = reference
    llm = _llama(exports[file_type])
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == "smollm" and llm.n_vocab() == len(tokenizer)
        from pmetal.export.agreement import llama_cpp_logits

        ids = tokenizer(TEXTS[4] + "The capital of France is Paris.")["input_ids"]
        theirs = torch.from_numpy(llama_cpp_logits(llm, ids))
    finally:
        llm.close()
    with torch.no_grad():
        ours = _stored(model, file_type)(torch.tensor([ids])).logits[0]
    scale = ours.abs().max()
    limit = {"f32": 1e-5, "f16": 5e-3, "bf16": 2e-2}.get(file_type, 5e-2)
    assert (theirs - ours).abs().max() < limit * scale, (file_type, float((theirs - ours).abs().max()), float(scale))


def test_llama_cpp_tokenizes_like_the_hf_tokenizer(exports, reference):
    """Unicode, emojis (with joiners), code, digits, whitespace runs and special tokens: the same ids
    as transformers, and the same text back."""
    _, tokenizer = reference
    llm = _llama(exports["f32"])
    try:
        for text in TEXTS:
            ids = llm.tokenize(text.encode(), add_bos=True, special=True)
            assert ids == tokenizer(text)["input_ids"], text
            assert llm.detokenize(ids, special=True).decode() == text
    finally:
        llm.close()


@pytest.mark.parametrize("file_type", ["f32", "f16", "bf16"])
def test_greedy_text_in_llama_cpp_equals_transformers(file_type, exports, reference):
    """f32: the fp32 model's greedy tokens; f16/bf16: those of the model with its weights rounded to
    that type (the file cannot be closer than its rounding)."""
    model, tokenizer = reference
    prompt = tokenizer.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, tokenize=True)["input_ids"]
    source = model if file_type == "f32" else _stored(model, file_type)
    llm = _llama(exports[file_type])
    try:
        assert _greedy_llama(llm, prompt, 24) == _greedy_hf(source, prompt, 24, tokenizer)
    finally:
        llm.close()


def test_the_chat_template_llama_cpp_reads_renders_like_apply_chat_template(exports, reference):
    """The template in the file, rendered the way llama-cpp-python's chat formatter renders it (with
    the BOS/EOS texts llama.cpp reads from the file), equals transformers' `apply_chat_template`."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, tokenizer = reference
    llm = _llama(exports["q8_0"])
    try:
        template = llm.metadata["tokenizer.chat_template"]
        token_text = lambda i: llm.detokenize([i], special=True).decode()  # noqa: E731
        formatter = Jinja2ChatFormatter(template, eos_token=token_text(llm.token_eos()),
                                        bos_token=token_text(llm.token_bos()))  # fmt: skip
    finally:
        llm.close()
    assert template == tokenizer.chat_template
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert formatter(messages=messages).prompt == expected


def test_a_quantized_export_prints_its_agreement_measured_in_llama_cpp(tiny_model_dir, tmp_path, capsys):
    from pmetal.cli import main

    assert main(["export", str(tiny_model_dir), "--format", "gguf", "--quantize", "q8_0",
                 "--out", str(tmp_path / "q8.gguf")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "q8_0: llama.cpp runs it against the source model: top-1 agreement" in printed
    assert "max |logit gap|" in printed


@pytest.mark.slow  # SmolLM2-135M in f32 and f16: about half a minute
def test_smollm2_f32_and_f16_greedy_answers_in_llama_cpp(smollm2_dir, tmp_path):
    """The real SmolLM2-135M-Instruct: llama.cpp's greedy answer from the f32 file is transformers'
    answer token for token; the f16 file's is the fp16-rounded model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmetal.export import export_model

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    for text in TEXTS:  # the real vocabulary's merges, not only its pre-tokenizer
        assert tokenizer(text)["input_ids"], text
    prompt = tokenizer.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, tokenize=True)["input_ids"]
    expected = _greedy_hf(model, prompt, 16, tokenizer)
    assert "Paris" in tokenizer.decode(expected)
    for file_type, source in (("f32", model), ("f16", None)):
        path = export_model(str(smollm2_dir), "gguf", tmp_path / f"{file_type}.gguf", dtype=file_type).path
        llm = _llama(path)
        try:
            assert [llm.tokenize(t.encode(), add_bos=True, special=True) for t in TEXTS] == [
                tokenizer(t)["input_ids"] for t in TEXTS]
            source = source or _stored(model, "f16")
            assert _greedy_llama(llm, prompt, 16) == (expected if file_type == "f32" else _greedy_hf(source, prompt, 16, tokenizer))
        finally:
            llm.close()
        path.unlink()
