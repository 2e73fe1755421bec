"""The shared base of every language-model method.

`PmetalModule` does the work all methods share, once: load the model and tokenizer, wrap the model
in a PEFT adapter (LoRA/DoRA) or train it fully, optionally on a quantized base; completion
log-probs through `pmetal.logps` (full-vocabulary logits never kept alive); reference log-probs
with the adapter disabled (no second model under LoRA; a frozen copy only for full fine-tuning);
AdamW over trainable parameters with warmup + cosine/linear/constant schedules; checkpoints that
hold only the trainable parameters; saving the adapter or the full model with its tokenizer.

A method subclasses it and implements `compute_loss(batch) -> (loss, metrics)`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
import torch

from pmetal.device import choose_device
from pmetal.errors import PmetalError
from pmetal.models import absolute_model_name, apply_adapter, count_parameters, record_portable_base
from pmetal.optim import build_optimizer, build_scheduler
from pmetal.modules.distributed import sync_metrics
from pmetal.perf import enable_gradient_checkpointing, maybe_compile

log = logging.getLogger("pmetal")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainableModule(L.LightningModule):
    """What every pmetal LightningModule shares, the language-model methods and `EmbedModule` alike.

    The adapter over the trained model (PEFT LoRA/DoRA, or every weight for "full"), AdamW over the
    trainable parameters with warmup + cosine/linear/constant decay, checkpoints that hold only the
    trainable parameters, and the settings file written next to a saved model. A subclass stores
    the trained model as the attribute named by `trained_attribute` and has the settings `adapter`,
    `lora_r`, `lora_alpha`, `lora_dropout`, `target_modules`, `learning_rate`, `weight_decay`,
    `warmup_steps`, `lr_schedule` and `min_lr_ratio` in its hparams.
    """

    #: the attribute that holds the trained model (its parameters are optimized and checkpointed).
    trained_attribute = "policy"
    #: optimizer steps one training batch makes (GRPO: `num_iterations` per rollout).
    steps_per_batch = 1

    def wrap_adapter(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        """`model` wrapped in the adapter of the module's settings (`pmetal.models.apply_adapter`)."""
        hp = self.hparams
        kwargs.setdefault("target_modules", hp.target_modules)
        return apply_adapter(model, hp.adapter, r=hp.lora_r, alpha=hp.lora_alpha, dropout=hp.lora_dropout, **kwargs)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(getattr(self, self.trained_attribute).parameters(), hp.learning_rate,
                                    hp.weight_decay)
        # The total is asked lazily (a callable): see build_scheduler for why.
        scheduler = build_scheduler(optimizer, hp.lr_schedule, hp.warmup_steps, self._total_steps, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        """Optimizer steps of the whole fit (the end of the learning-rate decay; RLKD's annealing).

        Lightning's estimate counts training batches, capped by `max_steps`; `max_steps` counts
        optimizer steps. So the total is the estimate times `steps_per_batch`, capped by `max_steps`.
        1000 without a trainer or a finite estimate. Ask it only once training has started or from
        the scheduler (the estimate builds the train dataloader).
        """
        estimate = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        if not (isinstance(estimate, (int, float)) and 0 < estimate < float("inf")):
            return 1000
        total = int(estimate) * self.steps_per_batch
        return min(total, self.trainer.max_steps) if self.trainer.max_steps > 0 else total

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The learning rate this step uses, logged once for every method (TRL's name, under train/).
        if self.trainer.optimizers:
            self.log("train/learning_rate", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefix = self.trained_attribute
        trained = getattr(self, prefix)
        trainable = {f"{prefix}.{n}" for n, p in trained.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def write_settings(self, out: Path) -> None:
        """pmetal_config.json in `out`: the method's class name and its plain-valued settings."""
        settings = {k: _plain(v) for k, v in dict(self.hparams).items() if isinstance(v, (str, int, float, bool, type(None), list))}
        for key in MODEL_SETTINGS:  # a relative model path would name a folder of whoever loads the adapter
            if isinstance(settings.get(key), str):
                settings[key] = absolute_model_name(settings[key])
        (out / "pmetal_config.json").write_text(json.dumps({"method": type(self).__name__, **settings}, indent=2))


# Settings that name a model (a directory, .gguf file, hub id or "default").
MODEL_SETTINGS = ("model", "teacher_model", "draft_model", "reward_model")


def _plain(value: Any) -> Any:
    """A setting as JSON: a Python callable in a list (a reward function object) by its import path."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if callable(value):
        return f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', type(value).__name__)}"
    return value


class PmetalModule(TrainableModule):
    """Base LightningModule: model + adapter setup, log-probs, reference, optimizer, saving.

    Args:
        model: the model to fine-tune: a local Hugging Face directory, a hub id, a .gguf file, or
            "default" (the embedded SmolLM2-135M-Instruct).
        adapter: "lora", "dora" (weight-decomposed LoRA) or "full" (every weight trained).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha; None means 2 × rank.
        lora_dropout: dropout on the LoRA input.
        target_modules: modules that get adapters; "all-linear" means every linear projection of
            attention and MLP (not the LM head).
        quantization: quantize the frozen base: "nf4", "fp4" or "int8" (QLoRA); None keeps it as is.
        quant_block_size: block size of the quantization.
        double_quant: also quantize the 4-bit absmax constants.
        quant_backend: 4-bit dequantization kernels: "auto" (bitsandbytes on CUDA when it is
            installed, else pmetal's pure PyTorch), "pmetal" or "bitsandbytes"; same values.
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        warmup_steps: linear warmup steps.
        lr_schedule: "cosine", "linear" or "constant" after warmup.
        min_lr_ratio: the learning rate at the end of a cosine/linear decay, as a fraction of the peak.
        gradient_checkpointing: recompute activations in backward (non-reentrant) to save memory.
        checkpoint_layers: which decoder layers to checkpoint: "all", "every:2", "0-11,20" (speed
            for memory: unchecked layers keep their activations).
        compile: compile the decoder layers with torch.compile (regional compilation; measured in
            benchmarks/RESULTS.md); the first steps pay the compile time, which is logged. None
            (the default) decides at the start of fit: on for methods that train on teacher-forced
            batches (SFT) on CUDA, when the run has at least `pmetal.perf.AUTO_COMPILE_MIN_STEPS`
            optimizer steps to amortize the compile, on a base that is not quantized and not a VLM;
            off elsewhere (CPU, MPS, short runs, rollout methods).
        compile_scope: what `compile` compiles: "layers" (each decoder layer; quick to compile) or
            "model" (the whole decoder stack as one graph; fewer Python calls per step).
        weight_dtype: dtype of the frozen base weights: "auto" (bf16 on a GPU that supports it when
            training adapters, fp32 on CPU and for full fine-tuning), "float32", "bfloat16", "float16".
        trust_remote_code: allow custom modelling code from the model's repository.
        attn_implementation: "sdpa" (portable), "eager" or "flash_attention_2".
        logits_chunk_size: tokens per chunk of the LM head in the log-prob computation.
        vlm: load a vision-language model (AutoModelForImageTextToText + AutoProcessor) with LoRA on
            its language model; None detects it from the model's config (a `vision_config`).
        train_projector: VLM: also train the projector between vision tower and language model fully.
        train_vision_tower: VLM: also train the vision tower fully.
    """

    #: "adapter" or "model": what `save_pretrained` writes, for messages.
    artifact_kind = "adapter"
    #: subclasses that compare against a reference model set this, so full fine-tuning keeps a frozen copy.
    needs_reference = False
    #: whether `compile=None` may turn compilation on (teacher-forced methods; rollout methods
    #: run their own compiled decode rounds over the same layers).
    auto_compile = False

    @property
    def eager_only(self) -> str:
        """The settings of this run that keep its layers eager ("" when none): no automatic compile."""
        return ""

    def __init__(
        self,
        model: str = "default",
        adapter: Literal["lora", "dora", "full"] = "lora",
        lora_r: int = 16,
        lora_alpha: Optional[int] = None,
        lora_dropout: float = 0.0,
        target_modules: Union[str, list[str]] = "all-linear",
        quantization: Optional[Literal["nf4", "fp4", "int8"]] = None,
        quant_block_size: int = 64,
        double_quant: bool = True,
        quant_backend: Literal["auto", "pmetal", "bitsandbytes"] = "auto",
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool = True,
        checkpoint_layers: str = "all",
        compile: Optional[bool] = None,
        compile_scope: Literal["layers", "model"] = "layers",
        weight_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
        logits_chunk_size: int = 1024,
        vlm: Optional[bool] = None,
        train_projector: bool = False,
        train_vision_tower: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if quantization and adapter == "full":
            raise PmetalError("a quantized base cannot be fully fine-tuned; use adapter 'lora' or 'dora' (QLoRA)")
        dtype = self._resolve_weight_dtype(weight_dtype, adapter)
        from pmetal.vlm import load_model_tokenizer_processor

        base, self.tokenizer, self.processor = load_model_tokenizer_processor(  # processor: a VLM's, else None
            model,
            vlm=vlm,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            quantization=quantization,
            quant_block_size=quant_block_size,
            double_quant=double_quant,
            quant_backend=quant_backend,
        )
        self.is_vlm = self.processor is not None
        if adapter == "full" and getattr(base, "pmetal_quantization", None):  # a checkpoint saved 4-bit
            raise PmetalError(f"{model} is quantized and cannot be fully fine-tuned; use adapter 'lora' or 'dora' (QLoRA)")
        if gradient_checkpointing:  # a VLM's layer selection counts the language model's layers
            from pmetal.vlm import language_model

            enable_gradient_checkpointing(language_model(base) if self.is_vlm else base, checkpoint_layers)
        base.config.use_cache = False
        adapter_kwargs = {}
        if self.is_vlm:
            from pmetal.vlm import vlm_adapter_kwargs

            adapter_kwargs = vlm_adapter_kwargs(base, adapter, target_modules, train_projector, train_vision_tower)
        self.policy = self.wrap_adapter(base, **adapter_kwargs)
        if compile:
            maybe_compile(self.policy, scope=compile_scope)
        self._compile_started: Optional[float] = None  # set when fit compiles: the first step reports its time
        self.policy.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes
        self.artifact_kind = "model" if adapter == "full" else "adapter"
        # Lightning loads our trainable-only checkpoints with strict=False.
        self.strict_loading = False
        self._frozen_reference: list[torch.nn.Module] = []  # a list keeps it out of state_dict/optimizer
        trainable, total = count_parameters(self.policy)
        log.info("model %s: %s adapter, %.2fM of %.1fM parameters trainable", model, adapter, trainable / 1e6, total / 1e6)

    @staticmethod
    def _resolve_weight_dtype(weight_dtype: str, adapter: str) -> torch.dtype:
        if weight_dtype != "auto":
            return _DTYPES[weight_dtype]
        if adapter == "full":
            return torch.float32  # fp32 master weights; autocast does the low-precision math
        return choose_device().weight_dtype

    # ------------------------------------------------------------------ log-probs
    def completion_logps(self, input_ids, attention_mask, labels, **kwargs):
        """Per-sequence log-probs of the label tokens under the policy (see pmetal.logps)."""
        from pmetal.logps import completion_logps

        return completion_logps(self.policy, input_ids, attention_mask, labels, **kwargs)

    @torch.no_grad()
    def reference_logps(self, input_ids, attention_mask, labels, **kwargs):
        """Log-probs under the frozen reference: the base with the adapter disabled.

        Under full fine-tuning there is no adapter to switch off, so a frozen copy made at the
        start of fit is used instead.
        """
        from pmetal.logps import completion_logps

        if self.hparams.adapter == "full":
            return completion_logps(self._reference_model(), input_ids, attention_mask, labels, **kwargs)
        with self.policy.disable_adapter():
            return completion_logps(self.policy, input_ids, attention_mask, labels, **kwargs)

    def _reference_model(self) -> torch.nn.Module:
        if not self._frozen_reference:
            ref = copy.deepcopy(self.policy).eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self._frozen_reference.append(ref)
        ref = self._frozen_reference[0]
        return ref.to(self.device)

    def on_fit_start(self) -> None:
        if self.needs_reference and self.hparams.adapter == "full":
            self._reference_model()  # copy the weights before the first update

    def on_train_start(self) -> None:
        # Here, not in on_fit_start: the run's length builds the train dataloader, which must happen
        # after a checkpoint's loop and sampler state is restored (else a resumed run is not exact).
        if self.hparams.compile is None:
            self._auto_compile()

    def _auto_compile(self) -> None:
        from pmetal.perf import auto_compile_decision

        steps = self.trainer.estimated_stepping_batches
        on, why = auto_compile_decision(
            eligible=self.auto_compile and not self.hparams.quantization and not self.is_vlm,
            device_type=self.device.type,
            steps=steps,
            eager=self.eager_only,
        )
        log.info("compile %s: %s", "on" if on else "off", why)
        if on and maybe_compile(self.policy, scope=self.hparams.compile_scope):
            self._compile_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._compile_started is not None:  # the first step after an automatic compile
            log.info("first step with torch.compile took %.1f s (compile included)", time.perf_counter() - self._compile_started)
            self._compile_started = None

    def configure_model(self) -> None:
        """Shard the model with FSDP2 under `--strategy fsdp` (Lightning's ModelParallelStrategy); else nothing."""
        if self._device_mesh is not None:
            from pmetal.modules.distributed import shard_for_fsdp

            shard_for_fsdp(self)

    # ------------------------------------------------------------------ steps
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss")

    def training_step(self, batch, batch_idx):
        loss, metrics = self.compute_loss(batch)  # a non-finite loss is stopped by NanGuard before backward
        batch_size = int(batch["input_ids"].shape[0]) if "input_ids" in batch else None
        sync = sync_metrics(self)  # several processes: log the mean over ranks
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size, sync_dist=sync)
        for name, value in metrics.items():
            self.log(f"train/{name}", value, batch_size=batch_size, sync_dist=sync)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, metrics = self.compute_loss(batch)
        batch_size = int(batch["input_ids"].shape[0]) if "input_ids" in batch else None
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        for name, value in metrics.items():
            self.log(f"val/{name}", value, sync_dist=True, batch_size=batch_size)
        return loss

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, out_dir: str | Path, state_dict: Optional[dict] = None) -> Path:
        """Write the adapter (PEFT format) or the full model, the tokenizer and pmetal's settings.

        `state_dict`: the policy's weights when they are not all in this process (gathered FSDP shards).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.hparams.quantization and self.hparams.adapter == "full":
            raise PmetalError("cannot save a quantized full model")
        if state_dict is None:
            self.policy.save_pretrained(out, safe_serialization=True)
        else:
            self.policy.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
        record_portable_base(out, self.hparams.model)  # a hub id, never a path into this machine's cache
        (self.processor or self.tokenizer).save_pretrained(out)
        self.write_settings(out)
        return out
