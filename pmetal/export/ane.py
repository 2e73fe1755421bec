"""Neural-Engine layouts of Hugging Face models, in plain PyTorch, for the Core ML export.

`AneDecoder` rebuilds a Llama / Qwen2 / Qwen3 decoder the way Apple's "Deploying Transformers on
the Apple Neural Engine" (ml-ane-transformers) lays a transformer out:
- activations are channels-first `(B, C, 1, S)`, the 4-D layout the ANE tiles natively, so every
  linear layer is a 1x1 `Conv2d` and no reshape or transpose runs between layers;
- norms reduce over the channel axis (dim 1);
- attention is split per head (slices of the channel axis) and computed with one einsum per head,
  so no `(B, H, S, D)` transposes are needed; grouped-query heads read their shared KV slice;
- the KV cache is two model buffers, `key_cache` / `value_cache` of shape
  `(layers, kv_heads * head_dim, 1, max_context)`, which the Core ML conversion turns into
  Core ML *state* (read and written in place on the device). A step writes its keys at its
  positions with a one-hot matmul and keeps the rest (elementwise ops and matmuls only: no
  dynamic slicing, which would leave the ANE), and the causal mask is built from the positions.

Inputs: `input_ids` `(1, S)` and `position_ids` `(1, S)` (the absolute positions of those tokens,
consecutive). Output: `logits` `(1, S, vocab)`. A prompt shorter than an enumerated S may be
padded at its end with any token at the following positions: those slots are rewritten by the
real tokens later, before any query can see them.

Departures from the HF models: RMSNorm divides by the largest magnitude in each column before
squaring (and multiplies eps back), which is the same function in exact arithmetic but keeps
float16 sums of squares from overflowing past 65504 on the ANE; attention scores use -1e4 rather
than -inf for masked keys (float16 softmax). Both are exact to float32 rounding.

`AneEmbedder` lays out a BERT-family embedding model from `pmetal embed-train` the same way (LayerNorm
over channels as ml-ane-transformers' LayerNormANE, eps raised to 1e-7 as it advises for float16),
with its pooling and L2 normalization inside, so the Core ML model returns sentence embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from pmetal.export.common import ExportError

DECODER_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MASKED = -1e4


def channel_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the channel axis, dividing by the column's largest magnitude
    first so that float16 squares cannot overflow (the same function in exact arithmetic)."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1.0)  # [B,1,1,S]
    scaled = x / scale
    return scaled * torch.rsqrt((scaled * scaled).mean(dim=1, keepdim=True) + eps / (scale * scale))


class AneRMSNorm(nn.Module):
    """RMSNorm over the channel axis of a `(B, C, 1, S)` tensor, overflow-safe in float16."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().view(1, -1, 1, 1), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_normalize(x, self.eps) * self.weight


class AneLayerNorm(AneRMSNorm):
    """LayerNorm over the channel axis (ml-ane-transformers' LayerNormANE), overflow-safe."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__(norm.weight, max(norm.eps, 1e-7))  # 1e-12 (BERT) is 0 in float16
        self.bias = nn.Parameter(norm.bias.detach().clone().view(1, -1, 1, 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_normalize(x - x.mean(dim=1, keepdim=True), self.eps) * self.weight + self.bias


def conv1x1(linear: nn.Linear) -> nn.Conv2d:
    """A Linear layer as the equivalent 1x1 convolution over `(B, C, 1, S)`."""
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None)
    conv.weight.data = linear.weight.detach().clone()[:, :, None, None]
    if linear.bias is not None:
        conv.bias.data = linear.bias.detach().clone()
    conv.requires_grad_(False)
    return conv


def rotate_half(x: torch.Tensor) -> torch.Tensor:  # over the channel axis
    half = x.shape[1] // 2
    return torch.cat([-x[:, half:], x[:, :half]], dim=1)


class AneDecoderLayer(nn.Module):
    def __init__(self, layer, config, head_dim: int):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        eps = config.rms_norm_eps
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, head_dim
        self.scale = head_dim**-0.5
        self.input_norm = AneRMSNorm(layer.input_layernorm.weight, eps)
        self.post_attention_norm = AneRMSNorm(layer.post_attention_layernorm.weight, eps)
        self.q_proj, self.k_proj, self.v_proj = conv1x1(attn.q_proj), conv1x1(attn.k_proj), conv1x1(attn.v_proj)
        self.o_proj = conv1x1(attn.o_proj)
        # Qwen3 normalizes each head's queries and keys
        self.q_norm = AneRMSNorm(attn.q_norm.weight, eps) if hasattr(attn, "q_norm") else None
        self.k_norm = AneRMSNorm(attn.k_norm.weight, eps) if hasattr(attn, "k_norm") else None
        self.gate_proj, self.up_proj, self.down_proj = conv1x1(mlp.gate_proj), conv1x1(mlp.up_proj), conv1x1(mlp.down_proj)

    def heads_of(self, x: torch.Tensor, count: int, norm, cos, sin) -> list[torch.Tensor]:
        parts = x.split(self.head_dim, dim=1)[:count]
        if norm is not None:
            parts = [norm(p) for p in parts]
        return [p * cos + rotate_half(p) * sin for p in parts]

    def forward(self, x, cos, sin, mask, write, keep, key_cache, value_cache):
        """x [1,C,1,S]; cos/sin [1,D,1,S]; mask [1,T,1,S]; write [S,T] one-hot; keep [T];
        key_cache/value_cache [1, kv*D, 1, T] (this layer's) -> (x, new key cache, new value cache)."""
        h = self.input_norm(x)
        queries = self.heads_of(self.q_proj(h), self.heads, self.q_norm, cos, sin)
        new_keys = torch.cat(self.heads_of(self.k_proj(h), self.kv_heads, self.k_norm, cos, sin), dim=1)
        new_values = self.v_proj(h)
        # place this step's keys/values at their positions, keep every other slot
        key_cache = key_cache * keep + torch.einsum("bcis,st->bcit", new_keys, write)
        value_cache = value_cache * keep + torch.einsum("bcis,st->bcit", new_values, write)
        keys = key_cache.split(self.head_dim, dim=1)
        values = value_cache.split(self.head_dim, dim=1)
        group = self.heads // self.kv_heads
        outputs = [attend(q, keys[head // group], values[head // group], self.scale, mask)
                   for head, q in enumerate(queries)]  # fmt: skip
        x = x + self.o_proj(torch.cat(outputs, dim=1))
        h = self.post_attention_norm(x)
        x = x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
        return x, key_cache, value_cache


def decoder_stack(model):
    """The decoder stack (embed_tokens, layers, norm, rotary_emb) of a causal LM or a bare decoder."""
    inner = getattr(model, "model", model)
    return inner if hasattr(inner, "layers") else model


def rope_tables(model, head_dim: int, max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[head_dim, max_context]` from the HF model's own rotary embedding."""
    rotary = decoder_stack(model).rotary_emb
    positions = torch.arange(max_context)[None, :]
    probe = torch.zeros(1, max_context, head_dim, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    return cos[0].T.contiguous().float(), sin[0].T.contiguous().float()


class AneDecoder(nn.Module):
    """A Llama/Qwen2/Qwen3 causal LM laid out for the Neural Engine, with a stateful KV cache.

    Args:
        model: the Hugging Face causal LM (plain: adapters fused, nothing quantized).
        max_context: the longest context the cache holds (positions 0 .. max_context-1).
    """

    def __init__(self, model, max_context: int = 512):
        super().__init__()
        arch = type(model).__name__
        if arch not in DECODER_ARCHITECTURES:
            raise ExportError(f"the Core ML (Neural Engine) export does not know the architecture {arch!r}; "
                              f"supported: {', '.join(DECODER_ARCHITECTURES)} and sentence-embedding models")  # fmt: skip
        config = model.config
        if getattr(config, "mlp_bias", False) or (arch == "LlamaForCausalLM" and getattr(config, "attention_bias", False)):
            raise ExportError("the Core ML export of Llama with attention or MLP biases is not supported")
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.max_context = max_context
        self.embed_tokens = nn.Embedding.from_pretrained(model.get_input_embeddings().weight.detach().clone())
        self.layers = nn.ModuleList(AneDecoderLayer(layer, config, self.head_dim) for layer in decoder_stack(model).layers)
        self.norm = AneRMSNorm(decoder_stack(model).norm.weight, config.rms_norm_eps)
        self.lm_head = conv1x1(model.get_output_embeddings())
        cos, sin = rope_tables(model, self.head_dim, max_context)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)
        kv_channels = config.num_key_value_heads * self.head_dim
        shape = (len(self.layers), kv_channels, 1, max_context)
        self.register_buffer("key_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("value_cache", torch.zeros(shape), persistent=False)

    def reset_cache(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """input_ids, position_ids [1, S] -> logits [1, S, vocab]; updates the KV cache in place."""
        positions = position_ids[0].long()  # [S]
        slots = torch.arange(self.max_context, device=positions.device)  # [T]
        write = (positions[:, None] == slots[None, :]).to(self.key_cache.dtype)  # [S,T]
        keep = 1.0 - write.sum(dim=0)  # [T]
        blocked = (slots[:, None] > positions[None, :]).to(self.key_cache.dtype)  # [T,S] keys after the query
        mask = (blocked * MASKED).unsqueeze(0).unsqueeze(2)  # [1,T,1,S]
        cos = self.cos_table.index_select(1, positions).unsqueeze(0).unsqueeze(2)  # [1,D,1,S]
        sin = self.sin_table.index_select(1, positions).unsqueeze(0).unsqueeze(2)
        x = self.embed_tokens(input_ids).transpose(1, 2).unsqueeze(2)  # [1,C,1,S]
        for i, layer in enumerate(self.layers):
            x, key_cache, value_cache = layer(x, cos, sin, mask, write, keep,
                                              self.key_cache[i : i + 1], self.value_cache[i : i + 1])  # fmt: skip
            self.key_cache[i : i + 1] = key_cache
            self.value_cache[i : i + 1] = value_cache
        logits = self.lm_head(self.norm(x))  # [1,V,1,S]
        return logits.squeeze(2).transpose(1, 2)


def pool_channels(x: torch.Tensor, keep: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """`pmetal.embedding.pool` for channels-first `x` [1,C,1,S] and mask `keep` [1,S] (float), as
    masked sums (no gathers): cls = the first position, mean, lasttoken = the last real token
    (the last 1 of the mask, so right and left padding both work) -> [1,C], L2-normalized if asked."""
    if mode == "cls":
        pooled = x[:, :, 0, 0]
    elif mode == "mean":
        weights = keep.unsqueeze(1).unsqueeze(2)  # [1,1,1,S]
        pooled = (x * weights).sum(dim=3)[:, :, 0] / weights.sum(dim=3)[:, :, 0].clamp(min=1.0)
    else:
        following = torch.cat([keep[:, 1:], keep[:, :1] * 0.0], dim=1)  # the mask shifted left, 0 at the end
        last = (keep * (1.0 - following)).unsqueeze(1).unsqueeze(2)  # [1,1,1,S] one-hot of the last real token
        pooled = (x * last).sum(dim=3)[:, :, 0]
    if normalize:
        pooled = pooled * torch.rsqrt((pooled * pooled).sum(dim=1, keepdim=True).clamp(min=1e-12))
    return pooled


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """One head: q [1,D,1,S], k/v [1,D,1,T], additive mask [1,T,1,S] or [1,T,1,1] -> [1,D,1,S]."""
    weights = (torch.einsum("bciq,bcik->bkiq", q, k) * scale + mask).softmax(dim=1)  # [1,T,1,S]
    return torch.einsum("bkiq,bcik->bciq", weights, v)


class AneBertLayer(nn.Module):
    def __init__(self, layer, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        attn = layer.attention
        self.q_proj, self.k_proj, self.v_proj = (conv1x1(attn.self.query), conv1x1(attn.self.key),
                                                 conv1x1(attn.self.value))  # fmt: skip
        self.o_proj, self.attention_norm = conv1x1(attn.output.dense), AneLayerNorm(attn.output.LayerNorm)
        self.up_proj, self.down_proj = conv1x1(layer.intermediate.dense), conv1x1(layer.output.dense)
        self.output_norm = AneLayerNorm(layer.output.LayerNorm)
        if config.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
            raise ExportError(f"the Core ML export does not know the activation {config.hidden_act!r}")
        self.act = nn.ReLU() if config.hidden_act == "relu" else nn.GELU("none" if config.hidden_act == "gelu" else "tanh")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        parts = [p.split(self.head_dim, dim=1) for p in (self.q_proj(x), self.k_proj(x), self.v_proj(x))]
        heads = [attend(q, k, v, self.head_dim**-0.5, mask) for q, k, v in zip(*parts)]
        x = self.attention_norm(x + self.o_proj(torch.cat(heads, dim=1)))
        return self.output_norm(x + self.down_proj(self.act(self.up_proj(x))))


class AneEmbedder(nn.Module):
    """A BERT-family sentence-embedding model (all-MiniLM, `pmetal embed-train`'s default) in the
    same channels-first layout, with its pooling and L2 normalization inside:
    (input_ids, attention_mask) `[1, S]` -> embedding `[1, H]`."""

    def __init__(self, model, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if type(model).__name__ != "BertModel":
            raise ExportError(f"the Core ML export of embedding models knows BertModel (all-MiniLM and other "
                              f"sentence-transformers encoders) and {', '.join(DECODER_EMBEDDERS)}, "
                              f"not {type(model).__name__!r}")  # fmt: skip
        emb = model.embeddings
        self.word = nn.Embedding.from_pretrained(emb.word_embeddings.weight.detach().clone())
        self.register_buffer("position", emb.position_embeddings.weight.detach().clone().T.contiguous(), persistent=False)
        self.register_buffer("token_type", emb.token_type_embeddings.weight[0].detach().clone().view(1, -1, 1, 1),
                             persistent=False)  # fmt: skip
        self.embedding_norm = AneLayerNorm(emb.LayerNorm)
        self.layers = nn.ModuleList(AneBertLayer(layer, model.config) for layer in model.encoder.layer)
        self.pooling, self.normalize = pooling, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.word(input_ids).transpose(1, 2).unsqueeze(2)  # [1,C,1,S]
        x = self.embedding_norm(x + self.position[:, :length].unsqueeze(0).unsqueeze(2) + self.token_type)
        keep = attention_mask.to(x.dtype)  # [1,S]
        mask = ((1.0 - keep) * MASKED).reshape(1, length, 1, 1)  # [1,T,1,1]: padded keys masked for every query
        for layer in self.layers:
            x = layer(x, mask)
        return pool_channels(x, keep, self.pooling, self.normalize)  # [1,H]


DECODER_EMBEDDERS = ("LlamaModel", "Qwen2Model", "Qwen3Model") + DECODER_ARCHITECTURES


class AneDecoderEmbedder(nn.Module):
    """A decoder used as a sentence-embedding model (`pmetal embed-train --pooling lasttoken` on a
    Llama/Qwen): the decoder layers of `AneDecoder` over the whole text at once (causal mask plus
    padded keys masked, positions 0..S-1 as Hugging Face uses), then pooling and normalization.
    (input_ids, attention_mask) `[1, S]` -> embedding `[1, H]`."""

    def __init__(self, model, pooling: str = "lasttoken", normalize: bool = True, max_length: int = 512):
        super().__init__()
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        stack = decoder_stack(model)
        self.embed_tokens = nn.Embedding.from_pretrained(stack.embed_tokens.weight.detach().clone())
        self.layers = nn.ModuleList(AneDecoderLayer(layer, config, self.head_dim) for layer in stack.layers)
        self.norm = AneRMSNorm(stack.norm.weight, config.rms_norm_eps)
        cos, sin = rope_tables(model, self.head_dim, max_length)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)
        # the layers' cache update with an empty cache and the identity as the write: keys = this text's
        self.register_buffer("identity", torch.eye(max_length), persistent=False)
        self.register_buffer("empty", torch.zeros(1, config.num_key_value_heads * self.head_dim, 1, max_length),
                             persistent=False)  # fmt: skip
        self.pooling, self.normalize = pooling, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        keep = attention_mask.to(self.identity.dtype)  # [1,S]
        slots = torch.arange(length, device=input_ids.device)
        blocked = (slots[:, None] > slots[None, :]).to(keep.dtype) + (1.0 - keep).reshape(length, 1)  # [T,S]
        mask = (blocked.clamp(max=1.0) * MASKED).unsqueeze(0).unsqueeze(2)  # [1,T,1,S]
        cos = self.cos_table[:, :length].unsqueeze(0).unsqueeze(2)
        sin = self.sin_table[:, :length].unsqueeze(0).unsqueeze(2)
        write, empty = self.identity[:length, :length], self.empty[..., :length]
        no_keep = self.identity[0, :length] * 0.0
        x = self.embed_tokens(input_ids).transpose(1, 2).unsqueeze(2)  # [1,C,1,S]
        for layer in self.layers:
            x, _, _ = layer(x, cos, sin, mask, write, no_keep, empty, empty)
        return pool_channels(self.norm(x), keep, self.pooling, self.normalize)


def embedder_for(model, pooling: str, normalize: bool) -> nn.Module:
    """The channels-first embedding module for a BERT-family encoder or a Llama/Qwen decoder."""
    if type(model).__name__ in DECODER_EMBEDDERS:
        return AneDecoderEmbedder(model, pooling, normalize)
    return AneEmbedder(model, pooling, normalize)
