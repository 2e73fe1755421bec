"""Collation, the resumable length-grouped sampler and SftDataModule end to end."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch

from pmetal.data.collate import PaddingCollator
from pmetal.data.datamodule import SftDataModule, example_path
from pmetal.data.sampler import LengthGroupedBatchSampler, ResumableDataLoader, ShuffledBatchSampler
from pmetal.errors import DataError, PmetalError


# ------------------------------------------------------------------------------ collate

def test_padding_collator_right_pads_with_ignored_labels():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = PaddingCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_padding_collator_multiple_of_8_capped_by_max_length():
    rows = [{"input_ids": list(range(1, 10)), "labels": list(range(1, 10))}]
    assert PaddingCollator(pad_token_id=0, pad_to_multiple_of=8)(rows)["input_ids"].shape == (1, 16)
    assert PaddingCollator(pad_token_id=0, pad_to_multiple_of=8, max_length=12)(rows)["input_ids"].shape == (1, 12)
    assert PaddingCollator(pad_token_id=0, pad_to_multiple_of=8, max_length=4)(rows)["input_ids"].shape == (1, 9)


# ------------------------------------------------------------------------------ sampler

LENGTHS = [(i * 37) % 101 + 1 for i in range(203)]


def test_length_grouped_batches_cover_rows_once_and_group_lengths():
    sampler = LengthGroupedBatchSampler(LENGTHS, 4, seed=1, group_factor=10)
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    assert max(LENGTHS[i] for i in batches[0]) == max(LENGTHS)  # longest batch first
    # grouping by length: much less padding than random batches
    padded = sum(len(b) * max(LENGTHS[i] for i in b) for b in batches)
    assert padded < 1.15 * sum(LENGTHS)
    assert sampler.batches(0) == LengthGroupedBatchSampler(LENGTHS, 4, seed=1, group_factor=10).batches(0)
    assert sampler.batches(1) != batches  # a new order every epoch
    assert len(sampler) == 51
    assert len(LengthGroupedBatchSampler(LENGTHS, 4, drop_last=True).batches(3)) == 50


def _indices(rows):
    return [r["i"] for r in rows]


def _loader(seed=7, **kwargs):
    data = [{"i": i} for i in range(len(LENGTHS))]
    sampler = LengthGroupedBatchSampler(LENGTHS, 8, seed=seed, group_factor=4)
    return ResumableDataLoader(data, sampler, collate_fn=_indices, **kwargs)


def test_resume_mid_epoch_gives_exactly_the_remaining_batches():
    uninterrupted = _loader()
    epoch0, epoch1 = list(uninterrupted), list(uninterrupted)
    assert epoch0 != epoch1
    for k in (0, 1, 5, len(epoch0) - 1, len(epoch0)):
        first = _loader()
        it = iter(first)
        taken = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
        resumed = _loader()
        resumed.load_state_dict(state)
        rest = list(resumed)
        if k == len(epoch0):  # saved at the end of the epoch: the next pass is epoch 1
            assert rest == epoch1
        else:
            assert taken + rest == epoch0
            assert list(resumed) == epoch1  # and the following epoch continues as before


def test_resume_counts_batches_handed_out_not_prefetched_by_workers():
    epoch0 = list(_loader())
    first = _loader(num_workers=1, prefetch_factor=4)
    it = iter(first)
    taken = [next(it) for _ in range(3)]  # the worker has already fetched several more
    assert first.state_dict()["batches_yielded"] == 3
    resumed = _loader()
    resumed.load_state_dict(first.state_dict())
    assert taken + list(resumed) == epoch0


def test_resume_in_second_epoch_and_mismatch_error():
    first = _loader()
    list(first)
    it = iter(first)
    taken = [next(it) for _ in range(3)]
    resumed = _loader()
    resumed.load_state_dict(first.state_dict())
    assert taken + list(resumed) == list(_loader_epoch(1))
    other = ResumableDataLoader(list(range(10)), LengthGroupedBatchSampler([1] * 10, 2))
    with pytest.raises(PmetalError, match="checkpoint's training data had 26 batches per epoch, this run has 5"):
        other.load_state_dict(first.state_dict())


def _loader_epoch(epoch):
    loader = _loader()
    for _ in range(epoch):
        list(loader)
    return loader


def test_ranks_split_the_batches(monkeypatch):
    """Two ranks with batch 4 train on the global batches one process with batch 8 sees, disjointly."""
    import pmetal.data.sampler as sampler_module

    everything = LengthGroupedBatchSampler(LENGTHS, 8, seed=2).batches(0)  # 26 global batches of 8 (last: 4)
    shards = []
    for rank in range(2):
        monkeypatch.setattr(sampler_module, "_replica", lambda rank=rank: (rank, 2))
        sampler = LengthGroupedBatchSampler(LENGTHS, 4, seed=2)
        assert len(sampler) == len(everything) == 26
        shards.append(list(sampler))
    for step, batch in enumerate(everything):
        assert shards[0][step] + shards[1][step] == batch
        assert not set(shards[0][step]) & set(shards[1][step])
    assert all(0 <= len(a) - len(b) <= 1 and b for a, b in zip(*shards))  # a smaller global batch: near-equal parts


def test_random_batches_shard_and_resume_with_the_same_global_batch():
    from pmetal.data.sampler import RandomBatchSampler

    one = RandomBatchSampler(11, 4, seed=3)
    halves = [RandomBatchSampler(11, 2, seed=3, rank=r, num_replicas=2) for r in range(2)]
    assert [a + b for a, b in zip(*map(list, halves))] == list(one)
    assert sorted(i for h in halves for b in h for i in b) == list(range(11))  # the last 3 rows: 2 + 1
    loader = ResumableDataLoader(list(range(11)), RandomBatchSampler(11, 2, seed=3, rank=0, num_replicas=2),
                                 collate_fn=list)
    it = iter(loader)
    next(it)
    single = ResumableDataLoader(list(range(11)), RandomBatchSampler(11, 4, seed=3), collate_fn=list)
    single.load_state_dict(loader.state_dict())  # same global batch (1 × 4 = 2 × 2): resumes
    assert list(single) == [b for b in RandomBatchSampler(11, 4, seed=3)][1:]
    other = ResumableDataLoader(list(range(11)), RandomBatchSampler(11, 2, seed=3), collate_fn=list)
    with pytest.raises(PmetalError, match=r"global batch of 4 rows \(or packed bins\) \(2 process\(es\) × 2\), this run's is 2"):
        other.load_state_dict(loader.state_dict())


def test_shuffled_fixed_batches():
    bins = [[0, 1], [2], [3, 4, 5], [6]]
    sampler = ShuffledBatchSampler(bins, seed=3)
    assert sorted(map(tuple, sampler.batches(0))) == sorted(map(tuple, bins))
    assert ShuffledBatchSampler(bins, shuffle=False).batches(5) == bins


class _Recorder(L.LightningModule):
    """Records the batches it trains on; one tiny parameter so the optimizer has work."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"][:, 0].tolist())
        return (self.weight ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _id_rows(n):  # row i starts with token i so a batch is identified by its first column
    return [{"text": f"row {i}"} for i in range(n)]


class _FakeTokenizer:
    pad_token_id, eos_token_id, eos_token, chat_template = 0, 1, "</s>", None

    def __call__(self, text, add_special_tokens=True):
        i = int(text.split()[1])
        return {"input_ids": [1000 + i] + [7] * (i % 5)}


def test_lightning_resume_mid_epoch_sees_remaining_batches(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _id_rows(40)))
    kwargs = dict(path=str(path), batch_size=4, val_fraction=0, tokenizer=_FakeTokenizer(), seed=5, packing=False)
    trainer_kwargs = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                          num_sanity_val_steps=0)

    full = _Recorder()
    L.Trainer(max_epochs=2, enable_checkpointing=False, **trainer_kwargs).fit(full, SftDataModule(**kwargs))
    assert len(full.seen) == 20

    first = _Recorder()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    L.Trainer(max_steps=3, callbacks=[ckpt], **trainer_kwargs).fit(first, SftDataModule(**kwargs))
    resumed = _Recorder()
    L.Trainer(max_epochs=2, enable_checkpointing=False, **trainer_kwargs).fit(
        resumed, SftDataModule(**kwargs), ckpt_path=str(next(tmp_path.glob("*.ckpt"))))
    assert first.seen + resumed.seen == full.seen


# ------------------------------------------------------------------------------ datamodule

def _chat_file(tmp_path, n=20):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from pmetal.models import load_tokenizer

    return load_tokenizer(smollm2_dir)


def test_datamodule_end_to_end(tmp_path, tok, caplog):
    dm = SftDataModule(path=str(_chat_file(tmp_path)), batch_size=3, val_fraction=0.1, tokenizer=tok, seed=0,
                       packing=False)
    with caplog.at_level(logging.INFO, logger="pmetal"):
        dm.setup("fit")
    assert "format messages | 20 rows | 0 truncated" in caplog.text and "train 18 / val 2 rows" in caplog.text
    batches = list(dm.train_dataloader())
    assert len(batches) == 6 and sum(b["input_ids"].shape[0] for b in batches) == 18
    batch = batches[1]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    trained = batch["labels"][0][batch["labels"][0] != -100]
    assert tok.decode(trained).endswith("<|im_end|>") and "plus" in tok.decode(trained)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
    assert dm.trainable_tokens == sum(int((b["labels"] != -100).sum()) for b in batches)
    assert dm.train_tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert sum(b["input_ids"].shape[0] for b in dm.val_dataloader()) == 2


def test_datamodule_truncation_is_counted_and_empty_rows_skipped(tmp_path, tok, caplog):
    with caplog.at_level(logging.INFO, logger="pmetal"):
        dm = SftDataModule(path=str(_chat_file(tmp_path, 4)), max_seq_len=40, val_fraction=0, tokenizer=tok)
        dm.setup()
    # rows are 48 tokens and the answer starts at token 38 (after SmolLM2's default system prompt)
    assert dm.stats.truncated == 4 and "4 truncated to 40 tokens" in caplog.text
    assert all(len(r["input_ids"]) == 40 and sum(x != -100 for x in r["labels"]) == 2 for r in dm.train_rows)
    with pytest.raises(DataError, match="chat.jsonl: no row has a token to learn from"):
        SftDataModule(path=str(_chat_file(tmp_path, 4)), max_seq_len=38, val_fraction=0, tokenizer=tok).setup()
    assert "4 row(s) have no trainable token after truncation to 38 (rows/lines 1, 2, 3, 4)" in caplog.text


def test_datamodule_eval_file_and_packing(tmp_path, tok):
    pytest.importorskip("pmetal.data.packing")
    path = _chat_file(tmp_path)
    dm = SftDataModule(path=str(path), eval_path=str(path), packing=True, pack_tokens=256, max_seq_len=128,
                       tokenizer=tok)
    dm.setup()
    assert dm.stats.train_rows == 20 and dm.stats.val_rows == 20
    batches = list(dm.train_dataloader())
    # bins of at most pack_tokens tokens, batch_size (4) bins stacked per batch
    assert all(b["input_ids"].shape[0] <= 4 and b["input_ids"].shape[1] <= 256 for b in batches)
    assert "attention_mask" not in batches[0]
    real_rows = 0
    for b in batches:
        flat_ids = b["input_ids"].reshape(-1)
        starts = torch.cumsum(b["seq_lens"], 0) - b["seq_lens"]
        real_rows += int((flat_ids[starts] != tok.pad_token_id).sum())  # padding segments start with pad
        assert int(b["seq_lens"].sum()) == b["input_ids"].numel()
    assert real_rows == 20


def test_datamodule_errors(tmp_path, tok):
    with pytest.raises(PmetalError, match="needs a tokenizer"):
        SftDataModule(path=str(_chat_file(tmp_path))).setup()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 1, field 'messages\[1\].role': unknown role 'wizard'"):
        SftDataModule(path=str(bad), tokenizer=tok).setup()
    with pytest.raises(PmetalError, match="val_fraction"):
        SftDataModule(val_fraction=1.5)
    with pytest.raises(PmetalError, match=r"pack_tokens \(512\) must be at least max_seq_len \(1024\)"):
        SftDataModule(packing=True, pack_tokens=512, max_seq_len=1024)


def test_datamodule_without_chat_template_needs_chatml(tmp_path, tok):
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(PmetalError, match="has no chat template.*--data.chat_template chatml"):
        SftDataModule(path=str(_chat_file(tmp_path)), tokenizer=bare).setup()
    dm = SftDataModule(path=str(_chat_file(tmp_path)), tokenizer=bare, chat_template="chatml", val_fraction=0)
    dm.setup()
    assert "helpful AI assistant" not in bare.decode(dm.train_rows[0]["input_ids"])
    assert bare.decode([t for t in dm.train_rows[0]["labels"] if t != -100]) == "0 plus 0 is 0.<|im_end|>"


def test_shipped_example_is_the_default(tok):
    dm = SftDataModule(tokenizer=tok)
    assert dm.path == str(example_path()) and example_path().is_file()
    dm.setup()
    assert dm.stats.format == "messages" and dm.stats.rows >= 200 and dm.stats.truncated == 0


def test_random_batches_on_one_process_are_those_of_a_seeded_shuffling_dataloader():
    from torch.utils.data import DataLoader

    from pmetal.data.sampler import RandomBatchSampler

    plain = DataLoader(list(range(11)), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5),
                       collate_fn=list)
    sampler = RandomBatchSampler(11, 4, seed=5)
    assert [list(plain) for _ in range(3)] == [sampler.batches(e) for e in range(3)]
