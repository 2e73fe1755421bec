"""Tool calling: the one format (parsing), SFT rows with tools (rendering, mask, errors), the tool
runner (exceptions, timeouts, size cap), multi-turn episodes (masks, log-probs, counts) and the
masking of tool tokens in the GRPO update (their gradients are zero)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from pmetal.errors import DataError
from pmetal.tokens import IGNORE_INDEX
from pmetal.tools.format import parse_tool_calls, parse_turn

LOOKUP = "pmetal.examples.agent_tools:lookup"


def test_parse_turn_keeps_good_calls_and_names_every_malformed_one():
    good = '<tool_call>{"name": "lookup", "arguments": {"name": "zorblat"}}</tool_call>'
    turn = parse_turn("Let me check. " + good + "<tool_call>{not json}</tool_call>"
                      '<tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "f", "arguments": 3}</tool_call>'
                      "<tool_call>{\"name\": \"g\"")
    assert turn.calls == [{"name": "lookup", "arguments": {"name": "zorblat"}}]
    assert turn.content == "Let me check."
    assert len(turn.errors) == 4
    assert "not JSON" in turn.errors[0] and "expected" in turn.errors[1]
    assert "not a JSON object" in turn.errors[2] and "without </tool_call>" in turn.errors[3]
    assert parse_turn("no call").calls == [] and parse_turn("no call").errors == []
    # arguments given as a JSON string are read as the object they hold
    assert parse_turn('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>').calls[0]["arguments"] == {"x": 1}


def test_serve_parses_with_the_core_parser():
    from pmetal.serve import text

    assert text.parse_tool_calls is parse_tool_calls  # one parser, not a copy
    content, calls = parse_tool_calls('Hi<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>')
    assert content == "Hi" and json.loads(calls[0]["function"]["arguments"]) == {"a": 1}


def _trace(tools=(LOOKUP,), call=None):
    call = call or {"type": "function", "function": {"name": "lookup", "arguments": {"name": "zorblat"}}}
    return {"tools": list(tools), "messages": [
        {"role": "user", "content": "Code of zorblat?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "TOOLRESULT512"},
        {"role": "assistant", "content": "It is 512."}]}


def test_tool_conversation_renders_in_the_fallback_with_loss_on_assistant_turns_only(tiny_model_dir):
    from transformers import AutoTokenizer

    from pmetal.data.formats import to_sft_examples
    from pmetal.data.inspect import show_mask
    from pmetal.data.render import render_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # SmolLM2's template: no tools
    _, (example,) = to_sft_examples([_trace()])
    assert example.tools[0]["function"]["name"] == "lookup"  # the schema from the function (get_json_schema)
    row = render_example(tokenizer, example)
    shown = show_mask(tokenizer, row.input_ids, row.labels)
    assert '[[<tool_call>{"name": "lookup", "arguments": {"name": "zorblat"}}</tool_call><|im_end|>]]' in shown
    assert "[[It is 512.<|im_end|>]]" in shown
    assert "<tool_response>TOOLRESULT512</tool_response>" in shown
    trained = tokenizer.decode([t for t, l in zip(row.input_ids, row.labels) if l != IGNORE_INDEX])
    assert "TOOLRESULT" not in trained and "lookup" in trained and "the name to look up" not in trained


def test_a_template_that_takes_tools_gets_them_as_they_are(tiny_model_dir):
    from transformers import AutoTokenizer

    from pmetal.data.render import render_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = ("{% for t in tools %}TOOL:{{ t.function.name }};{% endfor %}"
                               "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                               "{% for c in m.tool_calls or [] %}CALL:{{ c.function.name }}{% endfor %};{% endfor %}")
    text = render_text(tokenizer, _trace()["messages"], tools=[{"type": "function", "function": {"name": "lookup"}}])
    assert text.startswith("TOOL:lookup;") and "CALL:lookup" in text and "tool:TOOLRESULT512" in text


@pytest.mark.parametrize("row,field,expected", [
    ({**_trace(), "tools": {"name": "x"}}, "tools", "a list of"),
    ({**_trace(), "tools": [{"description": "no name"}]}, "tools[0]", "JSON schema"),
    ({**_trace(), "tools": ["nopkg_zz.mod:fn"]}, "tools[0]", "type hints"),
    (_trace(call={"function": {"arguments": {}}}), "messages[1].tool_calls[0]", "function"),
    (_trace(call={"function": {"name": "lookup", "arguments": "{oops"}}), "messages[1].tool_calls[0].function.arguments",
     "JSON object"),
])  # fmt: skip
def test_malformed_tool_rows_name_file_row_field_and_expectation(tmp_path, row, field, expected):
    from pmetal.data.formats import load_rows, to_sft_examples

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(_trace()) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        to_sft_examples(load_rows(path), path=str(path))
    message = str(info.value)
    assert str(path) in message and "line 2" in message and field in message and expected in message


@pytest.fixture
def user_tools(tmp_path, monkeypatch):
    (tmp_path / "agent_test_tools.py").write_text(textwrap.dedent('''
        import time
        def boom(x: int) -> str:
            """Always fails.

            Args:
                x: anything.
            """
            raise ValueError(f"bad x {x}")
        def hang() -> str:
            """Never answers."""
            time.sleep(60)
        def big() -> str:
            """A huge result."""
            return "y" * 10000
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    return ["agent_test_tools:boom", "agent_test_tools:hang", "agent_test_tools:big", LOOKUP]


def test_runner_errors_timeouts_and_the_size_cap(user_tools):
    import time

    from pmetal.tools.runner import Call, ToolRunner

    with ToolRunner(user_tools, timeout=1.0, max_result_chars=100, workers=2) as runner:
        start = time.perf_counter()
        results = runner.run([Call("hang", {}), Call("boom", {"x": 3}), Call("big", {}), Call("lookup", {"name": "zorblat"}),
                              Call("nope", {})])
        assert time.perf_counter() - start < 5  # the hanging call was killed, not waited for
        hang, boom, big, lookup, nope = results
        assert hang.status == "timeout" and "did not answer within 1 s" in hang.content
        assert boom.status == "error" and "ValueError: bad x 3" in boom.content
        assert big.status == "ok" and big.content.startswith("y" * 100) and "truncated: 10000 chars" in big.content
        assert lookup.status == "ok" and lookup.content == "512"
        assert nope.status == "unknown_tool" and "boom" in nope.content
        # the killed worker is replaced: the next call runs
        assert runner.run([Call("lookup", {"name": "quenby"})])[0].content == "284"
        assert runner.stats.counts == {"timeout": 1, "error": 1, "ok": 3, "unknown_tool": 1}


class _ScriptedTurns:
    """A `generate` that answers with fixed texts, turn by turn (the model's side of an episode)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def __call__(self, prompts, max_new_tokens):
        from pmetal.tools.episodes import TurnOutput

        self.calls.append(prompts)
        out = []
        for prompt in prompts:
            turn = sum(1 for _ in self.calls) - 1
            ids = self.tokenizer(self.script[turn], add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append(TurnOutput(ids[:max_new_tokens], [-0.5] * min(len(ids), max_new_tokens), len(ids) <= max_new_tokens))
        return out


def _episode_setup(tiny_model_dir, script, *, max_tool_turns=2, tools=(LOOKUP,)):
    from transformers import AutoTokenizer

    from pmetal.tools.episodes import EpisodeSettings, run_episodes, start_episode
    from pmetal.tools.format import function_schema
    from pmetal.tools.runner import ToolRunner, resolve_tool

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    schemas = [function_schema(resolve_tool(t)) for t in tools]
    episode = start_episode(tokenizer, [{"role": "user", "content": "Code of zorblat?"}], schemas)
    generate = _ScriptedTurns(tokenizer, script)
    with ToolRunner(tools, timeout=5) as runner:
        run_episodes(generate, [episode], tokenizer, runner,
                     EpisodeSettings(max_tool_turns=max_tool_turns, max_episode_tokens=400, max_new_tokens=64),
                     tools=schemas)
    return tokenizer, episode, generate


def test_an_episode_runs_the_call_appends_the_result_and_masks_tool_tokens(tiny_model_dir):
    call = '<tool_call>{"name": "lookup", "arguments": {"name": "zorblat"}}</tool_call>'
    tokenizer, ep, generate = _episode_setup(tiny_model_dir, [call, "The code is 512."])
    assert ep.turns == 2 and ep.stopped and ep.final_text == "The code is 512." and ep.counts == {"ok": 1}
    model = [t for t, m in zip(ep.completion_ids, ep.model_mask) if m]
    tool = [t for t, m in zip(ep.completion_ids, ep.model_mask) if not m]
    assert "<tool_response>512</tool_response>" in tokenizer.decode(tool) and "512" not in tokenizer.decode(model[:20])
    assert all(lp == 0.0 for lp, m in zip(ep.logps, ep.model_mask) if not m)
    assert all(lp == -0.5 for lp, m in zip(ep.logps, ep.model_mask) if m)
    # the second turn continued from exactly the tokens of the first turn and the tool turn
    assert generate.calls[1][0] == ep.prompt_ids + ep.completion_ids[: len(generate.calls[1][0]) - len(ep.prompt_ids)]
    assert [m["role"] for m in ep.messages] == ["user", "assistant", "tool", "assistant"]
    assert ep.messages[1]["tool_calls"][0]["function"]["name"] == "lookup" and ep.messages[2]["content"] == "512"
    # the rendered conversation of the update is what the chat template makes of the messages
    full = tokenizer.decode(ep.prompt_ids + ep.completion_ids)
    assert full.endswith("The code is 512.<|im_end|>")


def test_malformed_calls_and_the_turn_limit_are_counted(tiny_model_dir):
    bad = "<tool_call>{oops}</tool_call>"
    _, ep, generate = _episode_setup(tiny_model_dir, [bad, bad, bad, "never"], max_tool_turns=1)
    assert ep.counts == {"parse_error": 1} and ep.turns == 2 and not ep.stopped  # cut by max_tool_turns
    assert len(generate.calls) == 2


def test_tool_tokens_have_zero_gradient_in_the_grpo_update(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from pmetal.rl.rollout import RolloutRow, assemble
    from pmetal.logps import completion_logps
    from pmetal.losses.policy import grpo_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).float()
    mask = [True] * 4 + [False] * 5 + [True] * 3
    rows = [RolloutRow([5, 6, 7], list(range(20, 32)), [-1.0] * 12, 1.0, 0, False, model_mask=mask),
            RolloutRow([5, 6], list(range(40, 52)), [-1.0] * 12, 0.0, 0, False)]
    batch = assemble(rows, torch.tensor([1.0, -1.0]), pad_token_id=0, group_size=2)
    out = completion_logps(model, batch.input_ids, batch.attention_mask, batch.labels, return_token_logps=True)
    token_logps = out.token_logps
    token_logps.retain_grad()
    loss, _ = grpo_loss(token_logps, batch.old_logps, batch.advantages, batch.completion_mask.float())
    loss.backward()
    grad = token_logps.grad[0, 3:15]
    tool_positions = torch.tensor([not m for m in mask])
    assert torch.all(grad[tool_positions] == 0) and torch.all(grad[~tool_positions] != 0)
    assert (batch.labels[0, 3:15] == IGNORE_INDEX).tolist() == [not m for m in mask]


def test_environment_episodes_reset_from_the_row_and_own_their_reward(tiny_model_dir):
    from transformers import AutoTokenizer

    from pmetal.tools.agent import AgentRollout, environment_reward
    from pmetal.tools.episodes import EpisodeSettings, run_episodes

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    agent = AgentRollout((), "pmetal.examples.agent_tools:RegistryEnvironment", settings=EpisodeSettings(max_new_tokens=64))
    try:
        assert [s["function"]["name"] for s in agent.schemas] == ["lookup"]
        episodes = agent.episodes(["Code of zorblat?"], {"name": ["zorblat"], "answer": ["512"]}, 2, tokenizer)
        call = '<tool_call>{"name": "lookup", "arguments": {"name": "zorblat"}}</tool_call>'
        script = _ScriptedTurns(tokenizer, [call, "It is 512."])
        run_episodes(script, episodes[:1], tokenizer, agent.runner, agent.settings, tools=agent.schemas,
                     env_tools=list(agent.env_tools))
        rewards = environment_reward(["p"] * 2, ["c"] * 2, environments=[e.environment for e in episodes])
        assert rewards == [1.0, 0.0]  # only the first episode's environment was asked
        assert episodes[0].counts == {"ok": 1}
    finally:
        agent.close()


def test_grpo_tools_flags_reach_the_agent_module(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "pmetal", "grpo", "--help"], capture_output=True, text=True, timeout=60)
    assert "--tools" in done.stdout and "--max-tool-turns" in done.stdout and "--environment" in done.stdout


def test_a_local_tool_module_is_reported_once_however_often_it_is_resolved(tmp_path, monkeypatch, caplog):
    import logging

    from pmetal.tools.runner import resolve_tool

    (tmp_path / "localtools_once.py").write_text("def ping() -> str:\n    \"\"\"Ping.\"\"\"\n    return 'pong'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.delitem(sys.modules, "localtools_once", raising=False)
    with caplog.at_level(logging.INFO, logger="pmetal"):
        for _ in range(3):  # the runner, the schema and every environment resolve the same path
            assert resolve_tool("localtools_once:ping")() == "pong"
    assert caplog.text.count("localtools_once.py") == 1


def test_the_prompt_data_system_prompt_opens_every_tool_episode(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from pmetal.data.prompts import PromptDataModule
    from pmetal.modules.agent import AgentGrpoModule

    module = AgentGrpoModule(str(tiny_model_dir), tools=[LOOKUP], reward_fns=["pmetal.examples.agent_tools:code_reward"],
                             max_completion_length=8)
    data = PromptDataModule(str(tmp_path / "unused.jsonl"), system_prompt="Answer tersely.")
    module._trainer = SimpleNamespace(datamodule=data)  # what Trainer.fit attaches
    agent = module.agent_rollout()
    try:
        plain, with_system = agent.episodes(["Code of zorblat?", [{"role": "system", "content": "Own."},
                                                                  {"role": "user", "content": "Hi"}]], {}, 1,
                                            module.tokenizer)
        assert plain.messages[0] == {"role": "system", "content": "Answer tersely."}
        text = module.tokenizer.decode(plain.prompt_ids)
        assert "Answer tersely." in text and "lookup" in text  # beside the tool schemas
        assert [m["content"] for m in with_system.messages] == ["Own.", "Hi"]  # a prompt's own system turn stays
    finally:
        module.teardown("fit")
