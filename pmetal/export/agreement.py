"""How closely a written GGUF, run by llama.cpp itself, follows the model it was exported from.

A few fixed chat exchanges are fed, as the same token ids, to llama.cpp (`llama-cpp-python`, every
position's logits, an f32 KV cache) and to the source model in transformers; the agreement is the
share of positions where both pick the same top-1 token, and the largest |logit difference|. Every
quantized GGUF export prints it, so a q4_0 file says how far it moved the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EXCHANGES = (
    ("What is the capital of France?", "The capital of France is Paris, which is also its largest city."),
    ("Explain gradient descent in two sentences.",
     "Gradient descent improves a model by moving its parameters a small step against the gradient of "
     "the loss. Repeating this step lowers the loss until it stops improving."),
    ("Write a Python function that returns the square of a number.",
     "```python\ndef square(x: float) -> float:\n    return x * x\n```"),
    ("Write a haiku about autumn.", "Red leaves drift and fall,\ncool wind hums through empty trees,\nthe year breathes out slow."),
)  # fmt: skip


@dataclass(frozen=True)
class Agreement:
    top1: float  # share of positions where llama.cpp and the source model pick the same token
    max_gap: float  # largest |logit difference| over all positions and tokens
    positions: int
    texts: int

    def __str__(self) -> str:
        return (f"llama.cpp runs it against the source model: top-1 agreement {self.top1:.1%} over "
                f"{self.positions} positions of {self.texts} fixed chat texts, max |logit gap| {self.max_gap:.3f}")  # fmt: skip


def agreement_ids(tokenizer) -> list[list[int]]:
    """The fixed exchanges as token ids (through the chat template when the tokenizer has one)."""
    texts = []
    for question, answer in EXCHANGES:
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            texts.append(f"{question}\n{answer}")
    return [tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
            for text in texts]  # fmt: skip


def open_llama_cpp(path: str | Path, n_ctx: int = 512):
    """The GGUF in llama.cpp with every position's logits and an f32 KV cache (type_k/type_v 0:
    the default f16 cache flips near-tied tokens)."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0, verbose=False,
                 n_threads=torch.get_num_threads(), n_batch=n_ctx)  # fmt: skip


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) logits llama.cpp computes for the token ids."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def measure_agreement(path: str | Path, model, tokenizer) -> Agreement:
    """Run the GGUF at `path` in llama.cpp and `model` in transformers on the fixed exchanges."""
    sequences = agreement_ids(tokenizer)
    llm = open_llama_cpp(path, n_ctx=max(len(s) for s in sequences) + 8)
    same = total = 0
    gap = 0.0
    try:
        for ids in sequences:
            theirs = torch.from_numpy(llama_cpp_logits(llm, ids))
            with torch.no_grad():
                ours = model(torch.tensor([ids])).logits[0].float()
            vocab = min(ours.shape[-1], theirs.shape[-1])
            ours, theirs = ours[:, :vocab], theirs[:, :vocab]
            same += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            total += len(ids)
            gap = max(gap, float((ours - theirs).abs().max()))
    finally:
        llm.close()
    return Agreement(same / total, gap, total, len(sequences))


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None
