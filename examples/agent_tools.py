"""The tool example of "Train an agent": a registry lookup whose answers exist only in the tool.

`lookup(name)` returns the secret code of an invented name (a code no model can know), so the
model answers correctly only by calling it. `code_reward` scores the final answer, `called_lookup`
the call itself; `RegistryEnvironment` is the same task as an environment (one per rollout, its
public method `lookup` is the tool, `get_reward` owns the reward), for `environment:` runs.
`make_tool_data.py` writes examples/data/tool_sft.jsonl and tool_grpo.jsonl from `NAMES`.
"""

from __future__ import annotations

import hashlib
import json
import re

NAMES = ("zorblat", "quenby", "miravex", "tullop", "brindle", "osvath", "kelmarn", "pirrow", "drusk", "vantile",
         "hobrick", "yselle", "garnoth", "plimsy", "arkwen", "fendrel", "corvish", "lunder", "mabrey", "taskin",
         "wexley", "nimbral", "orpheld", "skellan", "brucket", "emberlin", "jorvik", "quillon", "ravenet", "solvane",
         "tremmel", "ulvard", "vesper", "wollick", "yarrow", "zenthar", "abernol", "caddox", "dwimmer", "falsted")


def secret_code(name: str) -> str:
    """The registry's code of a name (three digits, fixed by the name)."""
    return str(100 + int(hashlib.sha256(name.lower().encode()).hexdigest(), 16) % 900)


def lookup(name: str) -> str:
    """Look up the secret code of a name in the registry.

    Args:
        name: the name to look up, in lower case.
    """
    name = name.strip().lower()
    if name not in NAMES:
        raise KeyError(f"no entry named {name!r}")
    return secret_code(name)


def final_code(completion: str) -> str | None:
    """The last three-digit number of the final answer (calls and results excluded)."""
    text = re.sub(r"<tool_call>.*?</tool_call>", "", completion, flags=re.DOTALL)
    found = re.findall(r"\b\d{3}\b", text)
    return found[-1] if found else None


def code_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the final answer states the right code."""
    return [1.0 if final_code(c) == str(a) else 0.0 for c, a in zip(completions, answer)]


def called_lookup(prompts, completions, name, messages=None, **kwargs) -> list[float]:
    """1.0 when the episode called lookup with the asked name (from the episode's messages)."""
    out = []
    for i, asked in enumerate(name):
        calls = [c["function"] for m in (messages[i] if messages else []) for c in m.get("tool_calls") or []]
        out.append(1.0 if any(c["name"] == "lookup" and str(_arguments(c).get("name", "")).lower() == asked
                              for c in calls) else 0.0)
    return out


def _arguments(function: dict) -> dict:
    arguments = function.get("arguments", {})
    return json.loads(arguments) if isinstance(arguments, str) else arguments


class RegistryEnvironment:
    """The lookup task as an environment: one per rollout; it owns the reward."""

    def reset(self, name: str = "", answer: str = "", **row) -> None:
        self.name, self.answer, self.looked_up = name, str(answer), False

    def lookup(self, name: str) -> str:
        """Look up the secret code of a name in the registry.

        Args:
            name: the name to look up, in lower case.
        """
        self.looked_up = self.looked_up or name.strip().lower() == self.name
        return lookup(name)

    def get_reward(self) -> float:
        return 1.0 if self.looked_up else 0.0
