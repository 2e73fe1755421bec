"""Reward functions for online RL (GRPO, DAPO, RLKD).

A reward function is any callable ``fn(prompts, completions, **columns) -> list[float]``:

- ``prompts``: the prompts as the dataset gave them (a string or a list of chat messages), one
  per completion (a prompt is repeated for each of its ``G`` completions);
- ``completions``: the generated texts (special tokens removed);
- ``columns``: the dataset's other columns, one value per completion (``answer``, ``solution``,
  ...), plus ``completion_lengths`` (tokens generated) and ``max_completion_length``. A function
  takes the keywords it needs and must accept ``**kwargs`` for the rest.

Built in: ``think_format`` (a closed ``<think>``/``<thinking>`` block then an answer),
``accuracy`` (the final answer against the dataset's ``answer``/``solution``), ``length``
(PMetal's length shaping) and ``overlong`` (DAPO's soft overlong punishment). ``reasoning``
names the set ``--reasoning-rewards`` enables (format + accuracy + length). Anything else is an
import path ``package.module:function`` (or a factory's result); ``RewardModelReward`` scores with
a sequence-classification model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pmetal.errors import PmetalError
from pmetal.imports import import_user_module

RewardFn = Callable[..., list[float]]

# ---------------------------------------------------------------------------------------------
# Answer extraction and comparison
# ---------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_GSM8K_MARKER = re.compile(r"####\s*(.+)")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_FRACTION = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")


def _strip_think(text: str) -> str:
    """The text after the reasoning block, so a number inside the reasoning is never the answer."""
    for closing in ("</think>", "</thinking>"):
        if closing in text:
            text = text.rsplit(closing, 1)[1]
    return text


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return None  # unbalanced: no answer


def extract_answer(text: str) -> str | None:
    """The final answer stated in ``text``, or None.

    In order of precedence: the last ``<answer>...</answer>`` tag, the last ``\\boxed{...}``,
    GSM8K's ``#### answer`` line, the last number. Text inside a ``<think>`` block is ignored.
    """
    text = _strip_think(text)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    marker = _GSM8K_MARKER.findall(text)
    if marker:
        return marker[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def parse_number(text: str) -> float | None:
    """A number written with formatting (``"1,000"``, ``"$1000.00"``, ``"50%"``, ``"\\frac{1}{2}"``)."""
    s = text.strip().strip(".").strip()
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "").replace("\\!", "")
    s = re.sub(r"\\text\{[^{}]*\}", "", s).replace("{,}", ",").strip()
    fraction = _FRACTION.match(s)
    if fraction:
        num, den = parse_number(fraction.group(1)), parse_number(fraction.group(2))
        return num / den if num is not None and den not in (None, 0.0) else None
    if re.fullmatch(r"[-+]?\d+\s*/\s*\d+", s):
        num, den = (float(part) for part in s.split("/"))
        return num / den if den else None
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def _normalize_text(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    return re.sub(r"\s+", "", text).strip(".").lower()


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Numeric comparison when the reference is a number (``1,000 == 1000 == 1000.0``), else text.

    When the reference is a number and the predicted answer is a phrase ("The answer is 42."),
    its last number is compared.
    """
    if predicted is None or reference is None:
        return False
    ref_value = parse_number(reference)
    if ref_value is not None:
        value = parse_number(predicted)
        if value is None:
            numbers = _NUMBER.findall(predicted)
            value = parse_number(numbers[-1]) if numbers else None
        return value is not None and math.isclose(value, ref_value, rel_tol=1e-6, abs_tol=1e-9)
    return _normalize_text(predicted) == _normalize_text(reference)


def _reference_answer(answer: Any, solution: Any) -> str | None:
    if answer is not None and str(answer).strip():
        text = str(answer)
        # GSM8K stores the worked solution in "answer" with the result after "####".
        return extract_answer(text) if ("####" in text or "\\boxed" in text or "<answer>" in text) else text.strip()
    if solution is not None and str(solution).strip():
        return extract_answer(str(solution))
    return None


# ---------------------------------------------------------------------------------------------
# Built-in reward functions
# ---------------------------------------------------------------------------------------------


def think_format_reward(prompts: Sequence[Any], completions: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 when the completion opens with a closed, non-empty ``<think>...</think>`` (or
    ``<thinking>...</thinking>``) block followed by a non-empty answer, else 0.0.

    The DeepSeek-R1 format reward (arXiv:2501.12948, §2.2.2); both tag spellings are accepted
    because models and datasets use both. A completion whose prompt already opened ``<think>``
    (Qwen3-style templates) is accepted when it only closes it.
    """
    scores = []
    for completion in completions:
        text = completion if re.match(r"^\s*<think(ing)?>", completion) else None
        if text is None and re.search(r"</think(ing)?>", completion):
            tag = "thinking" if "</thinking>" in completion else "think"
            text = f"<{tag}>" + completion
        ok = False
        if text is not None:
            match = re.match(r"^\s*<(think|thinking)>(.*?)</\1>(.*)$", text, re.DOTALL)
            ok = bool(match and match.group(2).strip() and match.group(3).strip())
            # exactly one block: no other think tag inside it or after it
            ok = ok and not re.search(r"</?think(ing)?>", match.group(2) + match.group(3))
        scores.append(1.0 if ok else 0.0)
    return scores


def accuracy_reward(
    prompts: Sequence[Any],
    completions: Sequence[str],
    answer: Sequence[Any] | None = None,
    solution: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[float]:
    """1.0 when the completion's final answer equals the dataset's answer, else 0.0.

    The answer is read from the ``answer`` column (a bare answer, or GSM8K's ``#### 42``) or,
    failing that, extracted from the ``solution`` column (e.g. MATH's ``\\boxed{}``). The
    completion's answer is found by :func:`extract_answer` and compared by :func:`answers_match`.
    """
    if answer is None and solution is None:
        raise PmetalError(
            "the accuracy reward needs the dataset's answers: add an 'answer' (or 'solution') column to the "
            "prompt dataset, or choose other rewards"
        )
    answers = list(answer) if answer is not None else [None] * len(completions)
    solutions = list(solution) if solution is not None else [None] * len(completions)
    return [
        1.0 if answers_match(extract_answer(c), _reference_answer(a, s)) else 0.0
        for c, a, s in zip(completions, answers, solutions)
    ]


@dataclass
class LengthReward:
    """PMetal's length shaping: a small bonus for a reasonable length, penalties outside it.

    ``too_short`` (default -0.5) below ``min_chars`` characters, ``too_long`` (-0.1) above
    ``max_chars``, ``bonus`` (0.1) otherwise; weighted 0.2 in the reasoning set (as in PMetal's
    ``--reasoning-rewards``). ``max_chars=None`` means 8 characters per token of the generation
    limit (PMetal uses twice the max sequence length).
    """

    min_chars: int = 10
    max_chars: int | None = None
    too_short: float = -0.5
    too_long: float = -0.1
    bonus: float = 0.1
    __name__ = "length"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **kwargs: Any) -> list[float]:
        limit = self.max_chars
        if limit is None:
            limit = 8 * int(kwargs.get("max_completion_length") or 512)
        return [
            self.too_short if len(c.strip()) < self.min_chars else self.too_long if len(c) > limit else self.bonus
            for c in completions
        ]


@dataclass
class OverlongPunishment:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, Eq. 13), on token counts.

    With ``L_max`` the generation limit and ``L_cache`` the buffer: 0 up to ``L_max - L_cache``
    tokens, then falling linearly to -1 at ``L_max``, and -1 beyond (a truncated completion).
    ``buffer=None`` uses a quarter of ``L_max`` (the paper: 4096 of 20480, i.e. 1/5; TRL has no default).
    """

    buffer: int | None = None
    max_length: int | None = None
    __name__ = "overlong"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **kwargs: Any) -> list[float]:
        lengths = kwargs.get("completion_lengths")
        max_length = self.max_length or kwargs.get("max_completion_length")
        if lengths is None or not max_length:
            raise PmetalError("the overlong reward needs completion_lengths and max_completion_length (rollout columns)")
        buffer = self.buffer if self.buffer is not None else max(1, max_length // 4)
        expected = max_length - buffer
        scores = []
        for length in lengths:
            if length <= expected:
                scores.append(0.0)
            elif length <= max_length:
                scores.append((expected - length) / buffer)
            else:
                scores.append(-1.0)
        return scores


think_format_reward.__name__ = "think_format"
accuracy_reward.__name__ = "accuracy"

BUILTIN_REWARDS: dict[str, Callable[[], RewardFn]] = {
    "think_format": lambda: think_format_reward,
    "format": lambda: think_format_reward,
    "accuracy": lambda: accuracy_reward,
    "length": LengthReward,
    "overlong": OverlongPunishment,
}
# Dataset columns a built-in reads, as alternatives (one of them must hold a value in every row);
# a user's function may declare its own as a `required_columns` tuple.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {"accuracy": ("answer", "solution")}


def required_columns(fn: RewardFn) -> tuple[str, ...]:
    return tuple(getattr(fn, "required_columns", None) or REQUIRED_COLUMNS.get(reward_name(fn), ()))


# --reasoning-rewards: (name, weight).
REASONING_REWARDS: tuple[tuple[str, float], ...] = (("think_format", 1.0), ("accuracy", 1.0), ("length", 0.2))


# ---------------------------------------------------------------------------------------------
# Resolving and combining
# ---------------------------------------------------------------------------------------------


def resolve_reward(spec: str | RewardFn) -> RewardFn:
    """A reward function from a built-in name or an import path ``package.module:function``.

    Raises:
        PmetalError: the name is unknown, the module cannot be imported, the attribute is
            missing, or it is not callable.
    """
    if callable(spec):
        return spec
    spec = str(spec).strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]()
    if ":" not in spec:
        raise PmetalError(
            f"unknown reward {spec!r}: use a built-in ({', '.join(sorted(BUILTIN_REWARDS))}) or an import path "
            "'package.module:function'"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = import_user_module(module_name)
    except Exception as exc:  # any import failure is the user's path, say so plainly
        raise PmetalError(f"reward {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise PmetalError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise PmetalError(f"reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def reward_name(fn: RewardFn) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


class RewardSet:
    """Weighted reward functions; ``score`` returns each function's scores and the weighted sum."""

    def __init__(self, functions: Sequence[RewardFn], weights: Sequence[float] | None = None) -> None:
        if not functions:
            raise PmetalError(
                "no reward function: pass --reasoning-rewards, --reward-fn NAME|package.module:function "
                "or --reward-model PATH (a constant reward would teach nothing)"
            )
        weights = list(weights) if weights else [1.0] * len(functions)
        if len(weights) != len(functions):
            raise PmetalError(f"{len(weights)} reward weights for {len(functions)} reward functions")
        self.functions = list(functions)
        self.weights = [float(w) for w in weights]
        names = [reward_name(fn) for fn in self.functions]
        # a repeated function keeps its name the first time and gets its position after that
        self.names = [n if n not in names[:i] else f"{n}_{i}" for i, n in enumerate(names)]

    @classmethod
    def from_specs(
        cls,
        specs: Sequence[str | RewardFn] = (),
        weights: Sequence[float] | None = None,
        *,
        reasoning: bool = False,
        reward_model: str | None = None,
    ) -> RewardSet:
        """Build from the CLI's options: ``--reasoning-rewards``, ``--reward-fn``, ``--reward-model``."""
        functions: list[RewardFn] = []
        all_weights: list[float] = []
        if reasoning:
            for name, weight in REASONING_REWARDS:
                functions.append(BUILTIN_REWARDS[name]())
                all_weights.append(weight)
        user = [resolve_reward(s) for s in specs]
        if weights and len(weights) != len(user):
            raise PmetalError(f"{len(weights)} reward weights for {len(user)} --reward-fn functions")
        functions += user
        all_weights += list(weights) if weights else [1.0] * len(user)
        if reward_model:
            functions.append(RewardModelReward(reward_model))
            all_weights.append(1.0)
        return cls(functions, all_weights)

    @staticmethod
    def score_one(fn, prompts: Sequence[Any], completions: Sequence[str], **columns: Any):
        """One function's raw scores; an ``async def`` reward is run to completion."""
        import asyncio
        import inspect

        scores = fn(list(prompts), list(completions), **columns)
        return asyncio.run(scores) if inspect.isawaitable(scores) else scores

    def score(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> tuple[list[float], dict[str, list[float]]]:
        """``(total [N], {name: scores [N]})``; a function returning the wrong count is an error."""
        per_function: dict[str, list[float]] = {}
        for name, fn in zip(self.names, self.functions):
            scores = self.score_one(fn, prompts, completions, **columns)
            if scores is None or len(scores) != len(completions):
                got = "None" if scores is None else f"{len(scores)} scores"
                raise PmetalError(f"reward function {name!r} returned {got} for {len(completions)} completions")
            per_function[name] = [float("nan") if s is None else float(s) for s in scores]
        total = [
            sum(w * per_function[n][i] for n, w in zip(self.names, self.weights) if not math.isnan(per_function[n][i]))
            for i in range(len(completions))
        ]
        return total, per_function


class RewardModelReward:
    """Scores prompt + completion with a sequence-classification reward model (logit 0).

    The model is loaded lazily on first use (``trust_remote_code=False``), on the device of the
    tensors it is given (CPU by default; ``.to(device)`` to move it). Chat prompts are rendered
    with the reward model's own chat template when it has one.
    """

    def __init__(self, path: str, *, batch_size: int = 8, max_length: int = 2048) -> None:
        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = "cpu"
        self.__name__ = "reward_model"
        self._model = None
        self._tokenizer = None

    def to(self, device: Any) -> RewardModelReward:
        self.device = device
        if self._model is not None:
            self._model.to(device)
        return self

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
            self._model = AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=1).eval()
        except (OSError, ValueError) as exc:
            raise PmetalError(f"--reward-model {self.path!r}: cannot load a sequence-classification model ({exc})") from exc
        self._model.to(self.device)
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._model.config.pad_token_id = self._tokenizer.pad_token_id

    def _text(self, prompt: Any, completion: str) -> str:
        if isinstance(prompt, list) and getattr(self._tokenizer, "chat_template", None):
            messages = list(prompt) + [{"role": "assistant", "content": completion}]
            return self._tokenizer.apply_chat_template(messages, tokenize=False)
        if isinstance(prompt, list):
            prompt = "\n".join(str(m.get("content", "")) for m in prompt)
        return f"{prompt}{completion}"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **kwargs: Any) -> list[float]:
        import torch

        if self._model is None:
            self._load()
        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self._tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                ).to(self.device)
                logits = self._model(**enc).logits  # [b, num_labels]
                scores += logits[:, 0].float().tolist()
        return scores
