"""Merging adapters: one adapter into its base (`merge_adapter`), several adapters into one
(`merge_adapters`, on PEFT's `LoraModel.add_weighted_adapter`).

How PEFT combines (each adapter i is B_i A_i scaled by s_i = alpha_i / r_i; weights w_i):

- `cat`: A = [w_1 s_1 A_1; ...], B = [B_1 ... B_n], so the update is exactly sum_i w_i s_i B_i A_i;
  rank sum(r_i).
- `svd`: the same sum computed in full, then truncated to rank max(r_i) by SVD (exact when that sum
  has rank <= max(r_i), up to the SVD's rounding).
- `linear`, `dare_linear`: the factors are combined separately, A = sum_i sqrt(w_i s_i) A_i,
  B = sum_i sqrt(w_i s_i) B_i, so the update holds the cross terms B_i A_j (a rough approximation;
  equal ranks needed). `dare_linear` first drops a (1 - density) fraction of each factor at random
  and rescales the rest (DARE, Yu et al. 2024).
- `ties`, `dare_ties`: per factor, keep the `density` largest entries (`dare_ties`: a random
  `density` fraction, rescaled), elect each entry's sign by total magnitude, and average the entries
  that agree with it (TIES, Yadav et al. 2023); equal ranks needed.

So an adapter merged with itself equals it under `cat` and `svd` at weights summing to 1, under
`ties` and `dare_ties` at density 1 and equal weights 1, and under `linear` given once at weight 1;
`linear` of two copies at weight w gives (2 sqrt(w))^2 = 4w times the update (the cross terms).
The merged adapter has lora_alpha = r (scaling 1). DoRA and rsLoRA adapters are refused: PEFT
would copy their flags onto an adapter whose factors already hold the scaling.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from pmetal.atomic import atomic_output
from pmetal.errors import PmetalError
from pmetal.export.common import DENSITY_METHODS, EQUAL_RANK_METHODS, MERGE_METHODS
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain gradient descent in one sentence.",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def read_adapter_config(adapter: str | Path) -> dict:
    """The adapter's adapter_config.json, or a one-line error naming the folder or file."""
    adapter = Path(adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise PmetalError(f"{adapter}: no adapter_config.json; expected a PEFT adapter directory (e.g. runs/x/final)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PmetalError(f"{config_file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise PmetalError(f"{config_file}: field 'peft_type' is {config.get('peft_type')!r}; expected 'LORA' "
                          "(only LoRA adapters can be merged)")  # fmt: skip
    return config


def adapter_base(adapter: Path, config: dict) -> str | None:
    """The base an adapter was trained on: pmetal's record, else PEFT's base_model_name_or_path."""
    from pmetal.export.source import adapter_settings

    return adapter_settings(adapter).get("model") or config.get("base_model_name_or_path")


def adapter_rank(config: dict) -> int:
    return max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])


def check_merge_inputs(adapters: list[Path], method: str, weights: list[float] | None,
                       density: float | None) -> tuple[list[float], float | None]:
    """Validate the adapters and settings before any model loads; returns (weights, density)."""
    if method not in MERGE_METHODS:
        raise PmetalError(f"--method {method!r}: expected one of {', '.join(MERGE_METHODS)}")
    if len(adapters) < 1:
        raise PmetalError("--adapters: give at least one adapter directory")
    configs = [read_adapter_config(a) for a in adapters]
    for adapter, config in zip(adapters, configs):
        for flag, what in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA")):
            if config.get(flag):
                raise PmetalError(f"{adapter / 'adapter_config.json'}: field '{flag}' is true; {what} adapters cannot "
                                  "be merged with others (PEFT's add_weighted_adapter combines plain LoRA only)")  # fmt: skip
    bases = [adapter_base(a, c) for a, c in zip(adapters, configs)]
    for adapter, base in zip(adapters[1:], bases[1:]):
        if base != bases[0]:
            raise PmetalError(f"{adapter / 'adapter_config.json'}: field 'base_model_name_or_path' is {base!r} but "
                              f"{adapters[0]} was trained on {bases[0]!r}; adapters must share their base model")  # fmt: skip
    if method in EQUAL_RANK_METHODS:
        ranks = [adapter_rank(c) for c in configs]
        for adapter, rank in zip(adapters[1:], ranks[1:]):
            if rank != ranks[0]:
                raise PmetalError(f"{adapter / 'adapter_config.json'}: field 'r' is {rank} but {adapters[0]} has "
                                  f"r={ranks[0]}; --method {method} needs equal ranks (use cat or svd)")  # fmt: skip
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise PmetalError(f"--weights: {len(weights)} value(s) for {len(adapters)} adapter(s); give one weight per adapter")
    if density is not None and method not in DENSITY_METHODS:
        raise PmetalError(f"--density applies to {', '.join(DENSITY_METHODS)}, not --method {method}")
    if method in DENSITY_METHODS:
        density = 1.0 if density is None else density
        if not 0.0 < density <= 1.0:
            raise PmetalError(f"--density {density}: expected a fraction in (0, 1] (1 keeps every entry)")
    return [float(w) for w in weights], density


def combine_adapters(adapters: list[str | Path], *, method: str, weights: list[float] | None = None,
                     density: float | None = None, base: str | None = None, seed: int = 0,
                     trust_remote_code: bool = False):
    """(peft_model, tokenizer, base, quantization, settings): the adapters loaded onto their base and
    combined by PEFT into the adapter named "default" (the only one left), eval mode."""
    from pmetal.export.source import load_base_for_adapter

    adapters = [Path(a) for a in adapters]
    weights, density = check_merge_inputs(adapters, method, weights, density)
    peft_model, tokenizer, base, quantization = load_base_for_adapter(
        adapters[0], base=base, trust_remote_code=trust_remote_code)
    # load_base_for_adapter names the first adapter "default"; the merge result takes that name, so
    # the inputs get their own names and are deleted afterwards
    names = [f"input_{i}" for i in range(len(adapters))]
    with warnings.catch_warnings():  # PEFT's notes on the renaming below and on density 1 (no pruning, as asked)
        warnings.filterwarnings("ignore", message=r"Adapter \S+ was active which is now deleted")
        warnings.filterwarnings("ignore", message=r"The density .* no pruning will be performed")
        for name, adapter in zip(names, adapters):
            peft_model.load_adapter(str(adapter), adapter_name=name)
        peft_model.delete_adapter("default")
        torch.manual_seed(seed)  # DARE's random drop
        peft_model.add_weighted_adapter(names, weights, "default", combination_type=method, density=density)
        peft_model.set_adapter("default")
        for name in names:
            peft_model.delete_adapter(name)
    settings = {"method": method, "weights": weights, "density": density, "seed": seed,
                "adapters": [str(a) for a in adapters]}  # fmt: skip
    return peft_model.eval(), tokenizer, base, quantization, settings


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def save_fused(peft_model, tokenizer, out: str | Path, *, dtype: str = "float32",
               prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS, report: dict | None = None) -> dict:
    """Fuse the active adapter into its base and save a transformers model to `out` (atomically),
    with `merge_report.json`: the merge error (max / mean |dlogit| of the saved model against the
    unmerged adapter in fp32) on `prompts`."""
    tokenizer.padding_side = "right"
    batch = dict(tokenizer(list(prompts), return_tensors="pt", padding=True))
    reference = _logits(peft_model, batch)
    merged = peft_model.merge_and_unload().to(getattr(torch, dtype))
    diff = (_logits(merged, batch) - reference).abs()[batch["attention_mask"].bool()]
    report = {**(report or {}), "dtype": dtype, "logits_max_abs_diff": diff.max().item(),
              "logits_mean_abs_diff": diff.mean().item(),
              "reference": "unmerged adapter on the dequantized base, float32"}  # fmt: skip
    with atomic_output(Path(out), directory=True) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def merge_adapter(adapter: str | Path, out: str | Path, *, base: str | None = None, quantization: str | None = None,
                  quant_block_size: int = 64, double_quant: bool = True, dtype: str = "float32",
                  prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS, trust_remote_code: bool = False) -> dict:
    """Merge `adapter` into its (dequantized) base and save it to `out`; returns the error report."""
    from pmetal.export.source import load_base_for_adapter

    peft_model, tokenizer, base, quantization = load_base_for_adapter(
        adapter, base=base, quantization=quantization, quant_block_size=quant_block_size,
        double_quant=double_quant, trust_remote_code=trust_remote_code)
    return save_fused(peft_model, tokenizer, out, dtype=dtype, prompts=prompts,
                      report={"base": str(base), "adapter": str(adapter), "quantization": quantization})


def merge_adapters(adapters: list[str | Path], out: str | Path, *, method: str = "cat",
                   weights: list[float] | None = None, density: float | None = None, fuse: bool = False,
                   base: str | None = None, dtype: str = "float32", seed: int = 0,
                   prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS, trust_remote_code: bool = False) -> dict:
    """Combine `adapters` with PEFT (see the module docstring) and write the result to `out`: a PEFT
    adapter directory, or with `fuse` a full transformers model. Returns the report (also saved as
    `merge_report.json`)."""
    peft_model, tokenizer, base, quantization, settings = combine_adapters(
        adapters, method=method, weights=weights, density=density, base=base, seed=seed,
        trust_remote_code=trust_remote_code)
    report = {"base": str(base), "quantization": quantization, **settings, "fused": fuse}
    if fuse:
        return save_fused(peft_model, tokenizer, out, dtype=dtype, prompts=prompts, report=report)
    first = Path(adapters[0])
    with atomic_output(Path(out), directory=True) as staging:
        peft_model.save_pretrained(staging, safe_serialization=True)
        for name in ("pmetal_config.json", *TOKENIZER_FILES):  # the base and tokenizer the inputs share
            if (first / name).is_file():
                shutil.copy(first / name, staging / name)
        (staging / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
