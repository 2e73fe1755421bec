"""`pmetal merge --adapters`: several LoRA adapters combined by PEFT's add_weighted_adapter.

Which self-merges are exact (see pmetal/export/merge.py): `cat` and `svd` sum the weighted updates,
so weights 0.5 + 0.5 give the adapter back (`svd` up to its rounding); `ties`/`dare_ties` at density 1
average the agreeing entries of the weighted factors, so weights 1, 1 give it back; `linear` combines
the A and B factors separately, so only one copy at weight 1 is exact, and two copies at weight 1
give 4x the update (checked below). `dare_linear` is `linear` with a random drop: not exact either.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.tiny import save_random_lora

IDS = torch.tensor([[1, 20, 300, 4000, 5, 6, 7000, 8]])


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": save_random_lora(tiny_model_dir, root / "a", seed=1), "b": save_random_lora(tiny_model_dir, root / "b", seed=2),
            "r8": save_random_lora(tiny_model_dir, root / "r8", seed=3, r=8),
            "other_base": save_random_lora(tiny_model_dir, root / "other", seed=4, base_name="some/other-model")}


def _adapter_logits(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, str(adapter_dir)).eval()(input_ids=IDS).logits


@pytest.mark.parametrize("method, weights, density", [
    ("cat", [0.5, 0.5], None), ("ties", [1, 1], 1.0), ("dare_ties", [1, 1], 1.0), ("linear", [1], None)])
def test_an_adapter_merged_with_itself_equals_it(adapters, tiny_model_dir, tmp_path, method, weights, density):
    from pmetal.cli import main

    out = tmp_path / "merged"
    copies = [str(adapters["a"])] * len(weights)
    argv = ["merge", "--adapters", *copies, "--method", method, "--weights", *map(str, weights), "--out", str(out)]
    assert main(argv + (["--density", str(density)] if density else [])) == 0
    expected = _adapter_logits(tiny_model_dir, adapters["a"])
    base = _adapter_logits(tiny_model_dir, adapters["b"])
    assert (expected - base).abs().max() > 0.1  # the adapters change the logits
    assert torch.allclose(_adapter_logits(tiny_model_dir, out), expected, atol=1e-5)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == method and report["weights"] == weights


def test_svd_self_merge_is_exact_up_to_rounding_and_linear_of_two_copies_is_four_times(adapters, tiny_model_dir):
    from pmetal.export.merge import combine_adapters

    two = [adapters["a"]] * 2
    svd, *_ = combine_adapters(two, method="svd", weights=[0.5, 0.5])
    lin, *_ = combine_adapters(two, method="linear", weights=[1, 1])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapters["a"]))
    layer = lambda m: m.base_model.model.model.layers[0].self_attn.q_proj  # noqa: E731
    delta = layer(original).get_delta_weight("default")
    assert torch.allclose(layer(svd).get_delta_weight("default"), delta, atol=1e-5)
    assert torch.allclose(layer(lin).get_delta_weight("default"), 4 * delta, atol=1e-5)


def test_ties_matches_peft_called_directly(adapters, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pmetal.export.merge import merge_adapters

    out = tmp_path / "ties"
    merge_adapters([adapters["a"], adapters["b"]], out, method="ties", weights=[0.7, 0.3], density=0.5)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapters["a"]),
                                      adapter_name="x")  # fmt: skip
    model.load_adapter(str(adapters["b"]), adapter_name="y")
    model.add_weighted_adapter(["x", "y"], [0.7, 0.3], "m", combination_type="ties", density=0.5)
    direct = {k.replace(".m.", "."): v for k, v in model.state_dict().items() if ".m." in k}
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == len(direct) > 0
    assert sorted(saved) == sorted(direct)
    assert all(torch.equal(saved[key], direct[key]) for key in saved)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


CHECK_IN_A_FRESH_PROCESS = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, fused = sys.argv[1:4]
ids = torch.tensor([[1, 20, 300, 4000, 5, 6, 7000, 8]])
with torch.no_grad():
    a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(input_ids=ids).logits
    f = AutoModelForCausalLM.from_pretrained(fused).eval()(input_ids=ids).logits
torch.save({"adapter": a, "fused": f}, sys.argv[4])
"""


def test_merged_adapter_loads_in_peft_and_fused_model_in_transformers(adapters, tiny_model_dir, tmp_path):
    from pmetal.cli import main
    from pmetal.export.merge import combine_adapters

    common = ["--adapters", str(adapters["a"]), str(adapters["r8"]), "--method", "cat", "--weights", "0.6", "0.4"]
    assert main(["merge", *common, "--out", str(tmp_path / "adapter")]) == 0
    assert main(["merge", *common, "--fuse", "--out", str(tmp_path / "fused")]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 12  # cat: 4 + 8
    report = json.loads((tmp_path / "fused" / "merge_report.json").read_text())
    assert report["fused"] and report["logits_max_abs_diff"] < 1e-4
    combined, *_ = combine_adapters([adapters["a"], adapters["r8"]], method="cat", weights=[0.6, 0.4])
    with torch.no_grad():
        expected = combined(input_ids=IDS).logits
    result = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", CHECK_IN_A_FRESH_PROCESS, str(tiny_model_dir), str(tmp_path / "adapter"),
                    str(tmp_path / "fused"), str(result)], check=True, capture_output=True)  # fmt: skip
    logits = torch.load(result, weights_only=True)
    assert torch.allclose(logits["adapter"], expected, atol=1e-5)
    assert torch.allclose(logits["fused"], expected, atol=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--adapters", "{a}", "{other_base}"], "other/adapter_config.json: field 'base_model_name_or_path' is 'some/other-model'"),
    (["--adapters", "{a}", "{r8}", "--method", "linear"], "r8/adapter_config.json: field 'r' is 8"),
    (["--adapters", "{a}", "{b}", "--weights", "1"], "--weights: 1 value(s) for 2 adapter(s)"),
    (["--adapters", "{a}", "{b}", "--method", "ties", "--density", "0"], "--density 0.0: expected a fraction in (0, 1]"),
    (["--adapters", "{a}", "{b}", "--method", "dare_ties", "--density", "1.5"], "--density 1.5"),
    (["--adapters", "{a}", "{b}", "--density", "0.5"], "--density applies to ties"),
    (["--adapters", "{a}", "{tmp}"], "no adapter_config.json; expected a PEFT adapter directory"),
    (["--adapter", "{a}", "--weights", "0.5"], "--weights applies to --adapters"),
])
def test_bad_merges_get_one_line_errors(adapters, tmp_path, capsys, extra, message):
    from pmetal.cli import main

    names = {k: str(v) for k, v in adapters.items()} | {"tmp": str(tmp_path)}
    assert main(["merge", *[e.format(**names) for e in extra], "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
