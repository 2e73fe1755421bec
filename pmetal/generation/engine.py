"""The rollout engine: static-cache decoding in fixed shapes, CUDA graphs, optional speculation.

What it does, and why each piece is there:

- **One preallocated KV cache** per (rows, capacity) bucket (a ``workspace.Workspace``): ``[rows, kv_heads, capacity, head_dim]``
  per layer (:class:`SlotCache`), written in place at *slot* indices. The attention mask is a 4-D
  boolean ``[rows, 1, T, capacity]`` built from a per-row ``valid`` bitmap, so a row's slots need
  not be contiguous: left padding, rejected draft tokens and finished rows are holes in the bitmap,
  and rotary positions are explicit per row. Nothing is ever reallocated per token.
- **One fixed-shape round** (``_Round.__call__``): feed the last token (and ``K`` draft tokens
  under speculation), sample, record log-probs, check stop tokens and budgets, all as tensor ops
  on the device. On CUDA the round is captured once into a ``torch.cuda.CUDAGraph`` per bucket and
  replayed; on CPU and MPS the same round runs eagerly over the same static buffers.
- **A compiled round** (``compile_decode``, on by default where graphs are captured): the model
  forward, the sampling distribution and the recorded log-prob go through ``torch.compile``
  before the capture, so the graph replays inductor's fused kernels rather than the eager modules'
  many small ones (rounding between ops as eager does: ``emulate_precision_casts``).
- **Decode attention on CUDA** (``attention_kernel``): one Triton kernel per layer
  (``decode_attention``) walks each row's cache and skips the blocks its mask allows nothing in,
  so a round reads about the columns written so far while every shape stays fixed.
- **Fused projections** (``fuse_projections``, with the compiled rounds on CUDA): each layer's
  q/k/v and gate/up as one matmul each, over a copy refreshed from the live weights before every
  rollout (``fused``); decode matmuls are launch-sized, so four do the work of seven.
- **No host sync per token**: the host reads ``finished`` every ``sync_every`` rounds only.
- **Finished rows stop costing**: at those reads, when the live rows fit a smaller power-of-two
  bucket, the rows (cache included) are gathered into it.
- **Prompts prefilled once** (``prefill.py``): the ``P`` distinct prompts are prefilled with a
  ``DynamicCache`` (the model's own prompt path, the reference loop's ``prompt_forward``) and their
  KV is copied into the ``P x G`` decode rows.
- **VLM prompts**: ``prefill_inputs`` (``pixel_values``, ``image_grid_thw``, ...) go to that
  prefill with the positions of ``pmetal.vlm.prefill_positions`` (Qwen-VL's 3-D M-RoPE ids;
  Idefics3/SmolVLM and LLaVA-style models splice image features into plain 1-D positions). The
  decode rounds feed 1-D positions from each prompt's largest position + 1, which Qwen-VL repeats
  on its three axes: the positions the update's forward gives the completion (equal log-probs).
- **No recompiles per prompt length**: the capacity is rounded up to a multiple of 64 and a family
  of buckets is reused while it is big enough, so graphs are captured once per shape family.
- **The live policy**: the graphs read the parameters where they live; optimizers update them in
  place, so every rollout samples the current weights (LoRA, DoRA, full, QLoRA). Nothing is merged.

Sampling draws ``argmax(probs / E)`` with ``E ~ Exp(1)`` (the exponential race: exactly a draw
from ``probs``, without a host-side ``multinomial``), over the distribution of
:func:`pmetal.generation.sampling.process_logits`; greedy is the one-hot of the argmax. A plain
decode round takes the race in log space (``round.sample_and_score``: the processed logits
plus Gumbel noise from the same uniforms), so no softmax is formed. The
recorded log-prob is the full tempered ``log_softmax(logits / T)`` of the chosen token, as training
computes it. Speculation (``pmetal.generation.speculative``) plugs in as the draft of the round.

Continuous batching (rows joining and leaving a running batch, a row's kept KV extended by a new
turn) is :mod:`pmetal.generation.session`, on the same slot attention and round capture.
Departures: sliding-window and hybrid-cache models fall back to the reference loop
(``sampling.generate_reference``), as do models whose prompt cache has no per-layer tensors,
VLMs included. A draft model's prefill gets the token ids only, never the images.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch

from pmetal.generation.prefill import engine_supports, has_sliding_window  # noqa: F401 (public here too)
from pmetal.generation.prefill import prefill as prefill_prompts
from pmetal.generation.sampling import Generation, SamplingConfig
from pmetal.generation.workspace import DecodeSpec, Workspace

log = logging.getLogger("pmetal")

CAPACITY_STEP = 64
FUSE_LIMIT_BYTES = 2 << 30  # the largest fused-projection copy made by default (a 0.6B model's is ~0.6 GB)


class RolloutEngine:
    """Samples completions from ``model`` (see the module docstring); keeps its buffers and graphs.

    Args:
        model: a Hugging Face causal LM (PEFT-wrapped or not), used as it is (call ``eval()``).
        speculative: draft ``num_draft_tokens`` tokens per round and verify them in one forward.
        draft_model: the drafting model (same tokenizer); None with ``speculative`` drafts from
            n-grams of the prompt and completion (prompt lookup).
        num_draft_tokens: K, the tokens drafted per round.
        cuda_graphs: capture the round into CUDA graphs (None: on CUDA devices).
        compile_decode: compile the round's model forward with ``torch.compile`` before it is
            captured (None: wherever CUDA graphs are captured). Inductor fuses the eager modules'
            small kernels, which the graph would otherwise replay one by one. Compilation happens
            at the first call per shape family; a failure falls back to the eager forward.
        attention_kernel: decode and verify rounds attend through pmetal's Triton kernel
            (``pmetal.generation.decode_attention``), which reads only the cache columns the mask
            allows (None: where Triton runs, i.e. on CUDA); else through batched matmuls or SDPA.
        fuse_projections: decode through one matmul for each layer's q/k/v and one for gate/up,
            over a concatenated copy of those weights refreshed before every rollout
            (``pmetal.generation.fused``; groups with adapters or quantized weights keep theirs).
            None: where the rounds are compiled on CUDA and the copy takes at most
            ``FUSE_LIMIT_BYTES``.
        sync_every: rounds between the host's reads of the finished rows (compaction points).
    """

    def __init__(self, model, *, speculative: bool = False, draft_model=None, num_draft_tokens: int = 4,
                 cuda_graphs: bool | None = None, compile_decode: bool | None = None, attention_kernel: bool | None = None,
                 fuse_projections: bool | None = None, sync_every: int = 8) -> None:
        from pmetal.generation.decode_attention import kernel_supported, prepare
        from pmetal.generation.speculative import check_draft_settings

        check_draft_settings(speculative, draft_model, num_draft_tokens)
        self._model = weakref.ref(model)
        self._owner = model  # engine_for drops it: its cache must not keep the model alive
        self.draft_model = draft_model if speculative else None
        self.num_draft_tokens = num_draft_tokens if speculative else 0
        self.speculative = speculative
        self.device = next(model.parameters()).device
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.compile_decode = self.cuda_graphs if compile_decode is None else compile_decode
        supported = kernel_supported(self.device)
        if attention_kernel and not supported:
            raise ValueError(f"attention_kernel=True needs Triton on a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
                             f"the model is on {self.device}")
        self.attention_kernel = supported and self.device.type == "cuda" if attention_kernel is None else attention_kernel
        if self.attention_kernel:
            prepare()  # Triton's decoration and the op's registration, never inside a compiled round
        if fuse_projections is None:
            from pmetal.generation.fused import FusedProjections

            fuse_projections = self.compile_decode and self.device.type == "cuda" \
                and FusedProjections.size_bytes(model) <= FUSE_LIMIT_BYTES
        self.fuse_projections = fuse_projections
        self._fused = None
        self._compiled: dict[int, object] = {}
        self.compile_error: str | None = None  # why the rounds run uncompiled, if they do
        self.sync_every = max(1, sync_every)
        self._family: tuple[DecodeSpec, dict[int, Workspace], object] | None = None
        self._pool = None
        self.last_stats: dict[str, float] = {}
        self.capture_error: str | None = None  # why the rounds run eagerly on CUDA, if they do

    # ------------------------------------------------------------------ public entry point
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], config: SamplingConfig, *, stop_ids: Sequence[int],
                 pad_token_id: int, num_return_sequences: int = 1, generator: torch.Generator | None = None,
                 prefill_inputs: dict | None = None, on_tokens=None) -> Generation:
        """Sample ``num_return_sequences`` completions per prompt (the arguments of :func:`generate`).

        ``prefill_inputs`` (``pixel_values``, ``image_grid_thw``, ...) go to the prompt forward only,
        with a VLM's multimodal positions (see :func:`pmetal.generation.prefill.prefill`); decoding continues after them.
        """
        from pmetal.generation.sampling import generate_reference

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if not engine_supports(self.model) or (self.draft_model is not None and not engine_supports(self.draft_model)):
            return self._reference(generate_reference, prompts, config, stop_ids, pad_token_id,
                                   num_return_sequences, generator, prefill_inputs, on_tokens)
        prefill = prefill_prompts(self.model, prompts, pad_token_id, num_return_sequences, prefill_inputs, self.device)
        if prefill is None:
            return self._reference(generate_reference, prompts, config, stop_ids, pad_token_id,
                                   num_return_sequences, generator, prefill_inputs, on_tokens)
        draft_prefill = None
        if self.draft_model is not None:
            draft_prefill = prefill_prompts(self.draft_model, prompts, pad_token_id, num_return_sequences, None, self.device)
            if draft_prefill is None:
                raise ValueError("the draft model's prompt cache has no per-layer tensors: it cannot draft")
        return self._decode(prefill, draft_prefill, config, stop_ids, pad_token_id, num_return_sequences, generator,
                            on_tokens)

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the rollout engine's model has been freed")
        return model

    def fused(self, model):
        """The fused projections used in ``model``'s rounds (None: its own modules)."""
        if not self.fuse_projections or model is not self.model:
            return None
        if self._fused is None:
            from pmetal.generation.fused import FusedProjections

            self._fused = FusedProjections(model)
        return self._fused if len(self._fused) else None

    def compiled_forward(self, model):
        """The compiled decode forward for ``model`` (None: run it uncompiled)."""
        from pmetal.generation.round import model_logits

        return self.compiled(model_logits, key=id(model))

    def compiled(self, fn, key=None):
        """``fn`` through ``torch.compile`` (None where the engine does not compile, or compiling failed)."""
        if not self.compile_decode or self.compile_error is not None:
            return None
        key = (fn, key)
        if key not in self._compiled:
            # rounding as the eager kernels round (bf16 between ops), so sampling sees the training numerics
            compiled = torch.compile(fn, options={"emulate_precision_casts": True})

            def guarded(*args):
                try:
                    return compiled(*args)
                except Exception as exc:  # noqa: BLE001 - any compile failure means: run it uncompiled
                    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                        raise  # a capture in progress cannot be resumed eagerly; _capture falls back
                    self.compile_error = f"{type(exc).__name__}: {exc}"
                    log.warning("rollout engine: torch.compile of the decode round failed (%s); "
                                "running it uncompiled", self.compile_error.splitlines()[0][:300])
                    return fn(*args)

            self._compiled[key] = guarded
        return self._compiled[key]

    def _reference(self, fn, prompts, config, stop_ids, pad_token_id, group, generator, prefill_inputs, on_tokens):
        self.last_stats = {}
        return fn(self.model, prompts, config, stop_ids=stop_ids, pad_token_id=pad_token_id,
                  num_return_sequences=group, generator=generator, prefill_inputs=prefill_inputs, on_tokens=on_tokens)

    # ------------------------------------------------------------------ decode side
    def _family_for(self, spec: DecodeSpec, prefill, draft_prefill, config, generator, pad_token_id):
        """The buckets and the round of ``spec``, kept while the shapes stay (graphs survive calls)."""
        from pmetal.generation.round import Round

        if self._family is not None and self._family[0] == spec:
            return self._family[1], self._family[2]
        self._family = None  # free the previous family's buffers before allocating
        shapes = lambda pre: [(k.shape[1], k.shape[3], v.shape[3], k.dtype) for k, v in pre["layers"]] if pre else None  # noqa: E731
        self._shapes = (shapes(prefill), shapes(draft_prefill))
        self.vocab_size = prefill["logits"].shape[-1]
        spaces: dict[int, Workspace] = {}
        step = Round(self, spec, config, generator, pad_token_id)
        self._family = (spec, spaces, step)
        return spaces, step

    def _workspace(self, spaces, spec, rows) -> Workspace:
        if rows not in spaces:
            spaces[rows] = Workspace(rows, spec, *self._shapes, self.device)
        return spaces[rows]

    def _spec(self, config, stop, max_new, width, rows, generator) -> DecodeSpec:
        k = self.num_draft_tokens
        # speculation leaves holes (rejected drafts): slack so the cache is defragmented rarely
        need = width + max_new + (max(4 * (k + 1), max_new // 2) if k else 0)
        capacity = -(-need // CAPACITY_STEP) * CAPACITY_STEP
        sampling = (config.temperature, config.top_k, config.top_p, config.min_p, tuple(config.suppress_ids))
        # Reuse a family that is big enough, so no new graph is captured per prompt width. Only where
        # graphs are captured: eagerly the shapes then follow each call alone, so a call's numbers do
        # not depend on the calls before it (a resumed run samples bit for bit what the first did).
        if self._family is not None and self.cuda_graphs:
            old = self._family[0]
            same = (sampling, stop, rows, k, max_new, id(generator) if generator is not None else 0)
            if (old.sampling, old.stop, old.num_rows, old.draft_tokens, old.max_new_tokens, old.generator) == same \
                    and old.prompt_width >= width and old.capacity <= 2 * capacity:
                return old
        return DecodeSpec(sampling, stop, max_new, width, capacity, rows, k, id(generator) if generator is not None else 0)

    def _decode(self, prefill, draft_prefill, config, stop_ids, pad_token_id, group, generator,
                on_tokens=None) -> Generation:
        rows, width = prefill["ids"].shape[0], prefill["width"]
        stop = tuple(sorted(set(int(s) for s in stop_ids)))
        spec = self._spec(config, stop, config.max_new_tokens, width, rows, generator)
        spaces, step = self._family_for(spec, prefill, draft_prefill, config, generator, pad_token_id)
        ws = self._workspace(spaces, spec, rows)
        tokens, logps = step.tokens, step.logps
        offset = spec.prompt_width - width  # prompts narrower than the family's width sit right-aligned
        fused = self.fused(self.model)
        if fused is not None:
            fused.refresh()  # the live weights, after whatever optimizer step came before this rollout
        self._load(ws, prefill, draft_prefill, offset, step)
        rounds = 0
        # a streaming caller reads every round, so its tokens arrive one round at a time
        sync_every, streamed = (1 if on_tokens is not None else self.sync_every), [0] * rows
        while rounds < spec.max_new_tokens - 1:
            if rounds % sync_every == 0:
                if on_tokens is not None:
                    streamed = _stream(on_tokens, tokens, step.final_lengths[:rows], streamed)
                live = int((~ws.state["finished"]).sum())
                if live == 0:
                    break
                target = 1 << max(0, (live - 1).bit_length())
                if target <= ws.rows // 2:
                    ws = ws.compact_into(self._workspace(spaces, spec, target))
            if ws.col_host + spec.draft_tokens + 1 > spec.capacity:
                ws.defragment()
            self._run(ws, step)
            rounds += 1
        if on_tokens is not None:
            _stream(on_tokens, tokens, step.final_lengths[:rows], streamed)
        self.last_stats = step.stats(rounds)
        lengths, stopped = step.final_lengths[:rows], step.final_stopped[:rows]
        longest = max(1, int(lengths.max()))
        keep = torch.arange(longest, device=self.device)[None, :] < lengths[:, None]
        return Generation(
            prompt_ids=prefill["ids"], prompt_mask=prefill["mask"],
            completion_ids=torch.where(keep, tokens[:rows, :longest], pad_token_id),
            completion_mask=keep.long(), logps=torch.where(keep, logps[:rows, :longest], 0.0), stopped=stopped,
        )

    def _load(self, ws: Workspace, prefill, draft_prefill, offset: int, step) -> None:
        """Prompt KV into the top bucket's cache, the per-row state reset, the first token sampled."""
        width, rows = prefill["width"], ws.rows
        group = prefill["group"]
        for cache, pre in ((ws.cache, prefill), (ws.draft_cache, draft_prefill)):
            if cache is None:
                continue
            for (k, v), kbuf, vbuf in zip(pre["layers"], cache.keys, cache.values):
                kbuf[:, :, offset: offset + width].copy_(k.repeat_interleave(group, dim=0))
                vbuf[:, :, offset: offset + width].copy_(v.repeat_interleave(group, dim=0))
        s = ws.state
        s["valid"].zero_()
        s["valid"][:, offset: offset + width] = prefill["mask"].bool()
        s["seq"].fill_(-1)
        s["seq"][:, offset: offset + width] = torch.where(prefill["mask"].bool(), prefill["ids"], -1)
        s["pos"].copy_(prefill["start"] - 1)  # the position of the last prompt token: the first emission adds 1
        s["gen_len"].zero_()
        s["finished"].zero_()
        s["stopped"].zero_()
        s["row_ids"].copy_(torch.arange(rows, device=self.device))
        base = offset + width
        ws.col.fill_(base)
        ws.col_host = base
        ws.cache.seen = base
        step.first_token(ws, prefill["logits"])

    def _run(self, ws: Workspace, step) -> None:
        if self.cuda_graphs and ws.graph is None:
            ws.graph = self._capture(ws, step)
        if self.cuda_graphs and ws.graph is not False:
            step.kv_limit = None
            ws.graph.replay()
        else:  # eager: attend to the columns written so far only (compiled: the whole capacity, one shape)
            step.kv_limit = None if self.compiled_forward(self.model) else ws.col_host + step.width
            step(ws)
        ws.col_host += step.width
        ws.cache.seen = ws.col_host

    def _capture(self, ws: Workspace, step):
        """Capture ``step(ws)`` into a CUDA graph; False (eager from then on) if the model cannot be captured."""
        step.kv_limit = None  # a captured round attends over the whole capacity
        snapshot = {name: t.clone() for name, t in ws.state.items()}
        col = ws.col.clone()
        extra = step.snapshot()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step(ws)  # warm-up: lazy initialisations happen outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if step.generator is not None and hasattr(graph, "register_generator_state"):
                graph.register_generator_state(step.generator)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                step(ws)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            self.capture_error = f"{type(exc).__name__}: {exc}"
            log.warning("rollout engine: CUDA graph capture failed (%s); decoding eagerly", self.capture_error)
            graph = False
            self._pool = None  # a pool a failed capture touched is never shared again
            release_failed_capture(self.device, step.generator)
        for name, t in ws.state.items():
            t.copy_(snapshot[name])
        ws.col.copy_(col)
        step.restore(extra)
        return graph


def release_failed_capture(device: torch.device, generator: torch.Generator | None = None) -> None:
    """Leave no generator marked as capturing after a failed CUDA graph capture: one whose end raised
    (an allocator assert in ``capture_end``) skips the generators' epilogue, and every later random
    draw fails ("Offset increment outside graph capture"). A cloned state keeps seed and offset."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    for gen in (torch.cuda.default_generators[index], generator):
        if gen is not None and hasattr(gen, "graphsafe_set_state"):
            gen.graphsafe_set_state(gen.clone_state())


def _stream(on_tokens, tokens: torch.Tensor, lengths: torch.Tensor, streamed: list[int]) -> list[int]:
    """Hand ``on_tokens`` each row's tokens written since the last call; returns the lengths handed so far."""
    now = lengths.tolist()
    if now != streamed:
        block = tokens[: len(now), min(streamed): max(now)].tolist()
        on_tokens([row[a - min(streamed): b - min(streamed)] for row, a, b in zip(block, streamed, now)])
    return now


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(model, **options) -> RolloutEngine:
    """The engine kept for ``model`` with these options (its buffers and graphs survive between calls)."""
    key = tuple(sorted((k, id(v) if k == "draft_model" else v) for k, v in options.items()))
    engines = _ENGINES.setdefault(model, {})
    if key not in engines:
        engines.clear()  # one engine per model: a new option set frees the old buffers
        engine = RolloutEngine(model, **options)
        engine._owner = None  # the cache is keyed weakly on the model: a strong reference here would pin it
        engines[key] = engine
    return engines[key]


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    *,
    stop_ids: Sequence[int],
    pad_token_id: int,
    num_return_sequences: int = 1,
    generator: torch.Generator | None = None,
    prefill_inputs: dict | None = None,
    speculative: bool = False,
    draft_model=None,
    num_draft_tokens: int = 4,
    compile_decode: bool | None = None,
    engine=None,
    on_tokens=None,
) -> Generation:
    """Sample ``num_return_sequences`` completions for each prompt with the rollout engine.

    The arguments of :func:`generate_reference`, plus:

    Args:
        prefill_inputs: extra inputs of the prompt forward only (``pixel_values``,
            ``image_grid_thw``, ...: a VLM's images), never of the decode steps.
        speculative: draft ``num_draft_tokens`` tokens per round and verify them in one policy
            forward (exact speculative sampling; the completions' distribution is unchanged).
        draft_model: the drafting model (same tokenizer); None drafts from prompt n-grams.
        num_draft_tokens: K, tokens drafted per round.
        compile_decode: compile the engine's round (None: on CUDA); a one-shot or interactive
            caller passes False, since the compilation would cost more than it saves.
        engine: a :class:`pmetal.generation.engine.RolloutEngine` to use; by default one kept
            per model and options (its buffers and CUDA graphs are reused between calls).
        on_tokens: streaming: called on the host with one list per completion row (prompt-major),
            the token ids that row emitted since the previous call (stop token included, empty for
            a row with none new); the lists concatenate to the rows' completions. With it the
            engine reads the device every round, so a single row streams token by token.

    A VLM's prompts (``prefill_inputs``) go through the engine like text: its prefill carries the
    images and computes the multimodal positions (``pmetal.vlm.prefill_positions``, Qwen-VL's
    M-RoPE) that :func:`generate_reference` and the policy update use, and decoding continues from
    them. Only models the engine cannot serve (sliding-window or hybrid caches, a prompt cache
    without per-layer tensors) are sampled by :func:`generate_reference`, images included.
    """
    if engine is None:
        engine = engine_for(model, speculative=speculative, draft_model=draft_model, num_draft_tokens=num_draft_tokens,
                            compile_decode=compile_decode)
    return engine.generate(prompts, config, stop_ids=stop_ids, pad_token_id=pad_token_id,
                           num_return_sequences=num_return_sequences, generator=generator,
                           prefill_inputs=prefill_inputs, on_tokens=on_tokens)
