"""`compile=None`: SFT compiles its decoder layers on CUDA for runs long enough to repay it, and
nowhere else; the decision is logged with its reason."""

import logging
from pathlib import Path

import pytest
import torch

from pmetal.perf import AUTO_COMPILE_MIN_STEPS, auto_compile_decision

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def test_the_decision_and_its_reasons():
    on, why = auto_compile_decision(eligible=True, device_type="cuda", steps=AUTO_COMPILE_MIN_STEPS)
    assert on and "--no-compile" in why
    on, why = auto_compile_decision(eligible=True, device_type="cuda", steps=AUTO_COMPILE_MIN_STEPS - 1)
    assert not on and f"fewer than the {AUTO_COMPILE_MIN_STEPS}" in why
    on, why = auto_compile_decision(eligible=True, device_type="cuda", steps=float("inf"))
    assert on
    for device in ("cpu", "mps"):
        on, why = auto_compile_decision(eligible=True, device_type=device, steps=10**6)
        assert not on and device in why and "--compile" in why
    on, why = auto_compile_decision(eligible=False, device_type="cuda", steps=10**6)
    assert not on and "--compile" in why
    on, why = auto_compile_decision(eligible=True, device_type="cuda", steps=10**6, eager="--offload-activations")
    assert not on and why == "--offload-activations run eager"


def test_only_teacher_forced_methods_compile_automatically():
    from pmetal.modules import DapoModule, DpoModule, GrpoModule, RlkdModule, SftModule

    assert SftModule.auto_compile
    for rollout_method in (GrpoModule, DapoModule, RlkdModule):  # their layers also serve the rollout engine
        assert not rollout_method.auto_compile
    assert not DpoModule.auto_compile  # not measured faster yet: README's DPO paragraph


def _fit(module, tiny_model_dir, steps):
    import lightning as L

    from pmetal.data.datamodule import SftDataModule

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, SftDataModule(path=str(EXAMPLES / "sft.jsonl"), batch_size=2, max_seq_len=64))


def test_auto_compile_follows_the_decision_in_fit(tiny_model_dir, monkeypatch, caplog):
    """On the CPU fit logs "compile off" and compiles nothing; with the decision forced on (as CUDA
    would decide), fit compiles every decoder layer and reports the first step's time."""
    import pmetal.perf as perf
    from pmetal.modules import SftModule
    from pmetal.perf import decoder_layers

    module = SftModule(model=str(tiny_model_dir), gradient_checkpointing=False)
    assert module.hparams.compile is None
    with caplog.at_level(logging.INFO, logger="pmetal"):
        _fit(module, tiny_model_dir, steps=1)
    assert "compile off: automatic only on CUDA, this run is on cpu" in caplog.text
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(module.policy))

    seen = {}

    def decide(**kwargs):
        seen.update(kwargs)
        return True, "forced by the test"

    monkeypatch.setattr(perf, "auto_compile_decision", decide)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: setattr(self, "_compiled_call_impl", self._call_impl))
    module = SftModule(model=str(tiny_model_dir), gradient_checkpointing=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pmetal"):
        _fit(module, tiny_model_dir, steps=2)
    assert seen == dict(eligible=True, device_type="cpu", steps=2, eager="")
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(module.policy))
    assert "first step with torch.compile took" in caplog.text


@pytest.mark.parametrize("given", [True, False])
def test_an_explicit_choice_is_never_overridden(tiny_model_dir, monkeypatch, given):
    import pmetal.perf as perf
    from pmetal.modules import SftModule

    monkeypatch.setattr(perf, "auto_compile_decision", lambda **kw: pytest.fail("asked despite an explicit choice"))
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: setattr(self, "_compiled_call_impl", self._call_impl))
    module = SftModule(model=str(tiny_model_dir), gradient_checkpointing=False, compile=given)
    _fit(module, tiny_model_dir, steps=1)
