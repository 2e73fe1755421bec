"""`evaluate(...)`: read the data once (pmetal.data.formats.load_rows), pick the evaluation from its
columns (`detect_task`, or `task=`), run it on each variant of the model; `lm_eval=` runs
lm-evaluation-harness tasks on the same in-memory model. Its signature is `pmetal eval`'s flags."""

from __future__ import annotations

from typing import Literal, Optional

from pmetal.errors import PmetalError
from pmetal.evaluation.report import EvalReport


def evaluate(
    model: str = "default",
    dataset: Optional[str] = None,
    *,
    task: Optional[Literal["sft", "preference", "prompt", "embedding"]] = None,
    base: Optional[str] = None,
    accelerator: Literal["auto", "mps", "cuda", "cpu"] = "auto",
    max_seq_len: int = 1024,
    batch_size: int = 8,
    limit: Optional[int] = None,
    beta: float = 0.1,
    reward_fns: Optional[list[str]] = None,
    reward_weights: Optional[list[float]] = None,
    reasoning_rewards: bool = False,
    num_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: Optional[float] = None,
    top_p: float = 1.0,
    max_prompt_length: int = 512,
    seed: int = 0,
    lm_eval: Optional[str] = None,
    lm_eval_include: Optional[str] = None,
    lm_eval_limit: Optional[int] = None,
    trust_remote_code: bool = False,
) -> list[EvalReport]:
    """Evaluate a model, an adapter (beside its base with the adapter disabled) or a pmetal run.

    Args:
        model: a model (HF directory, hub id, .gguf, "default"), a PEFT adapter directory or a pmetal run.
        dataset: the data file; its columns pick the evaluation (SFT: loss and perplexity;
            preference: pairwise accuracy and reward margins; prompts with answers: reward,
            accuracy, pass@k; embedding pairs/scored pairs/triplets: retrieval and similarity metrics).
        task: force the evaluation instead of detecting it from the columns.
        base: the adapter's base model (none: the one the adapter records).
        accelerator: where the model runs (auto: mps > cuda > cpu); weights stay float32.
        max_seq_len: longest scored sequence in tokens (longer rows are cut).
        batch_size: rows per forward.
        limit: evaluate only the first N rows.
        beta: the DPO beta of the implicit reward margins (preference data, adapter only).
        reward_fns: prompt data: reward functions, built-in names (think_format, accuracy, length,
            overlong) or package.module:function.
        reward_weights: one weight per reward function (none: 1 each).
        reasoning_rewards: prompt data: add the reasoning set (think format, accuracy, length), as grpo.
        num_samples: prompt data: completions per prompt (n of pass@k).
        max_new_tokens: prompt data: the most tokens generated per completion.
        temperature: prompt data: sampling temperature (none: 0, greedy, for one sample; 1 for several).
        top_p: prompt data: nucleus sampling.
        max_prompt_length: prompt data: longer prompts keep their tail.
        seed: seed of the sampling.
        lm_eval: comma-separated lm-evaluation-harness task names, run on the model (needs the eval extra).
        lm_eval_include: a folder of lm-evaluation-harness task YAML files (your own tasks).
        lm_eval_limit: lm-evaluation-harness: at most this many documents per task.
        trust_remote_code: allow custom modelling code from the model's repository.
    """
    from pmetal.device import choose_device

    if dataset is None and lm_eval is None:
        raise PmetalError("nothing to evaluate: pass --dataset FILE and/or --lm-eval TASKS")
    device = choose_device(accelerator).torch_device
    reports = []
    handle = None
    if dataset is not None:
        from pmetal.data.formats import load_rows
        from pmetal.evaluation.model import detect_task

        path = str(dataset)
        rows = load_rows(dataset)
        rows = _head(rows, limit) if limit is not None else rows
        task = task or detect_task(rows, path=path)
        if task == "embedding":
            from pmetal.evaluation.embedding import embedding_eval

            report = EvalReport(task, path, str(model), ["model"])
            embedding_eval(str(model), rows, path, report, batch_size=batch_size, trust_remote_code=trust_remote_code)
            reports.append(report)
        else:
            handle = _load(model, base, device, trust_remote_code)
            reports.append(_run_task(task, handle, rows, path, max_seq_len=max_seq_len, batch_size=batch_size,
                                     beta=beta, rewards=_rewards(reward_fns, reward_weights, reasoning_rewards),
                                     num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, max_prompt_length=max_prompt_length, seed=seed))  # fmt: skip
    if lm_eval is not None:
        from pmetal.evaluation.harness import run_lm_eval

        handle = handle or _load(model, base, device, trust_remote_code)
        reports.append(run_lm_eval(handle, lm_eval, include_path=lm_eval_include, limit=lm_eval_limit,
                                   batch_size=batch_size, seed=seed))  # fmt: skip
    return reports


def _load(model, base, device, trust_remote_code):
    from pmetal.evaluation.model import load_eval_model

    return load_eval_model(model, base=base, device=device, trust_remote_code=trust_remote_code)


def _rewards(reward_fns, reward_weights, reasoning_rewards):
    """The RewardSet grpo would build from the same flags; None when none is named."""
    if not reward_fns and not reasoning_rewards:
        return None
    from pmetal.rewards import RewardSet

    return RewardSet.from_specs(reward_fns or [], reward_weights, reasoning=reasoning_rewards)


def _run_task(task: str, handle, rows, path: str, *, max_seq_len, batch_size, beta, rewards, **sampling) -> EvalReport:
    report = EvalReport(task, path, handle.source, handle.columns)
    if handle.base:
        report.notes.append(f"base = {handle.base} (the adapter disabled)")
    if task == "sft":
        from pmetal.evaluation.likelihood import sft_eval

        sft_eval(handle, rows, path, report, max_seq_len=max_seq_len, batch_size=batch_size)
    elif task == "preference":
        from pmetal.evaluation.likelihood import preference_eval

        preference_eval(handle, rows, path, report, max_seq_len=max_seq_len, batch_size=batch_size, beta=beta)
    elif task == "prompt":
        from pmetal.evaluation.sampling import prompt_eval

        prompt_eval(handle, rows, path, report, rewards=rewards, **sampling)
    else:
        raise PmetalError(f"unknown evaluation {task!r}; expected sft, preference, prompt or embedding")
    return report


def _head(rows, limit: int):
    """The first `limit` rows, keeping where each came from (for error messages)."""
    if limit < 1:
        raise PmetalError(f"--limit {limit}: expected at least 1 row")
    head = type(rows)(rows[:limit])
    head._files, head._where = rows._files, rows._where[:limit]
    return head
