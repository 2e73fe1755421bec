"""Where GGUF storage moves a model's outputs: each tensor group stored at a file type, or kept at f32.

For `--types` (f16, q8_0, ...) it stores the 2-D weights the way `pmetal.export.gguf` writes them
(`tensor_bytes`: the same bytes as in the file) and decodes them back (gguf's own dequantizer), for:
all weights; all but the tied token embedding / output (kept f32, and kept f16 in quantized
types); one group alone (token embedding, attention q/k, attention v/o, MLP). Each row is compared
with the fp32 model: the logits on a fixed chat prompt (max and mean |difference|) and how many
greedy tokens stay equal on fixed natural questions (up to `--max-new-tokens`; "k/n" with n the
fp32 answer's length; the fp32 top-2 logit margin at the first changed token is shown). One row per
type is the real file: `write_gguf`, read back by transformers' GGUF loader, with its size.

    python benchmarks/bench_gguf_precision.py --model default --types f16 q8_0 --threads 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT = "<|im_start|>user\nWhat is the capital of France? Answer in 12 words.<|im_end|>\n<|im_start|>assistant\n"
QUESTIONS = ["Explain gradient descent in two sentences.", "Write a haiku about autumn.",
             "What is the capital of France?"]
GROUPS = {"token embedding": ("embed_tokens", "lm_head"), "attention q/k": ("q_proj", "k_proj"),
          "attention v/o": ("v_proj", "o_proj"), "MLP": ("mlp.",)}


def group_of(name: str) -> str | None:
    return next((g for g, keys in GROUPS.items() if any(k in name for k in keys)), None)


def stored(array, file_type: str):
    """The tensor as a GGUF file of `file_type` holds it, decoded to float32; and its bytes."""
    import numpy as np
    from gguf import quants

    from pmetal.export.gguf import tensor_bytes

    data, raw = tensor_bytes("", array, file_type)
    decoded = data.astype(np.float32) if raw is None else quants.dequantize(data, raw).reshape(array.shape)
    return decoded.astype(np.float32), data.nbytes


class Probe:
    """The fp32 model's answers, and the comparison of a changed model with them."""

    def __init__(self, model, tokenizer, max_new_tokens: int):
        import torch

        self.model, self.tokenizer = model, tokenizer
        self.ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
        self.questions = [torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                                      add_generation_prompt=True, tokenize=True)["input_ids"]])
                          for q in QUESTIONS]  # fmt: skip
        self.settings = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             output_scores=True, return_dict_in_generate=True)  # fmt: skip
        self.logits, self.answers = self.run(model)

    def run(self, model):
        import torch

        with torch.no_grad():
            logits = model(self.ids).logits
            answers = []
            for q in self.questions:
                out = model.generate(q, **self.settings)
                answers.append((out.sequences[0, q.shape[1]:].tolist(), [s[0] for s in out.scores]))
        return logits, answers

    def compare(self, model) -> tuple[float, float, list[str]]:
        logits, answers = self.run(model)
        diff = (logits - self.logits).abs()
        kept = []
        for (ref, scores), (got, _) in zip(self.answers, answers):
            same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
            note = ""
            if same < len(ref):
                top = scores[same].topk(2).values
                note = f" (margin {float(top[0] - top[1]):.3f})"
            kept.append(f"{same}/{len(ref)}{note}")
        return float(diff.max()), float(diff.mean()), kept


def variants(file_type: str) -> list[tuple[str, dict]]:
    every = {g: file_type for g in GROUPS}
    rows = [("all weights", every), ("token embedding kept f32", {**every, "token embedding": "f32"})]
    if file_type not in ("f16", "bf16", "f32"):
        rows.append(("token embedding kept f16", {**every, "token embedding": "f16"}))
    return rows + [(f"{g} only", {g: file_type}) for g in GROUPS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model directory (default: the embedded SmolLM2)")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", default=None, help="append the table to this file")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from pmetal.export import write_gguf
    from _common import load_fp32_causal_lm, report  # benchmarks/ is on sys.path when run as a script

    tokenizer, model = load_fp32_causal_lm(args.model, args.threads)
    probe = Probe(model, tokenizer, args.max_new_tokens)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lines = ["| type | stored | max abs logit diff | mean abs logit diff | greedy tokens kept | MB |",
             "|---|---|---:|---:|---|---:|"]
    for file_type in args.types:
        encoded = {}
        for label, rule in variants(file_type):
            state, size = {}, 0
            for name, tensor in original.items():
                kind = rule.get(group_of(name)) if tensor.ndim == 2 else None
                if kind is None or kind == "f32":
                    state[name] = tensor
                    continue
                if (name, kind) not in encoded:
                    encoded[(name, kind)] = stored(tensor.numpy(), kind)
                decoded, nbytes = encoded[(name, kind)]
                state[name], size = torch.from_numpy(decoded), size + nbytes
            model.load_state_dict(state, strict=False)
            model.tie_weights()
            biggest, mean, kept = probe.compare(model)
            lines.append(f"| {file_type} | {label} | {biggest:.4f} | {mean:.5f} | {', '.join(kept)} | |")
            print(lines[-1], flush=True)
        model.load_state_dict(original)
        with tempfile.TemporaryDirectory() as tmp:
            path = write_gguf(model, tokenizer, Path(tmp) / "model.gguf", file_type=file_type)
            start = time.perf_counter()
            back = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()
            read = time.perf_counter() - start
            biggest, mean, kept = probe.compare(back)
            lines.append(f"| {file_type} | the file, read by transformers ({read:.0f} s) | {biggest:.4f} | {mean:.5f} | "
                         f"{', '.join(kept)} | {path.stat().st_size / 1e6:.1f} |")
            print(lines[-1], flush=True)
            del back
    questions = "; ".join(f"{i + 1}. {q!r}" for i, q in enumerate(QUESTIONS))
    report("\n".join(lines) + f"\n\nLogits: {PROMPT!r} ({probe.ids.shape[1]} tokens, fp32 logits in "
           f"[{float(probe.logits.min()):.1f}, {float(probe.logits.max()):.1f}]). Greedy questions: {questions}.\n",
           args.markdown)


if __name__ == "__main__":
    main()
