"""Long-row tricks change nothing but memory and speed: the chunked MLP, the host offload of
checkpointed layer inputs and the fused kernels give the plain path's loss and gradients (fp32,
tiny models), keep LoRA/DoRA adapters as PEFT built them, and are chosen only where they run."""

from __future__ import annotations

import pytest
import torch

from pmetal.errors import PmetalError
from tests.tiny import tiny_llama


@pytest.fixture(autouse=True)
def _restore_llama_modeling(monkeypatch):
    """Fusing patches the Llama classes' forwards and the modeling module's RoPE: undone after each test."""
    import transformers.models.llama.modeling_llama as modeling

    import pmetal.kernels as kernels

    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling.LlamaRMSNorm, "forward", modeling.LlamaRMSNorm.forward)
    monkeypatch.setattr(modeling.LlamaMLP, "forward", modeling.LlamaMLP.forward)
    monkeypatch.setattr(kernels, "_CLASS_FORWARDS", {})


def _lora(model, adapter="lora"):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=adapter == "dora", init_lora_weights=False)
    return get_peft_model(model, config).train()


def _model(adapter="lora", checkpoint=True):
    from pmetal.perf import enable_gradient_checkpointing

    model = _lora(tiny_llama(), adapter)
    if checkpoint:
        enable_gradient_checkpointing(model)
    return model


def _loss_and_grads(model, seq=24, batch=2):
    from pmetal.logps import lm_loss

    ids = torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(3))
    loss, _ = lm_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(reference, other):
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("adapter,checkpoint", [("lora", True), ("dora", False)])
def test_chunked_mlp_gives_the_plain_loss_and_gradients(adapter, checkpoint):
    from pmetal.activations import chunk_mlps

    reference = _loss_and_grads(_model(adapter, checkpoint))
    model = _model(adapter, checkpoint)
    calls = []
    mlp = model.base_model.model.model.layers[0].mlp
    mlp.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-2]))
    assert chunk_mlps(model, 7) == 2
    inner = []
    body = type(mlp).forward
    mp = pytest.MonkeyPatch()
    mp.setattr(type(mlp), "forward", lambda self, x: (inner.append(x.shape[-2]) if self is mlp else None) or body(self, x))
    try:
        _assert_same(reference, _loss_and_grads(model))
    finally:
        mp.undo()
    assert calls[0] == 24 and inner[:4] == [7, 7, 7, 3]  # the MLP saw the whole row, its body 7 tokens at a time
    with pytest.raises(PmetalError, match="chunk size 0"):
        chunk_mlps(model, 0)


def test_offloaded_inputs_are_the_layer_inputs_only_and_change_nothing():
    from pmetal.activations import HostOffload, offload_checkpointed_inputs

    reference = _loss_and_grads(_model())
    model = _model()
    # the CUDA path's block splitting, run synchronously on the CPU; blocks smaller than a layer input
    offload = offload_checkpointed_inputs(model, HostOffload(block_bytes=1000, min_bytes=0, copy_off_cuda=True))
    packed = []
    pack = offload.pack
    offload.pack = lambda t: packed.append(pack(t)) or packed[-1]
    _assert_same(reference, _loss_and_grads(model))
    layer_input = 2 * 24 * 32 * 4  # batch x tokens x hidden, fp32
    assert offload.offloaded_bytes == 2 * layer_input  # one input per layer, nothing from inside a layer
    blocks = [p[2] for p in packed if isinstance(p, tuple)]
    assert len(blocks) == 2 and [b.numel() for b in blocks[0]] == [250] * 6 + [36]
    assert offload_checkpointed_inputs(model) is not None  # idempotent: one layer of hooks


def test_offload_needs_checkpointed_layers():
    from pmetal.activations import offload_checkpointed_inputs

    with pytest.raises(PmetalError, match="gradient checkpointing"):
        offload_checkpointed_inputs(_model(checkpoint=False))


def test_host_offload_keeps_small_tensors_parameters_and_cpu_tensors_in_place():
    from pmetal.activations import HostOffload

    offload = HostOffload()
    small, param, big = torch.ones(3), torch.nn.Parameter(torch.ones(2 << 20)), torch.ones(2 << 20)
    assert offload.pack(small) is small and offload.pack(param) is param
    assert offload.pack(big) is big  # CPU memory is host memory already
    assert offload.offloaded_bytes == 0


# ----------------------------------------------------------------------------- fused kernels


def test_kernels_are_chosen_on_cuda_only():
    from pmetal.kernels import resolve_kernels

    assert resolve_kernels("auto", "cuda", available=True)[0]
    on, why = resolve_kernels("auto", "cuda", available=False)
    assert not on and "pip install liger-kernel" in why
    for device in ("cpu", "mps"):
        on, why = resolve_kernels("auto", device, available=True)
        assert not on and device in why
        with pytest.raises(PmetalError, match="CUDA"):
            resolve_kernels("liger", device, available=True)
    assert not resolve_kernels("off", "cuda", available=True)[0]
    with pytest.raises(PmetalError, match="liger-kernel"):
        resolve_kernels("liger", "cuda", available=False)
    with pytest.raises(PmetalError, match="not understood"):
        resolve_kernels("triton", "cuda")


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """The fused forwards active on the CPU, each kernel replaced by a reference that counts its calls
    (Liger's RMSNorm and SwiGLU kernels cannot run in Triton's interpreter; its RoPE kernel is
    checked against HF's below)."""
    import transformers.models.llama.modeling_llama as modeling

    import pmetal.kernels as kernels

    monkeypatch.setattr(kernels, "_on_kernel_device", lambda tensor: True)
    calls = {"rms_norm": 0, "swiglu": 0, "rope": 0}

    def rms_norm(x, weight, eps):
        calls["rms_norm"] += 1
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def silu_mul(gate, up):
        calls["swiglu"] += 1
        return torch.nn.functional.silu(gate) * up

    def rope(q, k, cos, sin):
        calls["rope"] += 1
        return modeling.apply_rotary_pos_emb.original(q, k, cos, sin)

    monkeypatch.setattr(kernels, "_liger_rms_norm", rms_norm)
    monkeypatch.setattr(kernels, "_liger_silu_mul", silu_mul)
    monkeypatch.setattr(kernels, "_liger_rope", rope)
    return calls


def test_liger_rope_kernel_matches_hf():
    """Liger's RoPE kernel itself, in Triton's interpreter, against HF's function (values and grads)."""
    import os

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from pmetal.kernels import _liger_rope, liger_available

    if not liger_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs liger-kernel and Triton's interpreter (TRITON_INTERPRET=1 before triton's import)")
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=generator), torch.randn(2, 2, 5, 8, generator=generator)
    angles = torch.randn(2, 5, 4, generator=generator)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    outputs = []
    for rope in (apply_rotary_pos_emb, _liger_rope):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        rq, rk = rope(qq, kk, cos, sin)
        (rq.square().sum() + rk.sum()).backward()
        outputs.append((rq.detach(), rk.detach(), qq.grad, kk.grad))
    for ours, theirs in zip(*outputs):
        torch.testing.assert_close(theirs, ours)


@pytest.mark.parametrize("adapter", ["dora"])
def test_fused_kernels_keep_adapters_and_give_the_plain_loss_and_gradients(adapter, fused_on_cpu):
    from peft.tuners.lora import LoraLayer

    from pmetal.kernels import apply_liger_kernels

    reference = _loss_and_grads(_model(adapter))
    model = _model(adapter)
    adapters = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    counts = apply_liger_kernels(model)
    assert counts == {"rms_norm": 5, "swiglu": 2, "rope": 1}  # 2 per layer + the final norm; 2 MLPs
    assert apply_liger_kernels(model) == counts  # idempotent
    # no forward per instance: compiled layers share one graph only when their submodules' forwards are one object
    assert not any("forward" in vars(m) for m in model.modules() if type(m).__name__.startswith("Llama"))
    assert [name for name, m in model.named_modules() if isinstance(m, LoraLayer)] == adapters
    _assert_same(reference, _loss_and_grads(model))
    assert fused_on_cpu["rms_norm"] >= 5 and fused_on_cpu["swiglu"] >= 2 and fused_on_cpu["rope"] >= 2


def test_fused_mlp_keeps_its_chunking(fused_on_cpu):
    from pmetal.activations import chunk_mlps
    from pmetal.kernels import apply_liger_kernels

    reference = _loss_and_grads(_model())
    model = _model()
    chunk_mlps(model, 10)  # chunked first, fused after: the chunks still run the fused MLP
    apply_liger_kernels(model)
    _assert_same(reference, _loss_and_grads(model))
    assert fused_on_cpu["swiglu"] >= 2 * 3  # each MLP ran its body per chunk (24 tokens: 10, 10, 4)


def test_fused_forwards_fall_back_off_the_kernel_device():
    """Without the test widening, CPU tensors take HF's own path: the default CPU run is unchanged."""
    from pmetal.kernels import apply_liger_kernels

    reference = _loss_and_grads(_model())
    model = _model()
    apply_liger_kernels(model)
    _assert_same(reference, _loss_and_grads(model))


def test_other_model_families_are_left_as_they_are():
    from transformers import GPT2Config, GPT2LMHeadModel

    from pmetal.kernels import apply_liger_kernels

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert apply_liger_kernels(model) == {"rms_norm": 0, "swiglu": 0, "rope": 0}


# ----------------------------------------------------------------------------- SftModule settings


def test_sft_settings_reach_the_model_and_change_nothing(tiny_model_dir):
    from pmetal.modules import SftModule

    plain = SftModule(model=str(tiny_model_dir), weight_dtype="float32")
    tricks = SftModule(model=str(tiny_model_dir), weight_dtype="float32", offload_activations=True,
                       mlp_chunk_size=5)
    assert tricks.eager_only == "--offload-activations and --mlp-chunk-size" and plain.eager_only == ""
    for module in (plain, tricks):
        torch.manual_seed(0)
        for p in module.policy.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    results = []
    for module in (plain, tricks):
        loss, _ = module.compute_loss(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.policy.named_parameters() if p.requires_grad}))
    _assert_same(*results)


def test_sft_settings_are_checked_before_the_model_loads():
    from pmetal.modules import SftModule

    with pytest.raises(PmetalError, match="drop --compile"):
        SftModule(model="/nonexistent", offload_activations=True, compile=True)
    with pytest.raises(PmetalError, match="gradient checkpointing"):
        SftModule(model="/nonexistent", offload_activations=True, gradient_checkpointing=False)
    with pytest.raises(PmetalError, match="not understood"):
        SftModule(model="/nonexistent", kernels="fast")


def test_long_row_settings_are_mps_ready():
    """The chunked MLP, the offload hooks (their copying path) and the fused forwards (HF's path off
    CUDA) under bf16 autocast and the MPS guard: no float64, no operator without an MPS kernel."""
    from pmetal.activations import HostOffload, chunk_mlps, offload_checkpointed_inputs
    from pmetal.kernels import apply_liger_kernels
    from pmetal.mps_guard import MpsReadinessMode

    model = _model()
    apply_liger_kernels(model)
    chunk_mlps(model, 7)
    offload_checkpointed_inputs(model, HostOffload(min_bytes=0, copy_off_cuda=True))
    with MpsReadinessMode(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
