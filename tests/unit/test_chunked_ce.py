"""Chunked linear cross-entropy (pmetal.losses.lm) against the unchunked computation."""

from __future__ import annotations

import math

import pytest
import torch

from pmetal.losses.lm import (
    auto_chunk_size,
    chunked_linear_cross_entropy,
    chunked_linear_logps,
    reference_linear_logps,
)


def _inputs(n, h, v, *, dtype=torch.float32, bias=False, weight_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / math.sqrt(h)).to(dtype)
    weight.requires_grad_(weight_grad)
    b = (torch.randn(v, generator=gen, dtype=torch.float64) * 0.1).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < 0.3] = -100
    return hidden, weight, b, targets


def _grads(value, tensors):
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(value, wanted, retain_graph=True))
    return [next(grads) if t is not None and t.requires_grad else None for t in tensors]


def test_hand_computed_uniform_logits():
    # W = 0 gives uniform logits: log p = -log V for every scored token, loss = log V.
    hidden = torch.randn(5, 4)
    weight = torch.zeros(7, 4)
    targets = torch.tensor([0, 3, -100, 6, 1])
    logps = chunked_linear_logps(hidden, weight, targets, chunk_size=2)
    assert torch.allclose(logps, torch.tensor([-math.log(7)] * 2 + [0.0] + [-math.log(7)] * 2))
    loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=2)
    assert loss.item() == pytest.approx(math.log(7), rel=1e-6)
    assert chunked_linear_cross_entropy(hidden, weight, targets, reduction="sum").item() == pytest.approx(
        4 * math.log(7), rel=1e-6
    )


def test_hand_computed_two_words():
    # Two words with logits (0, log 3): p = (1/4, 3/4).
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    logps = chunked_linear_logps(hidden, weight, torch.tensor([1]))
    assert logps.item() == pytest.approx(math.log(0.75), rel=1e-6)
    # With temperature 2 the logits are (0, log(3)/2): p1 = sqrt3 / (1 + sqrt3).
    logps_t = chunked_linear_logps(hidden, weight, torch.tensor([1]), temperature=2.0)
    assert logps_t.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), rel=1e-6)


@pytest.mark.parametrize(
    "n,h,v,chunk,bias,weight_grad,softcap,temperature",
    [
        (37, 16, 50, 8, False, True, None, 1.0),
        (64, 8, 33, 7, True, True, None, 0.7),
        (19, 12, 101, 32, False, False, None, 1.0),
        (50, 16, 64, 16, True, False, 3.0, 1.3),
    ],
)
def test_fp32_matches_unchunked(n, h, v, chunk, bias, weight_grad, softcap, temperature):
    hidden, weight, b, targets = _inputs(n, h, v, bias=bias, weight_grad=weight_grad)
    kwargs = dict(temperature=temperature, softcap=softcap)
    upstream = torch.randn(n)
    got = chunked_linear_logps(hidden, weight, targets, b, chunk_size=chunk, **kwargs)
    want = reference_linear_logps(hidden, weight, targets, b, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got[targets == -100] == 0).all()
    tensors = [hidden, weight, b]
    for g, w in zip(_grads((got * upstream).sum(), tensors), _grads((want * upstream).sum(), tensors)):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)

    loss = chunked_linear_cross_entropy(hidden, weight, targets, b, chunk_size=chunk, **kwargs)
    ref_loss = -want.sum() / (targets != -100).sum()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, w in zip(_grads(2.5 * loss, [hidden, weight, b]), _grads(2.5 * ref_loss, [hidden, weight, b])):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_bf16_inputs_close_to_fp32_reference(weight_grad):
    hidden, weight, _, targets = _inputs(48, 32, 80, dtype=torch.bfloat16, weight_grad=weight_grad)
    got = chunked_linear_logps(hidden, weight, targets, chunk_size=16)
    assert got.dtype == torch.float32  # the softmax math runs in fp32 even for bf16 inputs
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_(weight_grad)
    want = reference_linear_logps(h32, w32, targets)
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    upstream = torch.randn(48)
    grads = _grads((got * upstream).sum(), [hidden, weight])
    ref = _grads((want * upstream).sum(), [h32, w32])
    assert grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(grads[0].float(), ref[0], atol=3e-2, rtol=5e-2)
    if weight_grad:
        assert grads[1].dtype == torch.bfloat16
        torch.testing.assert_close(grads[1].float(), ref[1], atol=3e-2, rtol=5e-2)
    loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=16)
    torch.testing.assert_close(loss, -want.sum() / (targets != -100).sum(), atol=2e-2, rtol=1e-2)


def test_gradcheck_float64():
    hidden, weight, b, targets = _inputs(9, 5, 11, dtype=torch.float64, bias=True)
    for kwargs in (dict(), dict(temperature=0.6, softcap=2.0)):
        assert torch.autograd.gradcheck(
            lambda h, w, bb: chunked_linear_logps(h, w, targets, bb, chunk_size=4, **kwargs), (hidden, weight, b)
        )
        assert torch.autograd.gradcheck(
            lambda h, w, bb: chunked_linear_cross_entropy(h, w, targets, bb, chunk_size=4, **kwargs),
            (hidden, weight, b),
        )


def test_no_full_vocab_tensor_saved_for_backward():
    # The point of chunking: nothing of size [N, V] is kept between forward and backward.
    n, v = 64, 500
    hidden, weight, _, targets = _inputs(n, 8, v)
    saved_sizes = []

    def pack(t):
        saved_sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = chunked_linear_logps(hidden, weight, targets, chunk_size=16)
        loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=16)
    assert saved_sizes and max(saved_sizes) < n * v / 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full = reference_linear_logps(hidden, weight, targets)  # the unchunked one does keep [N, V]
    assert max(saved_sizes) >= n * v
    (logps.sum() + loss + full.sum()).backward()


def test_no_grad_and_empty_inputs():
    hidden, weight, _, targets = _inputs(10, 4, 9)
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(hidden, weight, targets)
    assert not loss.requires_grad
    empty = chunked_linear_cross_entropy(hidden[:0], weight, targets[:0])
    assert empty.item() == 0.0
    empty.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_shape_errors_and_auto_chunk():
    hidden, weight, _, targets = _inputs(10, 4, 9)
    with pytest.raises(ValueError, match="hidden"):
        chunked_linear_logps(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="targets"):
        chunked_linear_logps(hidden, weight, targets[:5])
    with pytest.raises(ValueError, match="reduction"):
        chunked_linear_cross_entropy(hidden, weight, targets, reduction="none")
    assert auto_chunk_size(151936) * 151936 <= 2**25
    assert auto_chunk_size(10**9) == 8


def test_fusable_pointwise_matches_in_place_math(monkeypatch):
    # The out-of-place per-chunk math that torch.compile fuses on CUDA, run eagerly here.
    from pmetal.losses import lm

    monkeypatch.setenv("PMETAL_COMPILED_CE", "1")
    monkeypatch.setattr(lm, "_compiled_pointwise", lambda: lm._pointwise)
    hidden, weight, b, targets = _inputs(40, 8, 30, bias=True)
    upstream = torch.randn(40)
    for kwargs in (dict(), dict(temperature=0.8, softcap=4.0)):
        got = chunked_linear_logps(hidden, weight, targets, b, chunk_size=16, **kwargs)
        want = reference_linear_logps(hidden, weight, targets, b, **kwargs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        tensors = [hidden, weight, b]
        for g, w in zip(_grads((got * upstream).sum(), tensors), _grads((want * upstream).sum(), tensors)):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
        loss = chunked_linear_cross_entropy(hidden, weight, targets, b, chunk_size=16, **kwargs)
        torch.testing.assert_close(loss, -want.sum() / (targets != -100).sum(), atol=1e-5, rtol=1e-5)
