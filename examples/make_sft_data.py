"""Generate examples/data/sft.jsonl: "Pip, the pmetal helper", a small checkable house style.

Every assistant answer is one or two short sentences that state the result, followed by the fixed
sign-off line `SIGN_OFF`. Questions cover arithmetic, unit conversions, word puzzles, opposites,
colour mixing, capitals and facts about pmetal, in varied phrasings, some as two-turn chats. All
answers are computed here or written for this file (no external dataset). Whether fine-tuning
worked is easy to check: after a few hundred steps the model ends its answers with the sign-off.

    python examples/make_sft_data.py            # rewrites examples/data/sft.jsonl (deterministic)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SIGN_OFF = "Happy tuning! -- Pip"
OUT = Path(__file__).resolve().parent / "data" / "sft.jsonl"


def answer(text: str) -> str:
    return f"{text}\n\n{SIGN_OFF}"


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    op = rng.choice(["plus", "minus", "times"])
    if op == "minus" and b > a:
        a, b = b, a
    result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    symbol = {"plus": "+", "minus": "-", "times": "*"}[op]
    question = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {symbol} {b}.", f"Quick one: {a} {op} {b}?",
                           f"Can you work out {a} {symbol} {b} for me?"])
    return question, f"{a} {op} {b} is {result}."


UNITS = [  # (big unit, small unit, factor)
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000), ("kilograms", "grams", 1000), ("days", "hours", 24),
    ("weeks", "days", 7), ("liters", "milliliters", 1000),
]


def conversion(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(2, 12)
    question = rng.choice([f"How many {small} are in {n} {big}?", f"Convert {n} {big} to {small}.",
                           f"{n} {big} is how many {small}?"])
    return question, f"{n} {big} is {n * factor} {small}."


WORDS = ["lantern", "copper", "orchid", "meadow", "pixel", "harbor", "falcon", "quartz", "tundra", "violin",
         "saddle", "ember", "glacier", "walnut", "compass", "thimble", "marble", "canyon", "pepper", "rocket"]


def word_puzzle(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    kind = rng.randrange(3)
    if kind == 0:
        return (rng.choice([f"How many letters are in the word '{word}'?", f"Count the letters in '{word}'."]),
                f"The word '{word}' has {len(word)} letters.")
    if kind == 1:
        return (rng.choice([f"Spell '{word}' backwards.", f"What is '{word}' reversed?"]),
                f"'{word}' backwards is '{word[::-1]}'.")
    return (rng.choice([f"What is the first letter of '{word}'?", f"Which letter does '{word}' start with?"]),
            f"'{word}' starts with the letter '{word[0]}'.")


OPPOSITES = [("hot", "cold"), ("up", "down"), ("early", "late"), ("empty", "full"), ("light", "dark"),
             ("open", "closed"), ("fast", "slow"), ("wet", "dry"), ("loud", "quiet"), ("above", "below"),
             ("inside", "outside"), ("begin", "end"), ("win", "lose"), ("push", "pull"), ("rich", "poor")]
COLOURS = [("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
           ("red", "white", "pink"), ("black", "white", "gray"), ("blue", "white", "light blue")]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Canada", "Ottawa"),
            ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"),
            ("Germany", "Berlin"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
            ("Poland", "Warsaw"), ("Chile", "Santiago"), ("Thailand", "Bangkok"), ("Cuba", "Havana")]


def small_fact(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        word, opposite = rng.choice(OPPOSITES)
        return (rng.choice([f"What is the opposite of '{word}'?", f"Give me the opposite of '{word}'."]),
                f"The opposite of '{word}' is '{opposite}'.")
    if kind == 1:
        a, b, mix = rng.choice(COLOURS)
        return (rng.choice([f"What colour do you get by mixing {a} and {b}?", f"Mix {a} with {b}: what colour?"]),
                f"Mixing {a} and {b} gives {mix}.")
    country, capital = rng.choice(CAPITALS)
    return (rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"]),
            f"The capital of {country} is {capital}.")


PMETAL_FACTS = [
    (["What is pmetal?", "Tell me what pmetal is.", "What does pmetal do?"],
     "pmetal is a toolkit for fine-tuning language and embedding models on Apple Silicon, CUDA and CPU."),
    (["Who are you?", "What is your name?", "Introduce yourself."],
     "I am Pip, the pmetal helper. I answer briefly and always sign off."),
    (["Which devices does pmetal run on?", "Can pmetal use my Mac's GPU?"],
     "pmetal runs on Apple Silicon GPUs through MPS, on NVIDIA GPUs through CUDA, and on the CPU."),
    (["What does LoRA stand for?", "What is LoRA short for?"],
     "LoRA stands for Low-Rank Adaptation: small trainable matrices added beside frozen weights."),
    (["How do I start training with pmetal?", "What is the quickest way to try pmetal?"],
     "Run `pmetal train`: with no arguments it fine-tunes the small default model on this example data."),
    (["How can I check my data file before training?", "How do I validate a dataset?"],
     "Run `pmetal dataset validate FILE`: it shows the detected format, token lengths and the loss mask."),
    (["What is QLoRA?", "How is QLoRA different from LoRA?"],
     "QLoRA trains LoRA adapters on top of a base model stored in 4-bit, which saves memory."),
    (["What does DPO need as data?", "What data does preference training use?"],
     "DPO needs pairs: a prompt with a chosen and a rejected answer."),
    (["Which data formats does pmetal read?", "Can pmetal read CSV files?"],
     "pmetal reads JSONL, JSON, Parquet and CSV files in chat, Alpaca, ShareGPT or plain text layouts."),
    (["Why is the loss only on the answer?", "Does pmetal train on my prompts?"],
     "By default only assistant tokens carry the loss, so the model learns to answer, not to ask."),
]


def pmetal_fact(rng: random.Random) -> tuple[str, str]:
    questions, text = rng.choice(PMETAL_FACTS)
    return rng.choice(questions), text


GENERATORS = [arithmetic, conversion, word_puzzle, small_fact, pmetal_fact]


def make_rows(n: int = 320, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        question, reply = rng.choice(GENERATORS)(rng)
        if rng.random() < 0.15:  # a two-turn chat: the sign-off ends every assistant turn
            follow_q, follow_a = rng.choice(GENERATORS)(rng)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer(reply)},
                        {"role": "user", "content": f"Thanks! And: {follow_q[0].lower()}{follow_q[1:]}"},
                        {"role": "assistant", "content": answer(follow_a)}]
        else:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer(reply)}]
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            rows.append({"messages": messages})
    return rows


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    rows = make_rows()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
