"""EmbedModule on tiny random models: building, embedding, losses, training, evaluation, saving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pmetal.errors import DataError, PmetalError


def _pairs(tmp_path, n=12, name="pairs.jsonl", **extra):
    rows = [{"anchor": f"code {i} {chr(97 + i)}", "positive": f"item number {i} is {chr(97 + i) * 3}", **extra}
            for i in range(n)]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trainer(tmp_path, max_steps=4, **kwargs):
    import lightning as L

    return L.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", max_steps=max_steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, **kwargs)


def test_builds_encoder_from_plain_bert_and_matches_sentence_transformers(tiny_bert_dir):
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling

    from pmetal.modules.embed import EmbedModule

    module = EmbedModule(str(tiny_bert_dir))
    assert all(m.training for m in module.modules())  # dropout on in training, as in sentence-transformers
    assert [type(m) for m in module.encoder][1:] == [Pooling, Normalize]
    assert module.encoder[1].pooling_mode == "mean"
    texts = ["a short text", "a rather longer text with more tokens in it", "x"]
    module.eval()
    with torch.no_grad():
        ours = module.embed(texts)
    ref = module.encoder.encode(texts, convert_to_tensor=True)
    assert ours.shape == (3, 32)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(ours, ref, atol=1e-5)
    cls = EmbedModule(str(tiny_bert_dir), pooling="cls", normalize=False)
    assert cls.encoder[1].pooling_mode == "cls" and not any(isinstance(m, Normalize) for m in cls.encoder)


def test_decoder_model_gets_lasttoken_pooling(tiny_model_dir):
    from sentence_transformers.base.modules import Normalize

    from pmetal.modules.embed import EmbedModule

    module = EmbedModule(str(tiny_model_dir), max_seq_len=64).eval()
    assert module.encoder[1].pooling_mode == "lasttoken" and isinstance(module.encoder[2], Normalize)
    with torch.no_grad():
        batch = module.embed(["hello there, how are you today?", "hi"])
        alone = module.embed(["hi"])
    # padding (on whichever side the tokenizer pads) does not change the short text's embedding
    assert torch.allclose(batch[1], alone[0], atol=1e-5)


def test_losses_and_duplicate_masking(tiny_bert_dir):
    from pmetal.data.embedding import EmbeddingExample, collate_embedding_examples
    from pmetal.modules.embed import EmbedModule

    module = EmbedModule(str(tiny_bert_dir)).eval()
    dup = collate_embedding_examples([EmbeddingExample("q1", "same doc"), EmbeddingExample("q2", "other doc"),
                                      EmbeddingExample("q3", "same doc")])
    with torch.no_grad():
        masked = module.compute_loss(dup)
        module.hparams.mask_duplicates = False
        unmasked = module.compute_loss(dup)
    assert masked < unmasked  # the duplicate no longer counts as a negative
    triplets = collate_embedding_examples([EmbeddingExample("q1", "d1", ("n1", "m1")), EmbeddingExample("q2", "d2", ("n2", "m2"))])
    module.hparams.loss = "triplet"
    assert torch.isfinite(module.compute_loss(triplets))
    with pytest.raises(PmetalError, match="loss 'triplet' needs triplets"):
        module.compute_loss(dup)
    module.hparams.loss = "cosent"
    scored = collate_embedding_examples([EmbeddingExample("a", "b", score=1.0), EmbeddingExample("c", "d", score=0.0)])
    assert torch.isfinite(module.compute_loss(scored))


def test_trains_evaluates_and_saves_a_loadable_model(tiny_bert_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from pmetal.data.embedding import EmbeddingDataModule
    from pmetal.modules.embed import EmbedModule

    train = _pairs(tmp_path, 16)
    data = EmbeddingDataModule(path=str(train), eval_path=str(_pairs(tmp_path, 6, "eval.jsonl")), batch_size=8)
    module = EmbedModule(str(tiny_bert_dir), learning_rate=1e-3)
    before = [p.detach().clone() for p in module.encoder.parameters()]
    _trainer(tmp_path, max_steps=4, val_check_interval=2).fit(module, datamodule=data)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, module.encoder.parameters()))

    records = [json.loads(line) for line in (tmp_path / "eval_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert {"recall@1", "recall@10", "mrr@10", "loss"} <= set(records[0])
    assert 0.0 <= records[-1]["recall@1"] <= 1.0
    assert json.loads((tmp_path / "eval_metrics.json").read_text())["step"] == 4

    out = module.save_pretrained(tmp_path / "model")
    texts = ["code 3 d", "item number 3 is ddd"]
    module.eval()
    with torch.no_grad():
        ours = module.embed(texts)
    reloaded = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, reloaded, atol=1e-5)
    assert json.loads((out / "pmetal_config.json").read_text())["method"] == "EmbedModule"


def test_lora_trains_adapter_only_and_saves_merged(tiny_bert_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from pmetal.data.embedding import EmbeddingDataModule
    from pmetal.modules.embed import EmbedModule

    module = EmbedModule(str(tiny_bert_dir), adapter="lora", lora_r=4, learning_rate=1e-2,
                         evaluate_before_training=False)
    trainable = [n for n, p in module.encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    data = EmbeddingDataModule(path=str(_pairs(tmp_path, 8)), batch_size=4, val_fraction=0.0)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=data)
    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)

    out = module.save_pretrained(tmp_path / "lora-model")
    assert (out / "adapter" / "adapter_config.json").is_file()
    texts = ["code 1 b", "something else"]
    module.eval()
    with torch.no_grad():
        ours = module.embed(texts)
    loaded = SentenceTransformer(str(out), device="cpu")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    assert torch.allclose(ours, loaded.encode(texts, convert_to_tensor=True), atol=1e-5)
    # saving left the training model's adapter in place
    assert any("lora_" in n for n, _ in module.encoder.named_parameters())


def test_layout_mismatch_is_a_clear_error(tiny_bert_dir, tmp_path):
    from pmetal.data.embedding import EmbeddingDataModule
    from pmetal.modules.embed import EmbedModule

    module = EmbedModule(str(tiny_bert_dir), loss="cosent")
    data = EmbeddingDataModule(path=str(_pairs(tmp_path, 4)), batch_size=4)
    with pytest.raises(DataError, match="pairs.jsonl: loss 'cosent' cannot train on pairs"):
        _trainer(tmp_path, max_steps=1).fit(module, datamodule=data)


def test_bad_arguments():
    from pmetal.modules.embed import EmbedModule

    with pytest.raises(PmetalError, match="unknown embedding loss 'mse'"):
        EmbedModule("default", loss="mse")
    with pytest.raises(PmetalError, match="embedding model not found"):
        EmbedModule("no/such/model/here")


def test_embed_train_command_end_to_end(tiny_bert_dir, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    from pmetal.cli import main

    out = tmp_path / "run"
    rc = main(["embed-train", "--model", str(tiny_bert_dir), "--dataset", str(_pairs(tmp_path, 12)),
               "--val-fraction", "0.25", "--batch-size", "4", "--max-steps", "2", "--output-dir", str(out),
               "--accelerator", "cpu", "--precision", "32-true", "--no-progress-bar", "--lr", "1e-3"])
    assert rc == 0
    assert (out / "eval_metrics.json").is_file() and "held-out metrics" in capsys.readouterr().out
    model = SentenceTransformer(str(out / "final"), device="cpu")
    assert model.encode(["code 1 b"]).shape == (1, 32)


def test_embed_train_command_reports_bad_data(tiny_bert_dir, tmp_path, capsys):
    from pmetal.cli import main

    rc = main(["embed-train", "--model", str(tiny_bert_dir), "--dataset", str(_pairs(tmp_path, 4)),
               "--loss", "triplet", "--output-dir", str(tmp_path / "run"), "--accelerator", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "pairs.jsonl: loss 'triplet' cannot train on pairs" in err and "Traceback" not in err


def test_fit_method_embed_builds_from_the_config(tiny_bert_dir, tmp_path):
    from pmetal.data.embedding import EmbeddingDataModule
    from pmetal.cli.lightning import run_lightning_cli
    from pmetal.modules.embed import EmbedModule

    config = Path(__file__).resolve().parents[2] / "configs" / "embed.yaml"
    cli = run_lightning_cli(["fit", "--config", str(config), "--model", str(tiny_bert_dir),
                             "--data.path", str(_pairs(tmp_path, 8)), "--trainer.default_root_dir",
                             str(tmp_path / "run")], run=False)
    assert isinstance(cli.model, EmbedModule) and isinstance(cli.datamodule, EmbeddingDataModule)
    assert cli.model.hparams.loss == "infonce" and cli.datamodule.hparams.batch_size == 32
