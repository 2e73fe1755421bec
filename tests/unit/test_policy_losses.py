"""GRPO / Dr. GRPO / DAPO losses, group advantages and the generalized JSD.

Checked against hand-worked values and against TRL (test-only reference): TRL's own
`GRPOTrainer._compute_loss` is called on a minimal stand-in object (its model forward replaced by
the given log-probs), and `GKDTrainer.generalized_jsd_loss` is called directly, on random float64
inputs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from pmetal.losses.distill import jsd_loss
from pmetal.losses.policy import group_advantages, grpo_loss, zero_spread_groups

# ---------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: all equal -> 0
    std = math.sqrt(1.0 / 3.0)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64)
    got = group_advantages(rewards, 4, scale="group")
    torch.testing.assert_close(got[:4], expected[:4] / (std + 1e-4))
    assert (got[4:] == 0).all()
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none"), expected)  # Dr. GRPO
    batch_std = rewards.std()
    torch.testing.assert_close(group_advantages(rewards, 4, scale="batch"), expected / (batch_std + 1e-4))
    assert zero_spread_groups(rewards, 4).tolist() == [False, True]


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="unknown advantage scale"):
        group_advantages(torch.zeros(4), 2, scale="rank")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_formula(scale):
    from trl.trainer.utils import nanstd

    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(24, generator=g, dtype=torch.float64)
    mean = rewards.view(-1, 6).mean(1).repeat_interleave(6)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, 6), dim=1).repeat_interleave(6)
    expected = rewards - mean
    if scale != "none":
        expected = expected / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 6, scale=scale), expected)


# ---------------------------------------------------------------------------------------------
# grpo_loss: by hand
# ---------------------------------------------------------------------------------------------


def test_grpo_loss_by_hand_clipping_and_aggregation():
    # two sequences: lengths 2 and 1 (one padding token)
    old = torch.zeros(2, 2, dtype=torch.float64)
    logps = torch.log(torch.tensor([[1.5, 0.9], [0.5, 7.0]], dtype=torch.float64))  # ratios
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    # seq 0, A=+1: ratio 1.5 clipped to 1.2 -> -1.2; ratio 0.9 unclipped -> -0.9
    # seq 1, A=-2: ratio 0.5: min(0.5*-2, 0.8*-2) = -1.6 -> loss +1.6 (clipped low)
    loss, m = grpo_loss(logps, old, adv, mask, loss_type="grpo")
    assert loss.item() == pytest.approx(((-1.2 - 0.9) / 2 + 1.6) / 2)
    loss, _ = grpo_loss(logps, old, adv, mask, loss_type="bnpo")
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 1.6) / 3)
    loss, _ = grpo_loss(logps, old, adv, mask, loss_type="dapo")
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 1.6) / 3)
    loss, _ = grpo_loss(logps, old, adv, mask, loss_type="dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 1.6) / (2 * 4))
    assert m["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert m["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert m["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)
    assert m["ratio"].item() == pytest.approx((1.5 + 0.9 + 0.5) / 3)


def test_grpo_loss_clip_higher_and_kl():
    old = torch.zeros(1, 1, dtype=torch.float64)
    logps = torch.log(torch.tensor([[1.25]], dtype=torch.float64))
    adv = torch.tensor([1.0], dtype=torch.float64)
    mask = torch.ones(1, 1)
    # symmetric 0.2 clips 1.25 to 1.2; DAPO's clip-higher 0.28 leaves it
    assert grpo_loss(logps, old, adv, mask)[0].item() == pytest.approx(-1.2)
    assert grpo_loss(logps, old, adv, mask, epsilon_high=0.28)[0].item() == pytest.approx(-1.25)
    # k3 KL: pi_ref/pi = 0.5 -> 0.5 - log 0.5 - 1
    ref = logps + math.log(0.5)
    loss, m = grpo_loss(logps, old, adv, mask, ref_logps=ref, beta=0.1, epsilon_high=0.28)
    kl = 0.5 - math.log(0.5) - 1
    assert m["kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(-1.25 + 0.1 * kl)


def test_grpo_loss_gradient_is_policy_gradient_at_ratio_one():
    """At ratio 1 the gradient of the GRPO loss w.r.t. a token log-prob is -A / |o| / N."""
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -0.1]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, _ = grpo_loss(logps, logps.detach(), adv, mask)
    loss.backward()
    expected = torch.tensor([[-2.0 / 2 / 2, -2.0 / 2 / 2, 0.0], [1.0 / 3 / 2] * 3], dtype=torch.float64)
    torch.testing.assert_close(logps.grad, expected)


def test_grpo_loss_micro_batches_sum_to_full_batch():
    g = torch.Generator().manual_seed(3)
    logps = -torch.rand(6, 5, generator=g, dtype=torch.float64)
    old = logps + 0.3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        full, _ = grpo_loss(logps, old, adv, mask, loss_type=loss_type, max_completion_length=5)
        parts = sum(
            grpo_loss(logps[s], old[s], adv[s], mask[s], loss_type=loss_type, max_completion_length=5,
                      num_sequences=6, num_tokens=float(mask.sum()))[0]
            for s in (slice(0, 2), slice(2, 6))
        )
        torch.testing.assert_close(parts, full)


def test_grpo_loss_errors():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="unknown GRPO loss_type"):
        grpo_loss(x, x, torch.zeros(1), x, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(x, x, torch.zeros(1), x, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(x, x, torch.zeros(1), x, beta=0.1)


# ---------------------------------------------------------------------------------------------
# grpo_loss against TRL's GRPOTrainer._compute_loss
# ---------------------------------------------------------------------------------------------


def _trl_grpo_loss(logps, old, ref, adv, mask, *, loss_type, beta, eps_low, eps_high, max_len, level="token",
                   customize=None):
    """Run TRL 1.16's GRPOTrainer._compute_loss on a stand-in `self` whose model returns `logps`
    (`customize(stand_in, inputs)` sets more of TRL's options first)."""
    from trl import GRPOTrainer

    class Accelerator:
        num_processes = 1
        sync_gradients = True

        def gather(self, x):
            return x

        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        accelerator=Accelerator(),
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    n, length = logps.shape
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, length, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum().to(logps.dtype),
    }
    if customize is not None:
        customize(stand_in, inputs)
    loss = GRPOTrainer._compute_loss(stand_in, None, inputs)
    return loss, stand_in._metrics["train"]


def _random_policy_inputs(seed: int, old_noise: float, n: int = 8, length: int = 6):
    """float64 ``(logps, old, ref, advantages, mask)`` of ``n`` completions of up to ``length`` tokens."""
    g = torch.Generator().manual_seed(seed)
    base = -torch.rand(n, length, generator=g, dtype=torch.float64) * 3
    old = base + old_noise * torch.randn(n, length, generator=g, dtype=torch.float64)
    ref = base + 0.2 * torch.randn(n, length, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = (torch.rand(n, length, generator=g) > 0.25).long()
    mask[:, 0] = 1
    return base, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl(loss_type, beta):
    base, old, ref, adv, mask = _random_policy_inputs(seed=7, old_noise=0.4)
    length = base.shape[1]
    kw = dict(loss_type=loss_type, beta=beta, eps_low=0.2, eps_high=0.28, max_len=length)

    ours_logps = base.clone().requires_grad_(True)
    ours, metrics = grpo_loss(ours_logps, old, adv, mask, ref_logps=ref, beta=beta, epsilon_low=0.2,
                              epsilon_high=0.28, loss_type=loss_type, max_completion_length=length)
    trl_logps = base.clone().requires_grad_(True)
    theirs, trl_metrics = _trl_grpo_loss(trl_logps, old, ref, adv, mask, **kw)
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(trl_metrics["clip_ratio/low_mean"][0])
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(trl_metrics["clip_ratio/high_mean"][0])
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(trl_metrics["clip_ratio/region_mean"][0])
    if beta:
        assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"][0])


def test_gspo_sequence_ratio_by_hand():
    """Two completions: the ratio is exp(mean token log-ratio) of each, clipped, times its advantage."""
    old = torch.zeros(2, 3, dtype=torch.float64)
    logps = torch.tensor([[0.1, 0.2, 0.3], [-1.0, 0.0, 9.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the 9.0 is padding
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, metrics = grpo_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2, importance_sampling_level="sequence")
    s1, s2 = math.exp(0.2), math.exp(-0.5)  # s1 = 1.2214 > 1.2: clipped, advantage > 0; s2 = 0.6065 < 0.8: clipped
    expected = (-min(s1 * 1.0, 1.2 * 1.0) - min(s2 * -1.0, 0.8 * -1.0)) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()  # both clipped terms are constants: no gradient
    assert torch.count_nonzero(logps.grad) == 0
    token, _ = grpo_loss(logps.detach(), old, adv, mask, importance_sampling_level="token")
    assert token.item() != pytest.approx(expected)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logps, old, adv, mask, importance_sampling_level="group")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_gspo_matches_trl(loss_type, beta):
    base, old, ref, adv, mask = _random_policy_inputs(seed=11, old_noise=0.3)
    length = base.shape[1]
    ours_logps = base.clone().requires_grad_(True)
    ours, _ = grpo_loss(ours_logps, old, adv, mask, ref_logps=ref, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
                        loss_type=loss_type, max_completion_length=length, importance_sampling_level="sequence")
    trl_logps = base.clone().requires_grad_(True)
    theirs, _ = _trl_grpo_loss(trl_logps, old, ref, adv, mask, loss_type=loss_type, beta=beta, eps_low=0.2,
                               eps_high=0.28, max_len=length, level="sequence")
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad)


# ---------------------------------------------------------------------------------------------
# jsd_loss
# ---------------------------------------------------------------------------------------------


def test_jsd_loss_by_hand_convention():
    """beta=0 is forward KL(teacher || student), beta=1 reverse KL(student || teacher)."""
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)  # teacher
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)  # student
    forward = float((p * (p / q).log()).sum())
    reverse = float((q * (q / p).log()).sum())
    assert jsd_loss(q.log()[None], p.log()[None], beta=0.0).item() == pytest.approx(forward)
    assert jsd_loss(q.log()[None], p.log()[None], beta=1.0).item() == pytest.approx(reverse)
    m = 0.5 * p + 0.5 * q
    jsd = 0.5 * float((p * (p / m).log()).sum()) + 0.5 * float((q * (q / m).log()).sum())
    assert jsd_loss(q.log()[None], p.log()[None], beta=0.5).item() == pytest.approx(jsd)
    assert jsd_loss(p.log()[None], p.log()[None], beta=0.3).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_loss_matches_trl(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(11)
    student = torch.randn(3, 5, 17, generator=g, dtype=torch.float64)
    teacher = torch.randn(3, 5, 17, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 17, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 4] = -100
    ours = jsd_loss(student, teacher, labels != -100, beta=beta, temperature=temperature)
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, theirs)


def test_jsd_loss_errors():
    with pytest.raises(ValueError, match="vocabulary"):
        jsd_loss(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="beta"):
        jsd_loss(torch.zeros(2, 5), torch.zeros(2, 5), beta=1.5)


# ---------------------------------------------------------------------------------------------
# advantage estimators: RLOO, REINFORCE++
# ---------------------------------------------------------------------------------------------


def test_rloo_advantages_by_hand():
    from pmetal.losses.policy import rloo_advantages

    # one prompt, rewards 1, 2, 3, 6: each minus the mean of the three others
    # 1 - 11/3 = -8/3, 2 - 10/3 = -4/3, 3 - 3 = 0, 6 - 2 = 4; a second group of equal rewards gives 0
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    expected = torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(rewards, 4), expected)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(rewards, 1)
    with pytest.raises(ValueError, match="groups of 3"):
        rloo_advantages(rewards, 3)


def test_rloo_advantages_match_trl_rloo_formula():
    """TRL's RLOOTrainer baseline: (group sum - r_i) / (G - 1), subtracted from r_i."""
    from pmetal.losses.policy import rloo_advantages

    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(24, generator=g, dtype=torch.float64)
    grouped = rewards.view(-1, 6)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (6 - 1)
    torch.testing.assert_close(rloo_advantages(rewards, 6), (grouped - baseline).view(-1))


def test_reinforce_pp_advantages_by_hand():
    from pmetal.losses.policy import ADVANTAGE_EPS, reinforce_pp_advantages

    # rewards 0, 1, 1, 2: mean 1, unbiased std sqrt(2/3); no per-prompt baseline
    rewards = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    std = (2 / 3) ** 0.5 + ADVANTAGE_EPS
    torch.testing.assert_close(reinforce_pp_advantages(rewards),
                               torch.tensor([-1 / std, 0.0, 0.0, 1 / std], dtype=torch.float64))


def test_estimate_advantages_dispatch_and_scaling():
    from pmetal.losses.policy import ADVANTAGE_EPS, estimate_advantages, needs_whole_batch

    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(estimate_advantages(rewards, 4, estimator="grpo", scale="none"), rewards - 3.0)
    loo = torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(estimate_advantages(rewards, 4, estimator="rloo", scale="none"), loo)
    torch.testing.assert_close(estimate_advantages(rewards, 4, estimator="rloo", scale="group"),
                               loo / (rewards.std() + ADVANTAGE_EPS))
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        estimate_advantages(rewards, 4, estimator="ppo")
    assert needs_whole_batch("reinforce_pp", "none") and needs_whole_batch("grpo", "batch")
    assert not needs_whole_batch("rloo", "group") and not needs_whole_batch("grpo", "none")


# ---------------------------------------------------------------------------------------------
# CISPO, truncated importance sampling, entropy masking
# ---------------------------------------------------------------------------------------------


def test_cispo_by_hand_keeps_the_gradient_of_clipped_tokens():
    # one completion of two tokens: pi = 0.5 and 0.25, sampled at 0.25 and 0.25 -> ratios 2 and 1;
    # epsilon_high 0.2 caps the first weight at 1.2. Loss = -(1.2 log .5 + 1 log .25) / 2 tokens.
    logps = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[math.log(0.25), math.log(0.25)]], dtype=torch.float64)
    adv, mask = torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2)
    loss, metrics = grpo_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2, loss_type="cispo")
    assert loss.item() == pytest.approx(-(1.2 * math.log(0.5) + math.log(0.25)) / 2)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.6, -0.5]], dtype=torch.float64))
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(0.5)
    assert metrics["clip_ratio/low_mean"].item() == 0.0
    # the clipped surrogate gives the capped token no gradient at all
    logps.grad = None
    grpo_loss(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo")[0].backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.5]], dtype=torch.float64))


def test_cispo_gradient_equals_the_surrogate_at_ratio_one():
    base, _, _, adv, mask = _random_policy_inputs(seed=11, old_noise=0.0)
    grads = []
    for loss_type in ("cispo", "dapo"):
        logps = base.clone().requires_grad_(True)
        grpo_loss(logps, base, adv, mask, loss_type=loss_type)[0].backward()
        grads.append(logps.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_truncated_importance_sampling_by_hand():
    # trainer's old pi 0.5, the sampler's 0.1 -> weight 5, capped at 2; ratio 1, advantage 1:
    # the grpo per-token term -1 becomes -2; a token with weight 0.5 (0.1 vs 0.2) is not truncated
    logps = torch.tensor([[math.log(0.5), math.log(0.1)]], dtype=torch.float64, requires_grad=True)
    old = logps.detach().clone()
    sampler = torch.tensor([[math.log(0.1), math.log(0.2)]], dtype=torch.float64)
    loss, metrics = grpo_loss(logps, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2),
                              sampling_logps=sampler, tis_cap=2.0)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)
    assert metrics["tis/weight_mean"].item() == pytest.approx(1.25)
    assert metrics["tis/truncated_fraction"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="tis_cap needs sampling_logps"):
        grpo_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 2), tis_cap=2.0)


def test_high_entropy_mask_by_hand():
    from pmetal.losses.policy import high_entropy_mask

    entropies = torch.tensor([[0.1, 0.5, 0.9, 9.0], [0.3, 0.7, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # real entropies 0.1 0.3 0.5 0.7 0.9: the 0.6-quantile is 0.58 -> 0.7 and 0.9 kept, padding never
    expected = torch.tensor([[False, False, True, False], [False, True, False, False]])
    assert torch.equal(high_entropy_mask(entropies, mask, 0.4), expected)
    assert torch.equal(high_entropy_mask(entropies, mask, 1.0), mask.bool())
    with pytest.raises(ValueError, match="fraction"):
        high_entropy_mask(entropies, mask, 0.0)


def _trl_extended_loss(logps, old, adv, mask, *, loss_type, eps_high, entropies=None, top=1.0, is_ratio=None):
    """TRL 1.16's _compute_loss with CISPO, its entropy mask and its vLLM importance-sampling weight."""
    from trl import GRPOTrainer

    def customize(stand_in, inputs):
        if entropies is not None:
            stand_in._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
        stand_in.top_entropy_quantile = top
        stand_in.get_high_entropy_mask = lambda e, m, t: GRPOTrainer.get_high_entropy_mask(stand_in, e, m, t)
        stand_in.accelerator.pad_across_processes = lambda x, dim=0, pad_index=0: x
        if is_ratio is not None:
            stand_in.use_vllm, stand_in.vllm_importance_sampling_correction = True, True
            inputs["importance_sampling_ratio"] = is_ratio

    loss, _ = _trl_grpo_loss(logps, old, None, adv, mask, loss_type=loss_type, beta=0.0, eps_low=0.2,
                             eps_high=eps_high, max_len=logps.shape[1], customize=customize)
    return loss


@pytest.mark.parametrize("case", ["cispo", "entropy", "tis"])
def test_loss_variants_match_trl(case):
    base, old, _, adv, mask = _random_policy_inputs(seed=5, old_noise=0.4)
    g = torch.Generator().manual_seed(9)
    entropies = torch.rand(base.shape, generator=g, dtype=torch.float64) * 3
    sampler = old + 0.5 * torch.randn(base.shape, generator=g, dtype=torch.float64)
    ours_kw, trl_kw = {}, {}
    loss_type = "dapo"
    if case == "cispo":
        loss_type, trl_kw["eps_high"], ours_kw["epsilon_high"] = "cispo", 1.28, 0.28  # TRL's cap is 1 + ours
    if case == "entropy":
        from pmetal.losses.policy import high_entropy_mask

        ours_kw["entropy_mask"] = high_entropy_mask(entropies, mask, 0.3)
        trl_kw.update(entropies=entropies, top=0.3)
    if case == "tis":
        ours_kw.update(sampling_logps=sampler, tis_cap=2.0)
        trl_kw["is_ratio"] = torch.clamp(torch.exp((old - sampler) * mask), max=2.0)
    ours_logps = base.clone().requires_grad_(True)
    ours, _ = grpo_loss(ours_logps, old, adv, mask, loss_type=loss_type,
                        **{"epsilon_high": 0.28, **ours_kw})
    trl_logps = base.clone().requires_grad_(True)
    theirs = _trl_extended_loss(trl_logps, old, adv, mask, loss_type=loss_type,
                                **{"eps_high": 0.28, **trl_kw})
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_logps.grad, trl_logps.grad)
