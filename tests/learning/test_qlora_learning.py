"""QLoRA (NF4 base, double quantization) on the real SmolLM2-135M-Instruct learns what LoRA learns.

Same task, settings and bar as test_sft_learning.py's LoRA run (the persona signature it never used
before), with the base's linear layers quantized to NF4 by pmetal's pure-PyTorch path.
"""

import pytest
import torch

from tasks import learn_persona

pytestmark = pytest.mark.slow


def test_qlora_nf4_sft_learns_the_persona_signature(smollm2_dir, tmp_path):
    import lightning as L

    from pmetal.modules import SftModule
    from pmetal.quant import QuantLinear, quantized_memory

    L.seed_everything(0)
    module = SftModule(model=str(smollm2_dir), quantization="nf4", learning_rate=1e-3, warmup_steps=2,
                       gradient_checkpointing=False)  # fmt: skip
    quantized = [m for m in module.policy.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 30 * 7  # every projection of the 30 blocks; lm_head (tied) stays
    assert quantized_memory(module.policy)["bytes_per_param"] < 0.53
    packed = [m.qweight.clone() for m in quantized[:3]]
    before, after = learn_persona(module, tmp_path)
    assert before == 0.0, "the base model already uses the signature: the task proves nothing"
    assert after >= 0.75, f"signature rate on held-out questions: before {before}, after {after}"
    assert all(torch.equal(m.qweight, p) for m, p in zip(quantized, packed))
