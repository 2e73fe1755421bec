"""Streaming (`on_tokens`): the pieces handed to the callback concatenate to exactly the final
completions, on the engine (plain, speculative, rows finishing at different rounds) and on the
reference loop (itself, and as the engine's fallback); a single streamed row arrives one token a
round; the text streamer writes multi-byte characters whole."""

from __future__ import annotations

import io

import pytest
import torch

from pmetal.generation import SamplingConfig, generate, generate_reference
from pmetal.generation.engine import RolloutEngine
from tests.tiny import tiny_llama

PAD = 0
PROMPTS = [[5, 9, 23, 7, 5, 9, 23], [11, 3], [40, 41, 42, 43, 44, 45, 46]]


@pytest.fixture(scope="module")
def lm():
    model = tiny_llama(vocab_size=96, pad_token_id=PAD, attn_implementation="sdpa")
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # greedy choices are not near-ties
    return model


class Recorder:
    def __init__(self):
        self.calls: list[list[list[int]]] = []

    def __call__(self, rows):
        self.calls.append([list(r) for r in rows])

    def joined(self) -> list[list[int]]:
        return [sum((call[i] for call in self.calls), []) for i in range(len(self.calls[0]))]


def _completions(gen) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(gen.completion_ids, gen.completion_mask)]


def _stop_token(model, config):
    free = generate_reference(model, PROMPTS, config, stop_ids=[], pad_token_id=PAD, num_return_sequences=2)
    return int(free.completion_ids[0, 4])  # rows stop at different rounds, so the engine compacts


@pytest.mark.parametrize("options", [dict(), dict(sync_every=3), dict(speculative=True, num_draft_tokens=3)],
                         ids=["plain", "sync3", "speculative"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_stream_concatenates_to_the_completions(lm, options, temperature):
    config = SamplingConfig(max_new_tokens=24, temperature=temperature)
    stop = _stop_token(lm, config)
    recorder = Recorder()
    torch.manual_seed(3)
    gen = RolloutEngine(lm, **options).generate(PROMPTS, config, stop_ids=[stop], pad_token_id=PAD,
                                                num_return_sequences=2, on_tokens=recorder)
    assert len(set(gen.lengths.tolist())) > 1 or temperature > 0
    assert recorder.joined() == _completions(gen)
    assert all(len(call) == 6 for call in recorder.calls)  # one list per row, prompt-major
    torch.manual_seed(3)
    plain = RolloutEngine(lm, **options).generate(PROMPTS, config, stop_ids=[stop], pad_token_id=PAD,
                                                  num_return_sequences=2)
    assert _completions(plain) == _completions(gen)  # streaming changes no token


def test_one_streamed_row_arrives_a_token_a_round(lm):
    config = SamplingConfig(max_new_tokens=12, temperature=0.0)
    recorder = Recorder()
    gen = generate(lm, [PROMPTS[0]], config, stop_ids=[], pad_token_id=PAD, on_tokens=recorder,
                   engine=RolloutEngine(lm, sync_every=8))
    assert [len(call[0]) for call in recorder.calls] == [1] * 12
    assert recorder.joined() == _completions(gen)


def test_reference_loop_streams_the_same_tokens(lm):
    config = SamplingConfig(max_new_tokens=16, temperature=0.0)
    stop = _stop_token(lm, config)
    recorder = Recorder()
    ref = generate_reference(lm, PROMPTS, config, stop_ids=[stop], pad_token_id=PAD, num_return_sequences=2,
                             on_tokens=recorder)
    assert len(set(ref.lengths.tolist())) > 1
    assert recorder.joined() == _completions(ref)


def test_the_engine_fallback_streams_through_the_reference_loop(lm):
    import copy

    from pmetal.generation.engine import engine_supports

    windowed = copy.deepcopy(lm)
    windowed.config.use_sliding_window = True  # the engine hands such models to the reference loop
    assert not engine_supports(windowed)
    config = SamplingConfig(max_new_tokens=10, temperature=0.0)
    recorder = Recorder()
    gen = generate(windowed, PROMPTS[:2], config, stop_ids=[], pad_token_id=PAD, on_tokens=recorder)
    assert recorder.joined() == _completions(gen)
    assert _completions(gen) == _completions(generate(lm, PROMPTS[:2], config, stop_ids=[], pad_token_id=PAD))


def test_text_stream_writes_whole_characters(tiny_model_dir):
    from transformers import AutoTokenizer

    from pmetal.cli.commands.generate import TextStream

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Café au lait 🙂 — naïve ✓ done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode(ids[:n]) for n in range(1, len(ids)))  # some tokens split a character
    out = io.StringIO()
    stream = TextStream(tokenizer, out)
    for token in ids:
        stream([[token]])
        assert "\ufffd" not in out.getvalue()
    assert stream.close() == text
    assert out.getvalue() == text + "\n"
