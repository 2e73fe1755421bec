"""One run per folder: a run holds an OS lock on its run folder for its whole life, and a second
run into the same folder is refused in one line naming the holder's pid (exit 2), before it writes
anything. The lock dies with the process, so a killed run leaves nothing stale behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_sft_end_to_end import ROOT, write_chat_data

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the holder uses fcntl's semantics")


def start_holder(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the run folder's lock and sleeps (as a training run would hold it)."""
    code = ("import sys, time; from pmetal.runlock import hold_run_lock; hold_run_lock(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def stop(holder: subprocess.Popen) -> None:
    holder.kill()
    holder.wait(timeout=30)


def test_a_second_run_into_a_held_folder_is_refused_with_the_holder_s_pid(tiny_model_dir, tmp_path, capsys):
    from pmetal.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step\n1\n")  # the holder's files: --overwrite must not touch them
    data = write_chat_data(tmp_path / "chat.jsonl", rows=4)
    holder = start_holder(run)
    try:
        for argv in (["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(run),
                      "--overwrite"],
                     ["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--output-dir", str(run),
                      "--resume"],
                     ["fit", "--method", "sft", "--model", str(tiny_model_dir), "--data.path", str(data),
                      "--trainer.default_root_dir", str(run), "--overwrite"]):
            assert main(argv) == 2, argv
            text = capsys.readouterr().err
            err = [line for line in text.splitlines() if line.startswith("pmetal: error")]
            assert len(err) == 1 and f"is in use by another pmetal run (pid {holder.pid})" in err[0], text
            assert str(run) in err[0] and ("--output-dir" in err[0] or "--trainer.default_root_dir" in err[0])
            assert "Traceback" not in text
        assert (run / "metrics.csv").read_text() == "step\n1\n"
    finally:
        stop(holder)
    from pmetal.runlock import hold_run_lock

    hold_run_lock(run)  # the holder was killed: its lock went with it


def test_the_lock_is_reentrant_within_a_process_and_survives_overwrite(tmp_path):
    from pmetal.cli.preflight import check_output_dir
    from pmetal.runlock import LOCK_FILE, hold_run_lock

    run = tmp_path / "run"
    check_output_dir(run)
    (run / "checkpoints").mkdir()
    check_output_dir(run, overwrite=True)  # clears the old run, keeps the lock file this process holds
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]
    hold_run_lock(run)
    holder = start_holder(tmp_path / "other")
    try:
        with pytest.raises(Exception, match=f"pid {holder.pid}"):
            hold_run_lock(tmp_path / "other")
    finally:
        stop(holder)
