"""Chunked linear cross-entropy: token log-probs through an LM head without full-vocabulary logits.

The LM head and the log-softmax are computed over chunks of tokens inside custom autograd functions,
so the `[tokens, vocab]` logits never exist at once: forward keeps one logsumexp per token, backward
recomputes one chunk of logits at a time and produces the gradients of the hidden states and, if they
require it, of the head weight and bias. This is the memory trick of Liger's fused linear
cross-entropy (Hsu et al., 2024, "Liger Kernel", sec. 3.3) and of Apple's Cut Cross-Entropy
(Wijmans et al., 2024), written in plain PyTorch so it runs on MPS, CPU and CUDA.

Per token i with hidden state h_i [H], head weight W [V, H], bias b [V], target y_i:

    l_i = h_i W^T + b                       (logits, [V])
    z_i = c * tanh(l_i / c) / T             (final-logit softcapping c (Gemma 2) if set, then 1/T)
    log p(y_i) = z_i[y_i] - logsumexp(z_i)

    d log p(y_i) / d z_i = onehot(y_i) - softmax(z_i)
    d z_i / d l_i = (1 - tanh^2(l_i / c)) / T     (1 / T without softcapping)

Departures from the references: the matmul runs in the weight's dtype (bf16 tensor cores on GPU) but
everything after it (softcapping, logsumexp, softmax, the gradient of the logits) is in fp32 inside
each chunk, whatever the input dtype; the head-weight gradient is accumulated across chunks in fp32.
`chunked_linear_cross_entropy` (the scalar SFT loss) computes its gradients during the forward pass,
as Liger does, which saves the recompute of the logits (one `[tokens, vocab, hidden]` matmul); the
per-token version cannot, since the gradient of each token is only known in backward.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
# Elements of fp32 logits per chunk (2**25 = 128 MiB); the few [chunk, vocab] temporaries of one
# chunk stay under ~1 GiB while the matmuls stay large enough to run at full speed.
DEFAULT_CHUNK_ELEMENTS = 2**25


def auto_chunk_size(vocab_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk of fp32 logits holds about `chunk_elements` numbers."""
    return max(8, (chunk_elements // max(vocab_size, 1)) // 8 * 8)


def _chunk_logits(hidden, weight, bias, temperature: float, softcap: float | None):
    """fp32 logits of one chunk: z [n, V] and tanh(l / c) [n, V] (None without softcapping).

    `weight` is already in the compute dtype; the matmul runs in it, the rest in fp32.
    """
    logits = hidden.to(weight.dtype) @ weight.t()  # [n, V]
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 stays fp64)
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(logits.div_(softcap))
        logits = tanh * softcap
    if temperature != 1.0:
        logits.div_(temperature)
    return logits, tanh


def _logits_grad(z, tanh, targets, valid, token_grad, lse, temperature: float, softcap: float | None):
    """Gradient of sum_i g_i log p(y_i) w.r.t. the raw logits l of one chunk, in place on z.

    z [n, V] fp32 (overwritten), targets/valid/token_grad/lse [n]. Returns dl [n, V] fp32.
    """
    # d/dz = g * (onehot - softmax) ; ignored tokens have g = 0.
    g = torch.where(valid, token_grad.to(z.dtype), 0.0)
    grad = z.sub_(lse.unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))  # [n, V]
    grad.scatter_add_(1, targets.clamp_min(0).unsqueeze(1), g.unsqueeze(1))
    if softcap is not None:
        grad.mul_(1.0 - tanh * tanh)
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


def _accumulate_grads(grad_logits, h, weight, grad_hidden, grad_weight, grad_bias, sl):
    """Push one chunk's logit gradient dl [n, V] to hidden, weight and bias gradients.

    `weight` is in the compute dtype; `grad_weight` and `grad_bias` are fp32 accumulators.
    """
    dl = grad_logits.to(weight.dtype)
    if grad_hidden is not None:
        grad_hidden[sl] = (dl @ weight).to(grad_hidden.dtype)  # [n, H]
    if grad_weight is not None:
        grad_weight.add_(dl.t() @ h.to(weight.dtype))  # [V, H], fp32 accumulator
    if grad_bias is not None:
        grad_bias.add_(grad_logits.sum(0))


def _acc(tensor):
    """Accumulator dtype: fp32, or fp64 for fp64 tensors (gradcheck)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _check(hidden, weight, targets):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")


class _ChunkedLinearLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, chunk_size, compute_dtype):
        ctx.settings = (temperature, softcap, chunk_size, compute_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            token_logps, lse = _logps_forward(hidden, weight.to(compute_dtype), bias, targets, *ctx.settings[:3])
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        temperature, softcap, chunk_size, compute_dtype = ctx.settings
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if needs_h else None
        grad_weight = torch.zeros(weight.shape, dtype=_acc(weight), device=weight.device) if needs_w else None
        grad_bias = torch.zeros(bias.shape, dtype=_acc(bias), device=bias.device) if needs_b else None
        valid = targets != IGNORE_INDEX
        w = weight.to(compute_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                z, tanh = _chunk_logits(hidden[sl], w, bias, temperature, softcap)
                dl = _logits_grad(z, tanh, targets[sl], valid[sl], grad_token_logps[sl], lse[sl], temperature, softcap)
                _accumulate_grads(dl, hidden[sl], w, grad_hidden, grad_weight, grad_bias, sl)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if needs_w else None,
            grad_bias.to(bias.dtype) if needs_b else None,
            None,
            None,
            None,
            None,
            None,
        )


def _logps_forward(hidden, weight, bias, targets, temperature, softcap, chunk_size):
    """Token log-probs [N] and logsumexps [N] (fp32), one chunk of logits at a time."""
    n_tokens = hidden.shape[0]
    valid = targets != IGNORE_INDEX
    acc = torch.promote_types(weight.dtype, torch.float32)
    token_logps = hidden.new_zeros(n_tokens, dtype=acc)  # [N]
    lse = hidden.new_zeros(n_tokens, dtype=acc)  # [N]
    for start in range(0, n_tokens, chunk_size):
        sl = slice(start, start + chunk_size)
        z, _ = _chunk_logits(hidden[sl], weight, bias, temperature, softcap)
        lse[sl] = torch.logsumexp(z, dim=1)
        target_z = z.gather(1, targets[sl].clamp_min(0).unsqueeze(1)).squeeze(1)
        token_logps[sl] = torch.where(valid[sl], target_z - lse[sl], 0.0)
    return token_logps, lse


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, temperature, softcap, chunk_size, compute_dtype, want_grads):
        needs_h = want_grads and hidden.requires_grad
        needs_w = want_grads and weight.requires_grad
        needs_b = want_grads and bias is not None and bias.requires_grad
        valid = targets != IGNORE_INDEX
        grad_hidden = torch.empty_like(hidden) if needs_h else None
        grad_weight = torch.zeros(weight.shape, dtype=_acc(weight), device=weight.device) if needs_w else None
        grad_bias = torch.zeros(bias.shape, dtype=_acc(bias), device=bias.device) if needs_b else None
        acc = torch.promote_types(compute_dtype, torch.float32)
        total = hidden.new_zeros((), dtype=acc)
        # loss = -scale * sum_i log p(y_i), so each valid token's log-prob gets the gradient -scale.
        token_grad = torch.full(targets.shape, -scale, dtype=acc, device=hidden.device)
        w = weight.to(compute_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                z, tanh = _chunk_logits(hidden[sl], w, bias, temperature, softcap)
                lse = torch.logsumexp(z, dim=1)  # [n]
                target_z = z.gather(1, targets[sl].clamp_min(0).unsqueeze(1)).squeeze(1)
                total -= torch.where(valid[sl], target_z - lse, 0.0).sum()
                if needs_h or needs_w or needs_b:
                    dl = _logits_grad(z, tanh, targets[sl], valid[sl], token_grad[sl], lse, temperature, softcap)
                    _accumulate_grads(dl, hidden[sl], w, grad_hidden, grad_weight, grad_bias, sl)
        ctx.save_for_backward(
            grad_hidden,
            grad_weight.to(weight.dtype) if needs_w else None,
            grad_bias.to(bias.dtype) if needs_b else None,
        )
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None, None, None)


def compute_dtype_for(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype the LM head would use: autocast's if active, else the wider of the two."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _resolve(hidden, weight, targets, chunk_size):
    _check(hidden, weight, targets)
    return chunk_size or auto_chunk_size(weight.shape[0])


def chunked_linear_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token log p(target) through a linear LM head, chunk by chunk.

    Args:
        hidden: [N, H] final hidden states (any float dtype).
        weight: [V, H] LM-head weight.
        targets: [N] long target ids; `-100` = ignored (its log-prob is 0 and gets no gradient).
        bias: [V] optional LM-head bias.
        temperature: logits are divided by it (sampling temperature, as in GRPO).
        softcap: final-logit softcapping c (logits = c * tanh(logits / c)), applied before temperature.
        chunk_size: tokens per chunk; default from the vocabulary size (`auto_chunk_size`).

    Returns:
        [N] log-probs in fp32 (fp64 for fp64 inputs).
    """
    chunk = _resolve(hidden, weight, targets, chunk_size)
    dtype = compute_dtype_for(hidden, weight)
    return _ChunkedLinearLogps.apply(hidden, weight, bias, targets, float(temperature), softcap, chunk, dtype)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of a linear LM head over the tokens whose target is not -100, chunk by chunk.

    Same arguments as `chunked_linear_logps`; `reduction` is "mean" (over non-ignored tokens; 0 when
    there are none) or "sum". Returns a 0-d fp32 tensor. Gradients are computed in the forward pass
    (no logits recompute), so call `backward` on this loss at most once.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    chunk = _resolve(hidden, weight, targets, chunk_size)
    scale = 1.0
    if reduction == "mean":
        scale = 1.0 / max(int((targets != IGNORE_INDEX).sum()), 1)
    dtype = compute_dtype_for(hidden, weight)
    want_grads = torch.is_grad_enabled()
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, targets, scale, float(temperature), softcap, chunk, dtype, want_grads
    )


def reference_linear_logps(hidden, weight, targets, bias=None, *, temperature=1.0, softcap=None):
    """Unchunked reference (full logits in fp32); for tests and small inputs only. Returns [N] fp32."""
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits / temperature
    logps = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(targets != IGNORE_INDEX, logps, 0.0)
