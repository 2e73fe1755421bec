"""Every pmetal method and mode for a few steps on the GPU, in the device's default precision: a table.

    python scripts/cuda_smoke.py                      # CUDA, pmetal's default precision (bf16-mixed)
    python scripts/cuda_smoke.py --device cpu --steps 1
    python scripts/cuda_smoke.py --only dpo-sigmoid,grpo --precision 16-mixed --markdown benchmarks/RESULTS.md

The cases are the precision matrix's (tests/method_matrix.py: SFT full/LoRA/DoRA/QLoRA, DPO's four
losses, SimPO, ORPO, KTO, GRPO, DAPO, GSPO, speculative and async-reward GRPO, RLKD, VLM SFT and
GRPO, the three embedding losses), each run in this process through the command a user types
(`pmetal fit --method ...` or `pmetal train|grpo|rlkd|embed-train ...`). The models are random,
built here from configs (a Llama, an Idefics3 and a Qwen2-VL of `--hidden` x `--layers`, a BERT),
with tokenizers trained here on pmetal's example data: nothing is downloaded. A failing case is
reported (its error's first line) and the run goes on; the exit code is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ holds the case table and the model builders
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def versions(device: str) -> list[str]:
    import lightning
    import peft
    import torch
    import transformers

    card = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = "?"
    cuda = f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""
    return [f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}   pmetal commit: {commit or '?'}",
            f"device: {device}, {card}",
            f"python=={platform.python_version()} torch=={torch.__version__}{cuda} transformers=={transformers.__version__} "
            f"peft=={peft.__version__} lightning=={lightning.__version__}"]


def build_models(folder: Path, hidden: int, layers: int) -> dict[str, str]:
    """Random models with tokenizers trained here (no download), as `run_case` takes them."""
    from tests.tiny import bpe_tokenizer, make_tiny_bert, make_tiny_causal_lm, wordpiece_tokenizer
    from tests.tiny_vlm import make_tiny_idefics3, make_tiny_qwen_vl

    bpe = bpe_tokenizer()
    return {
        "lm": str(make_tiny_causal_lm(folder / "lm", hidden_size=hidden, num_layers=layers, tokenizer=bpe)),
        "lm_teacher": str(make_tiny_causal_lm(folder / "lm_teacher", hidden_size=2 * hidden, num_layers=layers,
                                              seed=1, tokenizer=bpe)),
        "idefics3": str(make_tiny_idefics3(folder / "idefics3", hidden_size=hidden, num_layers=layers, tokenizer=bpe)),
        "qwen2_vl": str(make_tiny_qwen_vl(folder / "qwen2_vl", hidden_size=hidden, num_layers=layers, tokenizer=bpe)),
        "bert": str(make_tiny_bert(folder / "bert", hidden_size=hidden, num_layers=layers,
                                   tokenizer=wordpiece_tokenizer())),
    }


def table(outcomes, precision_label: str) -> str:
    lines = ["| method/mode | precision | steps | first loss | last loss | s/step | peak GPU GiB | status |",
             "|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        first = f"{o.losses[0]:.4f}" if o.losses else "-"
        last = f"{o.losses[-1]:.4f}" if o.losses else "-"
        status = "ok" if o.ok else f"FAIL: {o.problem()}".replace("|", "/")
        peak = f"{o.peak_memory_gib:.2f}" if o.peak_memory_gib == o.peak_memory_gib else "-"
        per_step = f"{o.seconds_per_step:.3f}" if o.seconds_per_step == o.seconds_per_step else "-"
        lines.append(f"| {o.case} | {o.precision_plugin or precision_label} | {o.steps} | {first} | {last} | "
                     f"{per_step} | {peak} | {status} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--precision", default=None,
                        help="a Lightning precision; default: what pmetal picks on the device (bf16-mixed on a "
                             "bf16 GPU, 32-true on the CPU)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per case")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random language models")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the random models")
    parser.add_argument("--only", default=None, help="comma-separated case names (default: every case)")
    parser.add_argument("--markdown", default=None, help="also append the table to this file")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device; pass --device cpu", file=sys.stderr)
        return 2
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from tests.method_matrix import CASES, run_case, write_data
    from tests.tiny_vlm import write_colour_images

    cases = CASES
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {c.name for c in CASES}
        if unknown:
            print(f"cuda_smoke: unknown case(s) {sorted(unknown)}; known: {', '.join(c.name for c in CASES)}",
                  file=sys.stderr)
            return 2
        cases = [c for c in CASES if c.name in names]
    header = versions(args.device)
    print("\n".join(header), flush=True)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="pmetal-smoke-") as tmp:
        work = Path(tmp)
        models = build_models(work / "models", args.hidden, args.layers)
        for sub in ("images", "data"):
            (work / sub).mkdir()
        data = write_data(work / "data", images=write_colour_images(work / "images"))
        for case in cases:
            import lightning as L

            L.seed_everything(0, verbose=False)
            outcome = run_case(case, args.precision, models, data, work / "runs" / case.name,
                               accelerator=args.device, steps=args.steps, catch=True)
            outcomes.append(outcome)
            print(f"[smoke] {case.name}: {'ok' if outcome.ok else 'FAIL ' + outcome.problem()}", flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    text = "\n".join(header) + "\n\n" + table(outcomes, args.precision or "default")
    failed = [o.case for o in outcomes if not o.ok]
    text += f"\n\n{len(outcomes) - len(failed)}/{len(outcomes)} ok" + (f"; failed: {', '.join(failed)}" if failed else "")
    print("\n" + text, flush=True)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n" + text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
