"""Reward models (`RewardModule`, `pmetal reward-train`): training, the saved classifier in transformers
and in `--reward-model`, the margin column, and a learning test on the embedded SmolLM2 (slow)."""

import json
import subprocess
import sys

import pytest
import torch

from pmetal.errors import DataError, PmetalError


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _easy_pairs(n, start=0):
    """Pairs a tiny model separates by a token: chosen completions say "good", rejected "bad"."""
    return [{"prompt": f"Rate item {i}.", "chosen": f"good good {i}", "rejected": f"bad bad {i}"}
            for i in range(start, start + n)]


def _trainer(tmp_path, max_steps):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     default_root_dir=str(tmp_path))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A tiny reward model after 12 steps on easy pairs, its weights before, and its saved directory."""
    import lightning as L

    from pmetal.data.preference import PreferenceDataModule
    from pmetal.modules.reward import RewardModule

    tmp = tmp_path_factory.mktemp("reward")
    L.seed_everything(0)
    module = RewardModule(model=str(tiny_model_dir), learning_rate=1e-2, lr_schedule="constant",
                          gradient_checkpointing=False)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    datamodule = PreferenceDataModule(path=str(_write(tmp / "pairs.jsonl", _easy_pairs(16))), batch_size=4)
    _trainer(tmp, 12).fit(module, datamodule=datamodule)
    return module, before, module.save_pretrained(tmp / "final")


def test_lora_and_the_score_head_train_and_the_base_stays(trained):
    module, before, _ = trained
    after = dict(module.policy.named_parameters())
    trainable = {n for n, p in after.items() if p.requires_grad}
    changed = {n for n in after if not torch.equal(after[n].detach(), before[n])}
    assert changed == trainable, "exactly the trainable parameters changed"
    assert any("lora_" in n for n in changed) and any("score.modules_to_save" in n for n in changed)
    assert not any("base_layer" in n or "embed_tokens" in n for n in trainable)


def test_saved_model_loads_in_transformers_and_ranks_held_out_pairs(trained):
    """A fresh interpreter loads the merged classifier with AutoModelForSequenceClassification alone
    and scores every held-out chosen completion above its rejected one."""
    module, _, out = trained
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    held_out = _easy_pairs(6, start=100)
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "path, pairs = sys.argv[1], json.loads(sys.argv[2])\n"
        "tok = AutoTokenizer.from_pretrained(path)\n"
        "model = AutoModelForSequenceClassification.from_pretrained(path).eval()\n"
        "def score(p, c):\n"
        "    text = tok.apply_chat_template([{'role': 'user', 'content': p}, {'role': 'assistant', 'content': c}], tokenize=False)\n"
        "    with torch.no_grad():\n"
        "        return model(**tok(text, return_tensors='pt')).logits[0, 0].item()\n"
        "print(json.dumps([[score(r['prompt'], r['chosen']), score(r['prompt'], r['rejected'])] for r in pairs]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(out), json.dumps(held_out)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(c > r for c, r in scores), scores
    # the same numbers the training module gives (the merge changed nothing)
    from pmetal.rewards import RewardModelReward

    reward = RewardModelReward(str(out))
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in held_out]
    ours = reward(prompts + prompts, [r["chosen"] for r in held_out] + [r["rejected"] for r in held_out])
    assert ours == pytest.approx([s[0] for s in scores] + [s[1] for s in scores], abs=1e-4)


def test_chat_turn_suffix_scores_where_the_scorer_reads(tiny_model_dir):
    """Training appends what the chat template writes after the closed turn (SmolLM2's newline), so a
    training row ends on the token `--reward-model` reads the score at."""
    from pmetal.data.preference import PreferencePair, tokenize_pairs
    from pmetal.models import load_tokenizer
    from pmetal.modules.reward import append_after_turn, chat_turn_suffix

    tok = load_tokenizer(str(tiny_model_dir))
    end, suffix = chat_turn_suffix(tok)
    item = tokenize_pairs(tok, [PreferencePair([{"role": "user", "content": "q"}], "a b", "c")], 256)[0]
    ids = torch.tensor([item["chosen_input_ids"] + [tok.pad_token_id] * 3])
    mask = torch.tensor([[1] * len(item["chosen_input_ids"]) + [0] * 3])
    new_ids, new_mask = append_after_turn(ids, mask, end, suffix, pad_token_id=tok.pad_token_id)
    whole = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}],
                                    tokenize=False)
    assert suffix and new_ids[0, new_mask[0].bool()].tolist() == tok(whole)["input_ids"]


def test_raw_rows_score_prompt_and_completion_as_the_scorer_tokenizes_them(tiny_model_dir):
    """chat_template=False rows are `prompt + completion + EOS`; `--reward-model` scores a plain-string
    prompt as `prompt + completion`, so training drops that EOS."""
    from pmetal.data.render import render_raw_prompt_completion
    from pmetal.models import load_tokenizer
    from pmetal.modules.reward import drop_final_token

    tok = load_tokenizer(str(tiny_model_dir))
    ids, _, _ = render_raw_prompt_completion(tok, "Rate item 1.", " good")
    assert ids[-1] == tok.eos_token_id
    rows = torch.tensor([ids + [tok.pad_token_id], ids[:-1] + [tok.pad_token_id] * 2])
    mask = (torch.arange(rows.shape[1]) < torch.tensor([[len(ids)], [len(ids) - 1]])).long()
    new_ids, new_mask = drop_final_token(rows, mask, tok.eos_token_id, pad_token_id=tok.pad_token_id)
    expected = tok("Rate item 1. good")["input_ids"]
    assert [new_ids[k, new_mask[k].bool()].tolist() for k in range(2)] == [expected, expected]


def test_margin_column_reaches_the_batch_and_bad_margins_name_the_row(tmp_path):
    from pmetal.data.formats import load_rows
    from pmetal.data.preference import to_preference_pairs

    rows = [dict(r, margin=m) for r, m in zip(_easy_pairs(2), (1.5, 0))]
    pairs, _ = to_preference_pairs(rows)
    assert [p.margin for p in pairs] == [1.5, 0.0]
    bad = _write(tmp_path / "bad.jsonl", [dict(_easy_pairs(1)[0], margin=1.0), _easy_pairs(2)[1]])
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 2.*margin.*missing"):
        to_preference_pairs(load_rows(bad), path=str(bad))
    bad = _write(tmp_path / "bad2.jsonl", [dict(_easy_pairs(1)[0], margin="big")])
    with pytest.raises(DataError, match=r"line 1.*margin.*'big' is not a finite number"):
        to_preference_pairs(load_rows(bad), path=str(bad))
    assert all(p.margin is None for p in to_preference_pairs(_easy_pairs(2))[0])


def test_margin_changes_the_loss(tiny_model_dir):
    from pmetal.modules.reward import RewardModule

    module = RewardModule(model=str(tiny_model_dir), gradient_checkpointing=False)
    ids = torch.randint(5, 90, (2, 6))
    batch = {"chosen_input_ids": ids, "rejected_input_ids": ids.flip(0), "chosen_attention_mask": torch.ones_like(ids),
             "rejected_attention_mask": torch.ones_like(ids), "chosen_labels": ids, "rejected_labels": ids}
    plain, metrics = module.compute_loss(batch)
    with_margin, _ = module.compute_loss({**batch, "margin": torch.tensor([3.0, 3.0])})
    assert with_margin > plain and set(metrics) == {"accuracy", "margin", "min_reward", "mean_reward", "max_reward"}


def test_unsupported_settings_are_clear_errors(tiny_model_dir):
    from pmetal.modules.reward import RewardModule

    with pytest.raises(PmetalError, match="center_rewards_coefficient"):
        RewardModule(model=str(tiny_model_dir), center_rewards_coefficient=-0.1)
    with pytest.raises(PmetalError, match="full-precision base"):
        RewardModule(model=str(tiny_model_dir), quantization="nf4")


def test_cli_reward_train_then_grpo_scores_with_the_reward_model(tiny_model_dir, tmp_path, capsys):
    """`pmetal reward-train` saves final/ and logs val/accuracy; `pmetal grpo --reward-model final/`
    takes a step scored by it."""
    from pmetal.cli import main

    data = _write(tmp_path / "pairs.jsonl", _easy_pairs(8))
    run = tmp_path / "rm"
    common = ["--model", str(tiny_model_dir), "--no-gradient-checkpointing", "--accelerator", "cpu",
              "--no-progress-bar", "--logger", "csv", "--batch-size", "2", "--max-steps", "2"]
    code = main(["reward-train", "--dataset", str(data), "--val-fraction", "0.25", "--output-dir", str(run), *common[:-1],
                 "3"])  # one epoch of 3 batches: it ends with a validation
    assert code == 0, capsys.readouterr().err
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/accuracy", "val/accuracy", "val/margin"} <= set(header), header
    assert json.loads((run / "final" / "pmetal_config.json").read_text())["method"] == "RewardModule"
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": f"Rate item {i}."} for i in range(2)])
    grpo = tmp_path / "grpo"
    code = main(["grpo", "--dataset", str(prompts), "--reward-model", str(run / "final"), "--num-generations", "2",
                 "--max-completion-length", "4", "--output-dir", str(grpo), *common[:-4], "--batch-size", "2",
                 "--max-steps", "1"])
    assert code == 0, capsys.readouterr().err
    lines = (grpo / "metrics.csv").read_text().splitlines()
    assert "train/reward" in lines[0].split(",")


@pytest.mark.slow
def test_smollm2_reward_model_ranks_held_out_pairs_above_chance(smollm2_dir, tmp_path):
    """The embedded SmolLM2 learns a preference from 24 pairs in 6 steps: on 16 held-out pairs it ranks
    chosen above rejected more often than chance. The example set's pairs are swapped (the answer in
    lower case preferred): its fresh score head ranks every held-out pair the other way (accuracy 0),
    so the accuracy must move. Raw-text rows (no chat template, no system prompt): ~15 tokens each."""
    import lightning as L

    from pmetal.data.formats import example_path, load_rows
    from pmetal.data.preference import PreferenceDataModule
    from pmetal.modules.reward import RewardModule

    rows = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) for r in load_rows(example_path("dpo.jsonl"))]
    train, held_out = _write(tmp_path / "t.jsonl", rows[:24]), _write(tmp_path / "v.jsonl", rows[100:116])
    L.seed_everything(0)
    module = RewardModule(model=str(smollm2_dir), learning_rate=2e-3, lr_schedule="constant", lora_r=8,
                          gradient_checkpointing=False)
    datamodule = PreferenceDataModule(path=str(train), eval_path=str(held_out), batch_size=4, max_seq_len=48,
                                      chat_template=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/accuracy"]
    trainer.fit(module, datamodule=datamodule)
    after = trainer.callback_metrics["val/accuracy"].item()
    assert after > 0.5 and after > before, (before, after)
