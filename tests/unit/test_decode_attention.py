"""The Triton decode-attention kernel computes attention exactly (against float64 by hand), and the
engine's rounds through it change nothing: equal greedy tokens, log-probs equal a training forward.

On the CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``); on CUDA it is compiled.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is a test dependency: pip install -e '.[test]'")

from pmetal.generation import SamplingConfig, generate_reference  # noqa: E402
from pmetal.generation import decode_attention as kernel_module  # noqa: E402
from pmetal.generation.engine import RolloutEngine  # noqa: E402


@pytest.fixture
def device():
    """Where the kernel runs: CUDA, else the CPU through Triton's interpreter (tests/conftest.py turns it
    on where there is no GPU, before triton is first imported)."""
    if kernel_module.interpreting():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("no CUDA device, and TRITON_INTERPRET=1 was not set before triton was imported")


def _reference(q, k, v, mask, scale):
    """softmax(q k^T * scale, masked) v in float64, grouped heads repeated as transformers' repeat_kv does."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = (q.double() @ kk.transpose(-1, -2)) * scale
    return (torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ vv).transpose(1, 2)


def _case(rows, q_heads, kv_heads, t, capacity, dim, seed=0, device="cpu"):
    """A round's inputs: a query laid out as HF's attention gives it (a transposed view), a cache with
    left padding, holes (rejected drafts), unwritten columns after the round's slots, and a causal verify mask."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, t, q_heads, dim, generator=g).transpose(1, 2)
    k = torch.randn(rows, kv_heads, capacity, dim, generator=g)
    v = torch.randn(rows, kv_heads, capacity, dim, generator=g)
    end = capacity // 2 + 3
    slots = torch.arange(end - t, end)
    valid = torch.rand(rows, capacity, generator=g) < 0.7
    valid[:, :70] = False  # left padding over a whole block of columns
    valid[:, end:] = False  # not written yet
    valid[:, slots] = True
    mask = valid[:, None, None, :] & (torch.arange(capacity)[None, None, None, :] <= slots[None, None, :, None])
    return q.to(device), k.to(device), v.to(device), mask.to(device)


@pytest.mark.parametrize("rows, q_heads, kv_heads, t, capacity, dim", [
    (3, 4, 2, 1, 256, 64),  # a decode round, two query heads per KV head
    (2, 6, 2, 4, 192, 48),  # a verify round (3 drafts + 1), a head size that is no power of two
    (2, 2, 2, 5, 200, 32),  # no grouping, a capacity that is no multiple of the block
])
def test_kernel_equals_masked_softmax_attention(device, rows, q_heads, kv_heads, t, capacity, dim):
    q, k, v, mask = _case(rows, q_heads, kv_heads, t, capacity, dim, device=device)
    out = kernel_module.decode_attention(q, k, v, mask, 0.3)
    assert out.shape == (rows, t, q_heads, dim) and out.is_contiguous()
    torch.testing.assert_close(out.double(), _reference(q, k, v, mask, 0.3), atol=1e-5, rtol=1e-5)
    if device == "cuda":  # bf16, as rollouts run: within bf16 rounding of the exact attention
        out = kernel_module.decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.3)
        exact = _reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.3)
        torch.testing.assert_close(out.double(), exact, atol=2e-2, rtol=2e-2)


def test_kernel_on_a_hand_worked_case(device):
    """One row, one head, three allowed columns of a 70-column cache (two blocks, the second never read):
    scores 0, 1, 2 -> weights e^0, e^1, e^2 over the values 1, 2, 3 (worked by hand)."""
    q = torch.zeros(1, 1, 1, 16)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 70, 16)
    v = torch.zeros(1, 1, 70, 16)
    for col, (score, value) in zip((3, 10, 40), ((0.0, 1.0), (1.0, 2.0), (2.0, 3.0))):
        k[0, 0, col, 0], v[0, 0, col, :] = score, value
    k[0, 0, 65:, :], v[0, 0, 65:, :] = 1e4, float("nan")  # a never-allowed block: reading it would show
    mask = torch.zeros(1, 1, 1, 70, dtype=torch.bool)
    mask[..., [3, 10, 40]] = True
    e = torch.tensor([1.0, 2.718281828459045, 7.38905609893065])
    expected = float((e * torch.tensor([1.0, 2.0, 3.0])).sum() / e.sum())  # 2.5752...
    out = kernel_module.decode_attention(q.to(device), k.to(device), v.to(device), mask.to(device), 1.0)
    torch.testing.assert_close(out.cpu(), torch.full((1, 1, 1, 16), expected), atol=1e-6, rtol=1e-6)


def test_kernel_refuses_a_mask_that_is_not_boolean(device):
    q, k, v, mask = _case(1, 2, 1, 1, 64, 16, device=device)
    with pytest.raises(ValueError, match=r"\[B, 1, T, C\] boolean mask"):
        kernel_module.decode_attention(q, k, v, mask.float(), 0.3)


def test_engine_rounds_through_the_kernel_change_nothing(device):
    """Greedy tokens equal the reference loop's, plain and speculative (verify rounds of K + 1 tokens),
    and sampled log-probs equal a training forward within 1e-5 in fp32 (the ratio starts at 1)."""
    from tests.unit.test_engine import PAD, PROMPTS, _tiny, _training_logps

    model = _tiny(device=device)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    ref = generate_reference(model, PROMPTS, greedy, stop_ids=[], pad_token_id=PAD, num_return_sequences=2)
    for options in (dict(), dict(speculative=True, num_draft_tokens=3)):
        engine = RolloutEngine(model, attention_kernel=True, **options)
        gen = engine.generate(PROMPTS, greedy, stop_ids=[], pad_token_id=PAD, num_return_sequences=2)
        assert gen.completion_ids.tolist() == ref.completion_ids.tolist(), options
        torch.testing.assert_close(gen.logps, ref.logps, atol=1e-5, rtol=1e-5)
    sampled = SamplingConfig(max_new_tokens=8, temperature=0.8)
    gen = RolloutEngine(model, attention_kernel=True).generate(PROMPTS, sampled, stop_ids=[], pad_token_id=PAD,
                                                                generator=torch.Generator(device).manual_seed(3))
    for row, prompt in enumerate(PROMPTS):
        expected = _training_logps(model, prompt, gen.completion_ids[row].tolist(), 0.8)
        torch.testing.assert_close(gen.logps[row], expected, atol=1e-5, rtol=1e-5)


def test_sampled_tokens_through_the_kernel_are_the_matmul_rounds_tokens(device):
    """Sampling (temperature, top-k, top-p) from the same seed: the kernel's rounds draw exactly the tokens
    the SDPA rounds draw, so their distribution is the engine's, which test_engine checks against the
    reference sampler by a chi-square test."""
    from tests.unit.test_engine import PAD, PROMPTS, _tiny

    model = _tiny(device=device)
    config = SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95)
    outs = [RolloutEngine(model, attention_kernel=kernel).generate(
        PROMPTS, config, stop_ids=[], pad_token_id=PAD, num_return_sequences=3,
        generator=torch.Generator(device).manual_seed(11)) for kernel in (True, False)]
    assert outs[0].completion_ids.tolist() == outs[1].completion_ids.tolist()
    torch.testing.assert_close(outs[0].logps, outs[1].logps, atol=1e-5, rtol=1e-5)
    assert len(set(map(tuple, outs[0].completion_ids.tolist()))) > 3  # sampled, not one sequence repeated


def test_the_kernel_goes_where_the_rounds_attend(device, monkeypatch):
    """attention_kernel=True sends every decode round's attention layer through the kernel."""
    from tests.unit.test_engine import PAD, PROMPTS, _tiny

    calls = []
    real = kernel_module.decode_attention
    monkeypatch.setattr(kernel_module, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = _tiny(layers=2, device=device)
    RolloutEngine(model, attention_kernel=True, cuda_graphs=False, compile_decode=False).generate(PROMPTS, SamplingConfig(max_new_tokens=5, temperature=0.0),
                                                         stop_ids=[], pad_token_id=PAD)
    assert len(calls) == 2 * 4  # 2 layers x 4 decode rounds (the first token comes from the prefill)
    calls.clear()
    RolloutEngine(model, attention_kernel=False, cuda_graphs=False, compile_decode=False).generate(PROMPTS, SamplingConfig(max_new_tokens=5, temperature=0.0),
                                                          stop_ids=[], pad_token_id=PAD)
    assert not calls


def test_the_kernel_is_refused_where_it_cannot_run(monkeypatch):
    """On a CPU without the interpreter (and by default on any CPU) the rounds attend through SDPA."""
    from tests.unit.test_engine import _tiny

    monkeypatch.setattr(kernel_module, "interpreting", lambda: False)  # a CPU without the interpreter
    with pytest.raises(ValueError, match="attention_kernel=True needs Triton on a CUDA device"):
        RolloutEngine(_tiny(), attention_kernel=True)
    assert RolloutEngine(_tiny()).attention_kernel is False  # the CPU default: matmuls / SDPA
