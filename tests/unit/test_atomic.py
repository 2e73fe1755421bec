"""Writes a kill cannot leave half-done: the final name holds the old content or the new, never a part."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pmetal.atomic import atomic_output, write_text_atomic


def test_a_file_is_replaced_whole_and_nothing_is_left_beside_it(tmp_path):
    target = tmp_path / "loss_history.json"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_history.json"]


def test_a_failed_write_keeps_the_old_file_and_the_old_directory(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "adapter_model.safetensors").write_text("the old adapter")
    with pytest.raises(RuntimeError):
        with atomic_output(target, directory=True) as staging:
            (staging / "adapter_model.safetensors").write_text("half")
            raise RuntimeError("killed mid-save")
    assert (target / "adapter_model.safetensors").read_text() == "the old adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    with atomic_output(target, directory=True) as staging:  # success replaces the whole tree
        (staging / "new.txt").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_the_final_adapter_is_written_beside_final_then_renamed(tmp_path):
    from pmetal.callbacks.checkpoint import ExportOnTrainEnd

    seen = []

    class Module:
        policy = None

        def save_pretrained(self, out):
            seen.append(out)
            (out / "adapter_config.json").write_text(json.dumps({"r": 4}))
            assert not (tmp_path / "final").exists()  # nothing under the final name while writing

    callback = ExportOnTrainEnd()
    callback.on_train_end(SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True), Module())
    assert seen[0] != tmp_path / "final" and callback.export_dir == tmp_path / "final"
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text()) == {"r": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_the_loss_history_and_plot_are_written_atomically(tmp_path, monkeypatch):
    from pmetal.callbacks import plots

    history = plots.LossHistory()
    history.train = [(1, 2.0), (2, 1.5)]
    history.write(tmp_path)
    before = (tmp_path / "loss_history.json").read_text()

    def broken_plot(train, val, path, **options):
        path.write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(plots, "plot_losses", broken_plot)
    history.train.append((3, 1.0))
    with pytest.raises(OSError):
        history.write(tmp_path)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG" and b"half" not in (tmp_path / "loss.png").read_bytes()
    assert json.loads((tmp_path / "loss_history.json").read_text())["train"][-1] == [3, 1.0]
    assert before != (tmp_path / "loss_history.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "loss_history.json"]


def test_the_embedding_evaluations_survive_a_cut_append(tmp_path):
    from pmetal.embedding import write_metrics

    write_metrics(tmp_path, 1, 0, {"spearman": 0.5})
    with (tmp_path / "eval_metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "spe')  # what a kill in the middle of an append leaves
    write_metrics(tmp_path, 2, 0, {"spearman": 0.7})
    records = [json.loads(line) for line in (tmp_path / "eval_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert json.loads((tmp_path / "eval_metrics.json").read_text())["spearman"] == 0.7
