"""Evaluate a model, adapter or run on a data file, picking the evaluation from its format.

    pmetal eval --model runs/sft-x --dataset examples/data/sft.jsonl        loss, perplexity: base | adapter
    pmetal eval --model runs/dpo-x --dataset examples/data/dpo.jsonl        pairwise accuracy, reward margins
    pmetal eval --model runs/grpo-x --dataset examples/data/grpo.jsonl --reward-fn accuracy --num-samples 4
                                                                            mean reward, accuracy, pass@k
    pmetal eval --model runs/embed-x --dataset examples/data/embed.jsonl    retrieval / similarity metrics
    pmetal eval --model default --lm-eval mytask --lm-eval-include tasks/   EleutherAI lm-evaluation-harness

The table is printed; JSON goes to --out, or beside a run (<run>/eval_results.json) when --model
is a pmetal run or adapter. The flags are the parameters of pmetal.evaluation.api.evaluate.
"""

from __future__ import annotations

import argparse

TARGET = "pmetal.evaluation.api:evaluate"
ALIASES = {"dataset": ("--dataset",), "model": ("--model",)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pmetal.cli.flags import add_function_flags

    p.set_defaults(_settings=add_function_flags(p, TARGET, ALIASES))
    p.add_argument("--out", default=None, help="write the results as JSON here (default: beside the run, "
                   "<run>/eval_results.json, when --model is a pmetal run or adapter)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pmetal.cli.flags import function_values
    from pmetal.evaluation.api import evaluate
    from pmetal.evaluation.report import default_result_path, reports_json

    values = function_values(args, args._settings)
    reports = evaluate(**values)
    for report in reports:
        print(report.table(), flush=True)
    out = args.out or default_result_path(values.get("model", "default"))
    if out is not None:
        from pmetal.atomic import write_text_atomic

        write_text_atomic(out, reports_json(reports))
        print(f"results: {out}")
    return 0
