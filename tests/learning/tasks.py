"""Small generated tasks for learning tests on the real SmolLM2-135M-Instruct.

The persona task: every answer starts with the signature "Pip here!" — something the model never
says on its own, learnable in a few dozen LoRA steps, and checkable by greedy generation on
held-out questions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SIGNATURE = "Pip here!"
_TOPICS = [
    ("the sky", "It looks blue because air scatters blue light most."),
    ("rain", "It is water falling from clouds."),
    ("a cat", "It is a small furry animal that purrs."),
    ("bread", "It is baked from flour, water and yeast."),
    ("the moon", "It orbits the Earth about once a month."),
    ("a river", "It is water flowing towards the sea."),
    ("snow", "It is frozen water falling as flakes."),
    ("a bicycle", "It has two wheels and pedals."),
    ("coffee", "It is a drink made from roasted beans."),
    ("a piano", "It makes music when keys strike strings."),
    ("the sun", "It is the star at the centre of our solar system."),
    ("a forest", "It is a large area covered with trees."),
    ("salt", "It is a mineral that makes food taste salty."),
    ("a clock", "It shows the time."),
    ("wind", "It is air moving from high to low pressure."),
    ("a library", "It is a place full of books to borrow."),
]
_HELD_OUT = ["a volcano", "the ocean", "a guitar", "tea", "a mountain", "ice", "a train", "honey"]
_ASK = ["What is {}?", "Tell me about {}.", "Explain {} briefly.", "Describe {} in one sentence."]


def persona_rows(n: int = 64, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic, answer = _TOPICS[i % len(_TOPICS)]
        question = rng.choice(_ASK).format(topic)
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": f"{SIGNATURE} {answer}"}]})
    return rows


def write_rows(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def held_out_prompts() -> list[str]:
    return [_ASK[i % len(_ASK)].format(t) for i, t in enumerate(_HELD_OUT)]


def signature_rate(model, tokenizer, prompts: list[str] | None = None, max_new_tokens: int = 6) -> float:
    """Fraction of greedy answers to held-out questions that start with the signature."""
    from pmetal.cli.commands.generate import generate

    prompts = prompts or held_out_prompts()
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return sum(a.startswith(SIGNATURE) for a in answers) / len(answers)


def learn_persona(module, tmp_path: Path, *, rows: int = 48, max_steps: int = 24) -> tuple[float, float]:
    """Train an SftModule on the persona task; return the held-out signature rate (before, after).

    Shared by the LoRA and QLoRA learning tests, so that "QLoRA learns what LoRA learns" compares the
    same data, steps and measure.
    """
    from pmetal.data.datamodule import SftDataModule
    from pmetal.cli.runner import build_trainer, fit

    data = write_rows(persona_rows(rows), tmp_path / "persona.jsonl")
    module.policy.eval()
    before = signature_rate(module.policy, module.tokenizer)
    trainer = build_trainer(tmp_path / "run", max_steps=max_steps, max_epochs=None, enable_progress_bar=False)
    fit(trainer, module, SftDataModule(path=str(data), batch_size=4, max_seq_len=96, val_fraction=0.0))
    module.policy.eval()
    return before, signature_rate(module.policy, module.tokenizer)
