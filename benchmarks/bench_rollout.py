"""Rollout throughput: pmetal's rollout engine beside Hugging Face `generate` (dynamic and static cache).

One process, one model, the same shapes: `--prompts` prompts x `--num-generations` samples, random
prompt tokens of `--prompt-len`, `--max-new-tokens` new tokens per row, sampling at temperature 1,
no stop tokens (every row runs to the limit: identical work). Each contender is called once untimed
(CUDA graph capture, HF's static-cache compilation), then `--repeats` timed calls; the table keeps
the best. New tokens/s = rows x new tokens / seconds. The engine runs twice: uncompiled and with
its compiled decode round (`--skip compiled` leaves that out; on the CPU the compile takes minutes).
On CUDA the compiled engine (Triton decode attention, fused q/k/v and gate/up projections) is
shown beside itself with unfused projections (`--skip unfused` leaves it out) and with both
unfused projections and matmul attention (`--skip matmul`). Each engine row reports the largest and the mean
gap between the log-probs it recorded and a training-mode forward over the same completions.
`--profile` prints the GPU time per kernel of a few compiled rounds (run without graphs, so the
profiler sees each kernel).
`--floor` adds the time of the decode step's weight matmuls alone, once per new token: where reading
the weights bounds the step, no engine computing the same numbers beats HF by more than that row.

`--speculative` adds the speculation table: greedy decoding (temperature 0, exact either way) of the
engine with and without speculation at batch sizes `--spec-batches`, with prompt-lookup drafts
(`--draft ngram`) or a draft made of the model's first layers (`--draft truncate:N`), reporting the
measured acceptance and tokens per policy forward.

    # GPU: a Qwen3-0.6B-shaped model with random bf16 weights
    python benchmarks/bench_rollout.py --device cuda --model qwen3-0.6b-shape --speculative
    # CPU: the embedded SmolLM2-135M-Instruct, batch 8
    python benchmarks/bench_rollout.py --device cpu --model default --prompts 8 --num-generations 1 \
        --prompt-len 64 --max-new-tokens 64 --speculative --spec-batches 1,8 --draft truncate:10

Prints the tables; `--markdown FILE` appends them as Markdown.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time

from _common import QWEN3_06B_SHAPE, report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def load_model(args):
    import torch

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.model == "qwen3-0.6b-shape":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(0)
        config = Qwen3Config(**QWEN3_06B_SHAPE, bos_token_id=None, eos_token_id=2, pad_token_id=0,
                             attn_implementation="sdpa")
        return Qwen3ForCausalLM(config).to(dtype).to(args.device).eval(), None
    from pmetal.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype, attn_implementation="sdpa")  # also a .gguf
    return model.to(dtype).to(args.device).eval(), tokenizer


def truncated_copy(model, layers: int):
    """The model's first ``layers`` decoder layers and its head: a draft that shares its embeddings' sense."""
    draft = copy.deepcopy(model)
    inner = draft.model
    inner.layers = inner.layers[:layers]
    draft.config.num_hidden_layers = layers
    if hasattr(draft.config, "layer_types") and draft.config.layer_types:
        draft.config.layer_types = draft.config.layer_types[:layers]
    return draft.eval()


def timed(fn, device: str, repeats: int) -> float:
    import torch

    fn()  # untimed: graph capture / compilation
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def prompts_for(args, tokenizer, count: int) -> list[list[int]]:
    rng = random.Random(0)
    if tokenizer is None:
        return [[rng.randrange(3, 8000) for _ in range(args.prompt_len)] for _ in range(count)]
    # a task with real agreement: the model is asked to repeat a text it was given
    words = "the cat sat on a mat while the dog ran in the park and birds sang over green hills".split()
    out = []
    for _ in range(count):
        text = " ".join(rng.choice(words) for _ in range(args.prompt_len // 2))
        messages = [{"role": "user", "content": f"Repeat this text exactly, word for word:\n{text}"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def rollout_table(args, model, tokenizer) -> str:
    import torch

    from pmetal.generation import SamplingConfig
    from pmetal.generation.engine import RolloutEngine

    prompts = prompts_for(args, tokenizer, args.prompts)
    rows, new = args.prompts * args.num_generations, args.max_new_tokens
    config = SamplingConfig(max_new_tokens=new, temperature=1.0)
    engines = [("pmetal engine", RolloutEngine(model, compile_decode=False))]
    if "compiled" not in args.skip:
        default = RolloutEngine(model, compile_decode=True)
        engines.append(("pmetal engine, compiled decode", default))
        if default.fuse_projections and "unfused" not in args.skip:
            engines.append(("pmetal engine, compiled decode, unfused projections",
                            RolloutEngine(model, compile_decode=True, fuse_projections=False)))
        if default.attention_kernel and "matmul" not in args.skip:
            engines.append(("pmetal engine, compiled decode, unfused, matmul attention",
                            RolloutEngine(model, compile_decode=True, attention_kernel=False, fuse_projections=False)))
    if engines[0][1].attention_kernel:
        engines[0] = ("pmetal engine (uncompiled)", engines[0][1])

    def run_engine(engine):
        return lambda: engine.generate(prompts, config, stop_ids=[], pad_token_id=0,
                                       num_return_sequences=args.num_generations)

    def run_hf(cache: str | None):
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=args.device)
        mask = (torch.arange(width, device=args.device)[None] >= torch.tensor([width - len(p) for p in prompts],
                                                                               device=args.device)[:, None]).long()
        kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                      num_return_sequences=args.num_generations, pad_token_id=0, eos_token_id=None)
        if cache:
            kwargs["cache_implementation"] = cache
        return lambda: model.generate(input_ids=ids, attention_mask=mask, **kwargs)

    results, gaps = [], {}
    for name, engine in engines:
        outs = []
        seconds = timed(lambda: outs.append(run_engine(engine)()), args.device, args.repeats)
        for why in (engine.capture_error, engine.compile_error):
            name += f" (fell back: {why[:100]})" if why else ""
        results.append((name, seconds))
        gaps[name] = logp_gap(model, outs[-1], config.temperature)
    for name, cache in (("HF generate, dynamic cache", None), ("HF generate, static cache", "static")):
        if name.split(", ")[1].split()[0] in args.skip:
            continue
        try:
            results.append((name, timed(run_hf(cache), args.device, args.repeats)))
        except Exception as exc:  # noqa: BLE001 - a contender that fails is reported, not fatal
            results.append((f"{name} (failed: {type(exc).__name__}: {str(exc)[:80]})", float("nan")))
    if args.floor:
        results.append(("floor: the weight matmuls alone, once per new token", new * weight_floor(model, rows, args)))
    header = (f"Rollout, {args.model} on {args.device}: {args.prompts} prompts x {args.num_generations} samples, "
              f"{args.prompt_len} + {new} tokens, temperature 1, no stop tokens, best of {args.repeats}")
    lines = ["| contender | seconds | new tokens/s | vs HF dynamic | vs HF static | max / mean log-prob gap |",
             "|---|---:|---:|---:|---:|---:|"]
    dynamic = next((s for n, s in results if n.startswith("HF generate, dynamic")), float("nan"))
    static = next((s for n, s in results if n.startswith("HF generate, static")), float("nan"))
    for name, seconds in results:
        gap = f"{gaps[name][0]:.2e} / {gaps[name][1]:.2e}" if name in gaps else ""
        lines.append(f"| {name} | {seconds:.3f} | {rows * new / seconds:,.0f} | {dynamic / seconds:.2f}x | "
                     f"{static / seconds:.2f}x | {gap} |")
    return header + "\n\n" + "\n".join(lines) + "\n"


def logp_gap(model, gen, temperature: float, chunk: int = 8) -> tuple[float, float]:
    """Largest and mean ``|recorded - training|`` log-prob over the completions' tokens: the training-mode
    forward (the whole sequence at once, the model's own attention) that the policy ratio divides by."""
    import torch

    ids = torch.cat([gen.prompt_ids, gen.completion_ids], dim=1)
    mask = torch.cat([gen.prompt_mask, gen.completion_mask], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    width, worst, total, count = gen.prompt_ids.shape[1], 0.0, 0.0, 0
    with torch.no_grad():
        for a in range(0, ids.shape[0], chunk):
            logits = model(input_ids=ids[a: a + chunk], attention_mask=mask[a: a + chunk],
                           position_ids=positions[a: a + chunk]).logits[:, width - 1: -1].float()
            logp = torch.log_softmax(logits / temperature, dim=-1).gather(2, gen.completion_ids[a: a + chunk, :, None])
            keep = gen.completion_mask[a: a + chunk].bool()
            diff = (logp.squeeze(2) - gen.logps[a: a + chunk]).abs()[keep]
            worst, total, count = max(worst, float(diff.max())), total + float(diff.sum()), count + diff.numel()
    return worst, total / max(count, 1)


def profile_rounds(args, model, tokenizer) -> str:
    """GPU time per kernel over a short compiled rollout without graphs (the profiler then sees every kernel)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pmetal.generation import SamplingConfig
    from pmetal.generation.engine import RolloutEngine

    prompts = prompts_for(args, tokenizer, args.prompts)
    config = SamplingConfig(max_new_tokens=64, temperature=1.0)
    engine = RolloutEngine(model, cuda_graphs=False, compile_decode=True)
    run = lambda: engine.generate(prompts, config, stop_ids=[], pad_token_id=0, num_return_sequences=args.num_generations)  # noqa: E731
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rounds = engine.last_stats.get("rollout/decode_rounds", 63.0)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
    return f"Profile: {args.prompts} x {args.num_generations} rows, 64 new tokens ({rounds:.0f} rounds)\n\n{table}\n"


def weight_floor(model, rows: int, args) -> float:
    """Seconds of one decode step's weight matmuls alone (``[rows, in] @ W.T`` for every 2-D weight).

    Any decoder reads every weight once per step; where that read bounds the step (a CPU at small
    batch), no engine can beat HF's step by more than HF's step over this floor."""
    import torch

    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}

    def step():
        with torch.no_grad():
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)

    return timed(lambda: [step() for _ in range(8)], args.device, args.repeats) / 8


def speculation_table(args, model, tokenizer) -> str:
    from pmetal.generation import SamplingConfig
    from pmetal.generation.engine import RolloutEngine

    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0)
    draft = None
    if args.draft.startswith("truncate:"):
        draft = truncated_copy(model, int(args.draft.split(":")[1]))
    lines = ["| batch | engine new tokens/s | speculative new tokens/s | speed-up | acceptance | tokens per policy forward |",
             "|---:|---:|---:|---:|---:|---:|"]
    stop = [tokenizer.eos_token_id] if tokenizer is not None else []
    for batch in args.spec_batches:
        prompts = prompts_for(args, tokenizer, batch)
        plain = RolloutEngine(model)
        spec = RolloutEngine(model, speculative=True, draft_model=draft, num_draft_tokens=args.num_draft_tokens)
        outs = {}

        def run(engine, key):
            outs[key] = engine.generate(prompts, config, stop_ids=stop, pad_token_id=0)

        t_plain = timed(lambda: run(plain, "plain"), args.device, args.repeats)
        t_spec = timed(lambda: run(spec, "spec"), args.device, args.repeats)
        tokens_plain, tokens_spec = int(outs["plain"].lengths.sum()), int(outs["spec"].lengths.sum())
        same = "" if outs["plain"].completion_ids.tolist() == outs["spec"].completion_ids.tolist() else " (outputs differ)"
        stats = spec.last_stats
        lines.append(f"| {batch} | {tokens_plain / t_plain:,.0f} | {tokens_spec / t_spec:,.0f}{same} | "
                     f"{t_plain / t_spec * tokens_spec / max(tokens_plain, 1):.2f}x | "
                     f"{stats.get('speculative/acceptance_rate', float('nan')):.2f} | "
                     f"{stats.get('speculative/tokens_per_forward', float('nan')):.2f} |")
    header = (f"Speculation, {args.model} on {args.device}: greedy, {args.max_new_tokens} new tokens, "
              f"draft {args.draft}, K = {args.num_draft_tokens}, best of {args.repeats}")
    return header + "\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="qwen3-0.6b-shape", help="qwen3-0.6b-shape, default (SmolLM2-135M), or an HF directory")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip", nargs="*", default=[], help="contenders to leave out: dynamic, static, compiled, unfused, matmul")
    p.add_argument("--profile", action="store_true", help="print the GPU time per kernel of compiled rounds")
    p.add_argument("--no-rollout", action="store_true", help="only the speculation table")
    p.add_argument("--floor", action="store_true", help="add the weight-read floor row (the matmuls alone)")
    p.add_argument("--speculative", action="store_true", help="add the speculation table")
    p.add_argument("--spec-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64])
    p.add_argument("--draft", default="ngram", help="ngram, or truncate:N (the model's first N layers)")
    p.add_argument("--num-draft-tokens", type=int, default=4)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args)
    text = ""
    if not args.no_rollout:
        text += rollout_table(args, model, tokenizer)
    if args.speculative:
        text += "\n" + speculation_table(args, model, tokenizer)
    if args.profile:
        text += "\n" + profile_rounds(args, model, tokenizer)
    versions = f"torch {torch.__version__}"
    if args.device == "cuda":
        versions += f", {torch.cuda.get_device_name()}"
    text += f"\n({versions})\n"
    report(text, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
