"""Vision-language models: loading, which parts train, and the pixel inputs of a forward pass.

A VLM is a model whose config has a `vision_config` (Qwen2-VL / Qwen2.5-VL / Qwen3-VL,
Idefics3 / SmolVLM, LLaVA-style and others following transformers' image-text-to-text API). It is
loaded with `AutoModelForImageTextToText` and `AutoProcessor`. Where the processor cannot be built
(transformers' Qwen2-VL processor needs torchvision for its video half), pmetal builds one from
the tokenizer and the image processor (`PartsProcessor`, images only).

Training: LoRA goes on the linear layers of the language model only (`language_model_targets`);
the vision tower and the projector stay frozen unless `train_projector` / `train_vision_tower`
ask for them, which then train fully and are saved with the adapter (PEFT `modules_to_save`).
QLoRA quantizes the language model's linear layers only. The reference model is the base with
the adapter off, as for text.

Forward passes: a batch's image tensors (`pixel_values`, `image_grid_thw`, `pixel_attention_mask`,
...) travel as one dict, "pixel inputs", next to the token tensors. `forward_inputs` adds what
some families derive from the token ids (Qwen's `mm_token_type_ids`), so a rollout row rebuilt
from ids needs nothing else. Qwen-family models place image tokens with multimodal RoPE
(3-D positions); `prefill_positions` gives generation the same positions the update computes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pmetal.errors import PmetalError

log = logging.getLogger("pmetal")

VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "mm_projector", "merger")
TOKEN_TENSORS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
# image tensors laid out per patch (Qwen family: rows of every image concatenated), not per row
CONCATENATED_PIXEL_KEYS = ("image_grid_thw",)


# ---------------------------------------------------------------------------------------------- detection
def is_vlm_config(config) -> bool:
    """Whether a transformers config (or a config.json dict) describes a vision-language model."""
    if isinstance(config, dict):
        return config.get("vision_config") is not None
    return getattr(config, "vision_config", None) is not None


def is_vlm(name: str | Path) -> bool:
    """Whether the model named like `load_model_and_tokenizer`'s `name` is a VLM (reads config.json only)."""
    import json

    from pmetal.models import resolve_model

    source, gguf = resolve_model(name)
    if gguf:
        return False
    config = Path(source) / "config.json"
    if config.is_file():
        try:
            return is_vlm_config(json.loads(config.read_text()))
        except (OSError, ValueError):
            return False
    try:
        from transformers import AutoConfig

        return is_vlm_config(AutoConfig.from_pretrained(source))
    except Exception:  # a hub id that cannot be reached: the text loader reports it
        return False


# ---------------------------------------------------------------------------------------------- processors
class PartsProcessor:
    """A Qwen-style image processor and a tokenizer acting as the model's processor (images only).

    Used when `AutoProcessor` cannot be built (transformers' Qwen2-VL/2.5-VL/3-VL processors need
    torchvision for video). Each image placeholder in the text (`image_token`, `<|image_pad|>`) is
    expanded to the number of merged patches of its image, as the transformers processor does.
    """

    def __init__(self, tokenizer, image_processor, image_token: str = "<|image_pad|>") -> None:
        self.tokenizer, self.image_processor, self.image_token = tokenizer, image_processor, image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.chat_template = getattr(tokenizer, "chat_template", None)

    @classmethod
    def from_pretrained(cls, source: str, **kwargs) -> PartsProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
        if not hasattr(image_processor, "merge_size"):
            raise PmetalError(f"cannot build a processor for {source}: AutoProcessor failed and its image processor "
                              f"({type(image_processor).__name__}) is not a Qwen-style one pmetal can drive itself")
        return cls(tokenizer, image_processor)

    def __call__(self, text: Sequence[str], images=None, return_tensors: str = "pt", **_):
        from transformers import BatchFeature

        flat = [im for row in (images or []) for im in (row if isinstance(row, (list, tuple)) else [row])]
        pixels: dict[str, Any] = {}
        counts: list[int] = []
        if flat:
            pixels = dict(self.image_processor(images=flat, return_tensors="pt"))
            merge = self.image_processor.merge_size ** 2
            counts = [int(n) for n in (pixels["image_grid_thw"].prod(-1) // merge).tolist()]
        expanded, k = [], 0
        for t in text:
            parts = t.split(self.image_token)
            pieces = [parts[0]]
            for part in parts[1:]:
                if k >= len(counts):
                    raise PmetalError(f"the text has more {self.image_token} placeholders than images")
                pieces += [self.image_token * counts[k], part]
                k += 1
            expanded.append("".join(pieces))
        enc = self.tokenizer(expanded, add_special_tokens=False, padding=True, return_tensors=return_tensors)
        enc["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()
        return BatchFeature({**enc, **pixels})

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def save_pretrained(self, out) -> None:
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)


def load_processor(source: str, *, trust_remote_code: bool = False):
    """`AutoProcessor` of `source`, or a `PartsProcessor` where that cannot be built."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError, OSError, TypeError, AttributeError) as exc:
        log.info("AutoProcessor of %s failed (%s); building the processor from its tokenizer and image processor",
                 source, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        try:
            return PartsProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        except OSError as inner:
            raise PmetalError(f"could not load a processor for {source!r}: {exc}; {inner}") from None


def image_token(processor) -> tuple[str, int]:
    """(placeholder text, its id): the token the chat template writes for each image."""
    token = getattr(processor, "image_token", None)
    if not isinstance(token, str):
        token = getattr(token, "content", None) or "<image>"
    return token, int(processor.tokenizer.convert_tokens_to_ids(token))


# ---------------------------------------------------------------------------------------------- loading
def load_vlm_and_processor(name: str | Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                           attn_implementation: str | None = "sdpa", quantization: str | None = None,
                           quant_block_size: int = 64, double_quant: bool = True, quant_backend: str = "auto"):
    """Load a VLM (`AutoModelForImageTextToText`) and its processor; quantize its language model for QLoRA.

    Returns (model, processor); `processor.tokenizer` has a pad token that is not EOS.
    """
    from transformers import AutoModelForImageTextToText

    from pmetal.models import ensure_pad_token, resolve_model

    source, gguf = resolve_model(name)
    if gguf:
        raise PmetalError(f"{name}: a GGUF file holds a text model; a VLM needs a Hugging Face directory or hub id")
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype or torch.float32,
                                                            trust_remote_code=trust_remote_code, **attention)
    except (OSError, ValueError) as exc:
        raise PmetalError(f"could not load the vision-language model {name!r}: {exc}") from exc
    processor = load_processor(source, trust_remote_code=trust_remote_code)
    ensure_pad_token(processor.tokenizer, model)
    if quantization:
        from pmetal.quant import quantize_model

        language = language_model(model)
        quantize_model(language, quantization, block_size=quant_block_size, double_quant=double_quant,
                       compute_dtype=dtype or torch.float32, backend=quant_backend)
        model.pmetal_quantization = language.pmetal_quantization
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor


def load_model_tokenizer_processor(name: str | Path, *, vlm: bool | None = None, **kwargs):
    """(model, tokenizer, processor or None): a VLM with its processor when `vlm` (None: detected
    from the config), else `pmetal.models.load_model_and_tokenizer`'s causal LM. `kwargs` are theirs."""
    if vlm is None:
        vlm = is_vlm(name)
    if not vlm:
        from pmetal.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(name, **kwargs)
        return model, tokenizer, None
    model, processor = load_vlm_and_processor(name, **kwargs)
    return model, processor.tokenizer, processor


def _qualified_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def language_model(model: nn.Module) -> nn.Module:
    """The VLM's language model (decoder stack, no LM head), PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        raise PmetalError(f"{type(base).__name__}: cannot find its language model (expected get_decoder())")
    return decoder


def _find_part(model: nn.Module, names: Sequence[str]) -> str | None:
    found = [n for n, _ in model.named_modules() if n and n.split(".")[-1] in names]
    return min(found, key=lambda n: n.count(".")) if found else None


def vision_parts(model: nn.Module) -> dict[str, str | None]:
    """Qualified names of the vision tower and the projector (None where the model has none)."""
    return {"vision_tower": _find_part(model, VISION_TOWER_NAMES), "projector": _find_part(model, PROJECTOR_NAMES)}


def language_model_targets(model: nn.Module, target_modules: str | list[str] = "all-linear") -> str:
    """A PEFT `target_modules` regex selecting linear layers inside the language model only.

    "all-linear" means every linear layer of the language model; a list keeps those names (last
    components, as PEFT matches them) but only inside the language model.
    """
    prefix = _qualified_name(model, language_model(model))
    leaves = sorted({n.split(".")[-1] for n, m in model.named_modules() if n.startswith(prefix + ".")
                     and (isinstance(m, nn.Linear) or type(m).__module__.startswith("pmetal.quant"))})
    if target_modules != "all-linear":
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        leaves = [leaf for leaf in leaves if leaf in wanted]
        if not leaves:
            raise PmetalError(f"target_modules {wanted} match no linear layer of the language model ({prefix})")
    return rf"^{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})$"


def trainable_vision_modules(model: nn.Module, *, train_projector: bool, train_vision_tower: bool) -> list[str]:
    """Qualified names of the vision parts that train fully (and are saved with the adapter)."""
    parts = vision_parts(model)
    names = []
    if train_vision_tower:
        if parts["vision_tower"] is None:
            raise PmetalError(f"{type(model).__name__} has no vision tower pmetal recognizes ({', '.join(VISION_TOWER_NAMES)})")
        names.append(parts["vision_tower"])
    if train_projector:
        if parts["projector"] is None:
            raise PmetalError(f"{type(model).__name__} has no projector pmetal recognizes ({', '.join(PROJECTOR_NAMES)})")
        if not any(parts["projector"].startswith(n + ".") for n in names):  # Qwen's merger lives in the tower
            names.append(parts["projector"])
    return names


def vlm_adapter_kwargs(model: nn.Module, adapter: str, target_modules: str | list[str] = "all-linear",
                       train_projector: bool = False, train_vision_tower: bool = False) -> dict[str, Any]:
    """`apply_adapter` keywords for a VLM: LoRA on the language model; vision parts frozen unless asked.

    Under full fine-tuning the language model trains and the vision parts not asked for stay frozen.
    """
    keep = trainable_vision_modules(model, train_projector=train_projector, train_vision_tower=train_vision_tower)
    if adapter == "full":
        parts = [p for p in vision_parts(model).values() if p]
        return {"frozen": [p for p in parts if not any(p == k or p.startswith(k + ".") for k in keep)]}
    return {"target_modules": language_model_targets(model, target_modules), "modules_to_save": keep}


# ---------------------------------------------------------------------------------------------- forward inputs
def multimodal_model(model: nn.Module) -> nn.Module | None:
    """The VLM's vision + language stack (`model.model`), or None for a text-only model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    return inner if inner is not None and hasattr(inner, "get_image_features") else None


def forward_inputs(model: nn.Module, input_ids: torch.Tensor, pixel_inputs: dict | None) -> dict[str, Any]:
    """The keyword inputs beside the token ids: the pixel inputs, plus Qwen's `mm_token_type_ids`."""
    if not pixel_inputs:
        return {}
    device = input_ids.device
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in pixel_inputs.items() if k not in TOKEN_TENSORS}
    inner = multimodal_model(model)
    if inner is not None and hasattr(inner, "get_rope_index"):
        config = inner.config
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == config.image_token_id] = 1
        if getattr(config, "video_token_id", None) is not None:
            types[input_ids == config.video_token_id] = 2
        inputs["mm_token_type_ids"] = types
    return inputs


def placeholder_token_ids(model: nn.Module) -> tuple[int, ...]:
    """The ids that stand for image or video features (none for a text model).

    A completion must never contain one: the update's forward would find one more placeholder
    than the images have features and fail, so rollouts suppress them (`SamplingConfig.suppress_ids`).
    """
    inner = multimodal_model(model)
    if inner is None:
        return ()
    config = inner.config
    names = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")
    return tuple(sorted({int(v) for v in (getattr(config, n, None) for n in names) if isinstance(v, int) and v >= 0}))


def prefill_positions(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, pixel_inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions for the prefill forward, the last position of each row) of a left-padded prompt batch.

    Plain 1-D positions for most families; Qwen's 3-D multimodal RoPE positions where the model
    computes them (`get_rope_index`), the same ones the update's forward derives itself. The tokens
    generated afterwards continue at last + 1 on all three axes, as text does under M-RoPE.
    """
    inner = multimodal_model(model)
    if inner is None or not hasattr(inner, "get_rope_index") or pixel_inputs.get("image_grid_thw") is None:
        return position_ids, position_ids[:, -1]
    extra = forward_inputs(model, input_ids, pixel_inputs)
    positions, _ = inner.get_rope_index(input_ids, mm_token_type_ids=extra["mm_token_type_ids"],
                                        image_grid_thw=extra["image_grid_thw"], attention_mask=attention_mask)
    return positions, positions.amax(dim=(0, 2))


# ---------------------------------------------------------------------------------------------- batching
def collate_pixel_inputs(rows: Sequence[dict | None]) -> dict[str, torch.Tensor]:
    """Stack the pixel inputs of several rows (None or {} for a row without images) into one batch.

    Qwen-style tensors (rows of patches, with `image_grid_thw`) are concatenated along dim 0, in row
    order. Per-row tensors (`pixel_values [1, n_images, C, H, W]`, `pixel_attention_mask`) are
    padded to the most images (all-zero images, which those models skip) and the largest image size,
    and concatenated.
    """
    present = [r for r in rows if r]
    if not present:
        return {}
    keys = [k for k in present[0] if k not in TOKEN_TENSORS]
    concatenated = any(k in CONCATENATED_PIXEL_KEYS for k in keys)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if concatenated:
            out[key] = torch.cat([r[key] for r in present], dim=0)
            continue
        template = present[0][key]
        shape = [max(r[key].shape[d] for r in present) for d in range(1, template.dim())]
        parts = []
        for r in rows:
            value = r.get(key) if r else None
            padded = template.new_zeros((1, *shape))
            if value is not None:  # smaller images sit top-left, their pixel mask marks them
                padded[(slice(None), *(slice(0, n) for n in value.shape[1:]))] = value
            parts.append(padded)
        out[key] = torch.cat(parts, dim=0)
    return out
