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
per-token version cannot, since the gradient of each token is only known in backward. On CUDA
(with Triton) the per-chunk math after the matmul is `torch.compile`d into fused kernels, which reads
the logits a couple of times instead of ~10 eager passes (`PMETAL_COMPILED_CE=0` turns it off, `=1`
forces it elsewhere); on CPU and MPS it runs eagerly, in place on one fp32 copy of the chunk.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from pmetal.tokens import IGNORE_INDEX

# Elements of fp32 logits per chunk (2**25 = 128 MiB); the few [chunk, vocab] temporaries of one
# chunk stay under ~1 GiB while the matmuls stay large enough to run at full speed.
DEFAULT_CHUNK_ELEMENTS = 2**25


def auto_chunk_size(vocab_size: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk of fp32 logits holds about `chunk_elements` numbers."""
    return max(8, (chunk_elements // max(vocab_size, 1)) // 8 * 8)


def _compiled_pointwise_wanted(device: torch.device) -> bool:
    """Use the torch.compile'd per-chunk math? Default: on CUDA with Triton; PMETAL_COMPILED_CE=0/1 forces."""
    forced = os.environ.get("PMETAL_COMPILED_CE")
    if forced is not None:
        return forced == "1"
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def _pointwise(logits, targets, token_grad, temperature: float, softcap: float | None, need_grad: bool):
    """The per-chunk math after the matmul, written out-of-place so torch.compile fuses it into a
    couple of passes over the logits (eager, it would allocate several [n, V] temporaries).

    logits [n, V] (compute dtype), targets [n], token_grad [n] -> (log p [n], lse [n], dl [n, V] in
    the compute dtype or None), all math in fp32 (fp64 for fp64 logits).
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        tanh = torch.tanh(z / softcap)
        z = tanh * softcap
    z = z / temperature
    lse = torch.logsumexp(z, dim=1)  # [n]
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, 0)
    logp = torch.where(valid, z.gather(1, safe_targets.unsqueeze(1)).squeeze(1) - lse, 0.0)
    if not need_grad:
        return logp, lse, None
    g = torch.where(valid, token_grad.to(z.dtype), 0.0).unsqueeze(1)  # [n, 1]
    onehot = torch.arange(z.shape[1], device=z.device).unsqueeze(0) == safe_targets.unsqueeze(1)
    grad = (onehot.to(z.dtype) - torch.exp(z - lse.unsqueeze(1))) * g / temperature
    if softcap is not None:
        grad = grad * (1.0 - tanh * tanh)
    return logp, lse, grad.to(logits.dtype)


_COMPILED: dict = {}


def _compiled_pointwise():
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_pointwise, dynamic=True)
    return _COMPILED["fn"]


def _eager_pointwise(logits, targets, token_grad, temperature: float, softcap: float | None, need_grad: bool):
    """Same contract as `_pointwise`, in place on one fp32 copy of the logits (least memory eager)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 stays fp64)
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(z.div_(softcap))
        z = tanh * softcap
    if temperature != 1.0:
        z.div_(temperature)
    lse = torch.logsumexp(z, dim=1)  # [n]
    valid = targets != IGNORE_INDEX
    logp = torch.where(valid, z.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1) - lse, 0.0)
    if not need_grad:
        return logp, lse, None
    # d/dz = g * (onehot - softmax); ignored tokens have g = 0.
    g = torch.where(valid, token_grad.to(z.dtype), 0.0)
    grad = z.sub_(lse.unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))  # [n, V]
    grad.scatter_add_(1, targets.clamp_min(0).unsqueeze(1), g.unsqueeze(1))
    if softcap is not None:
        grad.mul_(1.0 - tanh * tanh)
    if temperature != 1.0:
        grad.div_(temperature)
    return logp, lse, grad


def _chunk(hidden, weight, bias, targets, token_grad, temperature, softcap, need_grad):
    """One chunk: logits = hidden @ weight^T (+ bias) in the compute dtype of `weight`, then the
    log-softmax math (and, if `need_grad`, the gradient of sum_i g_i log p(y_i) w.r.t. the logits)."""
    logits = hidden.to(weight.dtype) @ weight.t()  # [n, V]
    if bias is not None:
        logits = logits + bias.to(weight.dtype)
    if token_grad is None:
        token_grad = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    if _compiled_pointwise_wanted(logits.device) and logits.dtype != torch.float64 and "failed" not in _COMPILED:
        try:
            return _compiled_pointwise()(logits, targets, token_grad, temperature, softcap, need_grad)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # a compiler problem must not stop training: fall back to eager
            _COMPILED["failed"] = True
            logging.getLogger("pmetal").warning("compiled chunked cross-entropy failed (%s); running it eagerly", error)
    return _eager_pointwise(logits, targets, token_grad, temperature, softcap, need_grad)


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
        grad_bias.add_(grad_logits.sum(0, dtype=grad_bias.dtype))


def _acc(tensor):
    """Accumulator dtype: fp32, or fp64 for fp64 tensors (gradcheck)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _check(hidden, weight, targets):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected targets [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")


class _ChunkedLinearLogps(torch.autograd.Function):
    """token log-probs [N]; forward keeps no logits, backward recomputes them chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, chunk_size, compute_dtype):
        ctx.settings = (temperature, softcap, chunk_size, compute_dtype)
        w = weight.to(compute_dtype)
        token_logps = hidden.new_zeros(hidden.shape[0], dtype=_acc(w))  # [N]
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                token_logps[sl] = _chunk(hidden[sl], w, bias, targets[sl], None, temperature, softcap, False)[0]
        ctx.save_for_backward(hidden, weight, bias, targets)
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):
        hidden, weight, bias, targets = ctx.saved_tensors
        temperature, softcap, chunk_size, compute_dtype = ctx.settings
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        grads = _new_grads(hidden, weight, bias, needs_h, needs_w, needs_b)
        w = weight.to(compute_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                g = grad_token_logps[sl]
                dl = _chunk(hidden[sl], w, bias, targets[sl], g, temperature, softcap, True)[2]
                _accumulate_grads(dl, hidden[sl], w, *grads, sl)
        return (*_final_grads(grads, weight, bias), None, None, None, None, None)


def _new_grads(hidden, weight, bias, needs_h, needs_w, needs_b):
    """Gradient buffers: hidden's in its dtype, the head's as fp32 accumulators (None if not needed)."""
    return (
        torch.empty_like(hidden) if needs_h else None,
        torch.zeros(weight.shape, dtype=_acc(weight), device=weight.device) if needs_w else None,
        torch.zeros(bias.shape, dtype=_acc(bias), device=bias.device) if needs_b else None,
    )


def _final_grads(grads, weight, bias):
    grad_hidden, grad_weight, grad_bias = grads
    return (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """-scale * sum of token log-probs; the gradients are computed in forward (no logits recompute)
    and only scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, temperature, softcap, chunk_size, compute_dtype, want_grads):
        needs = (
            want_grads and hidden.requires_grad,
            want_grads and weight.requires_grad,
            want_grads and bias is not None and bias.requires_grad,
        )
        grads = _new_grads(hidden, weight, bias, *needs)
        w = weight.to(compute_dtype)
        total = hidden.new_zeros((), dtype=_acc(w))
        # loss = -scale * sum_i log p(y_i): every token's log-prob gets the gradient -scale.
        token_grad = torch.full(targets.shape, -scale, dtype=_acc(w), device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                logp, _, dl = _chunk(hidden[sl], w, bias, targets[sl], token_grad[sl], temperature, softcap, any(needs))
                total -= logp.sum()
                if dl is not None:
                    _accumulate_grads(dl, hidden[sl], w, *grads, sl)
        ctx.save_for_backward(*_final_grads(grads, weight, bias))
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
