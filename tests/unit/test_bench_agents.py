"""benchmarks/bench_agents.py on the CPU: the scripted model follows its script, and both contenders
(pmetal's AgentGrpoModule, TRL's GRPOTrainer with tools) run real tool calls, the same number per
episode, through their public entry points. Run in this process (the script's own subprocess
wrapper is bench_grpo's): a change to either trainer's episode API fails here."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports _common and bench_grpo as siblings
    spec = importlib.util.spec_from_file_location("bench_agents_probe", BENCHMARKS / "bench_agents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    pytest.importorskip("trl")
    bench = _script()
    args = bench.parse_args(["--device", "cpu", "--model", "tiny", "--prompts", "2", "--num-generations", "2",
                             "--max-tool-turns", "2", "--think-tokens", "3", "--steps", "1", "--warmup", "0"])
    work = tmp_path_factory.mktemp("bench_agents")
    bench.prepare(args, work)  # raises if the model does not write its script
    return bench, args, work


def test_the_scripted_model_writes_its_tool_call_and_nothing_else(prepared):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bench, args, work = prepared
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    torch.manual_seed(0)  # sampled at temperature 1, as both trainers sample
    out = model.generate(**prompt, do_sample=True, temperature=1.0, top_k=0,
                         max_new_tokens=20, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    assert text == ' think000 think001 think002<tool_call>\n{"name": "lookup", "arguments": {"name": "zorblat"}}\n' \
                   "</tool_call><|im_end|>"


@pytest.mark.parametrize("contender", ["pmetal", "trl"])
def test_each_trainer_runs_every_tool_call(prepared, contender):
    bench, args, work = prepared
    runner = bench.run_pmetal if contender == "pmetal" else bench.run_trl
    result = runner(args, work / "model", work / "prompts.jsonl")
    assert result["steps"] == 1 and result["episodes_s"] > 0 and result["step_s"] > 0
    # 2 tool turns, then the turn after the last result: 3 turns of 3 + 4 tokens, every call answered
    assert result["calls_per_episode"] == 2.0 and result["failed_calls"] == 0
    assert result["turns_per_episode"] == 3.0 and result["model_tokens_per_episode"] == 21.0
    table = bench.results_table([result, dict(result, name="other")])
    assert "pmetal / TRL: rollout episodes/s 1.00x" in table and "WARNING" not in table
