"""Model loading details: pad token, adapters (LoRA, DoRA, full), saving what PEFT can reload."""

import pytest
import torch


def test_pad_token_is_never_eos(tiny_model_dir):
    from pmetal.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    # SmolLM2 ships pad == eos (<|im_end|>); pmetal switches to <|endoftext|> so EOS stays learnable
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("adapter", ["dora", "full"])
def test_dora_and_full_fine_tuning_train(adapter, tiny_model_dir, tmp_path):
    from pmetal.modules import SftModule

    module = SftModule(model=str(tiny_model_dir), adapter=adapter, learning_rate=1e-2)
    names = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    if adapter == "dora":
        assert any("lora_magnitude_vector" in n for n in names) and all("lora_" in n for n in names)
    else:
        assert len(names) == len(list(module.policy.parameters()))
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    optimizer = module.configure_optimizers()["optimizer"]
    ids = torch.randint(0, 500, (2, 10))
    loss, _ = module.compute_loss({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    loss.backward()
    optimizer.step()
    changed = [n for n, p in module.policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed
    out = module.save_pretrained(tmp_path / adapter)
    assert (out / ("adapter_config.json" if adapter == "dora" else "config.json")).is_file()
