"""Writes examples/data/tool_sft.jsonl (tool-calling traces) and tool_grpo.jsonl (lookup prompts).

The first 30 names of `agent_tools.NAMES` make the SFT traces (ask, call lookup, read the result,
answer); GRPO prompts ask about all 40, so the last 10 were never seen in a trace. Run from the
repository root: `python examples/make_tool_data.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pmetal.examples.agent_tools import NAMES, secret_code

TOOL = "pmetal.examples.agent_tools:lookup"
QUESTIONS = ("What is the secret code of {}?", "Tell me the registry code for {}.", "I need {}'s secret code.")


def question(i: int, name: str) -> str:
    return QUESTIONS[i % len(QUESTIONS)].format(name)


def trace(i: int, name: str) -> dict:
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"name": name}}}
    return {"tools": [TOOL], "messages": [
        {"role": "user", "content": question(i, name)},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "lookup", "content": secret_code(name)},
        {"role": "assistant", "content": f"The secret code of {name} is {secret_code(name)}."}]}


def main(out: Path = Path(__file__).parent / "data") -> None:
    sft = [trace(i, name) for i, name in enumerate(NAMES[:30])]
    grpo = [{"prompt": question(i + 1, name), "name": name, "answer": secret_code(name)} for i, name in enumerate(NAMES)]
    for file, rows in (("tool_sft.jsonl", sft), ("tool_grpo.jsonl", grpo)):
        (out / file).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
