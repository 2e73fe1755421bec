"""PEFT LoRA / DoRA adapters on QuantLinear layers (QLoRA).

PEFT 0.21 dispatches LoRA layers by module type; `QuantLinear` is registered through
`LoraConfig._register_custom_module` and gets `QuantLoraLinear`, PEFT's own `lora.Linear` with three
changes: in/out features come from the QuantLinear, DoRA's weight norm reads the dequantized weight
(`QuantLinear.weight` is a dequantized copy, which is what PEFT's `dequantize_module_weight` returns
for it), and merging dequantizes, adds the delta and quantizes again (lossy, like PEFT's bitsandbytes
layers). To merge without that loss use `pmetal merge`, which dequantizes the whole model first.

The adapters stay in full precision (fp32 unless the caller casts them), as in QLoRA.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from pmetal.errors import PmetalError
from pmetal.lora_autocast import AutocastInputMixin, keep_input_dtype_under_autocast
from pmetal.quant import functional as QF
from pmetal.quant.linear import QuantLinear


class QuantLoraLinear(AutocastInputMixin, LoraLinear):
    """PEFT's LoRA/DoRA linear around a frozen QuantLinear (input left as is under autocast,
    see `pmetal.lora_autocast`)."""

    def _get_in_out_features(self, module: nn.Module):
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return base.in_features, base.out_features

    def _requantize(self, weight: torch.Tensor) -> None:
        base = self.get_base_layer()
        codes, state = QF.quantize(weight, base.quant_type, base.block_size, base.double_quant)
        base.load_quantized(codes, state)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        weight = base.dequantize(torch.float32)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            if adapter in self.lora_variant:
                raise PmetalError("merging a DoRA adapter into quantized weights is not supported; "
                                  "dequantize first (pmetal.quant.dequantize_model, or `pmetal merge`)")  # fmt: skip
            warnings.warn("merging LoRA into quantized weights requantizes them (rounding error); "
                          "`pmetal merge` merges into full-precision weights instead", stacklevel=2)  # fmt: skip
            weight = weight + self.get_delta_weight(adapter).float()
            if safe_merge and not torch.isfinite(weight).all():
                raise PmetalError(f"NaNs in the merged weights: adapter {adapter!r} is broken")
            self.merged_adapters.append(adapter)
        self._requantize(weight)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().dequantize(torch.float32)
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                weight = weight - self.get_delta_weight(adapter).float()
        self._requantize(weight)

    def __repr__(self) -> str:
        return "pmetal." + super().__repr__()


def register_quant_lora(config: LoraConfig, model: nn.Module | None = None) -> LoraConfig:
    """Make PEFT build `QuantLoraLinear` for every QuantLinear the config targets.

    Call it on the LoraConfig before `peft.get_peft_model(model, config)` or
    `PeftModel.from_pretrained(model, dir, config=config)`. Without it PEFT still wraps QuantLinear
    (it is an nn.Linear) with its default layer and trains correctly, but cannot merge.
    """
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    return config


register_peft = register_quant_lora


def prepare_peft(
    model: nn.Module,
    config: LoraConfig | None = None,
    *,
    r: int = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    use_dora: bool = False,
    task_type: str = "CAUSAL_LM",
) -> PeftModel:
    """Wrap a (possibly quantized) model with LoRA or DoRA adapters.

    Args:
        model: a transformers model, after `quantize_model` / `load_quantized_model` or not.
        config: a ready LoraConfig; when given, the keyword arguments below are ignored.
        r: LoRA rank.
        lora_alpha: LoRA alpha (default 2r).
        lora_dropout: dropout on the adapter input.
        target_modules: "all-linear" (every linear layer but the output head, quantized or not)
            or a list of module names.
        use_dora: DoRA (Liu et al., 2024) instead of plain LoRA.
        task_type: PEFT task type.
    """
    if config is None:
        config = LoraConfig(r=r, lora_alpha=lora_alpha or 2 * r, lora_dropout=lora_dropout,
                            target_modules=target_modules, use_dora=use_dora, task_type=task_type)  # fmt: skip
    register_quant_lora(config)
    peft_model = get_peft_model(model, config)
    keep_input_dtype_under_autocast(peft_model)
    return peft_model


def load_adapter(model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False) -> PeftModel:
    """Load a saved PEFT adapter onto a (possibly quantized) model."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise PmetalError(f"{adapter_dir}: no adapter_config.json; expected a PEFT adapter directory")
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if isinstance(config, LoraConfig):
        register_quant_lora(config)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable)
    keep_input_dtype_under_autocast(peft_model)
    return peft_model
