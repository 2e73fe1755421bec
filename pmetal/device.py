"""Accelerator and precision choice: MPS first, then CUDA, then CPU, overridable.

The choice is made once per run and reported in one log line that says what was picked and why,
so a user on a Mac sees at once whether the GPU is in use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pmetal.errors import PmetalError

log = logging.getLogger("pmetal")

ACCELERATORS = ("auto", "mps", "cuda", "cpu")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


@dataclass(frozen=True)
class DeviceChoice:
    """What a run trains on.

    Attributes:
        accelerator: Lightning accelerator name: "mps", "cuda" or "cpu".
        precision: Lightning precision string, e.g. "bf16-mixed" or "32-true".
        weight_dtype: dtype to load frozen base weights in (adapters stay float32).
        reason: one human sentence explaining the choice.
    """

    accelerator: str
    precision: str
    weight_dtype: torch.dtype
    reason: str

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.accelerator)

    def describe(self) -> str:
        dtype = str(self.weight_dtype).replace("torch.", "")
        return f"device: {self.accelerator}, precision {self.precision}, base weights {dtype} ({self.reason})"


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def mps_supports_bf16() -> bool:
    """bf16 on MPS needs macOS 14+; probing is the only portable check."""
    if not mps_available():
        return False
    try:
        (torch.ones(2, dtype=torch.bfloat16, device="mps") * 2).cpu()
        return True
    except (RuntimeError, TypeError):
        return False


def cuda_supports_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _default_precision(accelerator: str) -> tuple[str, torch.dtype, str]:
    if accelerator == "cuda":
        if cuda_supports_bf16():
            return "bf16-mixed", torch.bfloat16, "bf16 autocast; the GPU supports bf16"
        return "16-mixed", torch.float16, "fp16 autocast; this GPU lacks bf16"
    if accelerator == "mps":
        if mps_supports_bf16():
            return "bf16-mixed", torch.bfloat16, "bf16 autocast; this macOS supports bf16 on MPS"
        return "16-mixed", torch.float16, "fp16 autocast; bf16 on MPS needs macOS 14+"
    return "32-true", torch.float32, "fp32 on CPU (pass --precision bf16-mixed for speed)"


def choose_device(accelerator: str = "auto", precision: str = "auto") -> DeviceChoice:
    """Pick the accelerator (mps > cuda > cpu) and a precision that device supports.

    Args:
        accelerator: "auto" or one of "mps", "cuda", "cpu".
        precision: "auto" or a Lightning precision string.

    Raises:
        PmetalError: if the requested accelerator is not available or the names are unknown.
    """
    if accelerator not in ACCELERATORS:
        raise PmetalError(f"unknown accelerator {accelerator!r}; expected one of {', '.join(ACCELERATORS)}")
    if precision not in PRECISIONS:
        raise PmetalError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if accelerator == "auto":
        if mps_available():
            accelerator, why = "mps", "Apple GPU found"
        elif torch.cuda.is_available():
            accelerator, why = "cuda", f"CUDA GPU found ({torch.cuda.get_device_name(0)})"
        else:
            accelerator, why = "cpu", "no MPS or CUDA device"
    else:
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": mps_available()}
        if not available[accelerator]:
            raise PmetalError(f"--accelerator {accelerator} was asked for, but no {accelerator.upper()} device is available")
        why = "asked for"
    default_precision, dtype, precision_why = _default_precision(accelerator)
    if precision == "auto":
        precision = default_precision
    else:
        precision_why = "precision asked for"
        if "bf16" in precision:
            if accelerator == "mps" and not mps_supports_bf16():
                raise PmetalError("bf16 on MPS needs macOS 14 or newer; use --precision 16-mixed")
            dtype = torch.bfloat16
        elif precision.startswith("16"):
            dtype = torch.float16
        else:
            dtype = torch.float32
    return DeviceChoice(accelerator, precision, dtype, f"{why}; {precision_why}")
