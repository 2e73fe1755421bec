"""SIGTERM and SIGINT: a run stops with the checkpoint of the step it was in, one line with the
command that resumes it, and the shell's 128 + signal exit status; an export removes its hidden
temporary output. Signals are sent to real subprocesses."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from tests.unit.test_sft_end_to_end import ROOT, write_chat_data

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests' / 'support'}{os.pathsep}{ROOT}"}


def pmetal(*argv, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pmetal", *argv], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)


def fit_argv(tiny_model_dir, data, run, *extra) -> list[str]:
    return ["fit", "--method", "sft", "--model", str(tiny_model_dir), "--data.path", str(data),
            "--data.batch_size", "2", "--data.max_seq_len", "64", "--data.val_fraction", "0",
            "--trainer.max_steps", "6", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
            "--checkpoint_every_n_steps", "100", "--trainer.default_root_dir", str(run), *extra]


def pmetal_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pmetal")]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_writes_the_current_step_s_checkpoint_and_says_how_to_resume(tiny_model_dir, tmp_path, name):
    data = write_chat_data(tmp_path / "chat.jsonl", rows=16)
    run = tmp_path / "run"
    stopped = pmetal(*fit_argv(tiny_model_dir, data, run, "--trainer.callbacks+=killer.SignalAtStep",
                               "--trainer.callbacks.step", "2", "--trainer.callbacks.signal", name, "--overwrite"))
    assert stopped.returncode == 128 + getattr(signal, name), stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "Received SIGTERM" not in stopped.stderr
    lines = pmetal_lines(stopped.stderr)
    assert len(lines) == 1, stopped.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert f"interrupted by {name} at step 3; wrote the checkpoint of this step: {last}" in lines[0]
    # the signal came as step 3 began (2 steps done, no checkpoint due before 100): step 3 finished and was kept
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert not (run / "final").exists()
    if name == "SIGINT":
        return
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[0] == "pmetal" and command[-1] == "--resume" and "--overwrite" not in command
    resumed = pmetal(*command[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "done: 6 optimizer steps" in resumed.stdout or (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "final" / "adapter_model.safetensors").is_file()


def test_sigterm_during_an_export_removes_its_temporary_folder(tiny_model_dir, tmp_path):
    """The signal arrives after the weights are written into the hidden `.partial` folder."""
    out = tmp_path / "exports" / "merged"
    code = ("import os, signal, sys, time\n"
            "import pmetal.export.api as api\n"
            "write = api.save_hf\n"
            "def slow(*a, **k):\n"
            "    write(*a, **k); os.kill(os.getpid(), signal.SIGTERM); time.sleep(60)\n"
            "api.save_hf = slow\n"
            "from pmetal.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, "export", str(tiny_model_dir), "--format", "hf",
                           "--out", str(out)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert done.returncode == 143, done.stderr[-3000:]
    lines = pmetal_lines(done.stderr)
    assert lines == ["pmetal: export interrupted by SIGTERM; no partial output was left behind"], done.stderr[-3000:]
    assert list(out.parent.iterdir()) == []


def test_the_resume_command_keeps_the_flags_and_drops_overwrite():
    from pmetal.cli.interrupts import resume_command

    assert resume_command(["train", "--model", "m", "--overwrite", "--lr", "1e-3"], "runs/sft-1") == \
        "pmetal train --model m --lr 1e-3 --output-dir runs/sft-1 --resume"
    assert resume_command(["train", "--resume", "--output-dir", "a b"], "a b") == \
        "pmetal train --output-dir 'a b' --resume"
    assert resume_command(["fit", "--ckpt_path", "x.ckpt", "--resume=last", "--method", "dpo"], "r") == \
        "pmetal fit --method dpo --trainer.default_root_dir r --resume"


def test_a_second_request_stops_at_once_naming_the_newest_checkpoint(tmp_path):
    from types import SimpleNamespace

    from pmetal.callbacks.interrupt import InterruptCheckpoint
    from pmetal.errors import Interrupted

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 4}, ckpts / "step-4.ckpt")
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), global_step=5,
                              checkpoint_callback=SimpleNamespace(dirpath=str(ckpts)))
    stopper = InterruptCheckpoint()
    stopper.on_fit_start(trainer, None)
    stopper.request_stop(signal.SIGINT)  # the first asks for a stop at the end of the step
    with pytest.raises(Interrupted) as info:
        stopper.request_stop(signal.SIGINT)
    assert (info.value.exit_code, info.value.step, info.value.saved) == (130, 5, False)
    assert info.value.checkpoint == ckpts / "step-4.ckpt"
