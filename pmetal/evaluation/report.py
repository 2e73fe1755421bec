"""An evaluation's result: metrics by column (base / adapter, or the model alone), as a terminal
table and as JSON written atomically."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULT_FILE = "eval_results.json"  # beside a run's final/ unless --out says otherwise


@dataclass
class EvalReport:
    task: str  # sft, preference, prompt, embedding, lm-eval
    dataset: str
    model: str
    columns: list[str]  # ["base", "adapter"] for an adapter, else ["model"]
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)  # metric -> column -> value
    notes: list[str] = field(default_factory=list)

    def add(self, column: str, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.metrics.setdefault(name, {})[column] = None if value is None else float(value)

    def table(self) -> str:
        """A plain-text table: one row per metric, one column per model variant."""
        header = ["metric", *self.columns]
        rows = [[name, *(_format(values.get(c)) for c in self.columns)] for name, values in self.metrics.items()]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [f"{self.task} evaluation of {self.model} on {self.dataset}"]
        lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                  for r in [header, *rows]]  # fmt: skip
        lines.insert(2, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def to_dict(self) -> dict:
        data = asdict(self)  # JSON has no inf/NaN: those (a diverged model's perplexity) become strings
        data["metrics"] = {name: {c: v if v is None or math.isfinite(v) else str(v) for c, v in values.items()}
                           for name, values in data["metrics"].items()}  # fmt: skip
        return data


def reports_json(reports: list[EvalReport]) -> str:
    """`{"evaluations": [report, ...]}` as JSON text."""
    return json.dumps({"evaluations": [r.to_dict() for r in reports]}, indent=2, allow_nan=False) + "\n"


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isfinite(value) and value == int(value) and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


def default_result_path(model: str) -> Path | None:
    """`<run>/eval_results.json` for a pmetal run or its `final/` adapter; None for anything else."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / "final").is_dir():
        return path / RESULT_FILE
    if path.is_dir() and path.name == "final" and (path / "adapter_config.json").is_file():
        return path.parent / RESULT_FILE
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return path / RESULT_FILE
    return None
