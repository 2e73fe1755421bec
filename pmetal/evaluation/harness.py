"""EleutherAI's lm-evaluation-harness (`lm-eval`, the `eval` extra) on the in-memory model.

Its `HFLM` wraps the transformers model pmetal loaded (an adapter stays unmerged on its base: the
base variant runs with the adapter disabled, so both come from one load). `include_path` adds a
folder of the user's own task YAML files (lm-eval's TaskManager); a task's local data files are
read by `datasets` as lm-eval resolves them (relative paths from the working directory), so a
local task runs offline.
"""

from __future__ import annotations

import math

from pmetal.errors import PmetalError
from pmetal.evaluation.report import EvalReport

STDERR_SUFFIX = "_stderr"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PmetalError("--lm-eval needs EleutherAI's lm-evaluation-harness: pip install 'pmetal[eval]' "
                          "(or pip install lm-eval==0.4.13)") from None  # fmt: skip
    return lm_eval, HFLM, TaskManager


def task_metrics(results: dict) -> dict[str, float]:
    """lm-eval's `results` ({task: {"acc,none": v, "acc_stderr,none": s, ...}}) as flat
    `task/metric` names (filter kept when it is not "none"), numbers only."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            name = f"{task}/{metric}" + ("" if filter_name == "none" else f" [{filter_name}]")
            flat[name] = float(value) if math.isfinite(value) else None
    return flat


def run_lm_eval(handle, tasks: str, *, include_path: str | None = None, limit: int | None = None,
                batch_size: int = 8, seed: int = 0) -> EvalReport:
    """Run lm-eval's `tasks` (comma-separated) on each variant of `handle` (pmetal.evaluation.model)."""
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else " (pass --lm-eval-include DIR for your own task YAMLs)"
        raise PmetalError(f"--lm-eval: unknown task {unknown[0]!r}: not among lm-eval's tasks{where}")
    report = EvalReport("lm-eval", ",".join(names), handle.source, handle.columns)
    model = handle.model.get_base_model() if handle.has_adapter else handle.model  # adapter layers stay in place
    lm = HFLM(pretrained=model, tokenizer=handle.tokenizer, batch_size=batch_size, device=str(handle.device))
    for column, context in handle.variants():
        with context:
            out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False,
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed)  # fmt: skip
        report.add(column, task_metrics(out["results"]))
    report.notes.append(f"lm-evaluation-harness {lm_eval.__version__}" + (f", at most {limit} documents per task" if limit else ""))
    return report
