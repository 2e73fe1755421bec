"""LoRA SFT on the real SmolLM2-135M-Instruct teaches it a signature it never used before."""

import pytest

from tasks import persona_rows, signature_rate, write_rows

pytestmark = pytest.mark.slow


def test_lora_sft_learns_the_persona_signature(smollm2_dir, tmp_path):
    import lightning as L

    from pmetal.data.datamodule import SftDataModule
    from pmetal.modules import SftModule
    from pmetal.runner import build_trainer, fit

    L.seed_everything(0)
    data = write_rows(persona_rows(48), tmp_path / "persona.jsonl")
    module = SftModule(model=str(smollm2_dir), learning_rate=1e-3, warmup_steps=2, gradient_checkpointing=False)
    module.policy.eval()
    before = signature_rate(module.policy, module.tokenizer)
    assert before == 0.0, "the base model already uses the signature: the task proves nothing"

    trainer = build_trainer(tmp_path / "run", max_steps=24, max_epochs=None, enable_progress_bar=False)
    fit(trainer, module, SftDataModule(path=str(data), batch_size=4, max_seq_len=96, val_fraction=0.0))
    module.policy.eval()
    after = signature_rate(module.policy, module.tokenizer)
    assert after >= 0.75, f"signature rate on held-out questions: before {before}, after {after}"
