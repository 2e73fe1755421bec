"""Evaluations that sample: mean reward, answer accuracy and pass@k on prompt data.

Each prompt gets `num_samples` completions from the rollout engine (pmetal.generation.generate).
They are scored by the reward functions GRPO uses (pmetal.rewards: `--reward-fn`,
`--reasoning-rewards`), with the dataset's other columns and the completion lengths as GRPO passes
them. Answer accuracy is pmetal.rewards.accuracy_reward (the completion's final answer against
`answer`/`solution`; over all samples, so it equals pass@1); pass@k, for k = 2, 4, ... up to
`num_samples`, is the unbiased estimator of Chen et al. (2021) over those samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k samples drawn without replacement from n, c of them
    correct, is correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1), as their product form
    prod_{i=n-c+1..n} (1 - k/i), which never forms the large binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(num_samples: int) -> list[int]:
    """The k reported for n samples: 1, powers of two below n, and n."""
    ks = [1]
    while ks[-1] * 2 < num_samples:
        ks.append(ks[-1] * 2)
    return sorted(set(ks + [num_samples]))


def has_answers(columns: dict[str, list]) -> bool:
    return any(v is not None and str(v).strip() for name in ("answer", "solution") for v in columns.get(name, []))


def prompt_eval(handle, rows, path: str, report, *, rewards=None, num_samples: int = 1, max_new_tokens: int = 256,
                temperature: float | None = None, top_p: float = 1.0, max_prompt_length: int = 512,
                seed: int = 0) -> None:
    """Generate `num_samples` completions per prompt per variant and score them."""
    from pmetal.data.prompts import row_to_prompt
    from pmetal.data.render import ensure_chat_template, render_prompt
    from pmetal.generation import SamplingConfig, generate, stop_token_ids
    from pmetal.rewards import accuracy_reward

    ensure_chat_template(handle.tokenizer)
    prompts, prompt_ids, per_row = [], [], []
    for i in range(len(rows)):
        original, messages, columns = row_to_prompt(rows, i, path=path)
        prompts.append(original)
        prompt_ids.append(render_prompt(handle.tokenizer, messages)[-max_prompt_length:])
        per_row.append(columns)
    names = sorted({k for c in per_row for k in c})
    columns = {name: [c.get(name) for c in per_row for _ in range(num_samples)] for name in names}
    repeated = [p for p in prompts for _ in range(num_samples)]
    temperature = (0.0 if num_samples == 1 else 1.0) if temperature is None else temperature
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    answers = has_answers(columns)
    report.notes.append(f"{len(prompts)} prompts x {num_samples} samples, temperature {temperature}, "
                        f"at most {max_new_tokens} new tokens"
                        + ("" if answers else "; no answer/solution column, so no accuracy or pass@k"))  # fmt: skip
    tokenizer = handle.tokenizer
    for column, context in handle.variants():
        generator = torch.Generator(handle.device).manual_seed(seed)
        with context:
            gen = generate(handle.model, prompt_ids, config, stop_ids=stop_token_ids(tokenizer, handle.model),
                           pad_token_id=tokenizer.pad_token_id, num_return_sequences=num_samples,
                           generator=generator, compile_decode=False)  # fmt: skip
        lengths = gen.lengths.tolist()
        completions = tokenizer.batch_decode([row[: int(n)] for row, n in zip(gen.completion_ids.tolist(), lengths)],
                                             skip_special_tokens=True)  # fmt: skip
        values = {"completion_tokens": sum(lengths) / len(lengths)}
        if rewards is not None:
            total, per_function = rewards.score(repeated, completions, **columns, completion_lengths=lengths,
                                                max_completion_length=max_new_tokens)  # fmt: skip
            values["reward"] = sum(total) / len(total)
            values |= {f"reward_{name}": _mean(scores) for name, scores in per_function.items()}
        if answers:
            correct = accuracy_reward(repeated, completions, answer=columns.get("answer"), solution=columns.get("solution"))
            values |= answer_metrics(correct, num_samples)
        report.add(column, values)


def answer_metrics(correct: Sequence[float], num_samples: int) -> dict[str, float]:
    """Accuracy over all samples (= pass@1) and pass@k for k in `pass_ks(num_samples)[1:]`, from
    the prompt-major 0/1 scores of `num_samples` completions per prompt."""
    per_prompt = [int(sum(correct[j : j + num_samples])) for j in range(0, len(correct), num_samples)]
    values = {"accuracy": sum(correct) / len(correct)}
    for k in pass_ks(num_samples)[1:]:
        values[f"pass@{k}"] = sum(pass_at_k(num_samples, c, k) for c in per_prompt) / len(per_prompt)
    return values


def _mean(scores: Sequence[float]) -> float | None:
    finite = [s for s in scores if not math.isnan(s)]
    return sum(finite) / len(finite) if finite else None
