"""Exports load in the program users load them with, from a fresh process in another working
directory: `pmetal export --format hf` in transformers, an adapter (a run's `final/`) in PEFT, a
sentence-embedding model and its hf export in SentenceTransformer; each compared with the
in-process model that wrote it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

CLIENT = r"""
import json, sys, torch
from pathlib import Path
spec = json.loads(sys.argv[1])
ids = torch.tensor(spec["ids"])
out = {}
from transformers import AutoModelForCausalLM
with torch.no_grad():
    out["hf"] = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32).eval()(ids).logits
    from peft import AutoPeftModelForCausalLM
    out["adapter"] = AutoPeftModelForCausalLM.from_pretrained(spec["adapter"]).eval()(ids).logits
from sentence_transformers import SentenceTransformer
for key in ("st", "st_hf"):
    out[key] = SentenceTransformer(spec[key], device="cpu").encode(spec["texts"], convert_to_tensor=True)
torch.save(out, spec["result"])
"""


def test_exports_load_in_their_clients_from_a_fresh_process_elsewhere(tiny_model_dir, tiny_bert_dir, tmp_path):
    from pmetal.cli import main
    from pmetal.modules import SftModule
    from pmetal.modules.embed import EmbedModule
    from tests.tiny import randomize_lora_b

    module = SftModule(model=str(tiny_model_dir))
    randomize_lora_b(module)  # a non-trivial adapter without a training run
    adapter = module.save_pretrained(tmp_path / "run" / "final")
    assert main(["export", str(adapter), "--format", "hf", "--out", str(tmp_path / "fused")]) == 0
    embedder = EmbedModule(str(tiny_bert_dir))
    with torch.no_grad():  # weights unlike the base model's, so a load of the wrong weights shows
        next(embedder.encoder.parameters()).add_(0.05 * torch.randn_like(next(embedder.encoder.parameters())))
    st_dir = embedder.save_pretrained(tmp_path / "embed")
    assert main(["export", str(st_dir), "--format", "hf", "--out", str(tmp_path / "embed-hf")]) == 0

    ids = [[1, 20, 300, 4000, 5, 6]]
    texts = ["code 3 d", "an unrelated sentence, longer than the first one"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spec = {"ids": ids, "texts": texts, "hf": str(tmp_path / "fused"), "adapter": str(adapter), "st": str(st_dir),
            "st_hf": str(tmp_path / "embed-hf"), "result": str(tmp_path / "client.pt")}  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(spec)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(tmp_path / "client.pt", weights_only=True)

    module.policy.eval()
    embedder.eval()
    with torch.no_grad():
        logits = module.policy(input_ids=torch.tensor(ids)).logits
        embeddings = embedder.embed(texts)
    assert torch.allclose(theirs["adapter"], logits, atol=1e-5)
    assert torch.allclose(theirs["hf"], logits, atol=1e-4)
    assert torch.allclose(theirs["st"], embeddings, atol=1e-5)
    assert torch.allclose(theirs["st_hf"], embeddings, atol=1e-5)
