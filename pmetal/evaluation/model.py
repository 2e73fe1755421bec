"""What `pmetal eval` evaluates: the model (or adapter on its base) and the kind of data.

`detect_task(rows)` names the evaluation from the first row's columns, reusing the readers'
field tables (pmetal.data.formats / preference / prompts / embedding):

| task       | columns                                                                   |
|------------|---------------------------------------------------------------------------|
| preference | a chosen field (`chosen`, `accepted`, ...) and a rejected field            |
| embedding  | a text pair (`anchor`/`positive`, `sentence1`/`sentence2`, ...)            |
| prompt     | a prompt (`prompt`, `question`, `problem`) with `answer`/`solution` and no completion, or a prompt alone |
| sft        | any SFT format (`messages`, `conversations`, alpaca, prompt/completion, text, ...) |
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pmetal.errors import DataError, PmetalError

TASKS = ("sft", "preference", "prompt", "embedding")
PROMPT_FIELDS = ("prompt", "question", "problem")
ANSWER_FIELDS = ("answer", "solution")


def detect_task(rows: Sequence[dict], *, path: str | None = None) -> str:
    """The evaluation the rows call for (one of TASKS); see the module docstring."""
    from pmetal.data.embedding import PAIR_FIELDS
    from pmetal.data.formats import detect_format, row_error
    from pmetal.data.preference import CHOSEN_FIELDS, REJECTED_FIELDS

    if not rows:
        raise DataError(path, "no rows", expected="at least one row")
    keys = set(rows[0])
    if keys & set(CHOSEN_FIELDS) and keys & set(REJECTED_FIELDS):
        return "preference"
    if any(a in keys and b in keys for a, b in PAIR_FIELDS):
        return "embedding"
    prompt = keys & set(PROMPT_FIELDS)
    if prompt and "completion" not in keys and "thinking" not in keys and (keys & set(ANSWER_FIELDS) or keys == prompt):
        return "prompt"
    try:
        detect_format(rows, path=path)
    except DataError:
        found = ", ".join(sorted(map(str, keys))) or "(none)"
        raise row_error(rows, 0, f"cannot tell what to evaluate from the columns: {found}", path=path,
                        expected="SFT rows (messages, conversations, instruction/output, prompt/completion, "
                                 "text), preference rows (prompt/chosen/rejected), prompts with an answer "
                                 "(prompt or question + answer/solution), or embedding pairs (anchor/positive)") from None  # fmt: skip
    return "sft"


@dataclass
class EvalModel:
    """A causal LM for evaluation; with an adapter, `variants()` gives the base (adapter disabled) too."""

    model: Any
    tokenizer: Any
    source: str
    base: str | None = None  # the base an adapter was loaded onto
    device: torch.device = torch.device("cpu")

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter") and hasattr(self.model, "peft_config")

    @property
    def columns(self) -> list[str]:
        return ["base", "adapter"] if self.has_adapter else ["model"]

    def variants(self) -> Iterator[tuple[str, contextlib.AbstractContextManager]]:
        """(column, context) pairs: inside the context the model is that variant."""
        if self.has_adapter:
            yield "base", self.model.disable_adapter()
            yield "adapter", contextlib.nullcontext()
        else:
            yield "model", contextlib.nullcontext()

    def reference(self) -> contextlib.AbstractContextManager:
        """The implicit-reward reference (the base without the adapter); only for an adapter."""
        return self.model.disable_adapter()


def load_eval_model(name: str | Path = "default", *, base: str | None = None, device: str | torch.device = "cpu",
                    trust_remote_code: bool = False) -> EvalModel:
    """A model, a PEFT adapter (on its dequantized base, unmerged) or a pmetal run (its final/), in
    fp32 eval mode on `device`."""
    from pmetal.export.source import load_base_for_adapter, resolve_source
    from pmetal.models import load_model_and_tokenizer

    source = resolve_source(name)
    path = Path(str(source))
    if path.is_dir() and (path / "modules.json").is_file():
        raise PmetalError(f"{path} is a sentence-embedding model: evaluate it on embedding data (pairs, scored "
                          "pairs or triplets)")  # fmt: skip
    base_name = None
    if path.is_dir() and (path / "adapter_config.json").is_file():
        model, tokenizer, base_name, _ = load_base_for_adapter(path, base=base, trust_remote_code=trust_remote_code)
    else:
        model, tokenizer = load_model_and_tokenizer(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    device = torch.device(device)
    return EvalModel(model.to(device).eval(), tokenizer, str(source), base_name, device)
