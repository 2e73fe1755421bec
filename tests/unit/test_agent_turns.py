"""Tool episodes on a decode session (issue 28): the same episodes as turn-synchronous re-prefill
(greedy: identical tokens and log-probs; sampled: the same distribution), a row waiting for a tool
never stalls the others, and a continued turn prefills only its new tokens.

The models are tiny random Llamas over SmolLM2's tokenizer with whole tool calls added as single
tokens, so a random model writes calls: sampling is confined to a handful of tokens (the calls,
the end of turn, a newline, a word) by a bias on the LM head.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from pmetal.generation import SamplingConfig
from pmetal.generation.engine import RolloutEngine
from pmetal.generation.session import DecodeSession
from pmetal.tools.episodes import EpisodeSettings, run_episodes, start_episode
from pmetal.tools.format import function_schema
from pmetal.tools.runner import Call, ToolRunner, resolve_tool
from pmetal.tools.turns import BatchTurns, SessionTurns, engine_generate
from tests.tiny import bpe_tokenizer, tiny_llama
from tests.unit.test_engine import _chi2_two_sample

LOOKUP = "pmetal.examples.agent_tools:lookup"
CALL = '<tool_call>{"name": "lookup", "arguments": {"name": "zorblat"}}</tool_call>'
BAD = "<tool_call>oops</tool_call>"
SEED, INIT, VOCAB = 1, 0.3, 512  # a model whose greedy episodes take every path
NAMES = ("zorblat", "quenby", "miravex", "tullop", "brindle", "osvath", "kelmarn", "pirrow")


@pytest.fixture(scope="module")
def calls():
    """(tokenizer, model, the sampled token ids): calls as single tokens, sampling confined to a few tokens."""
    tokenizer = bpe_tokenizer(vocab_size=VOCAB)
    tokenizer.add_tokens([CALL, BAD])
    allowed = [tokenizer.convert_tokens_to_ids(t) for t in (CALL, BAD)] + [tokenizer.eos_token_id] \
        + tokenizer("\n yes", add_special_tokens=False)["input_ids"]
    return tokenizer, _confined(len(tokenizer), allowed, seed=SEED, init=INIT), allowed


def _confined(vocab: int, allowed: list[int], seed: int, init: float):
    """A tiny Llama whose LM head has a bias of -1e4 on every token but `allowed` (it samples those
    only); a wide `init` lets the conversation sway its choices, a narrow one makes them near-uniform."""
    model = tiny_llama(vocab_size=vocab, seed=seed, max_position_embeddings=512, initializer_range=init)
    head = torch.nn.Linear(model.config.hidden_size, vocab, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.fill_(-1e4)
        head.bias[allowed] = 0.0
    model.lm_head = head
    return model


def _episodes(tokenizer, names, schemas):
    return [start_episode(tokenizer, [{"role": "user", "content": f"Code of {name}?"}], schemas) for name in names]


def _run(turns, tokenizer, names, settings, *, schemas=True):
    schemas = [function_schema(resolve_tool(LOOKUP))] if schemas else None
    episodes = _episodes(tokenizer, names, schemas)
    with ToolRunner([LOOKUP], timeout=20) as runner:
        run_episodes(turns, episodes, tokenizer, runner, settings, tools=schemas)
    return episodes


class _Counting(SessionTurns):
    """A session driver that records when rows begin a turn (and with how many tokens), are paused
    at a call, or end."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, int, int]] = []  # (what, episode, the session's decode rounds so far)
        self.begun: list[tuple[int, int]] = []  # (tokens kept, tokens handed over) per begin()

    def begin(self, key, tokens, *, keep, max_new_tokens):
        self.log.append(("begin", key, self.session.rounds))
        self.begun.append((keep, len(tokens)))
        super().begin(key, tokens, keep=keep, max_new_tokens=max_new_tokens)

    def pause(self, key):
        self.log.append(("pause", key, self.session.rounds))
        super().pause(key)

    def end(self, key):
        self.log.append(("end", key, self.session.rounds))
        super().end(key)


def test_greedy_session_episodes_equal_turn_synchronous_reprefill_and_prefill_only_new_tokens(calls):
    tokenizer, model, allowed = calls
    greedy = SamplingConfig(temperature=0.0)
    settings = EpisodeSettings(max_tool_turns=2, max_episode_tokens=160, max_new_tokens=6)
    stop = [tokenizer.eos_token_id]
    reference = _run(BatchTurns(engine_generate(RolloutEngine(model), greedy, stop_ids=stop, pad_token_id=0)),
                     tokenizer, NAMES, settings)
    # 3 rows for 8 episodes: the others wait in the queue and join as episodes finish
    session = DecodeSession(model, rows=3, capacity=512, sync_every=3)
    turns = _Counting(session, greedy, stop_ids=stop)
    ours = _run(turns, tokenizer, NAMES, settings)
    for ref, ep in zip(reference, ours):
        assert ep.completion_ids == ref.completion_ids and ep.model_mask == ref.model_mask
        torch.testing.assert_close(torch.tensor(ep.logps), torch.tensor(ref.logps), atol=1e-5, rtol=1e-5)
        assert (ep.turns, ep.counts, ep.stopped, ep.final_text, ep.messages) == \
            (ref.turns, ref.counts, ref.stopped, ref.final_text, ref.messages)
    # the episodes took every path: lookups run, malformed calls, several turns, a turn cut after its call
    total = {k: sum(ep.counts.get(k, 0) for ep in ours) for k in ("ok", "parse_error")}
    assert total["ok"] and total["parse_error"] and max(ep.turns for ep in ours) == 3
    assert any(what == "pause" for what, _, _ in turns.log)
    assert not session.free_rows < 3 and session.active == 0  # every row left
    # prefilled: each prompt once, then per continued turn only its tool turn (and the model's last
    # token when it was sampled but never fed); re-prefill would feed whole conversations again
    prompts = sum(n for keep, n in turns.begun if not keep)
    tool_turns = [(keep, n) for keep, n in turns.begun if keep]
    assert len(tool_turns) >= 4
    assert prompts + sum(n for _, n in tool_turns) <= session.prefilled <= prompts + sum(n + 1 for _, n in tool_turns)
    assert sum(n + 1 for _, n in tool_turns) < 0.25 * sum(keep + n for keep, n in tool_turns)


def test_sampled_session_episodes_have_the_turn_synchronous_distribution(calls):
    """Frequencies of whole episodes (every token, model and tool) on a session vs turn-synchronous
    re-prefill on the engine (its own sampler: torch's generator, not the session's hashed draws)."""
    from scipy.stats import chi2

    tokenizer, _, allowed = calls
    # three tokens (the call, the end of turn, a word), two per turn, one tool turn: a few dozen outcomes
    model = _confined(len(tokenizer), allowed[:1] + allowed[2:3] + allowed[-1:], seed=SEED, init=0.3)
    sampled = SamplingConfig(temperature=1.0)
    settings = EpisodeSettings(max_tool_turns=1, max_episode_tokens=64, max_new_tokens=2)
    stop, n = [tokenizer.eos_token_id], 1000
    names = ["zorblat"] * n
    torch.manual_seed(0)
    reference = _run(BatchTurns(engine_generate(RolloutEngine(model), sampled, stop_ids=stop, pad_token_id=0)),
                     tokenizer, names, settings, schemas=False)
    session = DecodeSession(model, rows=256, capacity=256,
                            generator=torch.Generator().manual_seed(1))
    ours = _run(SessionTurns(session, sampled, stop_ids=stop), tokenizer, names, settings, schemas=False)
    outcomes = sorted({tuple(ep.completion_ids) for ep in reference + ours})
    index = {o: i for i, o in enumerate(outcomes)}
    count = lambda eps: torch.bincount(torch.tensor([index[tuple(ep.completion_ids)] for ep in eps]),  # noqa: E731
                                       minlength=len(outcomes))
    assert len(outcomes) > 8 and sum(ep.turns == 2 for ep in ours) > n // 10  # tool turns happen
    stat, dof = _chi2_two_sample(count(ours), count(reference))
    assert stat < chi2.ppf(0.999, dof), (stat, dof)


# -- a row waiting for a slow tool ------------------------------------------------------------------------------------

def _bigram_model(tokenizer, successor: dict[str, str]):
    """A Llama whose greedy next token depends on the current token only (`successor`): attention and
    MLP outputs are zero, so the last hidden state is the current token's normalised embedding,
    and each successor's LM-head row points along its predecessors' embeddings."""
    ids = tokenizer.convert_tokens_to_ids
    model = tiny_llama(vocab_size=len(tokenizer), seed=1, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                       tie_word_embeddings=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for current, following in successor.items():
            embedding = model.model.embed_tokens.weight[ids(current)]
            model.lm_head.weight[ids(following)] += 10 * embedding / embedding.norm()
    return model


def test_a_row_waiting_for_a_slow_tool_never_stalls_the_others(tmp_path, monkeypatch):
    """Row A calls `wait_flag`, which returns only once row B has called `set_flag` in its second
    turn: A's tool is still running while B decodes its second turn (and rows C and D their whole
    episodes) in the same session. A turn-synchronous loop would wait for A's tool before B's
    second turn, so A's call would time out."""
    tokenizer = bpe_tokenizer(vocab_size=VOCAB)
    flag = tmp_path / "flag"
    (tmp_path / "slow_tools.py").write_text(textwrap.dedent(f'''
        import os, time
        def wait_flag() -> str:
            while not os.path.exists({str(flag)!r}):
                time.sleep(0.01)
            return "<waited>"
        def noop() -> str:
            return "<noop>"
        def set_flag() -> str:
            open({str(flag)!r}, "w").close()
            return "<set>"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    call = lambda name: f'<tool_call>{{"name": "{name}", "arguments": {{}}}}</tool_call>'  # noqa: E731
    chain_b, chain_c = [f"<y{i}>" for i in range(8)], [f"<z{i}>" for i in range(6)]
    tokenizer.add_tokens([call("wait_flag"), call("noop"), call("set_flag"), "<A>", "<B>", "<C>", "<waited>",
                          "<noop>", "<set>", *chain_b, *chain_c])
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] | replace('<tool_response>', '') "
                               "| replace('</tool_response>', '') }}{% endfor %}")
    eos = tokenizer.eos_token
    script = {"<A>": call("wait_flag"), call("wait_flag"): eos, "<waited>": eos,
              "<B>": call("noop"), call("noop"): eos, "<noop>": chain_b[0],
              **dict(zip(chain_b, chain_b[1:] + [call("set_flag")])), call("set_flag"): eos, "<set>": eos,
              "<C>": chain_c[0], **dict(zip(chain_c, chain_c[1:] + [eos]))}
    model = _bigram_model(tokenizer, script)
    greedy = SamplingConfig(temperature=0.0)
    session = DecodeSession(model, rows=4, capacity=64)
    turns = _Counting(session, greedy, stop_ids=[tokenizer.eos_token_id])
    a, b, c, d = _slow_episodes(turns, tokenizer, timeout=30)
    assert a.counts == {"ok": 1} and b.counts == {"ok": 2}  # A's wait ended by B's call, not by the timeout
    assert tokenizer.decode(a.completion_ids) == call("wait_flag") + eos + "<waited>" + eos
    assert tokenizer.decode(b.completion_ids) == call("noop") + eos + "<noop>" + "".join(chain_b) \
        + call("set_flag") + eos + "<set>" + eos
    assert tokenizer.decode(c.completion_ids) == tokenizer.decode(d.completion_ids) == "".join(chain_c) + eos
    assert all(ep.stopped for ep in (a, b, c, d))
    # counted in decode rounds: while A waited, B decoded its second turn and C and D their episodes
    begins = [r for what, key, r in turns.log if what == "begin" and key == 0]  # A's two turns
    ends = {key: r for what, key, r in turns.log if what == "end"}
    assert len(begins) == 2 and begins[1] >= len(chain_b) + 2 and max(ends[2], ends[3]) < begins[1]
    # turn-synchronous (every tool result gathered before the next turns): A's call stalls the batch and times out
    batch = BatchTurns(engine_generate(RolloutEngine(model), greedy, stop_ids=[tokenizer.eos_token_id], pad_token_id=0))
    flag.unlink()
    a, _, _, _ = _slow_episodes(batch, tokenizer, timeout=1.5)
    assert a.messages[2]["role"] == "tool" and "did not answer within" in a.messages[2]["content"]


def _slow_episodes(turns, tokenizer, timeout: float):
    tools = ["slow_tools:wait_flag", "slow_tools:noop", "slow_tools:set_flag"]
    episodes = [start_episode(tokenizer, [{"role": "user", "content": u}], None) for u in ("<A>", "<B>", "<C>", "<C>")]
    with ToolRunner(tools, timeout=timeout, workers=2) as runner:
        run_episodes(turns, episodes, tokenizer, runner, EpisodeSettings(max_tool_turns=2, max_new_tokens=16),
                     tools=None)
    return episodes


def test_the_runner_hands_back_each_batch_when_its_calls_are_answered(tmp_path, monkeypatch):
    (tmp_path / "nap_tools.py").write_text("import time\ndef nap(s: float) -> str:\n    time.sleep(s)\n    return 'up'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with ToolRunner(["nap_tools:nap", LOOKUP], timeout=5, workers=2) as runner:
        runner.run([Call("lookup", {"name": "zorblat"})] * 2)  # both workers started
        slow = runner.submit([Call("nap", {"s": 0.5})])
        fast = runner.submit([Call("lookup", {"name": "zorblat"}), Call("nope", {})])  # the free worker takes it
        assert runner.poll(timeout=None) == [fast] and not slow.done
        assert [(r.status, r.content) for r in fast.results][0] == ("ok", "512")
        assert fast.results[1].status == "unknown_tool"
        assert runner.poll(timeout=None) == [slow] and slow.results[0].content == "up"
        assert runner.poll(timeout=None) == []  # nothing submitted: no wait
        runner.submit([Call("nap", {"s": 30})])
        runner.cancel()  # its worker is killed: no stale answer reaches a later call
        assert runner.run([Call("nap", {"s": 0})])[0].content == "up"
        assert runner.stats.counts == {"ok": 5, "unknown_tool": 1}


def test_grpo_rollouts_keep_one_session_and_reprefill_only_where_no_session_serves(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmetal.generation.engine import engine_for
    from pmetal.rl.prompts import PromptBatch
    from pmetal.tools.agent import AgentRollout

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    agent = AgentRollout([LOOKUP], settings=EpisodeSettings(max_new_tokens=4, max_episode_tokens=12))
    part = PromptBatch([[0]], ["Code of zorblat?"])
    engine = engine_for(model, compile_decode=False, cuda_graphs=False)

    def rollout():
        return agent.generate(engine, part, SamplingConfig(temperature=1.0), stop_ids=[tokenizer.eos_token_id],
                              pad_token_id=0, tokenizer=tokenizer, group=3)

    try:
        gen = rollout()
        session = agent.turns.session
        assert isinstance(session, DecodeSession) and session.prefilled and session.free_rows == session.rows == 3
        assert gen.completion_ids.shape[0] == 3 and gen.model_mask.shape == gen.completion_ids.shape
        rollout()  # the next step decodes on the same session (its buffers, and on CUDA its graphs, kept)
        assert agent.turns.session is session and session.free_rows == 3
        monkeypatch.setattr("pmetal.generation.session.engine_supports", lambda model: False)  # e.g. sliding window
        agent.turns.close()
        gen = rollout()
        assert agent.turns.session is None and gen.completion_ids.shape[0] == 3
    finally:
        agent.close()


def test_called_lookup_scores_a_call_whose_name_is_not_a_string_as_zero():
    from pmetal.examples.agent_tools import called_lookup

    messages = [[{"role": "assistant", "tool_calls": [{"function": {"name": "lookup", "arguments": {"name": {"x": 1}}}}]}],
                [{"role": "assistant", "tool_calls": [{"function": {"name": "lookup", "arguments": '{"name": "Zorblat"}'}}]}]]
    assert called_lookup(["p", "p"], ["", ""], ["zorblat", "zorblat"], messages=messages) == [0.0, 1.0]
