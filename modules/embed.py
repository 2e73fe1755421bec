"""Sentence-embedding training: a sentence-transformers model trained as a LightningModule.

Implements Sentence-BERT-style fine-tuning (Reimers & Gurevych 2019, arXiv:1908.10084) of a
`SentenceTransformer` (Transformer + Pooling + optional Normalize) with one of three losses from
`pmetal.losses.embedding`:

- ``infonce``: InfoNCE / MultipleNegativesRanking with in-batch negatives and optional hard
  negatives (van den Oord et al. 2018; Henderson et al. 2017), on pairs or triplets;
- ``triplet``: triplet margin loss on true Euclidean or cosine distances (Schroff et al. 2015);
- ``cosent``: CoSENT on scored pairs (Su 2022).

Where it departs from sentence-transformers' own trainer:

- duplicated texts inside a batch are removed from an anchor's InfoNCE negatives by a mask built
  from text identity (sentence-transformers instead offers a no-duplicates batch sampler);
- pooling runs through `pmetal.embedding.pool` (same results as sentence-transformers' Pooling for
  cls/mean/lasttoken, tested), and all columns of a batch share one forward pass, as in
  sentence-transformers 6's merged forward;
- pmetal's defaults: L2-normalized embeddings, a triplet margin of 0.5 (not 5), AdamW without decay
  on biases/norms, linear warmup + decay.

LoRA/DoRA go through PEFT on the transformer; `save_pretrained` writes a directory that
`SentenceTransformer(path)` loads as it is (adapter merged into the saved copy), plus the adapter
alone in `path/adapter`. Held-out evaluation (retrieval recall@1/@10 and MRR@10 for pairs and
triplets, triplet accuracy, Spearman for scored pairs) runs before training and after every
validation epoch, is logged as `val/...` and appended to `<run_dir>/eval_metrics.jsonl`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch

from pmetal.embedding import (
    DEFAULT_EMBEDDING_HUB_ID,
    DEFAULT_EMBEDDING_MODEL_NAMES,
    POOLING_MODES,
    load_sentence_transformer,
    pool,
    retrieval_metrics,
    save_sentence_transformer,
    spearman,
    transformer_module,
    triplet_accuracy,
    write_metrics,
)
from pmetal.errors import PmetalError
from pmetal.losses.embedding import cosent_loss, duplicate_text_mask, info_nce_loss, triplet_loss
from pmetal.models import absolute_model_name, count_parameters
from pmetal.modules.base import TrainableModule
from pmetal.modules.distributed import distributed_mean, sync_metrics

log = logging.getLogger("pmetal")

EMBED_LOSSES = ("infonce", "triplet", "cosent")


class EmbedModule(TrainableModule):
    """Fine-tune a sentence-embedding model with InfoNCE, triplet or CoSENT loss.

    Args:
        model: a sentence-transformers directory, a plain Hugging Face encoder or decoder
            directory, a hub id, or "default" (all-MiniLM-L6-v2, shipped offline).
        loss: "infonce" (pairs or triplets), "triplet" (triplets) or "cosent" (scored pairs).
        pooling: "cls", "mean" or "lasttoken"; None keeps a sentence-transformers model's own
            pooling, and gives "lasttoken" to a plain decoder model and "mean" to a plain encoder.
        normalize: L2-normalize the embeddings (a Normalize module in the saved model).
        temperature: InfoNCE softmax temperature (0.05 is sentence-transformers' scale 20).
        margin: triplet margin, in units of the chosen distance.
        triplet_distance: "euclidean" or "cosine" (1 - cosine similarity).
        cosent_scale: CoSENT's lambda, the scale applied to cosine differences.
        mask_duplicates: leave texts equal to an anchor's positive out of its InfoNCE negatives.
        max_seq_len: truncate texts to this many tokens; None keeps the model's own limit.
        adapter: "full" (every weight trained), "lora" or "dora" (PEFT adapter on the transformer).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha; None means 2 × rank.
        lora_dropout: dropout on the LoRA input.
        target_modules: modules that get adapters; "all-linear" means every linear layer.
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        warmup_steps: linear warmup steps.
        lr_schedule: "linear", "cosine" or "constant" after warmup.
        min_lr_ratio: the learning rate at the end of the decay, as a fraction of the peak.
        gradient_checkpointing: recompute activations in backward to save memory (large models).
        evaluate_before_training: run the held-out evaluation once at step 0, as a baseline.
        trust_remote_code: allow custom modelling code from the model's repository.
    """

    artifact_kind = "model"
    trained_attribute = "encoder"

    def __init__(
        self,
        model: str = "default",
        loss: Literal["infonce", "triplet", "cosent"] = "infonce",
        pooling: Optional[Literal["cls", "mean", "lasttoken"]] = None,
        normalize: bool = True,
        temperature: float = 0.05,
        margin: float = 0.5,
        triplet_distance: Literal["euclidean", "cosine"] = "euclidean",
        cosent_scale: float = 20.0,
        mask_duplicates: bool = True,
        max_seq_len: Optional[int] = None,
        adapter: Literal["full", "lora", "dora"] = "full",
        lora_r: int = 16,
        lora_alpha: Optional[int] = None,
        lora_dropout: float = 0.0,
        target_modules: Union[str, list[str]] = "all-linear",
        learning_rate: float = 2e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        lr_schedule: Literal["linear", "cosine", "constant"] = "linear",
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = False,
        evaluate_before_training: bool = True,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if loss not in EMBED_LOSSES:
            raise PmetalError(f"unknown embedding loss {loss!r}; expected one of {', '.join(EMBED_LOSSES)}")
        if temperature <= 0:
            raise PmetalError(f"temperature must be > 0, got {temperature}")
        self.save_hyperparameters()
        self.encoder = load_sentence_transformer(
            model, pooling=pooling, normalize=normalize, max_seq_len=max_seq_len, trust_remote_code=trust_remote_code
        )
        transformer = transformer_module(self.encoder)
        if gradient_checkpointing and hasattr(transformer.model, "gradient_checkpointing_enable"):
            transformer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if adapter != "full":
            transformer.model = self.wrap_adapter(transformer.model, task_type="FEATURE_EXTRACTION")
        # SentenceTransformer loads in eval mode and Lightning 2.6 keeps module modes as they are:
        # train mode here so dropout is on during training, as in sentence-transformers' trainer.
        self.encoder.train()
        self.strict_loading = False  # checkpoints hold the trainable parameters only
        self._eval_outputs: list[dict[str, Any]] = []
        trainable, total = count_parameters(self.encoder)
        log.info("embedding model %s: %s, %.2fM of %.1fM parameters trainable", model, adapter, trainable / 1e6, total / 1e6)

    # ------------------------------------------------------------------ embedding
    def tokenize(self, texts: list[str]) -> dict[str, Any]:
        """Tokenize exactly as `SentenceTransformer.encode` does, on the module's device."""
        features = self.encoder.preprocess(texts)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Sentence embeddings `[N,H]` of `texts`, with gradients when training."""
        from sentence_transformers.sentence_transformer.modules import Pooling

        features = self.tokenize(texts)
        for module in self.encoder:
            plain_pooling = (
                isinstance(module, Pooling)
                and module.pooling_mode in POOLING_MODES
                and (module.include_prompt or "prompt_length" not in features)
                and "cu_seq_lens_q" not in features
            )
            if plain_pooling:
                features["sentence_embedding"] = pool(features["token_embeddings"], features["attention_mask"],
                                                      module.pooling_mode)
            else:
                features = module(features)
        return features["sentence_embedding"]

    def embed_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Embed every text column of a batch in one forward pass: `anchor`, `positive` `[B,H]`, `negatives` `[B,K,H]`."""
        columns = [batch["anchor"], batch["positive"], *batch.get("negatives", [])]
        size = len(batch["anchor"])
        flat = self.embed([text for column in columns for text in column])  # [(2+K)*B, H]
        out = {"anchor": flat[:size], "positive": flat[size:2 * size]}
        if len(columns) > 2:
            out["negatives"] = flat[2 * size:].reshape(len(columns) - 2, size, -1).transpose(0, 1)
        return out

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict[str, Any], emb: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        hp = self.hparams
        self._check_batch(batch)
        emb = emb if emb is not None else self.embed_batch(batch)
        if hp.loss == "cosent":
            return cosent_loss(emb["anchor"], emb["positive"], batch["score"].to(emb["anchor"].device),
                               scale=hp.cosent_scale)
        if hp.loss == "triplet":
            negatives = emb["negatives"]  # [B,K,H]: one triplet per (row, negative)
            k = negatives.shape[1]
            return triplet_loss(
                emb["anchor"].repeat_interleave(k, 0), emb["positive"].repeat_interleave(k, 0),
                negatives.reshape(-1, negatives.shape[-1]), margin=hp.margin, distance=hp.triplet_distance,
            ).mean()
        mask = None
        if hp.mask_duplicates and "anchor_ids" in batch:
            mask = duplicate_text_mask(batch["anchor_ids"], batch["positive_ids"], batch.get("negative_ids"))
            mask = mask.to(emb["anchor"].device)
        return info_nce_loss(emb["anchor"], emb["positive"], emb.get("negatives"), temperature=hp.temperature,
                             false_negative_mask=mask).mean()

    def _check_batch(self, batch: dict[str, Any]) -> None:
        loss = self.hparams.loss
        if loss == "cosent" and "score" not in batch:
            raise PmetalError("loss 'cosent' needs scored pairs (a 'score' or 'label' column); the batch has none")
        if loss == "triplet" and "negatives" not in batch:
            raise PmetalError("loss 'triplet' needs triplets (a 'negative' or 'negatives' column); the batch has none")
        if loss == "infonce" and "score" in batch:
            raise PmetalError("loss 'infonce' trains on pairs or triplets, not scored pairs; use --loss cosent")

    # ------------------------------------------------------------------ Lightning hooks
    def configure_model(self) -> None:
        if self._device_mesh is not None:  # `--strategy fsdp` (Lightning's ModelParallelStrategy)
            raise PmetalError("--strategy fsdp trains language models; an embedding model trains with --strategy ddp")

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        kind = getattr(datamodule, "kind", None)
        if kind is not None:
            from pmetal.data.embedding import check_informative_batches, check_loss_layout

            check_loss_layout(self.hparams.loss, kind, getattr(datamodule, "path", None))
            if getattr(datamodule, "train_examples", None):
                check_informative_batches(self.hparams.loss, datamodule)

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)  # a non-finite loss is stopped by NanGuard before backward
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["anchor"]), sync_dist=sync_metrics(self))
        return distributed_mean(self, loss, len(batch["anchor"]))

    def on_train_start(self) -> None:
        if not self.hparams.evaluate_before_training or self.trainer.global_step > 0:
            return
        loaders = self.trainer.val_dataloaders
        if loaders is None and getattr(self.trainer, "datamodule", None) is not None:
            loaders = self.trainer.datamodule.val_dataloader()
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        if loader is None or isinstance(loader, (list, tuple)):
            return
        metrics = self.evaluate(loader)
        self._report(metrics)

    def validation_step(self, batch, batch_idx):
        self._eval_outputs.append(self._eval_batch(batch))

    def on_validation_epoch_end(self) -> None:
        outputs, self._eval_outputs = self._eval_outputs, []
        if not outputs or self.trainer.sanity_checking:
            return
        metrics = eval_metrics(outputs)
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name in ("recall@1", "spearman", "triplet_accuracy"))
        self._report(metrics, log_to_loggers=False)

    def _report(self, metrics: dict[str, float], log_to_loggers: bool = True) -> None:
        if self._trainer is None or not self.trainer.is_global_zero:
            return
        step = self.trainer.global_step
        if log_to_loggers:
            for logger in self.loggers:
                logger.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step=step)
        write_metrics(self.trainer.default_root_dir, step, self.trainer.current_epoch, metrics)
        log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    @torch.no_grad()
    def _eval_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        emb = self.embed_batch(batch)
        out: dict[str, Any] = {"anchor": batch["anchor"], "positive": batch["positive"],
                               "anchor_emb": emb["anchor"].float().cpu(), "positive_emb": emb["positive"].float().cpu()}
        if "negatives" in emb:
            out["negatives"] = batch["negatives"]
            out["negative_emb"] = emb["negatives"].float().cpu()
        if "score" in batch:
            out["score"] = batch["score"].float().cpu()
        try:
            self._check_batch(batch)
            out["loss"] = (self.compute_loss(batch, emb).item(), len(batch["anchor"]))
        except PmetalError:
            pass  # an evaluation layout the training loss cannot score (e.g. pairs for triplet loss)
        return out

    @torch.no_grad()
    def evaluate(self, dataloader) -> dict[str, float]:
        """Held-out metrics over a whole dataloader of embedding batches (see `eval_metrics`)."""
        was_training = self.training
        self.eval()
        try:
            outputs = [self._eval_batch(batch) for batch in dataloader]
        finally:
            self.train(was_training)
        return eval_metrics(outputs)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, out_dir: str | Path) -> Path:
        """A directory `SentenceTransformer(out_dir)` loads as it is (LoRA merged; adapter in `adapter/`)."""
        default = self.hparams.model in DEFAULT_EMBEDDING_MODEL_NAMES  # never record site-packages' path
        # a local base by its absolute path: a relative one would name a folder of whoever loads the adapter
        base = DEFAULT_EMBEDDING_HUB_ID if default else absolute_model_name(self.hparams.model)
        out = save_sentence_transformer(self.encoder, out_dir, base)
        self.write_settings(out)
        return out


def eval_metrics(outputs: list[dict[str, Any]]) -> dict[str, float]:
    """Metrics of collected evaluation batches: retrieval for pairs/triplets, Spearman for scored pairs.

    Retrieval ranks every distinct positive (and hard negative) text of the held-out set for every
    distinct anchor text; a document is relevant to an anchor when some row pairs them.
    """
    anchors = [t for o in outputs for t in o["anchor"]]
    positives = [t for o in outputs for t in o["positive"]]
    anchor_emb = torch.cat([o["anchor_emb"] for o in outputs])
    positive_emb = torch.cat([o["positive_emb"] for o in outputs])
    metrics: dict[str, float] = {}
    losses = [o["loss"] for o in outputs if "loss" in o]
    if losses:
        metrics["loss"] = sum(v * n for v, n in losses) / sum(n for _, n in losses)
    if "score" in outputs[0]:
        scores = torch.cat([o["score"] for o in outputs])
        cos = torch.nn.functional.cosine_similarity(anchor_emb, positive_emb, dim=-1)
        metrics["spearman"] = spearman(cos, scores)
        return metrics
    doc_texts, doc_rows = list(positives), list(range(len(positives)))
    doc_emb = [positive_emb]
    if "negatives" in outputs[0]:
        negative_emb = torch.cat([o["negative_emb"] for o in outputs])  # [N,K,H]
        metrics["triplet_accuracy"] = triplet_accuracy(anchor_emb, positive_emb, negative_emb[:, 0])
        negatives = [t for o in outputs for row in zip(*o["negatives"]) for t in row]  # row-major, like [N,K]
        doc_texts += negatives
        doc_emb.append(negative_emb.reshape(-1, negative_emb.shape[-1]))
    all_doc_emb = torch.cat(doc_emb)
    doc_index: dict[str, int] = {}
    for i, text in enumerate(doc_texts):
        doc_index.setdefault(text, i)
    query_index: dict[str, int] = {}
    for i, text in enumerate(anchors):
        query_index.setdefault(text, i)
    q_keys, d_keys = list(query_index), list(doc_index)
    q_pos, d_pos = {t: j for j, t in enumerate(q_keys)}, {t: j for j, t in enumerate(d_keys)}
    relevance = torch.zeros(len(q_keys), len(d_keys), dtype=torch.bool)
    for row in doc_rows:
        relevance[q_pos[anchors[row]], d_pos[positives[row]]] = True
    queries = anchor_emb[[query_index[t] for t in q_keys]]
    docs = all_doc_emb[[doc_index[t] for t in d_keys]]
    metrics.update(retrieval_metrics(queries, docs, relevance))
    return metrics
