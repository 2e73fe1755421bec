"""The sampler's typed view of a prompt batch (`pmetal.data.prompts` collates it as a dict)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PromptBatch:
    """Prompts of one step: their token ids, the prompts as the dataset gave them, the reward columns
    (``{name: [value per prompt]}``) and, for a VLM, one dict of image tensors per prompt."""

    prompt_ids: list[list[int]]
    prompts: list[Any]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    pixel_inputs: list[dict] | None = None

    @classmethod
    def of(cls, batch: PromptBatch | dict[str, Any]) -> PromptBatch:
        """A collated prompt batch (`pmetal.data.prompts.collate_prompts`) as a PromptBatch."""
        if isinstance(batch, PromptBatch):
            return batch
        if not isinstance(batch, dict) or "prompt_ids" not in batch:
            raise TypeError("expected a prompt batch from pmetal.data.prompts.PromptDataModule "
                            f"(a dict with 'prompt_ids'), got {type(batch).__name__}")
        return cls(list(batch["prompt_ids"]), list(batch["prompts"]), dict(batch.get("columns") or {}),
                   batch.get("pixel_inputs") or None)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def chunk(self, start: int, size: int) -> PromptBatch:
        rows = slice(start, start + size)
        return PromptBatch(self.prompt_ids[rows], self.prompts[rows],
                           {name: values[rows] for name, values in self.columns.items()},
                           self.pixel_inputs[rows] if self.pixel_inputs else None)
