"""`pmetal eval` on tiny models: each data format, checked against hand values and plain HF forwards."""

from __future__ import annotations

import json
import math
from itertools import combinations

import pytest
import torch
import torch.nn.functional as F

from pmetal.data.formats import example_path, load_rows
from tests.tiny import save_random_lora

# ----------------------------------------------------------------------------------- pure functions


def test_pass_at_k_hand_values_and_the_binomial_definition():
    from pmetal.evaluation.sampling import pass_at_k

    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(3, 2, 2) == 1.0  # fewer than k wrong samples: every draw of k holds a correct one
    for n in range(1, 8):  # the product form equals 1 - C(n-c,k)/C(n,k) (and the count over all k-subsets)
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(combinations([1] * c + [0] * (n - c), k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    for bad in ((4, 5, 1), (4, 1, 0), (4, 1, 5)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_answer_metrics_average_pass_at_k_over_prompts():
    from pmetal.evaluation.sampling import answer_metrics, pass_ks

    assert pass_ks(1) == [1] and pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6]
    # prompt 1: 1 of 4 correct, prompt 2: 4 of 4
    values = answer_metrics([1, 0, 0, 0, 1, 1, 1, 1], 4)
    assert values == pytest.approx({"accuracy": 5 / 8, "pass@2": (0.5 + 1) / 2, "pass@4": 1.0})


@pytest.mark.parametrize("name, task", [("sft.jsonl", "sft"), ("dpo.jsonl", "preference"), ("grpo.jsonl", "prompt"),
                                        ("embed.jsonl", "embedding"), ("kto.jsonl", "sft")])
def test_the_task_is_read_from_the_columns(name, task):
    from pmetal.evaluation.model import detect_task

    assert detect_task(load_rows(example_path(name))) == task


def test_reasoning_rows_are_sft_and_problem_solution_rows_are_prompts():
    from pmetal.evaluation.model import detect_task

    assert detect_task([{"problem": "1+1?", "thinking": "add", "solution": "2"}]) == "sft"
    assert detect_task([{"problem": "1+1?", "solution": "\\boxed{2}"}]) == "prompt"
    assert detect_task([{"question": "1+1?", "answer": "#### 2"}]) == "prompt"
    assert detect_task([{"prompt": "Say hi."}]) == "prompt"
    assert detect_task([{"prompt": "Say hi.", "completion": "hi"}]) == "sft"


# ----------------------------------------------------------------------------------- on a tiny model


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return save_random_lora(tiny_model_dir, tmp_path_factory.mktemp("eval") / "adapter", seed=5, scale=0.5)


def _plain_loss(model, rendered_rows) -> tuple[float, int]:
    """Token-mean cross-entropy over the label tokens, one unpadded row at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rendered_rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].double()
            target = torch.tensor(row["labels"][1:])
            keep = target != -100
            total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count, count


def test_sft_perplexity_is_exp_of_the_plain_forward_loss_for_base_and_adapter(tiny_model_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmetal.data.formats import to_sft_examples
    from pmetal.data.render import render_sft_dataset
    from pmetal.evaluation.api import evaluate

    data = example_path("sft.jsonl")
    (report,) = evaluate(str(adapter), str(data), limit=5, batch_size=3, accelerator="cpu")  # 3 + 2: padding
    assert report.task == "sft" and report.columns == ["base", "adapter"]
    rows = load_rows(data)[:5]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rendered = render_sft_dataset(tokenizer, rows, to_sft_examples(rows)[1]).rows
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    expected_base, count = _plain_loss(base, rendered)
    expected_adapter, _ = _plain_loss(PeftModel.from_pretrained(base, str(adapter)).eval(), rendered)
    assert abs(expected_adapter - expected_base) > 0.05  # the adapter changes the loss
    for column, expected in (("base", expected_base), ("adapter", expected_adapter)):
        assert report.metrics["loss"][column] == pytest.approx(expected, rel=1e-5)
        assert report.metrics["perplexity"][column] == pytest.approx(math.exp(expected), rel=1e-5)
        assert report.metrics["tokens"][column] == count


PAIRS = 8  # the first pairs of examples/data/dpo.jsonl (chosen: the answer in capitals)


def _train_on_chosen(tiny_model_dir, out, steps=8):
    """A LoRA adapter trained (plain AdamW loop) to raise the log-prob of the chosen answers only."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmetal.data.preference import to_preference_pairs, tokenize_pairs
    from pmetal.evaluation.likelihood import _pad
    from pmetal.logps import completion_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    items = tokenize_pairs(tokenizer, to_preference_pairs(load_rows(example_path("dpo.jsonl"))[:PAIRS])[0], 256)
    ids = _pad([i["chosen_input_ids"] for i in items], tokenizer.pad_token_id)
    mask = _pad([[1] * len(i["chosen_input_ids"]) for i in items], 0)
    labels = _pad([i["chosen_labels"] for i in items], -100)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        loss = -completion_logps(model, ids, mask, labels).mean.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tiny_model_dir)}))
    return out


def test_an_adapter_trained_on_the_chosen_answers_wins_more_pairs(tiny_model_dir, tmp_path):
    from pmetal.evaluation.api import evaluate

    adapter = _train_on_chosen(tiny_model_dir, tmp_path / "chosen")
    (report,) = evaluate(str(adapter), str(example_path("dpo.jsonl")), limit=PAIRS, beta=0.1, accelerator="cpu")
    m = report.metrics
    assert m["logp_accuracy"]["adapter"] > m["logp_accuracy"]["base"]
    assert m["reward_accuracy"]["adapter"] >= 0.75 and m["reward_margin"]["adapter"] > 0
    assert "base" not in m["reward_accuracy"]  # the base is the reference: no reward of its own
    # the implicit reward is beta * (log p_adapter - log p_base), so its means follow the log-prob means
    for side in ("chosen", "rejected"):
        assert m[f"reward_{side}"]["adapter"] == pytest.approx(
            0.1 * (m[f"logp_{side}"]["adapter"] - m[f"logp_{side}"]["base"]), rel=1e-6)
    assert m["reward_margin"]["adapter"] == pytest.approx(m["reward_chosen"]["adapter"] - m["reward_rejected"]["adapter"])


def test_prompt_eval_scores_greedy_samples_with_the_reward_functions(tiny_model_dir, tmp_path, monkeypatch):
    from pmetal.evaluation.api import evaluate

    (tmp_path / "my_rewards.py").write_text(
        "def tokens(prompts, completions, completion_lengths, **kwargs):\n"
        "    return [float(n) for n in completion_lengths]\n")  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    (report,) = evaluate(str(tiny_model_dir), str(example_path("grpo.jsonl")), limit=3, num_samples=4,
                         temperature=0.0, max_new_tokens=6, reward_fns=["my_rewards:tokens", "accuracy"],
                         accelerator="cpu")  # fmt: skip
    m = {name: values["model"] for name, values in report.metrics.items()}
    assert 1 <= m["completion_tokens"] <= 6
    assert m["reward_tokens"] == pytest.approx(m["completion_tokens"])  # the rewards see the generated lengths
    assert m["reward"] == pytest.approx(m["reward_tokens"] + m["reward_accuracy"])
    assert m["reward_accuracy"] == m["accuracy"]
    assert m["pass@2"] == m["pass@4"] == m["accuracy"]  # greedy: the 4 samples of a prompt are equal


# ----------------------------------------------------------------------------------- the command


def test_cli_prints_base_and_adapter_and_writes_json_beside_the_adapter(adapter, capsys):
    from pmetal.cli import main

    assert main(["eval", "--model", str(adapter), "--dataset", str(example_path("sft.jsonl")), "--limit", "2",
                 "--accelerator", "cpu"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "base", "adapter"]
    saved = json.loads((adapter / "eval_results.json").read_text())["evaluations"][0]
    assert saved["task"] == "sft" and set(saved["metrics"]["perplexity"]) == {"base", "adapter"}
    assert f"results: {adapter / 'eval_results.json'}" in out


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ('{"foo": 1}\n', "line 1: cannot tell what to evaluate from the columns: foo"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": 3}\n',
     "line 2, field 'messages'"),
    ('{"prompt": "p", "chosen": "a", "rejected": ""}\n', "line 1, field 'rejected'"),
])
def test_bad_data_gets_a_located_error(tiny_model_dir, tmp_path, capsys, content, message):
    from pmetal.cli import main

    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(data), "--accelerator", "cpu"]) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("pmetal: error: "))
    assert str(data) in line and message in line, err


def test_nothing_to_evaluate_is_an_error(capsys):
    from pmetal.cli import main

    assert main(["eval", "--model", "default"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_the_evaluations_are_mps_ready(adapter, tiny_model_dir):
    """SFT, preference and prompt evaluation of base and adapter under the MPS dispatch guard (no
    float64, no op without an MPS kernel); loading happens outside it, as on a Mac it is the CPU's."""
    from pmetal.evaluation.api import _run_task
    from pmetal.evaluation.model import load_eval_model
    from pmetal.mps_guard import MpsReadinessMode
    from pmetal.rewards import RewardSet

    handle = load_eval_model(str(adapter))
    data = {task: load_rows(example_path(name))[:2] for task, name in
            (("sft", "sft.jsonl"), ("preference", "dpo.jsonl"), ("prompt", "grpo.jsonl"))}  # fmt: skip
    rewards = RewardSet.from_specs(["accuracy", "length"])
    with MpsReadinessMode():
        for task, rows in data.items():
            report = _run_task(task, handle, rows, task, max_seq_len=128, batch_size=2, beta=0.1, rewards=rewards,
                               num_samples=2, max_new_tokens=4, temperature=None, top_p=1.0, max_prompt_length=64,
                               seed=0)  # fmt: skip
            assert all(set(values) <= {"base", "adapter"} for values in report.metrics.values())
