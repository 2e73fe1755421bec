"""The Ollama Modelfile written beside every GGUF: FROM, TEMPLATE translated for ChatML and Llama 3
templates (recognised by rendering them), SYSTEM for a template's default system prompt, stop tokens;
any other template shape gets no TEMPLATE and a printed note."""

from __future__ import annotations

import pytest

LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
          "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")  # fmt: skip
ZEPHYR = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")  # fmt: skip


@pytest.fixture()
def tokenizer():
    from transformers import AutoTokenizer

    from pmetal.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def _directives(text: str) -> list[str]:
    return [line.split(" ")[0] for line in text.splitlines() if line and line.split(" ")[0].isupper()]


def test_smollm2_chatml_template_becomes_ollama_template_system_and_stop(tokenizer):
    from pmetal.export.modelfile import CHATML_GO, modelfile_text

    text, note = modelfile_text("model.gguf", tokenizer)
    assert note is None
    assert text.startswith("FROM ./model.gguf\n")
    assert f'TEMPLATE """{CHATML_GO}"""' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.rstrip().endswith('PARAMETER stop "<|im_end|>"')
    assert _directives(text) == ["FROM", "TEMPLATE", "SYSTEM", "PARAMETER"]


def test_llama3_template_is_recognised_without_a_default_system(tokenizer):
    from pmetal.export.modelfile import LLAMA3_GO, modelfile_text

    tokenizer.chat_template = LLAMA3
    text, note = modelfile_text("m.gguf", tokenizer)
    assert note is None and f'TEMPLATE """{LLAMA3_GO}"""' in text and "SYSTEM" not in text
    assert 'PARAMETER stop "<|eot_id|>"' in text


def test_a_template_of_another_shape_gets_no_template_and_a_note(tokenizer, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from pmetal.cli import main

    tokenizer.chat_template = ZEPHYR
    source = tmp_path / "zephyr"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = tmp_path / "z.gguf"
    assert main(["export", str(source), "--format", "gguf", "--dtype", "f32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "neither ChatML nor Llama 3, so it has no TEMPLATE" in printed
    assert (tmp_path / "z.Modelfile").read_text() == "FROM ./z.gguf\n"
    # the Modelfile is an output too: a second export without --force leaves both files alone
    assert main(["export", str(source), "--format", "gguf", "--out", str(tmp_path / "y.gguf")]) == 0
    (tmp_path / "y.gguf").unlink()
    assert main(["export", str(source), "--format", "gguf", "--out", str(tmp_path / "y.gguf")]) == 2
    assert "y.Modelfile exists; pass --force" in capsys.readouterr().err
