"""FLOPs and time of one DPO step: separate chosen/rejected rows vs the shared prompt, with and without
the reference forward (what `reuse_ref_logps` skips after an example's first epoch).

Counts with `torch.utils.flop_counter.FlopCounterMode` (matmuls and attention as dense work: the
4-D mask is counted in full, so the shared layout's attention is an upper bound) and times the same
step on a random Llama-shaped model built in place (no download), in fp32 on the CPU:

    python benchmarks/flops_dpo.py --shapes 256+256,1024+128 --pairs 4

Prints a Markdown table; `--markdown FILE` appends it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def build_module(args, work: Path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from pmetal.modules.dpo import DpoModule

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=4096)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(work)
    vocab = {f"w{i}": i for i in range(args.vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w1")),
                                        pad_token="w0", eos_token="w2")
    tokenizer.save_pretrained(work)
    return DpoModule(model=str(work), lora_r=16, gradient_checkpointing=True, weight_dtype="float32")


def make_batch(pairs: int, prompt: int, completion: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {}
    prompt_ids = torch.randint(3, vocab, (pairs, prompt), generator=g)
    for side in ("chosen_", "rejected_"):
        ids = torch.cat([prompt_ids, torch.randint(3, vocab, (pairs, completion), generator=g)], 1)
        labels = ids.clone()
        labels[:, :prompt] = -100
        batch.update({f"{side}input_ids": ids, f"{side}attention_mask": torch.ones_like(ids), f"{side}labels": labels})
    batch["index"] = torch.arange(pairs)
    return batch


def step(module, batch) -> None:
    module.policy.zero_grad()
    loss, _ = module.compute_loss(batch)
    loss.backward()


def measure(module, batch, repeats: int) -> tuple[float, float]:
    from torch.utils.flop_counter import FlopCounterMode

    step(module, batch)  # warm-up (and, with the cache on, fills it)
    with FlopCounterMode(display=False) as counter:
        step(module, batch)
    start = time.perf_counter()
    for _ in range(repeats):
        step(module, batch)
    return counter.get_total_flops() / 1e9, (time.perf_counter() - start) / repeats


VARIANTS = {  # name: (shared_prompt, reuse_ref_logps)
    "separate rows, reference every step": (False, False),
    "shared prompt, reference every step": (True, False),
    "shared prompt, reference reused (2nd epoch on)": (True, True),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="256+256,1024+128", help="prompt+completion tokens, comma-separated")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    module = build_module(args, Path(tempfile.mkdtemp(prefix="flops-dpo-")))
    lines = [f"One DPO step (policy forward + backward with checkpointing, reference forward), {args.pairs} pairs, "
             f"random Llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}, LoRA r16, fp32 CPU, "
             f"{torch.get_num_threads()} threads", "",
             "| prompt+completion | variant | GFLOPs | vs separate | s/step | vs separate |", "|---|---|---:|---:|---:|---:|"]
    for shape in args.shapes.split(","):
        prompt, completion = map(int, shape.split("+"))
        batch = make_batch(args.pairs, prompt, completion, args.vocab)
        base = None
        for name, (shared, reuse) in VARIANTS.items():
            module.hparams.shared_prompt, module.hparams.reuse_ref_logps = shared, reuse
            module.__dict__["_ref_cache"] = {}
            flops, seconds = measure(module, batch, args.repeats)
            base = base or (flops, seconds)
            lines.append(f"| {shape} | {name} | {flops:.1f} | {flops / base[0]:.2f}x | {seconds:.3f} | "
                         f"{seconds / base[1]:.2f}x |")
    report("\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
