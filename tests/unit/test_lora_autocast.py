"""LoRA layers skip PEFT's fp32 input copy under autocast: same values and gradients, less saved memory."""

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from pmetal.lora_autocast import AutocastLoraLinear
from pmetal.models import apply_adapter
from tests.tiny import tiny_llama

TOKENS = (2, 12)  # batch, sequence


def _adapted(adapter="lora", quant=None, seed=0):
    model = tiny_llama(seed=seed).to(torch.bfloat16)
    if quant:
        from pmetal.quant import quantize_model

        model = quantize_model(model, quant, compute_dtype=torch.bfloat16)
    peft_model = apply_adapter(model, adapter, r=4)
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # zero by default: make the adapter matter
            torch.nn.init.normal_(p, std=0.5)
    return peft_model.train()


def _unpatch(model):
    """Back to PEFT's own class (what pmetal did before): the fp32 input copy is made again."""
    for module in model.modules():
        if type(module) is AutocastLoraLinear:
            module.__class__ = LoraLinear
    from pmetal.quant.peft import QuantLoraLinear

    for module in model.modules():
        if type(module) is QuantLoraLinear:
            module._cast_input_dtype = lambda x, dtype: x.to(dtype)
    return model


def _step(model, ids):
    """Loss, trainable grads and the bytes of the distinct storages autograd saved in forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(storages.values())


def _shared_input_copies_bytes(model) -> int:
    """Bytes of the bf16 input copies PEFT's cast makes for layers that share one input: in a Llama
    block k/v read q's input and up reads gate's, so without the cast one saved tensor serves them all."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear) and name.rsplit(".", 1)[-1] in ("k_proj", "v_proj", "up_proj"):
            total += TOKENS[0] * TOKENS[1] * module.in_features * 2
    return total


@pytest.mark.parametrize("adapter,quant", [("lora", None), ("dora", None), ("lora", "nf4")])
def test_same_values_and_gradients_as_peft_cast(adapter, quant):
    ids = torch.randint(0, 97, TOKENS, generator=torch.Generator().manual_seed(0))
    patched = _adapted(adapter, quant)
    plain = _unpatch(_adapted(adapter, quant))
    assert any(type(m) is not LoraLinear and isinstance(m, LoraLinear) for m in patched.modules())
    loss_a, grads_a, _ = _step(patched, ids)
    loss_b, grads_b, _ = _step(plain, ids)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_no_second_copy_of_layer_inputs_is_saved(quant):
    """With PEFT's cast, lora_A saves a fresh bf16 copy of its input in every adapted layer; without
    it, the input itself, which layers reading the same input share (at least that much is saved)."""
    ids = torch.randint(0, 97, TOKENS, generator=torch.Generator().manual_seed(0))
    patched = _adapted(quant=quant)
    _, _, saved_patched = _step(patched, ids)
    _, _, saved_plain = _step(_unpatch(_adapted(quant=quant)), ids)
    assert saved_plain - saved_patched >= _shared_input_copies_bytes(patched) > 0


def test_without_autocast_the_input_is_still_cast():
    """bf16 base, fp32 adapters, no autocast: PEFT's cast is what makes the dtypes meet."""
    model = _adapted()
    ids = torch.randint(0, 97, TOKENS)
    lora_layer = next(m for m in model.modules() if isinstance(m, AutocastLoraLinear))
    assert lora_layer.lora_A["default"].weight.dtype == torch.float32
    logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def test_compiled_layers_trace_the_autocast_check_without_graph_breaks():
    """`compile=True` compiles each decoder layer; the autocast test inside the LoRA layers must trace
    (dynamo's eager backend: tracing without an inductor build) and give the eager results."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pmetal.perf import maybe_compile

    ids = torch.randint(0, 97, TOKENS, generator=torch.Generator().manual_seed(0))
    loss_eager, grads_eager, _ = _step(_adapted(), ids)
    compiled = _adapted()
    torch._dynamo.reset()
    counters.clear()
    assert maybe_compile(compiled, backend="eager")
    loss_compiled, grads_compiled, _ = _step(compiled, ids)
    assert counters["stats"]["unique_graphs"] >= 1  # the layers were really traced
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(loss_compiled, loss_eager)
    for name in grads_eager:
        torch.testing.assert_close(grads_compiled[name], grads_eager[name], msg=name)
