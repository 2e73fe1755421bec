"""LoRA SFT on the real SmolLM2-135M-Instruct teaches it a signature it never used before."""

import pytest

from tasks import learn_persona

pytestmark = pytest.mark.slow


def test_lora_sft_learns_the_persona_signature(smollm2_dir, tmp_path):
    import lightning as L

    from pmetal.modules import SftModule

    L.seed_everything(0)
    module = SftModule(model=str(smollm2_dir), learning_rate=1e-3, warmup_steps=2, gradient_checkpointing=False)
    before, after = learn_persona(module, tmp_path)
    assert before == 0.0, "the base model already uses the signature: the task proves nothing"
    assert after >= 0.75, f"signature rate on held-out questions: before {before}, after {after}"
