"""Evaluation of a model or a trained adapter on a data file (`pmetal eval`).

- `evaluate(model, dataset, ...)`: picks the evaluation from the data's format (`detect_task`) and
  returns an `EvalReport` (metric -> column -> value; columns "base" and "adapter" for an adapter).
- `pass_at_k(n, c, k)`: the unbiased pass@k estimator (Chen et al., 2021).
- `run_lm_eval(...)`: EleutherAI's lm-evaluation-harness on the in-memory model.

Core layer: nothing here imports `pmetal.cli`, `pmetal.modules` or `pmetal.callbacks`. Names
resolve lazily so that importing the package costs nothing.
"""

from __future__ import annotations

from pmetal.lazy import lazy_exports

_EXPORTS = {
    "evaluate": "pmetal.evaluation.api",
    "EvalReport": "pmetal.evaluation.report",
    "detect_task": "pmetal.evaluation.model",
    "load_eval_model": "pmetal.evaluation.model",
    "pass_at_k": "pmetal.evaluation.sampling",
    "run_lm_eval": "pmetal.evaluation.harness",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
