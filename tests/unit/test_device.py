import pytest
import torch

import pmetal.device as device
from pmetal.errors import PmetalError


def test_auto_prefers_mps_then_cuda_then_cpu(monkeypatch):
    monkeypatch.setattr(device, "mps_available", lambda: True)
    monkeypatch.setattr(device, "mps_supports_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    choice = device.choose_device()
    assert (choice.accelerator, choice.precision, choice.weight_dtype) == ("mps", "bf16-mixed", torch.bfloat16)
    assert "Apple GPU" in choice.reason

    monkeypatch.setattr(device, "mps_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "H100")
    monkeypatch.setattr(device, "cuda_supports_bf16", lambda: True)
    choice = device.choose_device()
    assert (choice.accelerator, choice.precision) == ("cuda", "bf16-mixed")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    choice = device.choose_device()
    assert (choice.accelerator, choice.precision, choice.weight_dtype) == ("cpu", "32-true", torch.float32)
    assert "cpu" in choice.describe()


def test_old_macos_gets_fp16_autocast(monkeypatch):
    monkeypatch.setattr(device, "mps_available", lambda: True)
    monkeypatch.setattr(device, "mps_supports_bf16", lambda: False)
    choice = device.choose_device()
    assert (choice.precision, choice.weight_dtype) == ("16-mixed", torch.float16)
    with pytest.raises(PmetalError, match="macOS 14"):
        device.choose_device("mps", "bf16-mixed")


def test_overrides_and_errors(monkeypatch):
    monkeypatch.setattr(device, "mps_available", lambda: True)
    monkeypatch.setattr(device, "mps_supports_bf16", lambda: True)
    choice = device.choose_device("cpu", "bf16-mixed")
    assert (choice.accelerator, choice.precision, choice.weight_dtype) == ("cpu", "bf16-mixed", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PmetalError, match="no CUDA device"):
        device.choose_device("cuda")
    with pytest.raises(PmetalError, match="unknown accelerator"):
        device.choose_device("tpu")
    with pytest.raises(PmetalError, match="unknown precision"):
        device.choose_device("cpu", "fp8")
