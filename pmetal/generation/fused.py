"""Fused decode projections: each layer's q/k/v, and its gate/up, as one matmul over a refreshed copy.

At decode batch sizes a projection's matmul is bound by its launch and latency, not by its width:
a few dozen rows against a weight matrix. A decoder layer runs seven of them; reading q, k and v
(and gate and up) out of one wider matmul each leaves four. The engine keeps one
concatenated copy of those weights, **refreshed from the live parameters before every rollout**
(``refresh``: one device copy), so the rounds sample the current policy after each optimizer step,
and the model's own modules and weights are never touched: within :class:`fused_projections` the
layers' ``q_proj`` (``gate_proj``) compute the fused product and hand its other parts to
``k_proj`` and ``v_proj`` (``up_proj``), which return them when called on that same input (and
compute their own product otherwise: a layer that calls them in another order or on other inputs
is served correctly, only unfused).

Only groups of plain ``nn.Linear`` are fused (full fine-tuning, a frozen model, adapters on other
layers); a group with a PEFT adapter or a quantized base keeps its own modules. Departures: the
fused matmul may round differently from three separate ones (another kernel, another split of the
sum), as a training forward over a whole sequence already does; the recorded log-probs stay those
of the live weights within that rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from pmetal.generation.hf_internals import swap_submodule

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Handoff:
    """The input and parts of one fused product, from the group's first projection to the others."""

    input: torch.Tensor | None = None
    parts: tuple[torch.Tensor, ...] = ()


class _First(nn.Module):
    def __init__(self, weight, bias, sizes, handoff) -> None:
        super().__init__()
        self.weight, self.bias, self.sizes, self.handoff = weight, bias, sizes, handoff

    def forward(self, x):
        parts = torch.nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        self.handoff.input, self.handoff.parts = x, parts
        return parts[0]


class _Rest(nn.Module):
    """A later projection of the group: the fused part when called on the first's input, else its own."""

    def __init__(self, index, handoff, original) -> None:
        super().__init__()
        self.index, self.handoff = index, handoff
        self.original = [original]  # in a list: not registered as a submodule (no second owner of its weights)

    def forward(self, x):
        if self.handoff.input is x:
            return self.handoff.parts[self.index]
        return self.original[0](x)  # another input, or called before the first: nothing to hand over


def _plain(module) -> bool:
    return type(module) is nn.Linear


def fusable_groups(model):
    """``(parent, names, linears)`` for every group of plain linear layers that can share one matmul."""
    for parent in list(model.modules()):
        for names in GROUPS:
            linears = [getattr(parent, n, None) for n in names]
            if all(_plain(m) for m in linears) and \
                    len({(m.in_features, m.weight.dtype, m.weight.device, m.bias is None) for m in linears}) == 1:
                yield parent, names, linears


class FusedProjections:
    """The fused weights of ``model``'s fusable groups, and the module swap that uses them."""

    def __init__(self, model) -> None:
        self.groups = []  # (parent, names, originals, fused weight, fused bias, stand-ins)
        for parent, names, linears in fusable_groups(model):
            weight = torch.empty((sum(m.out_features for m in linears), linears[0].in_features),
                                 dtype=linears[0].weight.dtype, device=linears[0].weight.device)
            bias = None if linears[0].bias is None else weight.new_empty(weight.shape[0])
            # the same stand-in modules every time: compiled rounds guard on the modules they trace
            handoff = _Handoff()
            stand_ins = [_First(weight, bias, [m.out_features for m in linears], handoff)]
            stand_ins += [_Rest(i, handoff, linears[i]) for i in range(1, len(names))]
            self.groups.append((parent, names, linears, weight, bias, stand_ins))
        self.refresh()

    @staticmethod
    def size_bytes(model) -> int:
        """Bytes the fused copy of ``model`` would take (0: nothing to fuse)."""
        return sum(m.weight.numel() * m.weight.element_size() for _, _, linears in fusable_groups(model) for m in linears)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the live weights into the fused buffers (in place: captured graphs keep reading them)."""
        for _, _, linears, weight, bias, _ in self.groups:
            torch.cat([m.weight for m in linears], dim=0, out=weight)
            if bias is not None:
                torch.cat([m.bias for m in linears], dim=0, out=bias)

    def __len__(self) -> int:
        return len(self.groups)

    def __enter__(self):
        for parent, names, _, _, _, stand_ins in self.groups:
            for name, module in zip(names, stand_ins):
                swap_submodule(parent, name, module)
        return self

    def __exit__(self, *exc) -> None:
        for parent, names, linears, _, _, _ in self.groups:
            for name, module in zip(names, linears):
                swap_submodule(parent, name, module)
