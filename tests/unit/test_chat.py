"""`pmetal chat`: scripted stdin, streamed replies equal to greedy generation, multi-turn history
through the chat template, --system, /reset, and an adapter directory as the model."""

from __future__ import annotations

import io
import sys

import torch


def _greedy_reply(model_dir, messages, max_new_tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmetal.data.render import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([render_prompt(tokenizer, messages)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_chat_streams_replies_and_keeps_history(tiny_model_dir, monkeypatch, capsys):
    from pmetal.cli import main
    from pmetal.cli.commands import chat

    seen = []
    original = chat.Conversation.prompt_ids

    def recording(self, user):
        ids = original(self, user)
        seen.append([dict(m) for m in self.messages])
        return ids

    monkeypatch.setattr(chat.Conversation, "prompt_ids", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nAnd again?\n/reset\nFresh start\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(tiny_model_dir), "--system", "Be brief.", "--temperature", "0",
                 "--max-new-tokens", "6", "--accelerator", "cpu"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "(new conversation)" in printed
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert seen[0] == first
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]  # history kept
    assert seen[1][2]["content"] == _greedy_reply(tiny_model_dir, first, 6)  # what was streamed is what is kept
    assert seen[2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Fresh start"}]
    assert len(seen) == 3  # /exit stopped reading
    assert seen[1][2]["content"] in printed


def test_chat_accepts_an_adapter_directory(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from pmetal.cli import main
    from pmetal.models import apply_adapter, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    peft_model = apply_adapter(model, "lora", r=4)
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", "--model", str(tmp_path / "adapter"), "--temperature", "0", "--max-new-tokens", "3",
                 "--accelerator", "cpu"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip()


def test_greedy_chat_equals_one_shot_generate(tiny_model_dir, monkeypatch, capsys):
    """The streamed reply (engine + on_tokens) is the non-streamed engine's answer, token for token, and
    `pmetal generate` prints the same answer for the same conversation."""
    from pmetal.cli import main
    from pmetal.cli.commands import chat
    from pmetal.cli.commands.generate import generate, load_for_inference

    replies = []
    original = chat.Conversation.add_reply
    monkeypatch.setattr(chat.Conversation, "add_reply", lambda self, text: (replies.append(text), original(self, text)))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name three colours.\n"))
    args = ["--model", str(tiny_model_dir), "--system", "Be brief.", "--temperature", "0", "--max-new-tokens", "16",
            "--accelerator", "cpu"]
    assert main(["chat", *args]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = load_for_inference(str(tiny_model_dir))
    expected = generate(model.eval(), tokenizer, ["Name three colours."], system="Be brief.", max_new_tokens=16)[0]
    assert replies == [expected] and len(expected) > 10
    assert printed.strip() == expected  # what was streamed is the whole reply, once
    assert main(["generate", *args, "--prompt", "Name three colours."]) == 0  # one prompt: streamed
    assert capsys.readouterr().out == f">>> Name three colours.\n{expected}\n\n"
    assert main(["generate", *args, "--prompt", "Name three colours.", "--prompt", "Hi"]) == 0  # batched
    assert capsys.readouterr().out.startswith(f">>> Name three colours.\n{expected}\n\n>>> Hi\n")
