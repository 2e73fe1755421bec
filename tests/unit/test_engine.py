"""The rollout engine changes nothing but speed: equal greedy tokens, equal log-probs, equal sampled
distributions, the live weights after an optimizer step; speculation is exact; bad options are refused."""

from __future__ import annotations

import math

import pytest
import torch

from pmetal.generation import SamplingConfig, generate_reference
from pmetal.generation.engine import RolloutEngine

PAD, EOS = 0, 1
PROMPTS = [[5, 9, 23, 7, 5, 9, 23], [11, 3], [40, 41, 42, 43, 44, 45, 46]]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _tiny(vocab=96, layers=2, seed=0, sharpen=8.0, device="cpu", dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=PAD, eos_token_id=EOS, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)  # greedy choices are not near-ties
    return model.to(device=device, dtype=dtype)


@pytest.fixture(scope="module")
def tiny_lm():
    return _tiny()


@pytest.fixture(scope="module")
def draft_lm():
    return _tiny(layers=1, seed=1)


def _training_logps(model, prompt, completion, temperature):
    ids = torch.tensor([list(prompt) + list(completion)], device=next(model.parameters()).device)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return torch.stack([logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(completion)])


def _options(draft):
    return [dict(), dict(sync_every=1), dict(speculative=True), dict(speculative=True, num_draft_tokens=1),
            dict(speculative=True, draft_model=draft, num_draft_tokens=3)]


def test_greedy_tokens_equal_the_reference_loop(tiny_lm, draft_lm):
    config = SamplingConfig(max_new_tokens=40, temperature=0.0)
    free = generate_reference(tiny_lm, PROMPTS, config, stop_ids=[], pad_token_id=PAD, num_return_sequences=2)
    stop = int(free.completion_ids[0, 5])  # rows stop at different steps: compaction moves the rest
    ref = generate_reference(tiny_lm, PROMPTS, config, stop_ids=[stop], pad_token_id=PAD, num_return_sequences=2)
    assert len(set(ref.lengths.tolist())) > 1
    for options in _options(draft_lm):
        gen = RolloutEngine(tiny_lm, **options).generate(PROMPTS, config, stop_ids=[stop], pad_token_id=PAD,
                                                         num_return_sequences=2)
        assert gen.completion_ids.tolist() == ref.completion_ids.tolist(), options
        assert gen.stopped.tolist() == ref.stopped.tolist() and gen.lengths.tolist() == ref.lengths.tolist()
        torch.testing.assert_close(gen.logps, ref.logps, atol=1e-5, rtol=1e-5)


def test_self_draft_accepts_everything(tiny_lm):
    engine = RolloutEngine(tiny_lm, speculative=True, draft_model=tiny_lm, num_draft_tokens=4)
    engine.generate(PROMPTS, SamplingConfig(max_new_tokens=30, temperature=0.0), stop_ids=[], pad_token_id=PAD)
    assert engine.last_stats["speculative/acceptance_rate"] == pytest.approx(1.0)
    assert engine.last_stats["speculative/tokens_per_forward"] > 4.0


def test_sampled_log_probs_equal_a_training_forward(tiny_lm, draft_lm):
    config = SamplingConfig(max_new_tokens=16, temperature=0.7, top_k=20, top_p=0.9)
    for options in _options(draft_lm):
        gen = RolloutEngine(tiny_lm, **options).generate(PROMPTS, config, stop_ids=[EOS], pad_token_id=PAD,
                                                         num_return_sequences=2,
                                                         generator=torch.Generator().manual_seed(0))
        for row in range(gen.completion_ids.shape[0]):
            n = int(gen.lengths[row])
            expected = _training_logps(tiny_lm, PROMPTS[row // 2], gen.completion_ids[row, :n].tolist(), 0.7)
            torch.testing.assert_close(gen.logps[row, :n], expected, atol=1e-5, rtol=1e-5)  # ratio 1 in fp32


def _chi2_two_sample(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom of two count vectors from one distribution."""
    keep = (a + b) > 0
    a, b = a[keep].double(), b[keep].double()
    na, nb = a.sum(), b.sum()
    stat = ((a * math.sqrt(nb / na) - b * math.sqrt(na / nb)) ** 2 / (a + b)).sum()
    return float(stat), int(keep.sum()) - 1


def test_sampled_token_frequencies_match_the_reference_sampler():
    """Joint frequencies of 2-token completions: engine (plain, speculative, fused projections) vs the
    reference loop. (The Triton kernel's rounds draw the very same tokens from the same uniforms as
    these: tests/unit/test_decode_attention.py.)"""
    from scipy.stats import chi2

    vocab = 8
    model, draft = _tiny(vocab=vocab, sharpen=2.0), _tiny(vocab=vocab, layers=1, seed=3, sharpen=2.0)
    config = SamplingConfig(max_new_tokens=2, temperature=1.0, top_k=6)
    n = 6000

    def joint(gen):
        return torch.bincount(gen.completion_ids[:, 0] * vocab + gen.completion_ids[:, 1], minlength=vocab * vocab)

    ref = joint(generate_reference(model, [[3, 4, 5]], config, stop_ids=[], pad_token_id=PAD, num_return_sequences=n,
                                   generator=torch.Generator().manual_seed(0)))
    variants = [dict(), dict(speculative=True, num_draft_tokens=1),
                dict(speculative=True, draft_model=draft, num_draft_tokens=2), dict(fuse_projections=True)]
    for seed, options in enumerate(variants):
        counts = joint(RolloutEngine(model, **options).generate(
            [[3, 4, 5]], config, stop_ids=[], pad_token_id=PAD, num_return_sequences=n,
            generator=torch.Generator().manual_seed(seed + 1)))
        stat, dof = _chi2_two_sample(counts, ref)
        assert stat < chi2.ppf(0.999, dof), (options, stat, dof)


def _trainable(kind, device, request):
    from pmetal.errors import PmetalError
    from pmetal.models import apply_adapter, load_model_and_tokenizer

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if kind == "qlora":  # pmetal's NF4 base under a LoRA adapter
        try:
            tiny_model_dir = request.getfixturevalue("tiny_model_dir")  # it borrows the embedded tokenizer
        except PmetalError as exc:
            pytest.skip(str(exc))
        base, _ = load_model_and_tokenizer(str(tiny_model_dir), dtype=dtype, quantization="nf4", quant_backend="pmetal")
        return apply_adapter(base.to(device), "lora", r=4, alpha=8).eval()
    base = _tiny(device=device, dtype=dtype)
    if kind == "full":
        return apply_adapter(base, "full").eval()
    return apply_adapter(base, kind, r=4, alpha=8).eval()


@pytest.mark.parametrize("kind", ["lora", "dora", "full", "qlora"])
@pytest.mark.parametrize("device", DEVICES)
def test_engine_samples_the_weights_after_an_optimizer_step(device, kind, request):
    model = _trainable(kind, device, request)
    engine = RolloutEngine(model)
    config = SamplingConfig(max_new_tokens=12, temperature=0.0)
    before = engine.generate(PROMPTS, config, stop_ids=[], pad_token_id=PAD)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5 if kind != "full" else 0.05)
    ids = torch.tensor([PROMPTS[2]], device=device)
    for _ in range(2):  # a LoRA B starts at zero: the second step moves the output
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = engine.generate(PROMPTS, config, stop_ids=[], pad_token_id=PAD)  # the same buffers (and graphs)
    assert not torch.equal(after.logps, before.logps)  # the step changed the policy the engine samples
    tol = dict(atol=2e-2, rtol=2e-2) if device == "cuda" else dict(atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        for row, prompt in enumerate(PROMPTS):
            completion = after.completion_ids[row].tolist()
            torch.testing.assert_close(after.logps[row], _training_logps(model, prompt, completion, 1.0), **tol)


def test_compiled_decode_changes_nothing_and_follows_the_live_weights(request):
    """torch.compile of the decode forward: the same greedy tokens and log-probs as the uncompiled
    rounds and the training forward, before and after an optimizer step on the adapter."""
    model = _trainable("lora", "cpu", request)
    config = SamplingConfig(max_new_tokens=12, temperature=0.0)
    compiled = RolloutEngine(model, compile_decode=True)
    for step in range(2):
        a = compiled.generate(PROMPTS, config, stop_ids=[], pad_token_id=PAD, num_return_sequences=2)
        b = RolloutEngine(model, compile_decode=False).generate(PROMPTS, config, stop_ids=[], pad_token_id=PAD,
                                                                num_return_sequences=2)
        assert compiled.compile_error is None
        assert a.completion_ids.tolist() == b.completion_ids.tolist()
        torch.testing.assert_close(a.logps, b.logps, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            for row, prompt in enumerate(PROMPTS):
                completion = a.completion_ids[2 * row].tolist()
                torch.testing.assert_close(a.logps[2 * row], _training_logps(model, prompt, completion, 1.0),
                                           atol=1e-4, rtol=1e-4)
        if step == 0:
            before = a.logps.clone()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.5)
            ids = torch.tensor([PROMPTS[2]])
            for _ in range(2):
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    assert not torch.equal(a.logps, before)  # the compiled rounds read the updated adapter


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_rounds_equal_eager_rounds():
    model = _tiny(device="cuda", dtype=torch.bfloat16)
    config = SamplingConfig(max_new_tokens=24, temperature=0.0)
    for options in (dict(), dict(speculative=True, num_draft_tokens=3)):
        graphed = RolloutEngine(model, cuda_graphs=True, compile_decode=True, **options)
        eager = RolloutEngine(model, cuda_graphs=False, compile_decode=False, **options)
        for _ in range(2):  # the second call replays the captured graphs
            a = graphed.generate(PROMPTS, config, stop_ids=[EOS], pad_token_id=PAD, num_return_sequences=3)
            b = eager.generate(PROMPTS, config, stop_ids=[EOS], pad_token_id=PAD, num_return_sequences=3)
            assert a.completion_ids.tolist() == b.completion_ids.tolist()
            torch.testing.assert_close(a.logps, b.logps)
        assert all(ws.graph not in (None, False) for ws in graphed._family[1].values())
        assert graphed.compile_error is None and graphed.capture_error is None


def test_bad_speculation_options_are_refused(tiny_lm):
    from pmetal.generation.speculative import check_draft_tokenizer

    with pytest.raises(ValueError, match="num_draft_tokens must be at least 1"):
        RolloutEngine(tiny_lm, speculative=True, num_draft_tokens=0)
    with pytest.raises(ValueError, match="only used with speculative"):
        RolloutEngine(tiny_lm, draft_model=tiny_lm)

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    with pytest.raises(ValueError, match="another tokenizer"):
        check_draft_tokenizer(Tok({"a": 0, "b": 1}), Tok({"a": 0, "c": 1}), "drafts/tiny")
    check_draft_tokenizer(Tok({"a": 0}), Tok({"a": 0}), "drafts/tiny")


def test_prefill_inputs_reach_the_prompt_forward_only(tiny_lm):
    from transformers import LlamaForCausalLM

    class ImageLM(LlamaForCausalLM):
        """Adds `pixel_values` (a [P, hidden] offset) to the prompt's embeddings, as a VLM mixes in images."""

        calls: list = []

        def forward(self, input_ids=None, pixel_values=None, **kwargs):
            type(self).calls.append(pixel_values is not None)
            embeds = self.model.embed_tokens(input_ids)
            if pixel_values is not None:
                embeds = embeds + pixel_values[:, None, :]
            return super().forward(inputs_embeds=embeds, **kwargs)

    model = ImageLM(tiny_lm.config).eval()
    model.load_state_dict(tiny_lm.state_dict())
    config = SamplingConfig(max_new_tokens=6, temperature=0.0)
    pixels = torch.randn(len(PROMPTS), tiny_lm.config.hidden_size)
    gen = RolloutEngine(model).generate(PROMPTS, config, stop_ids=[], pad_token_id=PAD, num_return_sequences=2,
                                        prefill_inputs={"pixel_values": pixels})
    assert ImageLM.calls[0] is True and not any(ImageLM.calls[1:])  # decode rounds never see the images
    ref = generate_reference(model, PROMPTS, config, stop_ids=[], pad_token_id=PAD, num_return_sequences=2,
                             prefill_inputs={"pixel_values": pixels})
    assert gen.completion_ids.tolist() == ref.completion_ids.tolist()
    plain = generate_reference(tiny_lm, PROMPTS, config, stop_ids=[], pad_token_id=PAD, num_return_sequences=2)
    assert gen.completion_ids.tolist() != plain.completion_ids.tolist()  # the images changed the output


def test_suppressed_ids_are_never_sampled_and_the_recorded_log_probs_stay_full(tiny_lm):
    config = SamplingConfig(max_new_tokens=12, temperature=0.0)
    free = generate_reference(tiny_lm, PROMPTS, config, stop_ids=[], pad_token_id=PAD)
    banned = tuple(sorted(set(free.completion_ids[:, :4].flatten().tolist())))  # the greedy favourites
    for temperature in (0.0, 1.0):
        config = SamplingConfig(max_new_tokens=12, temperature=temperature, suppress_ids=banned)
        ref = generate_reference(tiny_lm, PROMPTS, config, stop_ids=[], pad_token_id=PAD,
                                 generator=torch.Generator().manual_seed(0))
        gen = RolloutEngine(tiny_lm, speculative=True).generate(PROMPTS, config, stop_ids=[], pad_token_id=PAD,
                                                               generator=torch.Generator().manual_seed(0))
        for out in (ref, gen):
            assert not torch.isin(out.completion_ids, torch.tensor(banned)).any()
            for row in range(len(PROMPTS)):  # the full tempered distribution's log-prob, as training computes it
                expected = _training_logps(tiny_lm, PROMPTS[row], out.completion_ids[row].tolist(), temperature or 1.0)
                torch.testing.assert_close(out.logps[row], expected, atol=1e-5, rtol=1e-5)
        if temperature == 0.0:
            assert gen.completion_ids.tolist() == ref.completion_ids.tolist()


@pytest.mark.parametrize("compile_decode", [False, True])
def test_the_kept_engine_does_not_keep_its_model_alive(compile_decode):
    import gc
    import weakref

    from pmetal.generation.engine import engine_for

    model = _tiny()
    engine_for(model, compile_decode=compile_decode).generate(
        PROMPTS, SamplingConfig(max_new_tokens=4, temperature=0.0), stop_ids=[], pad_token_id=PAD)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # a GRPO run's policy (and its engine's buffers) is freed with the run


def test_a_compile_failure_falls_back_to_the_uncompiled_round(tiny_lm, monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("inductor is not available here")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    config = SamplingConfig(max_new_tokens=8, temperature=0.0)
    engine = RolloutEngine(tiny_lm, compile_decode=True)
    with caplog.at_level("WARNING", logger="pmetal"):
        got = engine.generate(PROMPTS, config, stop_ids=[], pad_token_id=PAD)
    want = RolloutEngine(tiny_lm, compile_decode=False).generate(PROMPTS, config, stop_ids=[], pad_token_id=PAD)
    assert got.completion_ids.tolist() == want.completion_ids.tolist()
    assert "inductor is not available here" in engine.compile_error
    assert "running it uncompiled" in caplog.text
