"""QLoRA through SftModule (quantization="nf4"), then `pmetal merge` into full-precision weights."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from pmetal.quant import QuantLinear

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _chat_data(path, rows=16):
    with path.open("w") as f:
        for i in range(rows):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say the code {i % 4}."},
                                             {"role": "assistant", "content": f"Code {'ABCD'[i % 4]}."}]}) + "\n")  # fmt: skip
    return path


def test_sft_module_qlora_trains_and_merges(tiny_model_dir, tmp_path):
    import lightning as L
    from transformers import AutoModelForCausalLM

    from pmetal.cli import main
    from pmetal.data.datamodule import SftDataModule
    from pmetal.modules import SftModule
    from pmetal.cli.runner import build_trainer, fit

    L.seed_everything(0)
    module = SftModule(model=str(tiny_model_dir), quantization="nf4", learning_rate=2e-2, lr_schedule="constant")
    quantized = [m for m in module.policy.modules() if isinstance(m, QuantLinear)]
    assert quantized
    before = [{k: b.clone() for k, b in m.named_buffers()} for m in quantized]
    trainer = build_trainer(tmp_path / "run", max_steps=12, max_epochs=None, enable_progress_bar=False)
    fit(trainer, module, SftDataModule(path=str(_chat_data(tmp_path / "chat.jsonl")), batch_size=4, max_seq_len=48,
                                       val_fraction=0.0))  # fmt: skip
    history = json.loads((tmp_path / "run" / "loss_history.json").read_text())["train"]
    assert sum(v for _, v in history[-3:]) < 0.8 * sum(v for _, v in history[:3])
    for m, saved in zip(quantized, before):
        assert all(torch.equal(b, saved[k]) for k, b in m.named_buffers())

    adapter = module.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--base", str(tiny_model_dir), "--out", str(out)]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["quantization"] == "nf4"  # read from the adapter's pmetal_config.json
    assert report["logits_max_abs_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    ids = torch.tensor([[1, 20, 300, 4000, 5, 6]])
    module.policy.eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, module.policy(input_ids=ids).logits, atol=1e-4)


def test_merge_without_adapter_names_the_directory(tmp_path, capsys):
    from pmetal.cli import main

    assert main(["merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no adapter_config.json; expected a PEFT adapter directory" in capsys.readouterr().err


def test_merge_onto_a_bitsandbytes_checkpoint(tiny_model_dir, tmp_path):
    """An adapter trained on a `*-bnb-4bit` base merges into that base's dequantized weights, read
    from its packed bytes (no requantization): the merged model gives the adapter's logits."""
    from transformers import AutoModelForCausalLM

    from pmetal.cli import main
    from pmetal.modules import SftModule
    from tests.tiny import randomize_lora_b, save_bnb_4bit_copy

    base = tmp_path / "bnb"
    save_bnb_4bit_copy(tiny_model_dir, base)
    module = SftModule(model=str(base))
    randomize_lora_b(module)  # a non-trivial adapter without a training run
    adapter = module.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--base", str(base), "--out", str(out)]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["quantization"] == "nf4"
    assert report["logits_max_abs_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    ids = torch.tensor([[1, 20, 300, 4000, 5, 6]])
    module.policy.eval()
    with torch.no_grad():
        adapted = module.policy(input_ids=ids).logits
        with module.policy.disable_adapter():
            assert not torch.allclose(adapted, module.policy(input_ids=ids).logits, atol=1e-3)  # the adapter matters
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-4)
