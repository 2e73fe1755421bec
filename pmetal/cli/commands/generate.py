"""One-shot answers from a model or a trained adapter: pmetal generate --model runs/x/final --prompt "..."

The prompts are answered together, batched through the rollout engine; a single prompt's answer
streams as it is generated.

`--model` takes a Hugging Face directory, hub id, .gguf file, "default", or the output directory of
a pmetal run (a PEFT adapter: its base model is loaded and the adapter applied).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model or adapter directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", action="append", required=True, help="user message (repeat for several prompts)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--accelerator", choices=["auto", "mps", "cuda", "cpu"], default="auto")
    p.add_argument("--trust-remote-code", action="store_true")


def load_for_inference(name: str, *, trust_remote_code: bool = False, dtype=None):
    """(model, tokenizer) for a model name or a pmetal adapter directory."""
    from pmetal.models import load_model_and_tokenizer

    adapter_config = Path(name) / "adapter_config.json"
    if not adapter_config.is_file():
        return load_model_and_tokenizer(name, dtype=dtype, trust_remote_code=trust_remote_code)
    from peft import PeftModel

    from pmetal.export.source import adapter_settings

    # the model pmetal trained on (a .gguf file stays one), else PEFT's record of the base
    base_name = (adapter_settings(Path(name)).get("model")
                 or json.loads(adapter_config.read_text()).get("base_model_name_or_path") or "default")  # fmt: skip
    model, _ = load_model_and_tokenizer(base_name, dtype=dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(model, name)
    # the adapter directory carries the tokenizer it was trained with (pad token and template included)
    from transformers import AutoTokenizer

    from pmetal.models import ensure_pad_token

    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    ensure_pad_token(tokenizer)
    return model, tokenizer


class TextStream:
    """Writes a reply's text as token ids arrive: the whole completion is decoded each time and the
    new tail written, held back while it ends inside a multi-byte character (decoding a token alone
    would split those and lose the spaces some tokenizers attach to the next token)."""

    def __init__(self, tokenizer, out) -> None:
        self.tokenizer, self.out, self.ids, self.written = tokenizer, out, [], 0

    def __call__(self, rows: list[list[int]]) -> None:
        self.ids += rows[0]
        text = self.text()
        if text.endswith("\ufffd") or len(text) <= self.written:
            return
        self.out.write(text[self.written :])
        self.out.flush()
        self.written = len(text)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def close(self) -> str:
        """Write what is left and end the line; returns the whole reply."""
        text = self.text()
        self.out.write(text[self.written :] + "\n")
        self.out.flush()
        return text.strip()


def generate(model, tokenizer, prompts: list[str], *, system=None, max_new_tokens=128, temperature=0.0, top_p=1.0,
             on_tokens=None):
    """One answer per prompt, batched through the rollout engine (`pmetal.generation.generate`: static
    KV cache, CUDA graphs on CUDA, the reference loop where the engine cannot serve the model), stopping
    at the end of each turn."""
    from pmetal.data.render import render_prompt
    from pmetal.generation import SamplingConfig, stop_token_ids
    from pmetal.generation import generate as sample

    rows = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        rows.append(render_prompt(tokenizer, messages))
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    out = sample(model, rows, config, stop_ids=stop_token_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id,
                 on_tokens=on_tokens, compile_decode=False)  # one call: compiling would cost more than it saves
    return [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip()
            for ids, mask in zip(out.completion_ids, out.completion_mask)]  # fmt: skip


def run(args) -> int:
    from pmetal.cli.preflight import check_ranges
    from pmetal.device import choose_device

    check_ranges(args)  # before the model loads
    choice = choose_device(args.accelerator)
    model, tokenizer = load_for_inference(args.model, trust_remote_code=args.trust_remote_code,
                                          dtype=choice.weight_dtype)
    model = model.to(choice.torch_device).eval()
    settings = dict(system=args.system, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p)
    if len(args.prompt) == 1:  # one answer streams as it is generated
        print(f">>> {args.prompt[0]}", flush=True)
        stream = TextStream(tokenizer, sys.stdout)
        generate(model, tokenizer, args.prompt, on_tokens=stream, **settings)
        stream.close()
        print()
        return 0
    for prompt, answer in zip(args.prompt, generate(model, tokenizer, args.prompt, **settings)):
        print(f">>> {prompt}\n{answer}\n")
    return 0
