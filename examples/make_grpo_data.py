"""Generate examples/data/grpo.jsonl: small arithmetic word problems with checkable answers.

Each row is `{"prompt": ..., "answer": ...}`: a one-step arithmetic question (addition,
subtraction, multiplication of single-digit numbers, some as tiny word problems) and its exact answer
as a bare number, which the `accuracy` reward compares against the last number of a completion
(or its `<answer>`/`\\boxed{}`). SmolLM2-135M-Instruct gets some of them right and some wrong at
the start, so GRPO has a reward spread to learn from. All answers are computed here.

    python examples/make_grpo_data.py            # rewrites examples/data/grpo.jsonl (deterministic)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "grpo.jsonl"
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]
THINGS = ["apples", "marbles", "books", "stickers", "coins", "pencils"]


def question(rng: random.Random) -> tuple[str, int]:
    kind = rng.choice(["plus", "minus", "times", "story"])
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if kind == "plus":
        return rng.choice([f"What is {a} + {b}?", f"Compute {a} plus {b}.", f"Add {a} and {b}."]), a + b
    if kind == "minus":
        a = a + b
        return rng.choice([f"What is {a} - {b}?", f"Compute {a} minus {b}.", f"Subtract {b} from {a}."]), a - b
    if kind == "times":
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        return rng.choice([f"What is {a} * {b}?", f"Compute {a} times {b}.", f"Multiply {a} by {b}."]), a * b
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b


def main(n: int = 256, seed: int = 0) -> None:
    rng = random.Random(seed)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for _ in range(n):
            prompt, result = question(rng)
            f.write(json.dumps({"prompt": prompt, "answer": str(result)}) + "\n")
    print(f"wrote {n} rows to {OUT}")


if __name__ == "__main__":
    main()
