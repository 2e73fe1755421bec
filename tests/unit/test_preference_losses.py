"""Preference losses: hand-computed values, gradients, and agreement with TRL 1.16 on float64 inputs.

TRL has no standalone DPO/KTO loss function: the losses live inside `DPOTrainer._compute_loss` and
`KTOTrainer._compute_loss`, which take a model and a tokenized batch. The tests call those methods
on a minimal stand-in for the trainer (`SimpleNamespace` with the attributes they read) and a fake
model whose "log_probs" output carries the per-sequence log-probs we choose, so TRL's own code
computes the loss. `CPOTrainer.cpo_loss` (SimPO) and `ORPOTrainer.odds_ratio_loss` are methods
on log-probs already and are called on a stand-in `self`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import MethodType, SimpleNamespace

import pytest
import torch

from pmetal.losses.preference import dpo_loss, kto_loss, orpo_loss, simpo_loss

trl = pytest.importorskip("trl")  # a declared test dependency (pyproject [test]); present in CI

B = 8


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _random_logps(seed: int, n: int = B, low: float = -60.0, high: float = -5.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.empty(n, dtype=torch.float64).uniform_(low, high, generator=g)


def _accelerator() -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)


class _FakeModel:
    """Returns `log_probs[b, t]` looked up by the token id at position t+1 of each row (TRL's shift)."""

    training = True

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def __call__(self, input_ids, **_: object) -> SimpleNamespace:
        log_probs = self.table[input_ids[:, 1:]]  # [N, T-1]
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


# ---------------------------------------------------------------------------------------------- DPO


def test_dpo_sigmoid_hand_values():
    """beta=0.1; policy (-10, -20), reference (-12, -18): log-ratios +2 and -2, h = 4, beta*h = 0.4.

    loss = -log sigmoid(0.4) = log(1 + e^-0.4) = 0.5130153; rewards 0.2 and -0.2.
    A tie (h = 0) costs log 2. cDPO with eps=0.1: 0.9*0.5130153 + 0.1*log(1+e^0.4) = 0.5530153.
    """
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-10.0, -20.0, -12.0, -18.0))
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.4)), abs=1e-12)
    assert losses.item() == pytest.approx(0.5130153, abs=1e-7)
    assert chosen_r.item() == pytest.approx(0.2) and rejected_r.item() == pytest.approx(-0.2)
    tie, _, _ = dpo_loss(pc, pc, rc, rc, beta=0.1)
    assert tie.item() == pytest.approx(math.log(2.0), abs=1e-12)
    cdpo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    assert cdpo.item() == pytest.approx(0.5530153, abs=1e-7)


def test_dpo_hinge_ipo_robust_hand_values():
    """beta=0.1, h=4: hinge relu(1 - 0.4) = 0.6; h=20 gives 0.
    IPO (tau=0.1, avg log-probs): (h - 1/(2*0.1))^2 = (4 - 5)^2 = 1; h = 5 gives 0.
    rDPO eps=0.1, beta*h=0.4: (0.9*0.5130153 - 0.1*0.9130153) / 0.8 = 0.4630153; at h=0 it is log 2.
    """
    zero = torch.zeros(1, dtype=torch.float64)
    h = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731 -- margin as the chosen log-ratio
    assert dpo_loss(h(4.0), zero, zero, zero, loss_type="hinge")[0].item() == pytest.approx(0.6)
    assert dpo_loss(h(20.0), zero, zero, zero, loss_type="hinge")[0].item() == 0.0
    assert dpo_loss(h(4.0), zero, zero, zero, loss_type="ipo")[0].item() == pytest.approx(1.0)
    assert dpo_loss(h(5.0), zero, zero, zero, loss_type="ipo")[0].item() == pytest.approx(0.0, abs=1e-12)
    robust = dpo_loss(h(4.0), zero, zero, zero, loss_type="robust", label_smoothing=0.1)[0].item()
    assert robust == pytest.approx(0.4630153, abs=1e-7)
    tie = dpo_loss(zero, zero, zero, zero, loss_type="robust", label_smoothing=0.1)[0].item()
    assert tie == pytest.approx(math.log(2.0), abs=1e-12)


def test_dpo_gradient_raises_chosen_lowers_rejected():
    pc, pr = torch.tensor([-10.0], requires_grad=True), torch.tensor([-11.0], requires_grad=True)
    ref = torch.tensor([-10.0])
    for loss_type in ("sigmoid", "hinge", "ipo", "robust"):
        pc.grad = pr.grad = None
        dpo_loss(pc, pr, ref, ref, loss_type=loss_type)[0].sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item(), loss_type  # descent raises chosen, lowers rejected


def test_dpo_rejects_bad_settings():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'kto'; expected one of sigmoid, hinge, ipo, robust"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="not defined for loss_type 'ipo'"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)


def _trl_dpo_losses(pc, pr, rc, rr, num_tokens, *, beta, loss_type, label_smoothing) -> torch.Tensor:
    """Per-pair losses from TRL's `DPOTrainer._compute_loss`, one pair per call (it returns a mean)."""
    from trl import DPOTrainer

    out = []
    for i in range(len(pc)):
        n_c, n_r = int(num_tokens[0][i]), int(num_tokens[1][i])
        width = max(n_c, n_r) + 1
        # token ids index the table: id 1 carries the summed log-prob, id 0 contributes 0
        table = torch.tensor([0.0, 0.0, pc[i].item(), pr[i].item()], dtype=torch.float64)
        input_ids = torch.zeros(2, width, dtype=torch.long)
        input_ids[0, 1], input_ids[1, 1] = 2, 3
        completion_mask = torch.zeros(2, width, dtype=torch.long)
        completion_mask[0, 1 : 1 + n_c] = 1
        completion_mask[1, 1 : 1 + n_r] = 1
        trainer = SimpleNamespace(
            model=_FakeModel(table), accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None,
            precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
            beta=beta, label_smoothing=label_smoothing, use_weighting=False, args=SimpleNamespace(),
            _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        )  # fmt: skip
        inputs = {
            "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask,
            "ref_chosen_logps": rc[i : i + 1], "ref_rejected_logps": rr[i : i + 1],
        }  # fmt: skip
        out.append(DPOTrainer._compute_loss(trainer, trainer.model, inputs, False))
    return torch.stack(out)


@pytest.mark.parametrize(
    "loss_type,label_smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0), ("robust", 0.2)]
)
def test_dpo_matches_trl(loss_type, label_smoothing):
    """pmetal's `ipo` takes per-token average log-probs; TRL takes sums and divides by the completion length
    itself, so the comparison gives TRL the sums and pmetal the sums / num_tokens (the same quantity)."""
    pc, pr, rc, rr = (_random_logps(s) for s in range(4))
    g = torch.Generator().manual_seed(9)
    num_tokens = torch.randint(1, 40, (2, B), generator=g).double()
    expected = _trl_dpo_losses(
        pc, pr, rc, rr, num_tokens, beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing
    )
    if loss_type == "ipo":
        pc, rc = pc / num_tokens[0], rc / num_tokens[0]
        pr, rr = pr / num_tokens[1], rr / num_tokens[1]
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing)
    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses, expected, atol=1e-6, rtol=0)


def test_dpo_label_smoothing_follows_cdpo_not_trl():
    """TRL 1.16 ignores `label_smoothing` for loss_type="sigmoid" (earlier TRL applied cDPO there).
    pmetal follows the cDPO note (Mitchell 2023), which TRL's own CPO trainer still implements:
    compared against `CPOTrainer.cpo_loss(loss_type="sigmoid")` on the DPO log-ratios."""
    from trl.experimental.cpo import CPOTrainer

    pc, pr, rc, rr = (_random_logps(s) for s in range(4, 8))
    cpo = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.1, label_smoothing=0.15, accelerator=_accelerator())
    expected, _, _ = CPOTrainer.cpo_loss(cpo, pc - rc, pr - rr)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.15)
    torch.testing.assert_close(losses, expected, atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------- SimPO


def test_simpo_hand_values():
    """beta=2.5, gamma/beta=0.5 -> gamma=1.25; avg log-probs -1 (chosen) and -2 (rejected):
    z = 2.5*(−1 − (−2)) − 1.25 = 1.25, loss = log(1 + 0.2865048) = 0.2519291; rewards -2.5, -5."""
    losses, cr, rr = simpo_loss(torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-2.0], dtype=torch.float64))
    assert losses.item() == pytest.approx(0.2519291, abs=1e-7)
    assert (cr.item(), rr.item()) == (pytest.approx(-2.5), pytest.approx(-5.0))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_matches_trl_cpo(label_smoothing):
    """TRL's CPO with loss_type="simpo" takes gamma itself (`simpo_gamma`); pmetal takes gamma/beta."""
    from trl.experimental.cpo import CPOTrainer

    chosen, rejected = _random_logps(10, low=-4, high=-0.1), _random_logps(11, low=-4, high=-0.1)
    beta, ratio = 2.0, 0.7
    cpo = SimpleNamespace(
        alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=ratio * beta, label_smoothing=label_smoothing,
        accelerator=_accelerator(),
    )  # fmt: skip
    exp_losses, exp_cr, exp_rr = CPOTrainer.cpo_loss(cpo, chosen, rejected)
    losses, cr, rr = simpo_loss(chosen, rejected, beta=beta, gamma_beta_ratio=ratio, label_smoothing=label_smoothing)
    torch.testing.assert_close(losses, exp_losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(cr, exp_cr, atol=1e-9, rtol=0)
    torch.testing.assert_close(rr, exp_rr, atol=1e-9, rtol=0)


# --------------------------------------------------------------------------------------------- ORPO


def test_orpo_hand_values():
    """P_w = 0.5 (odds 1), P_l = 0.2 (odds 0.25): log odds ratio = log 4 = 1.3862944;
    loss = -0.1 * log sigmoid(log 4) = -0.1 * log(0.8) = 0.0223144."""
    aw, al = torch.tensor([math.log(0.5)], dtype=torch.float64), torch.tensor([math.log(0.2)], dtype=torch.float64)
    losses, log_odds = orpo_loss(aw, al, beta=0.1)
    assert log_odds.item() == pytest.approx(math.log(4.0), abs=1e-12)
    assert losses.item() == pytest.approx(-0.1 * math.log(0.8), abs=1e-12)


def test_orpo_matches_trl():
    """TRL returns +beta*log sigmoid (its caller subtracts it) and casts to float32, hence the sign and tolerance."""
    from trl.experimental.orpo import ORPOTrainer

    chosen, rejected = _random_logps(12, low=-5, high=-1e-3), _random_logps(13, low=-5, high=-1e-3)
    orpo = SimpleNamespace(beta=0.25, accelerator=_accelerator())
    trl_losses, _, _, _, trl_mean_log_odds = ORPOTrainer.odds_ratio_loss(orpo, chosen, rejected)
    losses, log_odds = orpo_loss(chosen, rejected, beta=0.25)
    torch.testing.assert_close(losses, -trl_losses.double(), atol=1e-6, rtol=0)
    assert log_odds.mean().item() == pytest.approx(trl_mean_log_odds.item(), rel=1e-5)


def test_orpo_is_finite_at_certainty_and_far_tails():
    """avg log-prob exactly 0 (P = 1) would make the odds infinite; tiny and huge magnitudes stay accurate."""
    chosen = torch.tensor([0.0, -1e-9, -50.0], requires_grad=True)
    rejected = torch.tensor([-1.0, -1e-3, -60.0], requires_grad=True)
    losses, log_odds = orpo_loss(chosen, rejected)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    # far tail: log(1 - e^a) ~ 0, so the log odds ratio is just a_w - a_l = 10
    assert log_odds[2].item() == pytest.approx(10.0, abs=1e-5)
    assert chosen.grad[2].item() < 0 < rejected.grad[2].item()


# ---------------------------------------------------------------------------------------------- KTO


def test_kto_hand_values():
    """beta=0.1, r = 2, z = 1: desirable 1 - sigmoid(0.1) = 0.4750208; undesirable 1 - sigmoid(-0.1) = 0.5249792;
    weights scale each side; rewards 0.2; no gradient flows into z."""
    policy = torch.tensor([2.0, 2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(2, dtype=torch.float64)
    z = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    losses, rewards = kto_loss(policy, ref, torch.tensor([True, False]), z, undesirable_weight=2.0)
    assert losses[0].item() == pytest.approx(0.4750208, abs=1e-7)
    assert losses[1].item() == pytest.approx(2.0 * 0.5249792, abs=1e-7)
    torch.testing.assert_close(rewards, torch.tensor([0.2, 0.2], dtype=torch.float64))
    losses.sum().backward()
    assert z.grad is None
    assert policy.grad[0].item() < 0 < policy.grad[1].item()  # raise good completions, lower bad ones


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_matches_trl_given_same_z(weights):
    """TRL estimates z = clamp(mean(KL policy - KL reference), 0) itself; the test feeds it mismatched-pair
    log-probs through the fake model, computes the same z, and gives that z to pmetal. TRL returns the
    mean over its rows, so each row is scored in its own call (the KL rows are shared by every call)."""
    from trl import KTOTrainer

    policy, ref = _random_logps(20), _random_logps(21)
    kl_policy, kl_ref = _random_logps(22), _random_logps(23, low=-70, high=-20)  # z > 0
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    z = (kl_policy - kl_ref).mean().clamp(min=0)
    assert z > 0
    table = torch.cat([torch.zeros(1, dtype=torch.float64), policy, kl_policy])  # id 1+i: row i; id 1+B+j: KL row j
    expected = []
    for i in range(B):
        kto = SimpleNamespace(
            model=_FakeModel(table), accelerator=_accelerator(), aux_loss_enabled=False, precompute_ref_logps=True,
            calculate_KL=True, loss_type="kto", beta=0.1, desirable_weight=weights[0], undesirable_weight=weights[1],
            _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        )  # fmt: skip
        kto._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, kto)
        batch = {
            "input_ids": torch.tensor([[0, 1 + i]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
            "completion_mask": torch.tensor([[0, 1]]), "label": desirable[i : i + 1],
            "KL_input_ids": torch.stack([torch.zeros(B, dtype=torch.long), torch.arange(1 + B, 1 + 2 * B)], 1),
            "KL_attention_mask": torch.ones(B, 2, dtype=torch.long), "KL_completion_mask": torch.tensor([[0, 1]] * B),
            "ref_logps": ref[i : i + 1], "ref_KL_logps": kl_ref,
        }  # fmt: skip
        expected.append(KTOTrainer._compute_loss(kto, kto.model, batch, False))
        assert kto._metrics["train"]["kl"][-1] == pytest.approx(z.item(), abs=1e-12)
    losses, rewards = kto_loss(
        policy, ref, desirable, z, beta=0.1, desirable_weight=weights[0], undesirable_weight=weights[1]
    )
    torch.testing.assert_close(losses, torch.stack(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(rewards, 0.1 * (policy - ref))


def test_losses_keep_float32_and_agree_with_float64():
    a, b, c, d = (_random_logps(s, low=-3, high=-0.1) for s in range(30, 34))
    pairs = [
        (lambda *t: dpo_loss(*t)[0], (a, b, c, d)),
        (lambda *t: simpo_loss(*t)[0], (a, b)),
        (lambda *t: orpo_loss(*t)[0], (a, b)),
        (lambda *t: kto_loss(*t, torch.arange(B) % 2 == 0, 0.3)[0], (a, b)),
    ]
    for fn, args in pairs:
        out32 = fn(*(x.float() for x in args))
        assert out32.dtype == torch.float32 and out32.shape == (B,)
        torch.testing.assert_close(out32.double(), fn(*args), atol=1e-5, rtol=1e-5)
