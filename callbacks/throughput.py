"""ThroughputMonitor: tokens/s, samples/s, peak memory and model FLOPs utilization, every step.

Tokens are real tokens: the sum of every `*attention_mask` in the batch (so padding is not counted),
or the packed length N for a packed batch (`seq_lens` present). Time is measured from one training
batch's end to the next (data loading, forward, backward and optimizer included), after
synchronizing the device so queued GPU work is not mistaken for speed.

MFU follows the PaLM paper's estimate (Chowdhery et al., 2022, appendix B): 6 x parameters x tokens
FLOPs per step, over the device's peak dense bf16 FLOPs (`PEAK_BF16_FLOPS`). Departures: the
attention term (12 x layers x hidden x seq) is left out, and under LoRA the real work is closer to
4 x parameters x tokens (no weight gradients), so MFU is then an upper estimate. Unknown devices
(and the CPU) get no MFU.
"""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import time
from collections.abc import Mapping

import torch
from lightning.pytorch.callbacks import Callback

GIB = 1024**3

# Peak dense bf16 tensor FLOP/s (vendor datasheets; Apple GPUs: fp16/fp32 rate).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "Apple M1 Ultra": 21e12,
    "Apple M1 Max": 10.4e12,
    "Apple M1 Pro": 5.2e12,
    "Apple M1": 2.6e12,
    "Apple M2 Ultra": 27.2e12,
    "Apple M2 Max": 13.6e12,
    "Apple M2 Pro": 6.8e12,
    "Apple M2": 3.6e12,
    "Apple M3 Max": 16.4e12,
    "Apple M3 Pro": 7.4e12,
    "Apple M3": 4.1e12,
    "Apple M4 Max": 18.4e12,
    "Apple M4 Pro": 9.2e12,
    "Apple M4": 4.3e12,
}


def device_name(device: torch.device) -> str:
    """A readable name: the CUDA card, the Apple chip, or the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps" and sys.platform == "darwin":
        try:
            command = ["sysctl", "-n", "machdep.cpu.brand_string"]
            out = subprocess.run(command, capture_output=True, text=True, timeout=2)
            return out.stdout.strip() or "Apple Silicon"
        except (OSError, subprocess.SubprocessError):
            return "Apple Silicon"
    return platform.processor() or platform.machine() or "cpu"


def peak_flops(name: str) -> float | None:
    """Peak bf16 FLOP/s for a device name, matching the longest known key it contains; None if unknown."""
    matches = [key for key in PEAK_BF16_FLOPS if key.lower() in name.lower()]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak memory so far: CUDA max allocated, MPS driver-allocated now, else the process peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def count_tokens(batch: Mapping) -> tuple[int, int]:
    """(real tokens, samples) in a causal-LM, packed or preference batch (`chosen_*`/`rejected_*`)."""
    if "seq_lens" in batch:
        return int(batch["input_ids"].numel()), int(batch["seq_lens"].numel())
    tokens, samples = 0, None
    for key, value in batch.items():
        if not key.endswith("input_ids") or not isinstance(value, torch.Tensor):
            continue
        mask = batch.get(key[: -len("input_ids")] + "attention_mask")
        tokens += int(mask.sum()) if isinstance(mask, torch.Tensor) else value.numel()
        if samples is None:
            samples = value.shape[0]
    return tokens, samples or 0


class ThroughputMonitor(Callback):
    """Log `tok/s` (progress bar), `samples/s`, `peak_mem_gib` and `mfu` at every training step.

    Args:
        warmup_steps: steps left out of the running averages (compilation, allocator warm-up).
        log_every_n_steps: how often to log to the logger (the progress bar gets every step).
    """

    def __init__(self, warmup_steps: int = 1, log_every_n_steps: int = 1) -> None:
        self.warmup_steps = warmup_steps
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.history: list[dict[str, float]] = []
        self._last: float | None = None
        self._num_params = 0
        self._peak_flops: float | None = None
        self._peak_mem = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._num_params = sum(p.numel() for p in pl_module.parameters())
        self._peak_flops = peak_flops(device_name(pl_module.device))
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._last is None:
            synchronize(pl_module.device)
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        device = pl_module.device
        synchronize(device)
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        tokens, samples = count_tokens(batch)
        stats = {"tok/s": tokens / seconds, "samples/s": samples / seconds, "tokens": tokens, "seconds": seconds}
        memory = peak_memory_bytes(device)
        if memory is not None:
            self._peak_mem = max(self._peak_mem, memory)
            stats["peak_mem_gib"] = self._peak_mem / GIB
        if self._peak_flops:
            stats["mfu"] = 6 * self._num_params * tokens / seconds / self._peak_flops
        self.history.append(stats)
        pl_module.log("tok/s", stats["tok/s"], prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        if len(self.history) % self.log_every_n_steps == 0:
            for key in ("samples/s", "peak_mem_gib", "mfu"):
                if key in stats:
                    pl_module.log(f"throughput/{key}", stats[key], on_step=True, on_epoch=False, batch_size=1)

    def summary(self) -> dict[str, float]:
        """Averages over the steps after warm-up: tokens/s, samples/s, peak memory, MFU."""
        steps = self.history[self.warmup_steps :] or self.history
        if not steps:
            return {}
        seconds = sum(s["seconds"] for s in steps)
        tokens = sum(s["tokens"] for s in steps)
        result = {"tok/s": tokens / seconds, "samples/s": sum(s["samples/s"] * s["seconds"] for s in steps) / seconds}
        if "peak_mem_gib" in steps[-1]:
            result["peak_mem_gib"] = steps[-1]["peak_mem_gib"]
        if self._peak_flops:
            result["mfu"] = 6 * self._num_params * tokens / seconds / self._peak_flops
        return result
