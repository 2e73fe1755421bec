"""Write the small preference datasets shipped with pmetal: examples/data/dpo.jsonl and kto.jsonl.

The preference is deliberately simple, visible and learnable in a few dozen LoRA steps on a 135M
model: the *chosen* answer is written in capital letters, the *rejected* one is the same answer in
ordinary case. An instruction-tuned base model strongly prefers ordinary case, so before training it
ranks the pairs the wrong way round; a preference method that works flips that ranking, including on
questions it never saw. The questions are generated from small tables (opposites, capitals, colours,
animal sounds, sums), so the data is fully reproducible from a seed.

    python examples/make_preference_data.py            # writes both files next to this script
    python examples/make_preference_data.py --out DIR --pairs 150 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
             ("happy", "sad"), ("early", "late"), ("open", "closed"), ("full", "empty"), ("old", "young"),
             ("high", "low"), ("hard", "soft"), ("wet", "dry"), ("loud", "quiet"), ("strong", "weak"),
             ("rich", "poor"), ("thick", "thin"), ("near", "far"), ("clean", "dirty"), ("left", "right")]
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Norway", "Oslo"),
            ("Greece", "Athens"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Poland", "Warsaw"),
            ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Cuba", "Havana")]
COLOURS = [("grass", "green"), ("the sky", "blue"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
           ("a tomato", "red"), ("an orange", "orange"), ("a carrot", "orange"), ("milk", "white"),
           ("a lemon", "yellow"), ("chocolate", "brown"), ("a strawberry", "red")]
SOUNDS = [("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("duck", "quacks"), ("lion", "roars"),
          ("sheep", "bleats"), ("horse", "neighs"), ("owl", "hoots"), ("snake", "hisses"), ("bee", "buzzes")]


def questions(seed: int = 0) -> list[tuple[str, str]]:
    """Every (question, answer-in-ordinary-case) the tables give, in a seeded order."""
    qa = [(f"What is the opposite of {a}?", f"The opposite of {a} is {b}.") for a, b in OPPOSITES]
    qa += [(f"What is the capital of {c}?", f"The capital of {c} is {city}.") for c, city in CAPITALS]
    qa += [(f"What colour is {t}?", f"{t[0].upper() + t[1:]} is {c}.") for t, c in COLOURS]
    qa += [(f"What sound does a {a} make?", f"A {a} {s}.") for a, s in SOUNDS]
    qa += [(f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}.") for x in range(2, 12) for y in range(2, 12)]
    random.Random(seed).shuffle(qa)
    return qa


def preference_pairs(n: int = 150, seed: int = 0) -> list[dict[str, str]]:
    """`n` rows of {prompt, chosen (capitals), rejected (ordinary case)}."""
    return [{"prompt": q, "chosen": a.upper(), "rejected": a} for q, a in questions(seed)[:n]]


def kto_rows(n: int = 150, seed: int = 0) -> list[dict[str, object]]:
    """`n` unpaired rows: each question appears once, with a desirable (capitals) or undesirable answer."""
    rows = []
    for k, (q, a) in enumerate(questions(seed + 1)[:n]):
        desirable = k % 2 == 0
        rows.append({"prompt": q, "completion": a.upper() if desirable else a, "label": desirable})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data", help="output directory")
    parser.add_argument("--pairs", type=int, default=150, help="rows per file (at most 158 distinct questions)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_jsonl(preference_pairs(args.pairs, args.seed), args.out / "dpo.jsonl")
    write_jsonl(kto_rows(args.pairs, args.seed), args.out / "kto.jsonl")
    print(f"wrote {args.out / 'dpo.jsonl'} and {args.out / 'kto.jsonl'} ({args.pairs} rows each)")


if __name__ == "__main__":
    main()
