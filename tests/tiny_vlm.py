"""Tiny random vision-language models built in place: Idefics3 (SmolVLM-shaped) and Qwen2-VL
(also Qwen2.5-VL and Qwen3-VL, `make_tiny_qwen_vl(family=...)`).

Both use SmolLM2's real tokenizer with the family's image tokens added and a small chat template
that renders `{"type": "image"}` content parts as the family's placeholder. Idefics3 gets a real
transformers processor (its image processor needs no torchvision); Qwen2-VL's processor needs
torchvision (its video processor), so its directory holds the tokenizer and a Qwen2-VL image
processor only, and pmetal builds the processor from those parts (`pmetal.vlm.PartsProcessor`).
"""

from __future__ import annotations

import torch

IDEFICS3_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
QWEN2VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FAMILIES = ("idefics3", "qwen2_vl")  # the two families every VLM test covers
ALL_FAMILIES = (*FAMILIES, "qwen2_5_vl", "qwen3_vl")  # also checked by the rollout and SFT tests


def _tokenizer(extra_tokens, base=None):
    """SmolLM2's tokenizer (or a copy of `base`) with the family's image tokens added."""
    import copy

    from transformers import AutoTokenizer

    from pmetal.models import default_model_path

    tokenizer = copy.deepcopy(base) if base is not None else AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    return tokenizer


def make_tiny_idefics3(path, *, hidden_size: int = 32, num_layers: int = 2, image_size: int = 32, seed: int = 0,
                       tokenizer=None):
    """An Idefics3ForConditionalGeneration (a SmolVLM shape) with its processor, saved to `path`."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = _tokenizer(["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"], tokenizer)
    tokenizer.chat_template = IDEFICS3_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.3,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
                           num_attention_heads=2, image_size=image_size, patch_size=8),
        image_token_id=image_token_id, scale_factor=2, tie_word_embeddings=True,
        initializer_range=0.3,  # image embeddings on the scale of the text embeddings (0.02 would drown them)
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": image_size},
                                             max_image_size={"longest_edge": image_size}, do_image_splitting=False)
    seq_len = (image_size // 8 // 2) ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
                                  chat_template=IDEFICS3_TEMPLATE)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def make_tiny_qwen_vl(path, *, family: str = "qwen2_vl", hidden_size: int = 32, num_layers: int = 2, seed: int = 0,
                      tokenizer=None):
    """A Qwen2-VL, Qwen2.5-VL or Qwen3-VL model with SmolLM2's tokenizer and a Qwen-VL image processor,
    saved to `path` (no processor files: transformers' Qwen-VL processors need torchvision)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], tokenizer)
    tokenizer.chat_template = QWEN2VL_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                              "<|video_pad|>")}
    head_dim = hidden_size // 4
    half = head_dim // 2
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]}
    patch = 16 if family == "qwen3_vl" else 8
    vision = dict(depth=1, hidden_size=hidden_size, num_heads=2, patch_size=patch, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        vision.update(embed_dim=hidden_size, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        vision.update(intermediate_size=2 * hidden_size, out_hidden_size=hidden_size, fullatt_block_indexes=[0],
                      window_size=2 * patch * 2)
    else:
        vision.update(intermediate_size=2 * hidden_size, out_hidden_size=hidden_size, num_position_embeddings=16,
                      deepstack_visual_indexes=[0])
        rope["mrope_interleaved"] = True
    config_class, model_class = {
        "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
        "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
        "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    }[family]
    config = getattr(transformers, config_class)(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=1024, initializer_range=0.3, tie_word_embeddings=True,
                         rope_parameters=rope, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    side = 2 * patch * 2  # 2 x 2 merged tokens per image
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                               min_pixels=side * side, max_pixels=side * side)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def make_tiny_qwen2_vl(path, **kwargs):
    return make_tiny_qwen_vl(path, family="qwen2_vl", **kwargs)


def make_tiny_vlm(family: str, path, **kwargs):
    if family == "idefics3":
        return make_tiny_idefics3(path, **kwargs)
    return make_tiny_qwen_vl(path, family=family, **kwargs)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def write_colour_images(folder, size: int = 32):
    """red.png, green.png, blue.png: a coloured square on a grey background; returns the folder."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    for name, rgb in COLOURS.items():
        image = Image.new("RGB", (size, size), (128, 128, 128))
        image.paste(Image.new("RGB", (size // 2, size // 2), rgb), (size // 4, size // 4))
        image.save(folder / f"{name}.png")
    return folder
