"""The decode session (continuous batching) changes nothing but when rows run: rows added mid-flight
equal the same prompts generated alone by the engine, extend() equals generating from the
concatenated conversation, and joining leaves the sampled distribution unchanged."""

from __future__ import annotations

import pytest
import torch

from pmetal.generation import SamplingConfig, generate, generate_reference
from pmetal.generation.session import DecodeSession, SessionFull
from tests.unit.test_engine import PAD, PROMPTS, _chi2_two_sample, _tiny

LONGER = PROMPTS + [[7, 8, 9, 10], [60, 61], [3] * 12, [90, 2, 90, 2, 90]]


@pytest.fixture(scope="module")
def tiny_lm():
    return _tiny()


def _drain(session, outputs, steps=None):
    """Step until nothing is active (or `steps` steps); gather tokens and log-probs per row."""
    done = 0
    while session.active and (steps is None or done < steps):
        for event in session.step():
            tokens, logps, finish = outputs.setdefault(event.row, ([], [], []))
            tokens += event.tokens
            logps += event.logps
            if event.finish:
                finish.append(event.finish)
        done += 1
    return outputs


def test_rows_added_mid_flight_equal_generating_each_alone(tiny_lm):
    greedy = SamplingConfig(max_new_tokens=24, temperature=0.0)
    first = generate(tiny_lm, [LONGER[0]], greedy, stop_ids=[], pad_token_id=PAD).completion_ids[0].tolist()
    stop = first[6]  # some rows stop on it, at different steps
    session = DecodeSession(tiny_lm, rows=8, capacity=64, sync_every=3)
    outputs, handles = {}, []
    for i, prompt in enumerate(LONGER):
        budget = 24 - 2 * (i % 3)
        handles.append((session.add(prompt, SamplingConfig(max_new_tokens=budget, temperature=0.0), stop_ids=[stop]),
                        prompt, budget))
        _drain(session, outputs, steps=1 + i % 2)  # the others keep decoding between arrivals
        if i == 2:
            session.remove(handles[1][0])  # a client gone: its slot is taken by a later row
    _drain(session, outputs)
    assert len({len(outputs[h][0]) for h, _, _ in handles}) > 2
    for handle, prompt, budget in handles:
        if handle == handles[1][0]:
            continue
        alone = generate(tiny_lm, [prompt], SamplingConfig(max_new_tokens=budget, temperature=0.0), stop_ids=[stop],
                         pad_token_id=PAD)
        tokens, logps, finish = outputs[handle]
        n = int(alone.lengths[0])
        assert tokens == alone.completion_ids[0, :n].tolist(), prompt
        torch.testing.assert_close(torch.tensor(logps), alone.logps[0, :n], atol=1e-5, rtol=1e-5)
        assert finish == ["stop" if bool(alone.stopped[0]) else "length"]
        session.remove(handle)
    assert session.free_rows == 8


def test_extend_equals_generating_from_the_concatenation(tiny_lm):
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    sampled = SamplingConfig(max_new_tokens=10, temperature=0.9, top_p=0.95)
    session = DecodeSession(tiny_lm, rows=4, capacity=96, sync_every=4)
    a = session.add(PROMPTS[0], greedy)
    b = session.add(PROMPTS[2], sampled, seed=11)
    c = session.add(PROMPTS[1], greedy)  # keeps decoding while the others wait for their "tool"
    outputs = _drain(session, {}, steps=3)
    assert session.status(a) == session.status(b) == "finished"
    tool = [33, 34, 35, 36, 37]
    session.extend(a, tool, max_new_tokens=8)
    cut = len(PROMPTS[2]) + 4  # b's turn cut after 4 of its tokens, then the tool result
    session.extend(b, tool, at=cut)
    outputs = _drain(session, {})
    conversation_a = session.tokens(a)[: -len(outputs[a][0])]
    assert conversation_a[-len(tool):] == tool and len(conversation_a) == len(PROMPTS[0]) + 10 + len(tool)
    want = generate(tiny_lm, [conversation_a], SamplingConfig(max_new_tokens=8, temperature=0.0), stop_ids=[],
                    pad_token_id=PAD)
    assert outputs[a][0] == want.completion_ids[0].tolist()
    torch.testing.assert_close(torch.tensor(outputs[a][1]), want.logps[0], atol=1e-5, rtol=1e-5)
    # sampled with a seed: a fresh row over the concatenation draws the very same tokens
    conversation_b = session.tokens(b)[: cut + len(tool)]
    fresh = DecodeSession(tiny_lm, rows=1, capacity=96)
    d = fresh.add(conversation_b, sampled, seed=11)
    alone = _drain(fresh, {})
    assert outputs[b][0] == alone[d][0]
    torch.testing.assert_close(torch.tensor(outputs[b][1]), torch.tensor(alone[d][1]), atol=1e-5, rtol=1e-5)
    assert c in outputs or session.status(c) == "finished"


def test_a_paused_row_keeps_its_kv_and_continues_as_the_concatenation(tiny_lm):
    greedy = SamplingConfig(max_new_tokens=30, temperature=0.0)
    session = DecodeSession(tiny_lm, rows=2, capacity=96, sync_every=2)
    row = session.add(PROMPTS[1], greedy)
    other = session.add(PROMPTS[0], greedy)
    _drain(session, {}, steps=3)
    session.pause(row)  # e.g. a tool call seen in its text: the others go on
    assert session.status(row) == "finished" and session.status(other) == "live"
    _drain(session, {}, steps=2)
    so_far = session.tokens(row)
    session.extend(row, [50, 51], max_new_tokens=6)
    outputs = _drain(session, {})
    want = generate(tiny_lm, [so_far + [50, 51]], SamplingConfig(max_new_tokens=6, temperature=0.0), stop_ids=[],
                    pad_token_id=PAD)
    assert outputs[row][0] == want.completion_ids[0].tolist()
    torch.testing.assert_close(torch.tensor(outputs[row][1]), want.logps[0], atol=1e-5, rtol=1e-5)


def test_a_seeded_row_samples_the_same_in_any_company_and_greedy_rows_beside_sampled_ones_stay_exact(tiny_lm):
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, min_p=0.01)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    alone = DecodeSession(tiny_lm, rows=1, capacity=64)
    solo_row = alone.add(PROMPTS[0], sampled, seed=5)
    solo = _drain(alone, {})[solo_row][0]
    busy = DecodeSession(tiny_lm, rows=8, capacity=64, sync_every=2)
    others = [busy.add(p, SamplingConfig(max_new_tokens=12, temperature=0.7, top_p=0.8)) for p in PROMPTS]
    _drain(busy, {}, steps=2)
    g = busy.add(PROMPTS[1], greedy)
    s = busy.add(PROMPTS[0], sampled, seed=5)
    together = _drain(busy, {})
    assert together[s][0] == solo
    want = generate(tiny_lm, [PROMPTS[1]], greedy, stop_ids=[], pad_token_id=PAD)
    assert together[g][0] == want.completion_ids[0].tolist()
    assert others  # rows of other settings were decoding in the same rounds


def test_joining_leaves_the_sampled_distribution_unchanged():
    """Joint frequencies of 2-token completions: rows joining a running session at every step, with
    rows of other settings beside them, vs the reference sampler."""
    from scipy.stats import chi2

    vocab = 8
    model = _tiny(vocab=vocab, sharpen=2.0)
    config = SamplingConfig(max_new_tokens=2, temperature=1.0, top_k=6)
    n = 6000
    ref = generate_reference(model, [[3, 4, 5]], config, stop_ids=[], pad_token_id=PAD, num_return_sequences=n,
                             generator=torch.Generator().manual_seed(0))
    ref_counts = torch.bincount(ref.completion_ids[:, 0] * vocab + ref.completion_ids[:, 1], minlength=vocab * vocab)
    session = DecodeSession(model, rows=256, capacity=16, generator=torch.Generator().manual_seed(1))
    other = SamplingConfig(max_new_tokens=3, temperature=0.5, top_p=0.7)
    ours, outputs, added = [], {}, 0
    while added < n or session.active:
        for _ in range(min(100, n - added, session.free_rows - 2)):
            ours.append(session.add([3, 4, 5], config))
            added += 1
        if added < n and session.free_rows >= 2:
            session.remove(session.add([2, 6], other))  # a row that leaves at once
            session.add([5, 3], other)  # and one that runs beside them
        _drain(session, outputs, steps=1)
        for handle in list(session._rows):
            if session.status(handle) == "finished":
                session.remove(handle)
    pairs = torch.tensor([outputs[h][0] for h in ours])
    counts = torch.bincount(pairs[:, 0] * vocab + pairs[:, 1], minlength=vocab * vocab)
    stat, dof = _chi2_two_sample(counts, ref_counts)
    assert stat < chi2.ppf(0.999, dof), (stat, dof)


def test_hashed_uniforms_are_uniform_and_independent_of_the_batch():
    from scipy.stats import kstest

    from pmetal.generation.rowsampling import hashed_uniforms

    seeds, counters = torch.arange(64) * 7919, torch.arange(64) % 5
    u = hashed_uniforms(seeds, counters, 512)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert kstest(u.flatten().numpy(), "uniform").pvalue > 1e-3
    torch.testing.assert_close(hashed_uniforms(seeds[5:6], counters[5:6], 512), u[5:6], rtol=0, atol=0)


def test_the_session_refuses_what_it_cannot_do(tiny_lm):
    greedy = SamplingConfig(max_new_tokens=4, temperature=0.0)
    session = DecodeSession(tiny_lm, rows=1, capacity=16)
    row = session.add([5, 6], greedy)
    with pytest.raises(SessionFull):
        session.add([5, 6], greedy)
    with pytest.raises(ValueError, match="only a finished or paused row"):
        session.extend(row, [1])
    _drain(session, {})
    with pytest.raises(ValueError, match="a row holds 16"):
        session.extend(row, list(range(2, 20)))
    session.remove(row)
    with pytest.raises(KeyError):
        session.extend(row, [1])
    with pytest.raises(ValueError, match="a row holds 16"):
        session.add(list(range(2, 20)), greedy)
    with pytest.raises(ValueError, match="one set per session"):
        session.add([5], SamplingConfig(max_new_tokens=4, suppress_ids=(3,)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_session_rounds_equal_eager_rounds():
    model = _tiny(device="cuda", dtype=torch.bfloat16)
    configs = [SamplingConfig(max_new_tokens=20, temperature=0.0), SamplingConfig(max_new_tokens=20, temperature=0.8,
                                                                                  top_p=0.9)]
    results = []
    for graphs in (True, False):
        session = DecodeSession(model, rows=8, capacity=64, sync_every=4, cuda_graphs=graphs, compile_decode=False)
        outputs = {}
        for i, prompt in enumerate(LONGER):
            session.add(prompt, configs[i % 2], seed=i)
            _drain(session, outputs, steps=1)
        results.append(_drain(session, outputs))
        assert not graphs or all(g not in (None, False) for b in session._buckets.values() for g in b.graphs.values())
    assert [v[0] for v in results[0].values()] == [v[0] for v in results[1].values()]
