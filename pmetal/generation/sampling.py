"""Batched, KV-cached sampling for rollouts, returning the sampling-time log-probs.

:func:`generate` runs the rollout engine (``pmetal.generation.engine``: static cache, fixed-shape
rounds, CUDA graphs, optional speculation). :func:`generate_reference` is the plain loop it
replaces, kept as the engine's fallback and as the independent reference its tests compare with:
a small loop over a Hugging Face causal LM (``model(input_ids, past_key_values=DynamicCache)``)
rather than ``generate``: the rollout needs, for every chosen token, exactly the log-probability
training will compute for it, ``log_softmax(logits / temperature)[token]``, and per-sequence
stopping with the stop token kept in the completion mask.

Departures from ``transformers.generate``: none in the distribution sampled from (temperature,
then top-k, top-p, min-p, as HF orders its warpers), except ``suppress_ids``, never sampled (a
VLM's image placeholders). The *recorded* log-prob is taken before the suppression and the
top-k/top-p/min-p truncation, i.e. under the full tempered distribution, because that is the
policy the loss differentiates (TRL records the same). Each prompt is prefilled once and its
KV cache repeated for its ``num_return_sequences`` samples.

Works on CPU, CUDA and MPS: plain tensor ops, float32 for the sampling maths whatever the model
dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pmetal.generation.hf_internals import forward_kwargs, new_prompt_cache
from pmetal.tokens import END_OF_TURN_TOKENS



@dataclass
class SamplingConfig:
    """How completions are sampled.

    Args:
        max_new_tokens: the most tokens generated per completion.
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p (1 = off).
        top_k: keep only the k most likely tokens (0 = off).
        min_p: drop tokens less likely than ``min_p`` times the most likely one (0 = off).
        suppress_ids: token ids never sampled (greedy included), such as a VLM's image placeholders,
            which a completion must not contain; like top-k, it does not change the recorded log-probs.
    """

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    suppress_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"top_k must be >= 0 and min_p in [0, 1), got {self.top_k}, {self.min_p}")
        self.suppress_ids = tuple(int(i) for i in self.suppress_ids)


@dataclass
class Generation:
    """The result of :func:`generate` (``N`` = prompts x ``num_return_sequences``, prompt-major)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, L] right-padded with the pad id
    completion_mask: torch.Tensor  # [N, L] 1 on generated tokens up to and including the stop token
    logps: torch.Tensor  # [N, L] float32 log-prob of each chosen token at sampling time (0 on padding)
    stopped: torch.Tensor  # [N] bool: ended on a stop token (False: cut at max_new_tokens)

    @property
    def lengths(self) -> torch.Tensor:  # [N]
        return self.completion_mask.sum(dim=1)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS ids of the tokenizer and the model's generation config, plus the `END_OF_TURN_TOKENS` in the vocabulary."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update(int(i) for i in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        ids.discard(int(tokenizer.pad_token_id))  # a pad token is never a reason to stop
    return sorted(ids)


def suppressed(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """``[..., V]`` logits with ``config.suppress_ids`` set to ``-inf`` (a copy; the input as it is without any).

    One id at a time by plain indexing: no index tensor is copied to the device, so a CUDA graph
    can capture it. Ids beyond the vocabulary (a draft model's smaller head) are skipped."""
    ids = [i for i in config.suppress_ids if i < logits.shape[-1]]
    if not ids:
        return logits
    logits = logits.clone()
    for i in ids:
        logits[..., i] = float("-inf")
    return logits


def process_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """``[N, V]`` float logits -> tempered logits with truncated tokens set to ``-inf``."""
    logits = suppressed(logits, config) / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [N, V]
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens more likely than it already reach top_p (keeps at least 1)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if config.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        threshold = config.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, ...]:
    """``(ids, mask, position_ids)``, each ``[P, W]``: prompts left-padded, positions ``0..len-1`` per prompt."""
    num_prompts, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((num_prompts, width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((num_prompts, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        mask[i, width - len(p):] = 1
    return ids, mask, (mask.cumsum(dim=1) - 1).clamp(min=0)


def prompt_forward(model, prompts: Sequence[Sequence[int]], pad_token_id: int, device, prefill_inputs=None):
    """The prompts' forward into a fresh ``DynamicCache``: ``(ids, mask, last_position, output, cache)``.

    Prompts are left-padded with positions ``0..len-1``; with ``prefill_inputs`` (a VLM's images)
    the positions are :func:`pmetal.vlm.prefill_positions`' (Qwen-VL's 3-D M-RoPE ids), and
    ``last_position [P]`` is each prompt's largest position, after which decoding continues (the
    positions the update's forward gives the completion). Only the last position's logits are
    computed where the model allows it. Shared by the reference loop and the engine's prefill.
    """
    ids, mask, position_ids = left_pad(prompts, pad_token_id, device)
    cache_kw, has_keep = forward_kwargs(model)
    cache = new_prompt_cache()
    extra = {"logits_to_keep": 1} if has_keep else {}
    positions, last = position_ids, position_ids[:, -1]
    if prefill_inputs:
        from pmetal.vlm import forward_inputs, prefill_positions

        positions, last = prefill_positions(model, ids, mask, position_ids, prefill_inputs)
        extra = {**extra, **forward_inputs(model, ids, prefill_inputs)}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_kw: cache}, **extra)
    return ids, mask, last, out, cache


def sampling_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """``[..., V]`` float logits -> the sampling distribution (one-hot of the argmax when greedy)."""
    if config.temperature == 0.0:
        return torch.nn.functional.one_hot(suppressed(logits, config).argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    shape = logits.shape
    return process_logits(logits.reshape(-1, shape[-1]), config).softmax(dim=-1).view(shape)


def race(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from unnormalized ``[..., V]`` weights: ``argmax(w / E)`` with ``E ~ Exp(1)``.

    The exponential race: ``P(argmax = i) = w_i / sum(w)`` exactly, with no host-side
    ``multinomial``, so it runs inside a CUDA graph."""
    u = torch.rand(weights.shape, device=weights.device, dtype=torch.float32, generator=generator)
    return (weights / -torch.log(u.clamp_min(1e-30))).argmax(dim=-1)


@torch.no_grad()
def generate_reference(
    model,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    *,
    stop_ids: Sequence[int],
    pad_token_id: int,
    num_return_sequences: int = 1,
    generator: torch.Generator | None = None,
    prefill_inputs: dict | None = None,
    on_tokens=None,
) -> Generation:
    """Sample ``num_return_sequences`` completions for each prompt, batched, with a KV cache.

    The model is used as it is (call ``model.eval()`` first for deterministic layers); gradients
    are off. Prompts are token-id lists of any lengths; they are left-padded with explicit
    position ids, so a prompt gets the same positions alone or in a batch.

    Args:
        model: a Hugging Face causal LM (PEFT-wrapped or not).
        prompts: one token-id list per prompt.
        config: the sampling settings.
        stop_ids: token ids that end a completion (kept in it, with mask 1).
        pad_token_id: the id written after a completion ends.
        num_return_sequences: completions per prompt (GRPO's group size ``G``).
        generator: a ``torch.Generator`` on the model's device, for reproducible sampling.
        prefill_inputs: extra inputs of the prefill forward only, one batch row per prompt: a VLM's
            image tensors (``pmetal.vlm``); the KV cache then carries them to the decoding steps.
        on_tokens: streaming: called after every step with one list per completion row, the
            token that row emitted (``[]`` for a finished row); they concatenate to the completions.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    cache_kw, _ = forward_kwargs(model)
    prompt_ids, prompt_mask, last_position, out, cache = prompt_forward(model, prompts, pad_token_id, device,
                                                                        prefill_inputs)
    last_logits = out.logits[:, -1, :].float()  # [P, V]
    if num_return_sequences > 1:
        cache.batch_repeat_interleave(num_return_sequences)
        last_logits = last_logits.repeat_interleave(num_return_sequences, dim=0)
        prompt_ids = prompt_ids.repeat_interleave(num_return_sequences, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(num_return_sequences, dim=0)
        last_position = last_position.repeat_interleave(num_return_sequences, dim=0)
    n = prompt_ids.shape[0]

    stop = torch.as_tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    greedy = config.temperature == 0.0
    attention_mask = prompt_mask
    next_position = last_position + 1  # [N]
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    tokens, logps, masks = [], [], []
    for step in range(config.max_new_tokens):
        full_logp = torch.log_softmax(last_logits / (1.0 if greedy else config.temperature), dim=-1)  # [N, V]
        if greedy:
            token = suppressed(last_logits, config).argmax(dim=-1)  # [N]
        else:
            probs = process_logits(last_logits, config).softmax(dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [N]
        active = ~finished
        token = torch.where(active, token, torch.full_like(token, pad_token_id))
        tokens.append(token)
        masks.append(active.long())
        logps.append(torch.where(active, full_logp.gather(1, token[:, None]).squeeze(1), torch.zeros_like(token, dtype=full_logp.dtype)))
        if on_tokens is not None:
            on_tokens([[t] if a else [] for t, a in zip(token.tolist(), active.tolist())])
        hit_stop = active & torch.isin(token, stop)
        stopped |= hit_stop
        finished |= hit_stop
        if bool(finished.all()) or step == config.max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, active.long()[:, None]], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position[:, None],
                    use_cache=True, **{cache_kw: cache})
        last_logits = out.logits[:, -1, :].float()
        next_position = next_position + 1

    return Generation(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=torch.stack(tokens, dim=1),
        completion_mask=torch.stack(masks, dim=1),
        logps=torch.stack(logps, dim=1),
        stopped=stopped,
    )
