"""Batched KV-cached sampling: log-probs consistent with training, per-sequence stop, left padding."""

from __future__ import annotations

import pytest
import torch

from pmetal.generation import SamplingConfig, generate, process_logits

VOCAB, PAD, EOS = 96, 0, 1


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=PAD, eos_token_id=EOS, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    # make tokens sharper than a random init so greedy choices are not near-ties
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _training_logps(model, prompt, completion, temperature):
    """Log-probs of the completion tokens from one full forward of prompt + completion (no cache)."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()  # [T, V]
    logp = torch.log_softmax(logits / temperature, dim=-1)
    start = len(prompt)
    return torch.stack([logp[start - 1 + j, tok] for j, tok in enumerate(completion)])


PROMPTS = [[5, 9, 23, 7], [11, 3], [40, 41, 42, 43, 44, 45, 46]]


def test_sampling_logps_match_training_forward(tiny_lm):
    config = SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9)
    gen = generate(tiny_lm, PROMPTS, config, stop_ids=[EOS], pad_token_id=PAD, num_return_sequences=3,
                   generator=torch.Generator().manual_seed(0))
    assert gen.completion_ids.shape[0] == 9 and gen.prompt_ids.shape == (9, 7)
    for row in range(9):
        prompt = PROMPTS[row // 3]
        n = int(gen.lengths[row])
        completion = gen.completion_ids[row, :n].tolist()
        expected = _training_logps(tiny_lm, prompt, completion, temperature=0.7)
        torch.testing.assert_close(gen.logps[row, :n], expected, atol=1e-4, rtol=1e-4)
        # importance ratio at the start of an update: exp(train - sampled) == 1
        assert torch.allclose(torch.exp(expected - gen.logps[row, :n]), torch.ones(n), atol=1e-3)
        assert (gen.logps[row, n:] == 0).all() and (gen.completion_ids[row, n:] == PAD).all()


def test_left_padding_gives_same_greedy_output_alone_and_batched(tiny_lm):
    config = SamplingConfig(max_new_tokens=10, temperature=0.0)
    batched = generate(tiny_lm, PROMPTS, config, stop_ids=[EOS], pad_token_id=PAD)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(tiny_lm, [prompt], config, stop_ids=[EOS], pad_token_id=PAD)
        n = int(alone.lengths[0])
        assert int(batched.lengths[i]) == n
        assert batched.completion_ids[i, :n].tolist() == alone.completion_ids[0, :n].tolist()
        torch.testing.assert_close(batched.logps[i, :n], alone.logps[0, :n], atol=1e-4, rtol=1e-4)


def test_each_sequence_stops_at_its_own_stop_token(tiny_lm):
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    free = generate(tiny_lm, PROMPTS, greedy, stop_ids=[EOS], pad_token_id=PAD)
    # make the 2nd greedy token of prompt 0 a stop token: only that row stops there
    stop_token = int(free.completion_ids[0, 1])
    gen = generate(tiny_lm, PROMPTS, greedy, stop_ids=[stop_token], pad_token_id=PAD)
    first_stop = [row.tolist().index(stop_token) if stop_token in row.tolist() else None for row in free.completion_ids]
    for i in range(len(PROMPTS)):
        if first_stop[i] is None:
            assert not bool(gen.stopped[i]) and int(gen.lengths[i]) == 10  # truncated at the limit
        else:
            n = first_stop[i] + 1  # the stop token stays in the completion
            assert bool(gen.stopped[i]) and int(gen.lengths[i]) == n
            assert int(gen.completion_ids[i, n - 1]) == stop_token
            assert (gen.completion_mask[i, n:] == 0).all() and (gen.completion_ids[i, n:] == PAD).all()
    assert int(gen.lengths[0]) == 2


def test_process_logits_truncation():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(process_logits(logits, SamplingConfig(**kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(min_p=0.5) == [True, True, False, False]  # below 0.5 * 0.5 dropped
    assert kept(top_p=0.1) == [True, False, False, False]  # always keeps the top token


def test_sampling_follows_the_tempered_distribution():
    """Frequencies of sampled tokens match softmax(logits / T) over many draws."""

    class Unigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.tensor([0.0, 1.0, 2.0, -9.0]))

        def forward(self, input_ids, cache=None, **kwargs):
            out = type("Out", (), {})()
            out.logits = self.logits.expand(input_ids.shape[0], input_ids.shape[1], 4)
            return out

    gen = generate(Unigram(), [[0]], SamplingConfig(max_new_tokens=1, temperature=2.0), stop_ids=[3], pad_token_id=3,
                   num_return_sequences=4000, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(gen.completion_ids[:, 0], minlength=4).float() / 4000
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0, -9.0]) / 2.0, dim=0)
    assert torch.allclose(freq, expected, atol=0.03)
    torch.testing.assert_close(gen.logps[:, 0], expected.log()[gen.completion_ids[:, 0]])
