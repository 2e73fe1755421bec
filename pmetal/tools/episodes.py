"""Multi-turn tool episodes for GRPO: the model writes a turn, its tool calls run, the results are
appended as a tool turn, and the row goes on, up to `max_tool_turns` tool turns and a budget of
`max_episode_tokens` completion tokens (model and tool tokens together).

`run_episodes(turns, ...)` is one loop over a small driver interface (:mod:`pmetal.tools.turns`:
begin a row's turn, step, pause, end). On pmetal's rollout engine the driver is a decode session
(`SessionTurns`): every row decodes in one `DecodeSession`; a row whose turn ends in a tool call is
paused with its KV kept while its calls run in the tool workers (`ToolRunner.submit`/`poll`), the
other rows keep decoding, and when the results arrive the tool turn is appended with `extend` (only
its tokens are prefilled, on the kept prefix) and the row resumes; finished episodes free their row
for episodes waiting in the queue. A model no session serves (sliding-window or hybrid caches)
runs the same loop on `BatchTurns` over the engine (`engine_generate`): turn-synchronous, every
row's next turn in one call that prefills its whole conversation again. A plain `generate(prompts,
max_new_tokens)` callable (a scripted model in tests) is run as a `BatchTurns`.

Each episode keeps the exact token ids the model sampled (never re-tokenized) and, between them,
the tokens of the tool turns, with `model_mask` telling them apart: the update trains and weighs
only model tokens (tool tokens get label -100, so they are outside the loss and the importance
ratio), and the sampling-time log-probs cover model tokens only (0 on tool tokens). A turn ends at
its first complete `</tool_call>` block (anything the model wrote after it is dropped) or at a stop
token. Calls are parsed with `pmetal.tools.format.parse_turn`: a malformed block becomes an error
message in the tool turn, and is counted. On a session a row is paused as soon as non-blank text
follows its first complete call, so the same tokens are kept as by a whole turn cut afterwards:
greedy episodes equal the turn-synchronous ones token for token, sampled ones (hashed per-row
draws) follow the same distribution.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pmetal.errors import PmetalError
from pmetal.tools.format import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ParsedTurn, parse_turn
from pmetal.tools.runner import PARSE_ERROR, Call
from pmetal.tools.turns import BatchTurns, Generate, TurnOutput, engine_generate  # noqa: F401 (public here too)


@dataclass
class Episode:
    """One rollout row's episode."""

    prompt_ids: list[int]
    messages: list[dict]  # the conversation: the prompt, assistant turns (with tool_calls), tool results
    completion_ids: list[int] = field(default_factory=list)  # model and tool tokens, in order
    logps: list[float] = field(default_factory=list)  # sampling-time log-probs; 0 on tool tokens
    model_mask: list[bool] = field(default_factory=list)  # True on tokens the model sampled
    final_text: str = ""  # the last assistant turn's text (what rewards read as the completion)
    stopped: bool = False  # ended on its own (False: cut by a token budget or max_tool_turns)
    turns: int = 0  # model turns
    counts: dict[str, int] = field(default_factory=dict)  # tool-call outcomes (ok, error, timeout, ...)
    environment: Any = None  # its EnvironmentHandle (environment runs)
    messages_for_render: list[dict] = field(default_factory=list)  # assistant turns as the model wrote them
    _text: str = ""  # the conversation rendered so far, ending where the model continues

    def add(self, ids: Sequence[int], logps: Sequence[float] | None, model: bool) -> None:
        self.completion_ids += ids
        self.logps += list(logps) if model else [0.0] * len(ids)
        self.model_mask += [model] * len(ids)


@dataclass
class EpisodeSettings:
    """Args:
        max_tool_turns: tool turns an episode may take (the model's next turn after the last one
            still runs, so an episode has at most max_tool_turns + 1 model turns).
        max_episode_tokens: completion tokens (model and tool) an episode may hold.
        max_new_tokens: tokens one model turn may generate.
    """

    max_tool_turns: int = 4
    max_episode_tokens: int = 1024
    max_new_tokens: int = 256


def cut_at_tool_call(tokenizer, ids: Sequence[int]) -> int | None:
    """How many tokens of `ids` reach the end of the first complete `</tool_call>` (None: no call).

    Tokens after it are kept only when they are all stop/special tokens (the turn's end-of-turn).
    """
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if TOOL_CALL_CLOSE not in text:
        return None
    for k in range(1, len(ids) + 1):
        if TOOL_CALL_CLOSE in tokenizer.decode(ids[:k], skip_special_tokens=False):
            rest = tokenizer.decode(ids[k:], skip_special_tokens=True)
            return len(ids) if not rest.strip() else k
    return None


def _render(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None) -> str:
    from pmetal.data.render import render_text

    return render_text(tokenizer, messages, add_generation_prompt=True, tools=tools)


def _tokenize(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def start_episode(tokenizer, messages: list[dict], tools: Sequence[dict] | None, environment=None) -> Episode:
    text = _render(tokenizer, messages, tools)
    return Episode(_tokenize(tokenizer, text), list(messages), environment=environment,
                   messages_for_render=list(messages), _text=text)


def tool_turn_ids(tokenizer, episode: Episode, turn_text: str, model_ended_turn: bool,
                  results: Sequence[dict], tools: Sequence[dict] | None) -> list[int]:
    """The tokens between the model's turn and its next one: end of turn, the tool turn(s), the
    assistant header. The model's own tokens are kept as sampled; only this text is tokenized.

    Raises:
        PmetalError: the chat template does not render the assistant turn verbatim (it rewrites
            history), so the appended text cannot be found.
    """
    from pmetal.data.render import end_of_turn_markers

    turns = [{"role": "assistant", "content": turn_text}] + list(results)
    full = _render(tokenizer, episode.messages_for_render + turns, tools)
    head = episode._text + turn_text
    if not full.startswith(head):
        raise PmetalError("the chat template does not render the assistant's turn as written (it rewrites earlier "
                          "turns), so tool results cannot be appended to the sampled tokens")
    rest = full[len(head):]
    if model_ended_turn:
        marker = next((m for m in end_of_turn_markers(tokenizer) if rest.startswith(m)), "")
        rest = rest[len(marker):]
    episode._text = full
    episode.messages_for_render += turns
    return _tokenize(tokenizer, rest)


@dataclass
class _Turn:
    """The model turn a row is writing."""

    budget: int  # its max_new_tokens
    ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)


@dataclass
class _ToolTurn:
    """A row whose model turn called tools: what the tool turn after it is built from."""

    row: int
    text: str  # the model's turn as text
    ended: bool  # the model closed its turn itself (its end-of-turn token is kept)
    parsed: ParsedTurn
    calls: list[Call]


def run_episodes(turns: Any, episodes: list[Episode], tokenizer, runner, settings: EpisodeSettings, *,
                 tools: Sequence[dict] | None, env_tools: Sequence[str] = ()) -> list[Episode]:
    """Run every episode to its end (module docstring); the episodes are completed in place.

    `turns`: where model turns are sampled: a driver of :mod:`pmetal.tools.turns` (`SessionTurns`
    or `BatchTurns`), or a `generate(prompts, max_new_tokens) -> [TurnOutput]` callable, run as a
    `BatchTurns`. `runner`: a :class:`pmetal.tools.runner.ToolRunner` (its `submit` and `poll`).
    """
    driver = turns if hasattr(turns, "begin") else BatchTurns(turns)
    writing: dict[int, _Turn] = {}  # row -> the model turn it is writing
    waiting: dict[Any, _ToolTurn] = {}  # runner batch -> the row waiting for its results

    def begin(row: int, tokens: list[int], keep: int) -> None:
        room = settings.max_episode_tokens - len(episodes[row].completion_ids)
        writing[row] = _Turn(min(settings.max_new_tokens, room))
        driver.begin(row, tokens, keep=keep, max_new_tokens=writing[row].budget)

    try:
        for row, ep in enumerate(episodes):
            begin(row, ep.prompt_ids, 0)
        while driver.busy or waiting:
            for event in driver.step():
                turn = writing[event.key]
                turn.ids += event.tokens
                turn.logps += event.logps
                if event.finish is None:
                    cut = cut_at_tool_call(tokenizer, turn.ids)
                    if cut is None or cut == len(turn.ids):  # no call yet, or only blanks after one so far
                        continue
                    driver.pause(event.key)  # the turn ends at its call: what follows would be dropped
                del writing[event.key]
                tool_turn = _end_model_turn(episodes[event.key], event.key, turn, event.finish == "stop", tokenizer,
                                            settings)
                if tool_turn is None:
                    driver.end(event.key)
                else:
                    waiting[runner.submit(tool_turn.calls, env_tools=env_tools)] = tool_turn
            for batch in _results(runner, waiting, driver):
                tool_turn = waiting.pop(batch)
                ep = episodes[tool_turn.row]
                appended = _tool_turn(ep, tool_turn, batch.results, tokenizer, runner, tools)
                keep = len(ep.prompt_ids) + len(ep.completion_ids)  # the row's KV is kept up to here
                room = settings.max_episode_tokens - len(ep.completion_ids)
                ep.add(appended[:room], None, model=False)
                if len(appended) >= room:  # no token left for the model's next turn
                    ep.final_text, ep.stopped = tool_turn.text, False
                    driver.end(tool_turn.row)
                else:
                    begin(tool_turn.row, appended, keep)
    except BaseException:
        runner.cancel()  # no call of this rollout may answer a later one
        raise
    finally:
        driver.close()
    return episodes


def _results(runner, waiting: dict, driver) -> list:
    """The runner batches answered now; while the driver decodes, none is waited for; a driver of
    whole turns (`BatchTurns`) gets every one before its next step, so its next call batches them all."""
    if not waiting:
        return []
    if not getattr(driver, "whole_turns", False):
        return runner.poll(timeout=0.0 if driver.busy else None)
    done = []
    while len(done) < len(waiting):
        done += runner.poll(timeout=None)
    return done


def _end_model_turn(ep: Episode, row: int, turn: _Turn, stopped: bool, tokenizer,
                    settings: EpisodeSettings) -> _ToolTurn | None:
    """Add a finished model turn to its episode; the tool turn it asks for (None: the episode is over)."""
    ids, logps = turn.ids[: turn.budget], turn.logps[: turn.budget]
    stopped = stopped and len(turn.ids) <= turn.budget
    cut = cut_at_tool_call(tokenizer, ids)
    if cut is not None:
        ids, logps = ids[:cut], logps[:cut]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    ep.add(ids, logps, model=True)
    ep.turns += 1
    parsed = parse_turn(text) if cut is not None or TOOL_CALL_OPEN in text else None
    wants_tools = parsed is not None and bool(parsed.calls or parsed.errors)
    room = len(ep.completion_ids) < settings.max_episode_tokens
    if not wants_tools or ep.turns > settings.max_tool_turns or not room:
        ep.final_text = text
        ep.stopped = (stopped or cut is not None) and not wants_tools
        ep.messages.append(_assistant_message(parsed.content if parsed else text, parsed.calls if parsed else []))
        return None
    ep.messages.append(_assistant_message(parsed.content, parsed.calls))
    env_id = getattr(ep.environment, "_id", None)
    ended = cut is not None and len(ids) > 0 and _ends_turn(tokenizer, ids, cut)
    return _ToolTurn(row, text, ended, parsed, [Call(c["name"], c["arguments"], env_id) for c in parsed.calls])


def _tool_turn(ep: Episode, tool_turn: _ToolTurn, results, tokenizer, runner, tools) -> list[int]:
    """Count the results, add them to the conversation and return the tool turn's tokens."""
    messages = []
    for call, result in zip(tool_turn.parsed.calls, results):
        ep.counts[result.status] = ep.counts.get(result.status, 0) + 1
        messages.append({"role": "tool", "name": call["name"], "content": result.content})
    for error in tool_turn.parsed.errors:
        ep.counts[PARSE_ERROR] = ep.counts.get(PARSE_ERROR, 0) + 1
        runner.stats.add(PARSE_ERROR)
        messages.append({"role": "tool", "name": "error", "content": f"error: {error}"})
    ep.messages += messages
    return tool_turn_ids(tokenizer, ep, tool_turn.text, tool_turn.ended, messages, tools)


def _ends_turn(tokenizer, ids: Sequence[int], cut: int) -> bool:
    """The model wrote its end-of-turn token after the call (kept in `ids`)."""
    return cut == len(ids) and tokenizer.decode(ids[-1:], skip_special_tokens=True) == ""


def _assistant_message(content: str, calls: Sequence[dict]) -> dict:
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"type": "function", "function": {"name": c["name"],
                                                                    "arguments": json.dumps(c["arguments"])}}
                                 for c in calls]
    return message


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """Per-step tool metrics (TRL's names where TRL has them: tools/call_frequency, tools/failure_frequency)."""
    n = max(len(episodes), 1)
    total: dict[str, int] = {}
    for ep in episodes:
        for status, count in ep.counts.items():
            total[status] = total.get(status, 0) + count
    calls = sum(total.values())
    failures = calls - total.get("ok", 0)
    rate = lambda status: total.get(status, 0) / calls if calls else 0.0  # noqa: E731
    return {
        "tools/call_frequency": calls / n,  # calls per episode (TRL: per completion)
        "tools/failure_frequency": failures / calls if calls else 0.0,
        "tools/success_rate": rate("ok"),
        "tools/parse_error_rate": rate(PARSE_ERROR),
        "tools/timeout_rate": rate("timeout"),
        "tools/error_rate": rate("error") + rate("unknown_tool"),
        "episodes/mean_turns": sum(ep.turns for ep in episodes) / n,
        "episodes/mean_length": sum(len(ep.completion_ids) for ep in episodes) / n,
        "episodes/mean_model_tokens": sum(sum(ep.model_mask) for ep in episodes) / n,
        "episodes/truncated_ratio": sum(not ep.stopped for ep in episodes) / n,
    }
