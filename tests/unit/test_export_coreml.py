"""Core ML export: the Neural-Engine layout equals the HF model (fp32, prefill + ten cached decode
steps), the .mlpackage spec (inputs, outputs, states, target, precision), weight compression, an
embedding model with pooling inside, and the errors. Predictions need macOS: skipped elsewhere."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.tiny import tiny_llama

ON_MACOS = sys.platform == "darwin"
NEEDS_MACOS = pytest.mark.skipif(not ON_MACOS, reason="Core ML predictions run only on macOS (coremltools "
                                 "converts everywhere but has no runtime on Linux/Windows)")  # fmt: skip


def _qwen(version: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(seed)
    if version == 3:
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8)).eval()
    model = Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # non-zero q/k/v biases
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("build", [tiny_llama, lambda: _qwen(2), lambda: _qwen(3)], ids=["llama", "qwen2", "qwen3"])
def test_ane_layout_equals_hf_logits_for_prefill_and_ten_cached_decode_steps(build):
    from pmetal.export import AneDecoder

    model = build()
    ane = AneDecoder(model, max_context=64).eval()
    ids = torch.randint(0, 97, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits  # [1,17,V]
        prefill = ane(ids[:, :7], torch.arange(7)[None])
        assert prefill.shape == (1, 7, 97)
        assert (prefill - reference[:, :7]).abs().max() < 1e-4
        for t in range(7, 17):  # ten decode steps, each reading the cache the earlier ones wrote
            step = ane(ids[:, t : t + 1], torch.tensor([[t]]))
            assert (step - reference[:, t : t + 1]).abs().max() < 1e-4, t
        # a fresh cache replays the same; a prompt padded at its end leaves the real tokens' logits unchanged
        ane.reset_cache()
        padded = torch.cat([ids[:, :5], torch.zeros(1, 3, dtype=torch.long)], dim=1)
        assert (ane(padded, torch.arange(8)[None])[:, :5] - reference[:, :5]).abs().max() < 1e-4
        assert (ane(ids[:, 5:6], torch.tensor([[5]])) - reference[:, 5:6]).abs().max() < 1e-4


def test_ane_rmsnorm_does_not_overflow_in_float16():
    from pmetal.export.ane import AneRMSNorm

    x = torch.full((1, 64, 1, 3), 300.0)  # 300**2 * 64 overflows float16's 65504 when squared directly
    norm = AneRMSNorm(torch.ones(64), 1e-5).half()
    assert torch.isfinite(norm(x.half())).all()
    assert torch.allclose(norm(x.half()).float(), torch.ones_like(x), atol=1e-2)


@pytest.fixture(scope="module")
def decoder_package(tmp_path_factory, tiny_model_dir):
    from pmetal.cli import main

    out = tmp_path_factory.mktemp("coreml") / "Tiny.mlpackage"
    assert main(["export", str(tiny_model_dir), "--format", "coreml", "--out", str(out), "--seq-lens", "1", "16",
                 "--max-context", "64"]) == 0  # fmt: skip
    return out


def _ops(spec):
    main = spec.mlProgram.functions["main"]
    return [op for op in main.block_specializations[main.opset].operations]


def test_coreml_package_spec(decoder_package, tiny_model_dir):
    import coremltools as ct
    from coremltools.proto import MIL_pb2
    from coremltools.proto import FeatureTypes_pb2 as ft

    from pmetal.export.api import tokenizer_path

    model = ct.models.MLModel(str(decoder_package), skip_model_load=True)
    spec = model.get_spec()
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15: the first with state
    assert [i.name for i in spec.description.input] == ["input_ids", "position_ids"]
    assert [o.name for o in spec.description.output] == ["logits"]
    states = {s.name: s.type.stateType.arrayType for s in spec.description.state}
    assert set(states) == {"key_cache", "value_cache"}
    assert list(states["key_cache"].shape) == [2, 2 * 8, 1, 64]  # layers, kv heads x head dim, 1, context
    assert states["key_cache"].dataType == ft.ArrayFeatureType.FLOAT16
    ids = spec.description.input[0].type.multiArrayType
    assert ids.dataType == ft.ArrayFeatureType.INT32
    assert sorted(list(s.shape) for s in ids.enumeratedShapes.shapes) == [[1, 1], [1, 16]]
    ops = _ops(spec)
    types = {op.type for op in ops}
    assert {"conv", "read_state", "write_state", "softmax"} <= types
    assert "linear" not in types  # every projection is a 1x1 convolution
    conv_weights = [op for op in ops if op.type == "const" and op.outputs[0].type.tensorType.rank == 4]
    assert conv_weights and all(op.outputs[0].type.tensorType.dataType == MIL_pb2.FLOAT16 for op in conv_weights)
    assert model.user_defined_metadata["pmetal.max_context"] == "64"
    assert "<|im_start|>" in model.user_defined_metadata["pmetal.chat_template"]
    assert (tokenizer_path(decoder_package) / "tokenizer.json").is_file()


def test_coreml_weight_compression():
    """int8/int4 linear quantization and 4-bit palettization through coremltools.optimize (weights
    above its 2048-element threshold, hence hidden 64)."""
    from pmetal.export.coreml import _compress, check_coreml_available, convert_decoder

    ct = check_coreml_available()
    mlmodel = convert_decoder(tiny_llama(vocab_size=300, hidden_size=64, intermediate_size=128), seq_lens=(1,),
                              max_context=16)  # fmt: skip
    for quantize, op_type in (("int8", "constexpr_blockwise_shift_scale"), ("int4", "constexpr_blockwise_shift_scale"),
                              ("palettize4", "constexpr_lut_to_dense")):  # fmt: skip
        compressed = [op for op in _ops(_compress(ct, mlmodel, quantize).get_spec()) if op.type == op_type]
        assert len(compressed) >= 10, quantize  # embedding, 7 projections x 2 layers, LM head (some share)


def test_coreml_embedding_model_has_pooling_and_normalization_inside(tiny_bert_dir, tmp_path):
    import coremltools as ct
    from sentence_transformers import SentenceTransformer

    from pmetal.embedding import load_sentence_transformer, save_sentence_transformer
    from pmetal.export import AneEmbedder, export_model
    from pmetal.export.source import load_fused

    st_dir = save_sentence_transformer(load_sentence_transformer(str(tiny_bert_dir), pooling="mean"), tmp_path / "st")
    fused = load_fused(st_dir)
    assert fused.embedding == {"pooling": "mean", "normalize": True}
    st = SentenceTransformer(str(st_dir), device="cpu")
    batch = fused.tokenizer(["a short sentence"], return_tensors="pt", padding="max_length", max_length=16)
    with torch.no_grad():
        ours = AneEmbedder(fused.model, "mean", True)(batch["input_ids"], batch["attention_mask"])
    expected = torch.as_tensor(st.encode(["a short sentence"]))
    assert torch.allclose(ours, expected, atol=1e-5)
    out = tmp_path / "Embed.mlpackage"
    export_model(fused, "coreml", out, seq_lens=(16, 64))
    spec = ct.models.MLModel(str(out), skip_model_load=True).get_spec()
    assert [i.name for i in spec.description.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in spec.description.output] == ["embedding"]


def test_coreml_decoder_embedding_model_last_token_pooling(tiny_model_dir, tmp_path):
    """A decoder trained as an embedding model (lasttoken pooling) in the channels-first layout
    equals sentence-transformers on right-padded text, and converts."""
    import coremltools as ct
    from sentence_transformers import SentenceTransformer

    from pmetal.embedding import load_sentence_transformer, save_sentence_transformer
    from pmetal.export import AneDecoderEmbedder, export_model
    from pmetal.export.source import load_fused

    st_dir = save_sentence_transformer(load_sentence_transformer(str(tiny_model_dir)), tmp_path / "st")
    fused = load_fused(st_dir)
    assert fused.embedding == {"pooling": "lasttoken", "normalize": True}
    texts = ["a short sentence", "a somewhat longer sentence with more words in it"]
    st = SentenceTransformer(str(st_dir), device="cpu")
    expected = torch.as_tensor(st.encode(texts))
    module = AneDecoderEmbedder(fused.model, "lasttoken", True, max_length=64).eval()
    for text, row in zip(texts, expected):
        ids = st.preprocess([text])["input_ids"]  # what sentence-transformers feeds (its template included)
        pad = torch.full((1, 48 - ids.shape[1]), fused.tokenizer.pad_token_id)
        mask = torch.cat([torch.ones_like(ids), torch.zeros_like(pad)], dim=1)
        with torch.no_grad():  # right-padded to a fixed length, as the Core ML model is fed
            assert torch.allclose(module(torch.cat([ids, pad], dim=1), mask)[0], row, atol=1e-5)
    export_model(fused, "coreml", tmp_path / "E.mlpackage", seq_lens=(48,))
    spec = ct.models.MLModel(str(tmp_path / "E.mlpackage"), skip_model_load=True).get_spec()
    assert [o.name for o in spec.description.output] == ["embedding"]


def test_coreml_errors(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from pmetal.cli import main
    from pmetal.export import ExportError, check_coreml_available

    monkeypatch.setitem(sys.modules, "coremltools", None)  # as if it were not installed
    with pytest.raises(ExportError, match=r"needs coremltools >= 8.0 \(pip install 'coremltools>=8'\)"):
        check_coreml_available()
    monkeypatch.undo()
    out = tmp_path / "bad.mlmodel"
    assert main(["export", str(tiny_model_dir), "--format", "coreml", "--out", str(out)]) == 2
    assert "must end in .mlpackage" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(tiny_model_dir), "--format", "coreml", "--out", str(tmp_path / "a.mlpackage"),
                 "--seq-lens", "1", "600"]) == 2  # fmt: skip
    assert "at most the context (512)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@NEEDS_MACOS
def test_coreml_prediction_matches_hf_through_the_state(decoder_package, tiny_model_dir):
    import coremltools as ct
    import numpy as np
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 20, 300, 4000, 5, 6, 7, 8]])
    with torch.no_grad():
        reference = hf(ids).logits[0].numpy()
    model = ct.models.MLModel(str(decoder_package), compute_units=ct.ComputeUnit.CPU_ONLY)
    state = model.make_state()
    logits = []
    for t in range(ids.shape[1]):  # one token at a time through the stateful cache
        out = model.predict({"input_ids": ids[:, t : t + 1].numpy().astype(np.int32),
                             "position_ids": np.array([[t]], dtype=np.int32)}, state)  # fmt: skip
        logits.append(out["logits"][0, 0])
    assert np.abs(np.stack(logits) - reference).max() < 5e-2 * np.abs(reference).max()
