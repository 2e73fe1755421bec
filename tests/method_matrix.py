"""Every method and mode, a few optimizer steps each, through the entry points users call.

One table (`CASES`) serves two callers: the precision matrix in CI
(tests/unit/test_precision_matrix.py: every case under 32-true, bf16-mixed and 16-mixed on the CPU,
whose autocast stands in for MPS/CUDA) and the GPU smoke run (scripts/cuda_smoke.py: every case in
the device's default precision, on bigger random models). A case is the command line of
`pmetal fit --method X ...` or of a PMetal command (`pmetal train|grpo|rloo|online-dpo|rlkd|reward-train|embed-train ...`),
run in-process through `pmetal.cli.main`; `run_case` watches the fit it starts (`pmetal.cli.runner.fit`,
which both entry points call) and reports the loss of every step, which parameters the steps
changed and whether a frozen one moved.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
# What `weight_dtype="auto"` loads a frozen base in on a GPU under each precision (pmetal.device):
# the CPU runs of the matrix ask for it, so they hold the weights the GPU runs hold.
GPU_WEIGHT_DTYPE = {"32-true": "float32", "bf16-mixed": "bfloat16", "16-mixed": "float16"}


def crc_reward(prompts, completions, **columns):
    """A reward that spreads within any group of distinct completions (so every group has an advantage)."""
    return [zlib.crc32(c.encode()) % 10 / 10 for c in completions]


REWARD = f"{__name__}:crc_reward"
GRPO_ARGS = ("--num-generations", "4", "--max-completion-length", "4", "--micro-batch-size", "4",
             "--batch-size", "2", "--reward-fn", REWARD)

# GRPO with tools, kept small: episodes rendered with the tool schema (a long prompt), 2 per prompt
TOOL_ARGS = ("--num-generations", "2", "--max-completion-length", "4", "--micro-batch-size", "4", "--batch-size", "2",
             "--reward-fn", REWARD, "--tools", "pmetal.examples.agent_tools:lookup", "--max-tool-turns", "1")


ONLINE_DPO_ARGS = ("--max-completion-length", "4", "--micro-batch-size", "4", "--batch-size", "2", "--reward-fn", REWARD)


@dataclass(frozen=True)
class Case:
    """One method/mode: `argv` after the command (the model, data, precision and run folder are added)."""

    name: str
    command: str  # "fit" (pmetal fit --method ...) or a PMetal command
    method: str  # the method's name in pmetal.cli.methods.METHODS
    data: str  # key of write_data()'s files
    argv: tuple[str, ...] = ()
    model: str = "lm"  # "lm", "teacher" (lm + itself as teacher), "idefics3", "qwen2_vl", "bert"
    teacher: str | None = None  # a key of the models: the teacher (`--teacher-model`) of a distillation case
    frozen_base: bool = True  # adapters on a frozen base (the base must not move)
    # optimizer steps under 16-mixed: fp16's gradient scaler starts at 2^16 and skips the steps whose
    # gradients overflow there, halving its scale each time (as fp16 training expects), so a case
    # needs as many steps as it skips plus real updates. The RL losses' gradients do not overflow.
    fp16_steps: int = 4


CASES = [
    Case("sft-full", "train", "sft", "sft", ("--full",), frozen_base=False),
    Case("sft-lora", "train", "sft", "sft"),
    Case("sft-dora", "fit", "sft", "sft", ("--model.adapter", "dora")),
    Case("sft-qlora-nf4", "train", "sft", "sft", ("--quantization", "nf4")),
    *[Case(f"dpo-{loss}", "fit", "dpo", "pref", ("--model.loss_type", loss), fp16_steps=8 if loss == "ipo" else 4)
      for loss in ("sigmoid", "hinge", "ipo", "robust")],  # IPO starts at (1 / 2 beta)^2 = 25: five skips
    Case("simpo", "fit", "simpo", "pref"),
    Case("orpo", "fit", "orpo", "pref"),
    Case("kto", "fit", "kto", "kto"),
    Case("grpo", "grpo", "grpo", "prompts", GRPO_ARGS, fp16_steps=2),
    Case("dapo", "grpo", "dapo", "prompts", ("--dapo", *GRPO_ARGS), fp16_steps=2),
    Case("gspo", "fit", "grpo", "prompts",
         ("--model.importance_sampling_level", "sequence", "--model.num_generations", "4",
          "--model.max_completion_length", "4", "--model.micro_batch_size", "4", "--data.batch_size", "2",
          "--model.reward_fns", f"[{REWARD}]"), fp16_steps=2),
    Case("grpo-speculative", "grpo", "grpo", "prompts", ("--speculative", *GRPO_ARGS), fp16_steps=2),
    Case("grpo-async-rewards", "grpo", "grpo", "prompts", ("--async-rewards", *GRPO_ARGS), fp16_steps=2),
    Case("rloo", "rloo", "rloo", "prompts", GRPO_ARGS, fp16_steps=2),
    Case("grpo-tools", "grpo", "agent", "prompts", TOOL_ARGS, fp16_steps=1),
    Case("grpo-cispo-tis-entropy", "grpo", "grpo", "prompts",
         ("--loss-type", "cispo", "--tis-cap", "2", "--top-entropy-quantile", "0.5", *GRPO_ARGS), fp16_steps=2),
    Case("grpo-reinforce-pp", "fit", "grpo", "prompts",
         ("--model.advantage_estimator", "reinforce_pp", "--model.num_generations", "4",
          "--model.max_completion_length", "4", "--model.micro_batch_size", "4", "--data.batch_size", "2",
          "--model.reward_fns", f"[{REWARD}]"), fp16_steps=2),
    Case("rlkd", "rlkd", "rlkd", "prompts", GRPO_ARGS, model="teacher", fp16_steps=2),
    Case("online-dpo", "online-dpo", "online_dpo", "prompts", ONLINE_DPO_ARGS, fp16_steps=2),
    Case("xpo", "online-dpo", "xpo", "prompts", ("--xpo", "--alpha", "0.01", *ONLINE_DPO_ARGS), fp16_steps=2),
    Case("distill-gkd", "distill", "distill", "sft", ("--lmbda", "0.5", "--max-new-tokens", "4", "--batch-size", "2",
                                                      "--val-fraction", "0"), teacher="lm_teacher"),
    Case("distill-offline-reverse-kl", "fit", "distill", "sft", ("--model.lmbda", "0", "--model.beta", "1"),
         teacher="lm_teacher"),
    Case("reward", "reward-train", "reward", "pref"),
    Case("vlm-sft-idefics3", "train", "sft", "vlm_sft", model="idefics3"),
    Case("vlm-grpo-qwen2vl", "grpo", "grpo", "vlm_prompts", GRPO_ARGS, model="qwen2_vl", fp16_steps=2),
    *[Case(f"embed-{loss}", "embed-train", "embed", data, ("--loss", loss), model="bert", frozen_base=False)
      for loss, data in (("infonce", "pairs"), ("triplet", "triplets"), ("cosent", "scored"))],
]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_data(folder: Path, images: Path | None = None, rows: int = 8) -> dict[str, str]:
    """The small datasets of every case, in `folder` (VLM rows name red/green/blue.png in `images`)."""
    folder = Path(folder)
    colours = ["red", "green", "blue"]
    data = {
        "sft": _jsonl(folder / "sft.jsonl", [{"messages": [{"role": "user", "content": f"Name colour {i}."},
                                                           {"role": "assistant", "content": f"Colour {colours[i % 3]}."}]}
                                             for i in range(rows)]),
        "pref": _jsonl(folder / "pref.jsonl", [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.",
                                                "rejected": f"maybe {i + 1}"} for i in range(rows)]),
        "kto": _jsonl(folder / "kto.jsonl", [{"prompt": f"Name {i}.", "completion": f"NAME {i}" if i % 2 else f"name {i}?",
                                              "label": i % 2 == 1} for i in range(rows)]),
        "prompts": _jsonl(folder / "prompts.jsonl", [{"prompt": f"What is {i} plus 1?", "answer": str(i + 1)}
                                                     for i in range(rows)]),
        "pairs": _jsonl(folder / "pairs.jsonl", [{"anchor": f"code {i} {colours[i % 3]}", "positive": f"item number {i}"}
                                                 for i in range(rows)]),
        "triplets": _jsonl(folder / "triplets.jsonl", [{"anchor": f"code {i}", "positive": f"item {i}",
                                                        "negative": f"thing {i + 3}"} for i in range(rows)]),
        "scored": _jsonl(folder / "scored.jsonl", [{"sentence1": f"code {i}", "sentence2": f"item {i % 3}",
                                                    "score": float(i % 6)} for i in range(rows)]),
    }
    if images is not None:
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}
        data["vlm_sft"] = _jsonl(Path(images) / "matrix-vlm-sft.jsonl", [
            {"image": f"{colours[i % 3]}.png", "messages": [user, {"role": "assistant", "content": colours[i % 3]}]}
            for i in range(rows)])
        data["vlm_prompts"] = _jsonl(Path(images) / "matrix-vlm-prompts.jsonl", [
            {"image": f"{colours[i % 3]}.png", "prompt": "Colour?", "answer": colours[i % 3]} for i in range(rows)])
    return data


# The options of each command that are not the method's own settings, by entry point.
_FIT = {"model": "--model", "data": "--data.path", "precision": "--trainer.precision",
        "accelerator": "--trainer.accelerator", "steps": "--trainer.max_steps", "out": "--trainer.default_root_dir"}
_COMMAND = {"model": "--model", "data": "--dataset", "precision": "--precision", "accelerator": "--accelerator",
            "steps": "--max-steps", "out": "--output-dir"}


def case_argv(case: Case, precision: str | None, models: dict[str, str], data: dict[str, str], out: Path, *,
              accelerator: str = "cpu", steps: int = 2, weight_dtype: str | None = None) -> list[str]:
    """The command line of `case` (precision None: the device's default)."""
    fit = case.command == "fit"
    names = _FIT if fit else _COMMAND
    model = models["lm" if case.model == "teacher" else case.model]
    argv = ["fit", "--method", case.method] if fit else [case.command]
    argv += [names["model"], model, names["data"], data[case.data], names["accelerator"], accelerator,
             names["steps"], str(steps), names["out"], str(out)]
    if precision is not None:
        argv += [names["precision"], precision]
    if fit:
        argv += ["--trainer.max_epochs", "null", "--trainer.enable_progress_bar", "false", "--trainer.logger", "csv"]
        if case.method in ("sft", "dpo", "simpo", "orpo", "kto", "distill"):
            argv += ["--data.val_fraction", "0", "--data.batch_size", "2"]
        argv += ["--model.gradient_checkpointing", "false"]
        if weight_dtype and case.frozen_base:
            argv += ["--model.weight_dtype", weight_dtype]
    else:
        argv += ["--epochs", "none", "--no-progress-bar", "--logger", "csv"]
        if case.method == "sft":
            argv += ["--val-fraction", "0", "--batch-size", "2"]
        if case.method == "embed":
            argv += ["--val-fraction", "0", "--batch-size", "4", "--no-evaluate-before-training"]
        else:
            argv += ["--no-gradient-checkpointing"]
            if weight_dtype and case.frozen_base:
                argv += ["--weight-dtype", weight_dtype]
    if case.model == "teacher":
        argv += ["--teacher-model", model]
    if case.teacher:
        argv += ["--model.teacher_model" if fit else "--teacher-model", models[case.teacher]]
    return argv + list(case.argv)


@dataclass
class Outcome:
    """What one run did."""

    case: str
    precision: str | None
    rc: int | None = None
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # trainable parameters the run changed
    frozen_moved: list[str] = field(default_factory=list)  # frozen parameters/quantized buffers that changed
    trainable: int = 0
    seconds: float = 0.0  # the fit, model loading excluded
    seconds_per_step: float = float("nan")
    peak_memory_gib: float = float("nan")
    error: str | None = None
    precision_plugin: str | None = None  # the precision the Trainer really ran (Lightning may swap it)

    @property
    def ok(self) -> bool:
        return (self.error is None and self.rc == 0 and self.steps > 0 and bool(self.losses)
                and all(math.isfinite(x) for x in self.losses) and bool(self.changed) and not self.frozen_moved)

    def problem(self) -> str:
        """The first thing wrong, in one line ("" when ok)."""
        if self.error:
            return self.error
        if self.rc != 0:
            return f"exit code {self.rc}"
        if not self.steps or not self.losses:
            return "no optimizer step / no loss recorded"
        if not all(math.isfinite(x) for x in self.losses):
            return f"non-finite loss {self.losses}"
        if not self.changed:
            return "no trainable parameter changed"
        if self.frozen_moved:
            return f"frozen parameters changed: {self.frozen_moved[:3]}"
        return ""


def _state(module) -> dict[str, torch.Tensor]:
    """Every parameter and quantized-weight buffer of the module, copied (trainable or not)."""
    state = {n: p.detach().clone() for n, p in module.named_parameters()}
    state.update({n: b.detach().clone() for n, b in module.named_buffers() if n.endswith(("qweight", "absmax"))})
    return state


class _StepTimes:
    """A callback recording when each training batch ends."""

    def __new__(cls):
        from lightning.pytorch import Callback

        class StepTimes(Callback):
            def __init__(self):
                self.ends: list[float] = []

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if pl_module.device.type == "cuda":
                    torch.cuda.synchronize()
                self.ends.append(time.perf_counter())

        return StepTimes()


@contextlib.contextmanager
def watch_fit(outcome: Outcome, mps_guard: bool = False):
    """Wrap `pmetal.cli.runner.fit` (the fit of every entry point) to record what the run did
    (`mps_guard`: the fit runs under `pmetal.mps_guard.MpsReadinessMode`)."""
    from pmetal.cli import runner

    original = runner.fit

    def watched(trainer, module, datamodule, **kwargs):
        from pmetal.callbacks.plots import LossHistory

        before = _state(module)
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        times = _StepTimes()
        trainer.callbacks.append(times)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        guard = contextlib.nullcontext()
        if mps_guard:
            from pmetal.mps_guard import MpsReadinessMode

            guard = MpsReadinessMode()
        try:
            with guard:
                return original(trainer, module, datamodule, **kwargs)
        finally:
            outcome.seconds = time.perf_counter() - start
            if len(times.ends) > 1:
                outcome.seconds_per_step = (times.ends[-1] - times.ends[0]) / (len(times.ends) - 1)
            elif times.ends:
                outcome.seconds_per_step = times.ends[0] - start
            if torch.cuda.is_available():
                outcome.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30
            outcome.steps = trainer.global_step
            outcome.precision_plugin = str(trainer.precision_plugin.precision)
            history = next((cb for cb in trainer.callbacks if isinstance(cb, LossHistory)), None)
            outcome.losses = [loss for _, loss in history.train] if history else []
            after = _state(module)
            outcome.trainable = len(trainable)
            moved = [n for n in before if not torch.equal(before[n], after[n].to(before[n].device))]
            outcome.changed = [n for n in moved if n in trainable]
            outcome.frozen_moved = [n for n in moved if n not in trainable]

    runner.fit = watched
    try:
        yield outcome
    finally:
        runner.fit = original


def run_case(case: Case, precision: str | None, models: dict[str, str], data: dict[str, str], out: Path, *,
             accelerator: str = "cpu", steps: int = 2, weight_dtype: str | None = None, mps_guard: bool = False,
             catch: bool = False) -> Outcome:
    """Run `case` through `pmetal.cli.main` and report what it did (`catch`: an exception becomes the
    outcome's error, its first line, instead of propagating; `mps_guard`: see `watch_fit`)."""
    from pmetal.cli import main

    argv = case_argv(case, precision, models, data, out, accelerator=accelerator, steps=steps,
                     weight_dtype=weight_dtype)
    outcome = Outcome(case.name, precision)
    stderr = _Tee(sys.stderr)
    try:
        with watch_fit(outcome, mps_guard), contextlib.redirect_stderr(stderr):
            outcome.rc = main(argv)
    except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
        if not catch:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        outcome.error = f"{type(exc).__name__}: {first}"[:200]
    if outcome.rc not in (0, None) and outcome.error is None:  # a user error: main printed "pmetal: error: ..."
        errors = [line for line in stderr.lines if line.startswith("pmetal: error:")]
        outcome.error = (errors[-1] if errors else f"exit code {outcome.rc}")[:200]
    return outcome


class _Tee(io.TextIOBase):
    """Writes through to `stream` and keeps the lines (to report a command's error message)."""

    def __init__(self, stream):
        self.stream, self.lines, self._partial = stream, [], ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        *done, self._partial = (self._partial + text).split("\n")
        self.lines += done
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
