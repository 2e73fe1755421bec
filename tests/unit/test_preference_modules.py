"""DPO/SimPO/ORPO/KTO modules on a tiny random Llama: a training step runs, only the adapter moves,
the reference is the frozen base, one forward covers chosen+rejected, and cached reference log-probs
equal the live ones."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch

from pmetal.data.kto import KtoDataModule
from pmetal.data.preference import PreferenceDataModule
from pmetal.modules.dpo import DpoModule
from pmetal.modules.kto import KtoModule
from pmetal.modules.orpo import OrpoModule
from pmetal.modules.preference import concat_sides
from pmetal.modules.simpo import SimpoModule

COMMON = dict(adapter="lora", lora_r=4, learning_rate=1e-2, gradient_checkpointing=False, weight_dtype="float32")
PAIR_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"}


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    rows = [{"prompt": f"What is {k} plus {k}?", "chosen": f"{2 * k} IS THE ANSWER.", "rejected": f"maybe {k}"}
            for k in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def kto_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kto") / "kto.jsonl"
    rows = [{"prompt": f"Name {k}.", "completion": f"NAME {k}" if k % 2 else f"name {k} or so", "label": k % 2 == 1}
            for k in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0)


def _datamodule(module, path, kto=False):
    cls = KtoDataModule if kto else PreferenceDataModule
    dm = cls(path, batch_size=4, max_seq_len=64, tokenizer=module.tokenizer)
    dm.setup("fit")
    return dm


def _params(module, lora: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters() if ("lora_" in n) == lora}


CASES = [(DpoModule, {}, False), (SimpoModule, {}, False), (OrpoModule, {}, False), (KtoModule, {}, True)]


@pytest.mark.parametrize("cls,kwargs,kto", CASES, ids=["dpo", "simpo", "orpo", "kto"])
def test_training_step_moves_only_the_adapter(tiny_model_dir, pair_file, kto_file, cls, kwargs, kto):
    module = cls(model=str(tiny_model_dir), **COMMON, **kwargs)
    dm = _datamodule(module, kto_file if kto else pair_file, kto=kto)
    lora_before, base_before = _params(module, True), _params(module, False)
    assert lora_before and all(not p.requires_grad for n, p in module.policy.named_parameters() if "lora_" not in n)
    trainer = _trainer(2)
    trainer.fit(module, datamodule=dm)
    lora_after, base_after = _params(module, True), _params(module, False)
    assert any(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before)
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)
    logged = {k.removeprefix("train/") for k in trainer.callback_metrics}
    expected = {"loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"}
    expected |= {"kl"} if kto else PAIR_METRICS  # KTO logs margins only for batches with both labels
    expected |= {"logits/chosen", "logits/rejected", "learning_rate"}
    expected |= {"nll_loss", "log_odds_ratio", "log_odds_chosen"} if cls is OrpoModule else set()
    assert expected <= logged, expected - logged
    assert all(torch.isfinite(v) for v in trainer.callback_metrics.values())


def test_every_dpo_loss_type_trains_the_adapter(tiny_model_dir, pair_file):
    module = DpoModule(model=str(tiny_model_dir), **COMMON)
    batch = next(iter(_datamodule(module, pair_file).train_dataloader()))
    with torch.no_grad():  # move the adapter off the identity so every loss has a gradient
        for n, p in module.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    for loss_type, smoothing in (("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)):
        module.hparams.loss_type, module.hparams.label_smoothing = loss_type, smoothing
        module.zero_grad()
        loss, _ = module.compute_loss(batch)
        loss.backward()
        grads = [p.grad.abs().sum() for n, p in module.policy.named_parameters() if "lora_" in n]
        assert torch.isfinite(loss) and sum(grads) > 0, loss_type


def test_reference_is_the_frozen_base(tiny_model_dir, pair_file):
    module = DpoModule(model=str(tiny_model_dir), **COMMON)
    dm = _datamodule(module, pair_file)
    batch = next(iter(dm.train_dataloader()))
    args = concat_sides(batch, "chosen_", "rejected_")
    ref_before = module.reference_logps(*args).sum
    with torch.no_grad():
        policy_before = module.completion_logps(*args).sum
    torch.testing.assert_close(ref_before, policy_before)  # LoRA starts as the identity
    _trainer(3).fit(module, datamodule=dm)
    with torch.no_grad():
        policy_after = module.completion_logps(*args).sum
    torch.testing.assert_close(module.reference_logps(*args).sum, ref_before, rtol=0, atol=1e-6)
    assert (policy_after - policy_before).abs().max() > 1e-3


def test_one_forward_for_chosen_and_rejected_matches_separate_forwards(tiny_model_dir, pair_file):
    """One policy forward (+ one reference forward): by default one row per pair (the shared prompt),
    with shared_prompt=False the [2B, T] rows; its log-probs equal separate padded forwards."""
    module = DpoModule(model=str(tiny_model_dir), **COMMON)
    off = DpoModule(model=str(tiny_model_dir), shared_prompt=False, **COMMON)
    batch = next(iter(_datamodule(off, pair_file).train_dataloader()))
    rows = []
    handle = off.policy.get_base_model().model.register_forward_hook(
        lambda m, a, kw, out: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    off.compute_loss(batch)
    handle.remove()
    assert rows == [8, 8]  # policy, reference: each over 2 x 4 rows
    rows = []
    backbone = module.policy.get_base_model().model
    handle = backbone.register_forward_hook(lambda m, a, kw, out: rows.append(kw["input_ids"].shape[0]),
                                            with_kwargs=True)
    loss, metrics = module.compute_loss(batch)
    handle.remove()
    assert rows == [4, 4]  # policy, reference: each over 4 rows holding both sides
    chosen, rejected = module.pair_logps(batch)
    for side, logps in (("chosen", chosen), ("rejected", rejected)):
        alone = module.completion_logps(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"],
                                        batch[f"{side}_labels"])
        torch.testing.assert_close(logps.sum, alone.sum, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(logps.mean, alone.mean, rtol=1e-5, atol=1e-5)
    # at initialization policy == reference, so DPO's loss is exactly log 2 and every reward is 0
    assert loss.item() == pytest.approx(0.6931472, abs=1e-5)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("cls,kto", [(DpoModule, False), (KtoModule, True)], ids=["dpo", "kto"])
def test_precomputed_reference_equals_live_and_skips_the_reference_forward(tiny_model_dir, pair_file, kto_file,
                                                                           cls, kto):
    module = cls(model=str(tiny_model_dir), precompute_ref_logps=True, **COMMON)
    dm = _datamodule(module, kto_file if kto else pair_file, kto=kto)
    batch = next(iter(dm.train_dataloader()))
    live = module._compute_reference(batch)
    calls = []
    handle = module.policy.get_base_model().model.register_forward_hook(lambda *a: calls.append(1))
    _trainer(1).fit(module, datamodule=dm)  # on_fit_start fills the cache: 8 examples in 2 batches
    assert len(module._ref_cache) == 8
    n_before = len(calls)
    module.compute_loss(batch)
    handle.remove()
    assert len(calls) - n_before == (2 if kto else 1)  # policy (+ KTO's no-grad KL pass); no reference
    torch.testing.assert_close(module.reference_values(batch), live, rtol=1e-5, atol=1e-4)


def test_full_finetuning_reference_is_a_frozen_copy(tiny_model_dir, pair_file):
    module = DpoModule(model=str(tiny_model_dir), adapter="full", learning_rate=1e-3, gradient_checkpointing=False,
                       weight_dtype="float32")
    dm = _datamodule(module, pair_file)
    batch = next(iter(dm.train_dataloader()))
    ref_before = module._compute_reference(batch)
    _trainer(2).fit(module, datamodule=dm)
    torch.testing.assert_close(module._compute_reference(batch), ref_before, rtol=0, atol=1e-6)
    with torch.no_grad():
        chosen, _ = module.pair_logps(batch)
    assert (chosen.sum - ref_before[:, 0]).abs().max() > 1e-3  # the policy itself moved


def test_kto_metrics_and_clamped_kl(tiny_model_dir, kto_file):
    module = KtoModule(model=str(tiny_model_dir), **COMMON)
    batch = next(iter(_datamodule(module, kto_file, kto=True).train_dataloader()))
    loss, metrics = module.compute_loss(batch)
    assert metrics["kl"].item() == 0.0  # policy == reference at start: KL 0, every loss 1 - sigmoid(0)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in module.policy.named_parameters()
               if "lora_B" in n)


def test_kto_warns_about_imbalance(tiny_model_dir, tmp_path, caplog):
    path = tmp_path / "skewed.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{k}", "completion": f"a{k}", "label": k > 0}) + "\n"
                            for k in range(8)))
    module = KtoModule(model=str(tiny_model_dir), **COMMON)
    dm = _datamodule(module, str(path), kto=True)
    with caplog.at_level(logging.WARNING, logger="pmetal"):
        _trainer(1).fit(module, datamodule=dm)
    assert "KTO data is imbalanced: 7 desirable vs 1 undesirable" in caplog.text
    assert "consider undesirable_weight=7.00" in caplog.text


def test_bad_settings_fail_before_loading_the_model():
    with pytest.raises(ValueError, match="not defined for loss_type 'ipo'"):
        DpoModule(model="/nonexistent", loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'nope'"):
        DpoModule(model="/nonexistent", loss_type="nope")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        SimpoModule(model="/nonexistent", label_smoothing=0.7)


class _TableLogps:
    """A stand-in for the policy's log-probs: log p(token) = -token / 10 at every scored position."""

    def __init__(self):
        self.scored = None

    def __call__(self, input_ids, attention_mask, labels, **kwargs):
        from pmetal.logps import CompletionLogps

        scored = labels != -100
        scored[:, 0] = False
        self.scored = scored
        token = torch.where(scored, -input_ids.float() / 10, 0.0)
        counts = scored.sum(-1)
        return CompletionLogps(token.sum(-1), token.sum(-1) / counts.clamp_min(1), counts, token,
                               torch.where(scored, input_ids.float(), 0.0))


@pytest.mark.parametrize("scope, nll", [("completion", (0.7 + 0.8 + 0.3) / 3), ("full", (0.6 + 0.7 + 0.8 + 0.2 + 0.3) / 5)])
def test_orpo_nll_scope_by_hand(tiny_model_dir, scope, nll):
    module = OrpoModule(model=str(tiny_model_dir), nll_scope=scope, shared_prompt=False, **COMMON)  # the table replaces the rows' forward
    table = _TableLogps()
    module.completion_logps = table
    # chosen rows: prompt [5, 6] + completion [7, 8]; prompt [1, 2] + completion [3] and a pad
    batch = {
        "chosen_input_ids": torch.tensor([[5, 6, 7, 8], [1, 2, 3, 0]]),
        "chosen_attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "chosen_labels": torch.tensor([[-100, -100, 7, 8], [-100, -100, 3, -100]]),
        "rejected_input_ids": torch.tensor([[5, 6, 9], [1, 2, 4]]),
        "rejected_attention_mask": torch.ones(2, 3, dtype=torch.long),
        "rejected_labels": torch.tensor([[-100, -100, 9], [-100, -100, 4]]),
    }
    loss, metrics = module.compute_loss(batch)
    # NLL: "completion" = tokens 7, 8, 3; "full" = every real token but each row's first: 6, 7, 8 and 2, 3
    assert metrics["nll_loss"].item() == pytest.approx(nll, abs=1e-6)
    # the odds ratio and logps/* see the completions only, whatever the scope (TRL: per-token means)
    chosen_mean, rejected_mean = torch.tensor([-0.75, -0.3]), torch.tensor([-0.9, -0.4])
    assert metrics["logps/chosen"].item() == pytest.approx(chosen_mean.mean().item(), abs=1e-6)
    assert metrics["logps/rejected"].item() == pytest.approx(rejected_mean.mean().item(), abs=1e-6)
    log_odds = (chosen_mean - rejected_mean) - (torch.log1p(-chosen_mean.exp()) - torch.log1p(-rejected_mean.exp()))
    assert metrics["log_odds_chosen"].item() == pytest.approx(log_odds.mean().item(), abs=1e-5)
    assert metrics["log_odds_ratio"].item() == pytest.approx(torch.nn.functional.logsigmoid(log_odds).mean().item(), abs=1e-5)
    assert loss.item() == pytest.approx(nll - 0.1 * torch.nn.functional.logsigmoid(log_odds).mean().item(), abs=1e-5)
    # logits/chosen: the mean logit over the chosen completion tokens (here the token id itself)
    assert metrics["logits/chosen"].item() == pytest.approx((7 + 8 + 3) / 3)
    assert metrics["logits/rejected"].item() == pytest.approx((9 + 4) / 2)
    chosen_scored = table.scored[:2].tolist()
    assert chosen_scored == ([[False, False, True, True], [False, False, True, False]] if scope == "completion"
                             else [[False, True, True, True], [False, True, True, False]])


def test_fit_orpo_full_nll_on_raw_text_rows(tiny_model_dir, pair_file, tmp_path, capsys):
    """The new settings through `pmetal fit`: typed, parsed from the command line, and trained with."""
    import yaml

    from pmetal.cli.lightning import run_lightning_cli

    args = ["fit", "--method", "orpo", "--model", str(tiny_model_dir), "--data.path", pair_file,
            "--data.chat_template", "false", "--model.nll_scope", "full"]
    with pytest.raises(SystemExit):
        run_lightning_cli([*args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["chat_template"] is False and printed["model"]["nll_scope"] == "full"
    run_lightning_cli([*args, "--data.batch_size", "4", "--data.max_seq_len", "64", "--model.lora_r", "4",
                       "--model.gradient_checkpointing", "false", "--trainer.max_steps", "2",
                       "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    header = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    for name in ("train/nll_loss", "train/log_odds_chosen", "train/logits/chosen", "train/learning_rate"):
        assert name in header, (name, header)
    assert not any(name.startswith("lr-") for name in header)  # the learning rate is logged once
