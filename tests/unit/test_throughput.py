"""ThroughputMonitor: token counting, device tables and logging in a real (tiny) Lightning fit."""

from __future__ import annotations

import pytest
import torch

from pmetal.callbacks import throughput
from pmetal.callbacks.throughput import ThroughputMonitor, count_tokens, peak_flops, peak_memory_bytes


def test_count_tokens_excludes_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert count_tokens({"input_ids": torch.zeros(2, 4), "attention_mask": mask, "labels": mask}) == (5, 2)
    packed = {"input_ids": torch.zeros(1, 9), "seq_lens": torch.tensor([4, 5]), "labels": torch.zeros(1, 9)}
    assert count_tokens(packed) == (9, 2)
    preference = {
        "chosen_input_ids": torch.zeros(2, 4),
        "chosen_attention_mask": mask,
        "rejected_input_ids": torch.zeros(2, 3),
        "rejected_attention_mask": torch.ones(2, 3),
    }
    assert count_tokens(preference) == (11, 2)
    assert count_tokens({"input_ids": torch.zeros(3, 5)}) == (15, 3)


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Apple M2 Max") == 13.6e12  # the longest match, not "Apple M2"
    assert peak_flops("Apple M2") == 3.6e12
    assert peak_flops("x86_64") is None
    assert peak_memory_bytes(torch.device("cpu")) > 10 * 2**20  # this process's peak RSS


class _TinyLM:
    @staticmethod
    def module():
        import lightning.pytorch as pl
        from transformers import LlamaConfig, LlamaForCausalLM

        from pmetal.logps import lm_loss

        class TinyLM(pl.LightningModule):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                config = LlamaConfig(
                    vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1,
                )
                self.model = LlamaForCausalLM(config)

            def training_step(self, batch, batch_idx):
                return lm_loss(self.model, batch)[0]

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return TinyLM()


def _loader(steps=4):
    batches = []
    for i in range(steps):
        ids = torch.randint(0, 50, (2, 8))
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5 + i % 2 :] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches


@pytest.mark.parametrize("fake_peak", [None, 1e12])
def test_monitor_logs_in_a_fit(monkeypatch, tmp_path, fake_peak):
    import lightning.pytorch as pl

    monkeypatch.setattr(throughput, "peak_flops", lambda name: fake_peak)
    monitor = ThroughputMonitor(warmup_steps=1)
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", callbacks=[monitor], logger=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    loader = _loader()
    trainer.fit(_TinyLM.module(), train_dataloaders=torch.utils.data.DataLoader(loader, batch_size=None))
    assert [s["tokens"] for s in monitor.history] == [int(b["attention_mask"].sum()) for b in loader]
    assert all(s["tok/s"] > 0 and s["peak_mem_gib"] > 0 for s in monitor.history)
    assert "tok/s" in trainer.callback_metrics
    summary = monitor.summary()
    assert summary["tok/s"] == pytest.approx(
        sum(s["tokens"] for s in monitor.history[1:]) / sum(s["seconds"] for s in monitor.history[1:])
    )
    if fake_peak is None:
        assert "mfu" not in summary and "throughput/mfu" not in trainer.callback_metrics
    else:
        params = sum(p.numel() for p in trainer.lightning_module.parameters())
        assert summary["mfu"] == pytest.approx(6 * params * summary["tok/s"] / fake_peak)
        assert "throughput/mfu" in trainer.callback_metrics
