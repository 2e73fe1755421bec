"""`pmetal train --ane` / `pmetal embed-train --ane`: train on the PyTorch device, then a Core ML
package for the Neural Engine in the run directory, and a plain statement of where training ran."""

from __future__ import annotations

import json


def test_train_ane_exports_a_coreml_package_and_says_where_training_ran(tiny_model_dir, tmp_path, capsys):
    from pmetal.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}) + "\n" for i in range(4)))
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--dataset", str(data), "--max-steps", "1",
                 "--max-seq-len", "96", "--accelerator", "cpu", "--precision", "32-true", "--output-dir", str(run),
                 "--no-progress-bar", "--val-fraction", "0", "--ane"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "training ran on CPU: PyTorch has no Neural Engine backend" in printed
    assert f"Core ML model for the Neural Engine (CPU_AND_NE, macOS 15 / iOS 18): {run / 'model.mlpackage'}" in printed
    assert (run / "model.mlpackage" / "Manifest.json").is_file()
    assert (run / "model-tokenizer" / "tokenizer.json").is_file()


def test_embed_train_ane_exports_the_embedding_model(tiny_bert_dir, tmp_path, capsys):
    import coremltools as ct

    from pmetal.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": f"code {i}", "positive": f"the code number {i}"}) + "\n"
                            for i in range(8)))  # fmt: skip
    run = tmp_path / "run"
    assert main(["embed-train", "--model", str(tiny_bert_dir), "--dataset", str(data), "--max-steps", "1",
                 "--batch-size", "4", "--accelerator", "cpu", "--output-dir", str(run), "--no-progress-bar",
                 "--val-fraction", "0", "--ane"]) == 0  # fmt: skip
    assert "training ran on CPU" in capsys.readouterr().out
    spec = ct.models.MLModel(str(run / "embedding.mlpackage"), skip_model_load=True).get_spec()
    assert [o.name for o in spec.description.output] == ["embedding"]
