"""Generate small embedding-training data where a pretrained model starts weak and learning is visible.

Every item is a made-up code of three invented words (size, colour, animal), e.g. "vosk tirab
quell", paired with its English description, "a large red dog". A pretrained encoder knows none
of the invented words, so retrieval starts near chance; the words combine systematically, so a
model that learns them generalizes to held-out combinations whose words it saw in other codes.

    python examples/make_embed_data.py            # writes examples/data/embed.jsonl (pairs)

`retrieval_pairs`, `scored_pairs` and `triplets` build the three layouts (pairs for InfoNCE,
scored pairs for CoSENT, triplets for the triplet loss) on a train/held-out split of the codes;
the learning tests use them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

SIZES = {"vosk": "tiny", "prell": "small", "dunmo": "large", "skeb": "huge"}
COLOURS = {
    "tirab": "red", "gloon": "blue", "fesh": "green", "worvy": "yellow",
    "zanth": "black", "plim": "white", "krudo": "purple", "hegga": "orange",
}
ANIMALS = {
    "quell": "dog", "mibbo": "cat", "tharn": "horse", "yulp": "bird",
    "snave": "fish", "orrick": "snake", "blenz": "rabbit", "cadwy": "mouse",
}
ATTRIBUTES = (SIZES, COLOURS, ANIMALS)

Item = tuple[str, str, str]  # invented (size, colour, animal) words


def all_items() -> list[Item]:
    return list(itertools.product(SIZES, COLOURS, ANIMALS))


def code(item: Item) -> str:
    return " ".join(item)


def description(item: Item) -> str:
    size, colour, animal = (table[word] for table, word in zip(ATTRIBUTES, item))
    return f"a {size} {colour} {animal}"


def split_items(num_heldout: int = 48, seed: int = 0) -> tuple[list[Item], list[Item]]:
    """(train items, held-out items); every invented word of the held-out items occurs in training."""
    items = all_items()
    random.Random(seed).shuffle(items)
    heldout, train = items[:num_heldout], items[num_heldout:]
    seen = {word for item in train for word in item}
    assert all(word in seen for item in heldout for word in item)
    return train, heldout


def retrieval_pairs(items: list[Item]) -> list[dict]:
    """Pairs for InfoNCE: the code and its description."""
    return [{"anchor": code(item), "positive": description(item)} for item in items]


def _neighbour(item: Item, rng: random.Random, pool: set[Item]) -> Item:
    """An item from `pool` differing from `item` in exactly one attribute (a hard negative)."""
    candidates = []
    for position, table in enumerate(ATTRIBUTES):
        for word in table:
            if word != item[position]:
                other = item[:position] + (word,) + item[position + 1:]
                if other in pool:
                    candidates.append(other)
    return rng.choice(candidates)


def triplets(items: list[Item], seed: int = 0) -> list[dict]:
    """Triplets: the code, its description, and the description of an item one attribute away."""
    rng = random.Random(seed)
    pool = set(all_items())
    return [{"anchor": code(item), "positive": description(item),
             "negative": description(_neighbour(item, rng, pool))} for item in items]


def scored_pairs(items: list[Item], per_item: int = 1, seed: int = 0) -> list[dict]:
    """Scored pairs for CoSENT: a code and a description sharing 0-3 attributes (uniformly), scored by that count."""
    rng = random.Random(seed)
    rows = []
    for item in items:
        for _ in range(per_item):
            shared = rng.randrange(len(ATTRIBUTES) + 1)
            changed = rng.sample(range(len(ATTRIBUTES)), len(ATTRIBUTES) - shared)
            other = list(item)
            for position in changed:
                other[position] = rng.choice([w for w in ATTRIBUTES[position] if w != item[position]])
            rows.append({"sentence1": code(item), "sentence2": description(tuple(other)), "score": float(shared)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "data" / "embed.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = retrieval_pairs(all_items())
    random.Random(args.seed).shuffle(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} pairs to {out}")


if __name__ == "__main__":
    main()
