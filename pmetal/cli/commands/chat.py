"""Chat with a model, adapter or run, streaming the reply: pmetal chat --model runs/sft-x

Each line you type is a user turn; the model's chat template renders the whole conversation
(history kept, `--system` first) and the reply streams token by token from the rollout engine
(`pmetal.generation.generate` with `on_tokens`; it stops at the end of the turn). `/reset` starts a new
conversation, `/exit` (or end of input) quits. Input may be piped: `printf 'Hi\\n' | pmetal chat`.
`pmetal generate` is the one-shot form.

`--model` takes a Hugging Face directory, hub id, .gguf file, "default", an adapter directory, or
a pmetal run directory (its final/ adapter, applied to its base model).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model, adapter or run directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--system", default=None, help="system message at the start of every conversation")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest reply (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--accelerator", choices=["auto", "mps", "cuda", "cpu"], default="auto")
    p.add_argument("--trust-remote-code", action="store_true")


class Conversation:
    """The messages so far; `prompt_ids` renders them with the model's chat template."""

    def __init__(self, tokenizer, system: str | None = None):
        self.tokenizer, self.system = tokenizer, system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, user: str) -> list[int]:
        from pmetal.data.render import render_prompt

        self.messages.append({"role": "user", "content": user})
        return render_prompt(self.tokenizer, self.messages)

    def add_reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})


def stream_reply(model, tokenizer, prompt_ids: list[int], config, out=None) -> str:
    """Generate one reply through the rollout engine (the reference loop where the engine cannot
    serve the model), writing the text to `out` as tokens arrive; returns the whole reply."""
    from pmetal.cli.commands.generate import TextStream
    from pmetal.generation import generate, stop_token_ids

    stream = TextStream(tokenizer, out or sys.stdout)
    generate(model, [prompt_ids], config, stop_ids=stop_token_ids(tokenizer, model),
             pad_token_id=tokenizer.pad_token_id, on_tokens=stream,
             compile_decode=False)  # a turn's prompt grows: a compile per new shape would cost more than it saves
    return stream.close()


def run(args) -> int:
    import torch

    from pmetal.cli.commands.generate import load_for_inference
    from pmetal.cli.preflight import check_ranges
    from pmetal.device import choose_device
    from pmetal.export.source import resolve_source
    from pmetal.generation import SamplingConfig

    check_ranges(args)  # before the model loads
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k)  # fmt: skip
    if args.seed is not None:
        torch.manual_seed(args.seed)
    choice = choose_device(args.accelerator)
    model, tokenizer = load_for_inference(str(resolve_source(args.model)), trust_remote_code=args.trust_remote_code,
                                          dtype=choice.weight_dtype)  # fmt: skip
    model = model.to(choice.torch_device).eval()
    conversation = Conversation(tokenizer, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} on {choice.torch_device} (/reset starts over, /exit quits)", flush=True)
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            conversation.reset()
            print("(new conversation)", flush=True)
            continue
        reply = stream_reply(model, tokenizer, conversation.prompt_ids(text), config)
        conversation.add_reply(reply)
    return 0
