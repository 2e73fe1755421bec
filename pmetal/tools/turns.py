"""Where an episode's model turns are sampled: the small interface the episode loop
(:func:`pmetal.tools.episodes.run_episodes`) drives, with two implementations.

A driver samples one turn at a time for rows named by keys (the episodes' indices):

- ``begin(key, tokens, keep=..., max_new_tokens=...)``: the row's sequence becomes its first
  ``keep`` tokens followed by ``tokens`` (a new row: the prompt, ``keep=0``; a continuing row: the
  tool turn after the model's turn), and a turn of at most ``max_new_tokens`` is sampled from there;
- ``step()``: sampling progress, as :class:`TurnEvent` s (a row's new tokens and their log-probs;
  ``finish`` set once its turn is over: "stop" on a stop token, "length" at its budget);
- ``pause(key)``: end a row's turn now, its kept KV intact (the loop saw a complete tool call);
- ``end(key)``: the episode is over, its row leaves; ``close()``: every row leaves (errors too);
- ``busy``: turns in progress or waiting for a row.

:class:`SessionTurns` decodes every row in one :class:`pmetal.generation.session.DecodeSession`:
a paused or finished row keeps its KV while its tools run, the others keep decoding, ``begin``
on a continuing row is ``extend`` (only the tool turn is prefilled, on top of the kept prefix),
finished episodes free their row, and episodes beyond the session's rows wait in a queue and join
as rows free up. Each row samples from hashed uniforms of its seed and positions (drawn from the
session's generator at admission), so its draws do not depend on the rows beside it.

:class:`BatchTurns` runs any ``generate(prompts, max_new_tokens) -> [TurnOutput]`` callable (a
scripted model in tests; :func:`engine_generate` for models a session cannot serve: sliding-window
or hybrid caches): each ``step()`` samples every begun turn in one call, from its whole
conversation (prefilled again), and returns them whole.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from pmetal.generation.sampling import SamplingConfig

log = logging.getLogger("pmetal")

CAPACITY_STEP = 64  # session capacities are rounded up to this, so a session (and its graphs) serves many steps


@dataclass
class TurnOutput:
    """One sampled turn of one row (what a `Generate` returns per prompt)."""

    ids: list[int]
    logps: list[float]
    stopped: bool  # ended on a stop token (False: cut at max_new_tokens)


Generate = Callable[[list[list[int]], int], list[TurnOutput]]


@dataclass
class TurnEvent:
    """What one row's turn did during a ``step()``."""

    key: Hashable
    tokens: list[int]
    logps: list[float]
    finish: str | None = None  # "stop", "length", or None: the turn goes on


class BatchTurns:
    """Turns sampled by a batch ``generate`` callable, every begun turn in one call (module docstring)."""

    whole_turns = True  # each step() finishes every begun turn: the loop gathers all tool results first

    def __init__(self, generate: Generate) -> None:
        self.generate = generate
        self._sequences: dict[Hashable, list[int]] = {}
        self._budgets: dict[Hashable, int] = {}  # begun turns -> their max_new_tokens

    def begin(self, key: Hashable, tokens: Sequence[int], *, keep: int, max_new_tokens: int) -> None:
        self._sequences[key] = self._sequences.get(key, [])[:keep] + list(tokens)
        self._budgets[key] = max_new_tokens

    @property
    def busy(self) -> bool:
        return bool(self._budgets)

    def step(self) -> list[TurnEvent]:
        if not self._budgets:
            return []
        keys = list(self._budgets)
        outputs = self.generate([self._sequences[k] for k in keys], max(self._budgets.values()))
        events = []
        for key, out in zip(keys, outputs):
            budget = self._budgets[key]
            ids, logps = list(out.ids[:budget]), list(out.logps[:budget])
            self._sequences[key] += ids
            events.append(TurnEvent(key, ids, logps, "stop" if out.stopped and len(out.ids) <= budget else "length"))
        self._budgets.clear()
        return events

    def pause(self, key: Hashable) -> None:
        """Nothing to stop: turns come back whole."""

    def end(self, key: Hashable) -> None:
        self._sequences.pop(key, None)
        self._budgets.pop(key, None)

    def close(self) -> None:
        self._sequences.clear()
        self._budgets.clear()


class SessionTurns:
    """Turns decoded in one decode session, rows kept across turns (module docstring).

    Args:
        session: a :class:`pmetal.generation.session.DecodeSession` with no rows of its own (every
            row it holds is this driver's until ``close()``); its capacity must hold a prompt and
            the episode's tokens.
        sampling: the sampling settings of every turn (``max_new_tokens`` is set per turn).
        stop_ids: the tokens that end a turn.
    """

    def __init__(self, session, sampling: SamplingConfig, *, stop_ids: Sequence[int]) -> None:
        self.session, self.sampling, self.stop_ids = session, sampling, list(stop_ids)
        self._rows: dict[Hashable, int] = {}  # key -> session row
        self._keys: dict[int, Hashable] = {}
        self._queue: list[tuple[Hashable, list[int], int]] = []  # new rows waiting for a free one

    def begin(self, key: Hashable, tokens: Sequence[int], *, keep: int, max_new_tokens: int) -> None:
        if key in self._rows:
            self.session.extend(self._rows[key], tokens, at=keep, max_new_tokens=max_new_tokens)
            return
        if keep:
            raise ValueError(f"row {key!r} is not in the session: it cannot keep {keep} tokens")
        self._queue.append((key, list(tokens), max_new_tokens))
        self._admit()

    @property
    def busy(self) -> bool:
        """Rows decoding (queued rows join as soon as a row ends, so none waits while one is free)."""
        return self.session.active > 0

    def step(self) -> list[TurnEvent]:
        if not self.session.active:
            return []
        return [TurnEvent(self._keys[e.row], e.tokens, e.logps, e.finish) for e in self.session.step()]

    def pause(self, key: Hashable) -> None:
        self.session.pause(self._rows[key])

    def end(self, key: Hashable) -> None:
        row = self._rows.pop(key, None)
        if row is not None:
            del self._keys[row]
            self.session.remove(row)
        self._admit()

    def close(self) -> None:
        self._queue.clear()
        for key in list(self._rows):
            self.end(key)

    def _admit(self) -> None:
        while self._queue and self.session.free_rows:
            key, tokens, budget = self._queue.pop(0)
            config = dataclasses.replace(self.sampling, max_new_tokens=budget)
            row = self.session.add(tokens, config, stop_ids=self.stop_ids)
            self._rows[key], self._keys[row] = row, key


def engine_generate(engine, sampling: SamplingConfig, *, stop_ids: Sequence[int], pad_token_id: int) -> Generate:
    """A `Generate` over pmetal's rollout engine: one call per turn for every row begun."""

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[TurnOutput]:
        config = dataclasses.replace(sampling, max_new_tokens=max_new_tokens)
        gen = engine.generate(prompts, config, stop_ids=stop_ids, pad_token_id=pad_token_id)
        lengths = gen.lengths.tolist()
        return [TurnOutput(gen.completion_ids[r, :n].tolist(), gen.logps[r, :n].tolist(), bool(gen.stopped[r]))
                for r, n in enumerate(lengths)]

    return generate


class TurnSource:
    """The driver of each rollout's turns: a decode session kept between rollouts (rebuilt only when
    a rollout needs more rows or slots, or other engine options), or, for a model no session can
    serve, :class:`BatchTurns` over the engine.

    Args:
        sync_every: decode rounds between the host's reads (a row's tool call is seen at a read;
            the tokens it wrote after the call in the meantime are dropped, as its turn ends at the call).
    """

    def __init__(self, sync_every: int = 4) -> None:
        self.sync_every = sync_every
        self.session = None

    def driver(self, engine, sampling: SamplingConfig, *, stop_ids: Sequence[int], pad_token_id: int, rows: int,
               capacity: int):
        """A driver for ``rows`` episodes whose prompt and episode tokens fit ``capacity`` slots."""
        from pmetal.generation.session import DecodeSession, engine_supports

        suppress, stops = tuple(sampling.suppress_ids), max(8, len(set(stop_ids)))
        if self.session is not None and not self._fits(engine, rows, capacity, suppress, stops):
            self.session = None  # freed before a bigger one is allocated
        if self.session is not None:
            self.session.refresh()  # the weights the optimizer has moved
        elif engine_supports(engine.model):
            capacity = -(-capacity // CAPACITY_STEP) * CAPACITY_STEP
            try:
                self.session = DecodeSession(engine.model, rows, capacity, sync_every=self.sync_every,
                                             suppress_ids=suppress, max_stop_ids=stops, **_options(engine))
            except ValueError as exc:  # a prompt cache without per-layer tensors
                log.info("tool episodes: no decode session for this model (%s); each turn re-prefills", exc)
        if self.session is None:
            return BatchTurns(engine_generate(engine, sampling, stop_ids=stop_ids, pad_token_id=pad_token_id))
        return SessionTurns(self.session, sampling, stop_ids=stop_ids)

    def close(self) -> None:
        self.session = None

    def _fits(self, engine, rows, capacity, suppress, stops) -> bool:
        s = self.session
        return (s.model is engine.model and s.rows >= rows and s.capacity >= capacity and s.suppress_ids == suppress
                and s.max_stop_ids >= stops and s.free_rows == s.rows and _options(s.engine) == _options(engine))


def _options(engine) -> dict:
    """The engine options a session takes over (as the engine resolved them for its device)."""
    return dict(cuda_graphs=engine.cuda_graphs, compile_decode=engine.compile_decode,
                attention_kernel=engine.attention_kernel, fuse_projections=engine.fuse_projections)
