"""A dispatch mode that proves, on the CPU, that a code path would run on Apple's MPS backend.

No Apple hardware is needed: `MpsReadinessMode` watches every operator the code calls and fails on
(a) a float64 or complex128 tensor among the inputs or outputs (MPS has no float64), and (b) an
operator listed in `mps_unsupported_ops.txt` (no MPS kernel, or CUDA-only). Tests run one training
step of each method under it.
"""

from __future__ import annotations

from importlib import resources

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_FORBIDDEN_DTYPES = (torch.float64, torch.complex128)


def unsupported_ops() -> frozenset[str]:
    text = resources.files("pmetal").joinpath("mps_unsupported_ops.txt").read_text()
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


class MpsReadinessError(AssertionError):
    pass


class MpsReadinessMode(TorchDispatchMode):
    """Fails on float64/complex128 tensors and on operators without MPS kernels.

    Args:
        allow_float64: operator names (e.g. "aten::item") allowed to touch float64, for code that
            is not on the training path.
    """

    def __init__(self, allow_float64: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.unsupported = unsupported_ops()
        self.allow_float64 = allow_float64
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name  # e.g. "aten::mm"
        self.seen.add(name)
        if name in self.unsupported:
            raise MpsReadinessError(f"{name} has no MPS kernel (listed in pmetal/mps_unsupported_ops.txt)")
        if name not in self.allow_float64:
            self._check_dtypes(name, (args, kwargs), "input")
        out = func(*args, **kwargs)
        if name not in self.allow_float64:
            self._check_dtypes(name, out, "output")
        return out

    @staticmethod
    def _check_dtypes(name, tree, where) -> None:
        leaves, _ = tree_flatten(tree)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.dtype in _FORBIDDEN_DTYPES:
                raise MpsReadinessError(f"{name} got a {leaf.dtype} {where} of shape {tuple(leaf.shape)}: MPS has no float64")
            if isinstance(leaf, torch.dtype) and leaf in _FORBIDDEN_DTYPES:
                raise MpsReadinessError(f"{name} was asked for dtype {leaf}: MPS has no float64")
