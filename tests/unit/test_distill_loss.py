"""The generalized JSD of GKD (`pmetal.losses.distill`): by hand, against TRL, chunked = unchunked.

References (test-only): TRL's `GKDTrainer.generalized_jsd_loss` (trl.experimental.gkd, called
directly) on random float64 logits; the hand-computed KL/JSD of two small distributions; and
autograd through the unchunked `jsd_loss` for the chunked form's closed-form gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

from pmetal.losses.distill import chunked_jsd_loss, jsd_loss

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


def _problem(seed=3, n=13, h=6, ht=9, v=23, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return dict(student_hidden=r(n, h).requires_grad_(), student_weight=r(v, h).requires_grad_(),
                student_bias=r(v).requires_grad_() if bias else None, teacher_hidden=r(n, ht),
                teacher_weight=r(v, ht), teacher_bias=r(v) if bias else None)


def _reference(p, beta, temperature, softcaps=(None, None)):
    """The unchunked loss on full logits (autograd makes the gradients)."""
    def logits(h, w, b, cap):
        z = h @ w.t() + (b if b is not None else 0)
        return torch.tanh(z / cap) * cap if cap is not None else z
    s = logits(p["student_hidden"], p["student_weight"], p["student_bias"], softcaps[0])
    t = logits(p["teacher_hidden"], p["teacher_weight"], p["teacher_bias"], softcaps[1])
    return jsd_loss(s, t, beta=beta, temperature=temperature), s, t


def test_chunked_by_hand_one_token():
    """One token, identity heads: the logits are the hidden states; KL and JSD written out."""
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)  # teacher
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)  # student
    eye = torch.eye(3, dtype=torch.float64)
    forward = float((p * (p / q).log()).sum())
    reverse = float((q * (q / p).log()).sum())
    m = 0.3 * p + 0.7 * q
    jsd = 0.3 * float((p * (p / m).log()).sum()) + 0.7 * float((q * (q / m).log()).sum())
    entropy = -float((q * q.log()).sum())
    for beta, expected in ((0.0, forward), (1.0, reverse), (0.3, jsd)):
        out = chunked_jsd_loss(q.log()[None], eye, p.log()[None], eye, beta=beta)
        assert out.loss.item() == pytest.approx(expected, rel=1e-12)
        assert out.divergence.item() == pytest.approx(expected, rel=1e-12)
        assert out.forward_kl.item() == pytest.approx(forward, rel=1e-12)
        assert out.entropy.item() == pytest.approx(entropy, rel=1e-12)
    # the forward KL's gradient with respect to the student's logits is q - p
    logits = q.log()[None].clone().requires_grad_()
    chunked_jsd_loss(logits, eye, p.log()[None], eye, beta=0.0).loss.backward()
    torch.testing.assert_close(logits.grad[0], q - p)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_chunked_matches_trl_and_the_unchunked_loss(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    p = _problem()
    ours = chunked_jsd_loss(**p, beta=beta, temperature=temperature, chunk_size=4)  # 13 tokens: 4 chunks
    reference, s, t = _reference(p, beta, temperature)
    every_token = torch.zeros(1, s.shape[0], dtype=torch.long)  # labels: TRL then means over the tokens
    theirs = GKDTrainer.generalized_jsd_loss(s[None], t[None], labels=every_token, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours.loss, theirs.detach())
    torch.testing.assert_close(ours.loss, reference.detach())
    whole = chunked_jsd_loss(**p, beta=beta, temperature=temperature)  # one chunk
    torch.testing.assert_close(ours.loss, whole.loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(ours.divergence, whole.divergence, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("softcaps", [(None, None), (3.0, 5.0)])
def test_chunked_gradients_equal_autograd_through_the_unchunked_loss(beta, softcaps):
    """The closed-form gradients (made in forward) of hidden states, head weight and bias, times an
    outer scale, equal autograd's through full logits; under softcapping too."""
    p = _problem(seed=5)
    out = chunked_jsd_loss(**p, beta=beta, temperature=1.5, student_softcap=softcaps[0],
                           teacher_softcap=softcaps[1], chunk_size=5)
    (3.0 * out.loss).backward()
    ours = [p[k].grad.clone() for k in ("student_hidden", "student_weight", "student_bias")]
    for k in ("student_hidden", "student_weight", "student_bias"):
        p[k].grad = None
    reference, _, _ = _reference(p, beta, 1.5, softcaps)
    (3.0 * reference).backward()
    for mine, key in zip(ours, ("student_hidden", "student_weight", "student_bias")):
        torch.testing.assert_close(mine, p[key].grad, msg=key)
    torch.testing.assert_close(out.loss, reference.detach())


def test_chunked_statistics_by_token():
    p = _problem(seed=8, bias=False)
    out = chunked_jsd_loss(**p, beta=0.5, temperature=1.0, chunk_size=3)
    s = p["student_hidden"] @ p["student_weight"].t()
    t = p["teacher_hidden"] @ p["teacher_weight"].t()
    sl, tl = s.log_softmax(-1), t.log_softmax(-1)
    torch.testing.assert_close(out.forward_kl, (tl.exp() * (tl - sl)).sum(-1).detach())
    torch.testing.assert_close(out.entropy, -(sl.exp() * sl).sum(-1).detach())
    torch.testing.assert_close(out.divergence, torch.stack([jsd_loss(s[i], t[i], beta=0.5) for i in range(13)]).detach())
    assert not out.divergence.requires_grad and not out.entropy.requires_grad


def test_chunked_float32_and_bfloat16_autocast_stay_close():
    """fp32 inputs give fp32 math; under bf16 autocast only the matmuls run in bf16."""
    p64 = _problem(seed=9)
    exact = chunked_jsd_loss(**p64, beta=0.5).loss.item()
    p32 = {k: (v.detach().float().requires_grad_(v.requires_grad) if v is not None else None) for k, v in p64.items()}
    out = chunked_jsd_loss(**p32, beta=0.5, chunk_size=4)
    assert out.loss.dtype == torch.float32 and out.loss.item() == pytest.approx(exact, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = chunked_jsd_loss(**p32, beta=0.5, chunk_size=4)
    assert bf.loss.dtype == torch.float32 and bf.loss.item() == pytest.approx(exact, rel=0.1)
    bf.loss.backward()
    assert p32["student_hidden"].grad.dtype == torch.float32 and torch.isfinite(p32["student_weight"].grad).all()


def test_chunked_edge_cases_and_errors():
    p = _problem(n=0)
    out = chunked_jsd_loss(**p, beta=0.5)
    assert out.loss.item() == 0.0 and out.divergence.shape == (0,)
    out.loss.backward()  # no tokens: a zero gradient, not an error
    assert torch.count_nonzero(p["student_weight"].grad) == 0
    same = _problem(seed=1)
    same.update(teacher_hidden=same["student_hidden"].detach(), teacher_weight=same["student_weight"].detach(),
                teacher_bias=same["student_bias"].detach())
    assert chunked_jsd_loss(**same, beta=0.3).loss.item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_jsd_loss(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, 4), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="beta"):
        chunked_jsd_loss(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, 4), torch.zeros(5, 4), beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        chunked_jsd_loss(torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(2, 4), torch.zeros(5, 4), temperature=0)
    assert math.isfinite(chunked_jsd_loss(torch.full((1, 2), 80.0), torch.eye(2) * 50, torch.zeros(1, 2),
                                          torch.eye(2), beta=1.0).loss.item())  # saturated softmax: no NaN
