"""A causal LM's body under a sequence-classification head: the reward model's architecture
(`pmetal.modules.reward`), built from the causal checkpoint without loading it twice."""

from __future__ import annotations

import torch


def sequence_classifier_from_causal_lm(causal, num_labels: int = 1):
    """`causal`'s body under a new `AutoModelForSequenceClassification` head of `num_labels` scores.

    The body (embeddings, decoder layers, any quantized or checkpointed layer as it is) is moved,
    not copied; the LM head is dropped; the score head is new, normal with the config's
    `initializer_range` (what transformers gives a head missing from a checkpoint), in the body's
    dtype. `config.pad_token_id` must be set: the score is read at each row's last non-pad token.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification

    config = causal.config
    config.num_labels = num_labels
    body = getattr(causal, causal.base_model_prefix)
    weight = body.get_input_embeddings().weight
    with init_empty_weights(include_buffers=False):
        model = AutoModelForSequenceClassification.from_config(config, dtype=weight.dtype)
    setattr(model, model.base_model_prefix, body)
    std = getattr(config, "initializer_range", 0.02)
    for name, param in list(model.named_parameters()):
        if param.device.type != "meta":
            continue
        module_name, _, attr = name.rpartition(".")
        value = torch.zeros(param.shape, dtype=weight.dtype, device=weight.device)
        if attr == "weight":
            torch.nn.init.normal_(value, std=std)
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(value))
    if hasattr(causal, "pmetal_quantization"):
        model.pmetal_quantization = causal.pmetal_quantization
    return model
