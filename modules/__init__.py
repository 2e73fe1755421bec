"""pmetal.modules: one LightningModule per training method.

    from pmetal.modules import SftModule, DpoModule, GrpoModule

Classes are imported on first use (Lightning, transformers and PEFT cost seconds to import).
"""

from __future__ import annotations

from pmetal.lazy import lazy_exports

_EXPORTS = {
    "PmetalModule": "pmetal.modules.base",
    "SftModule": "pmetal.modules.sft",
    "DpoModule": "pmetal.modules.dpo",
    "SimpoModule": "pmetal.modules.simpo",
    "OrpoModule": "pmetal.modules.orpo",
    "KtoModule": "pmetal.modules.kto",
    "GrpoModule": "pmetal.modules.grpo",
    "DapoModule": "pmetal.modules.grpo",
    "RlooModule": "pmetal.modules.grpo",
    "RlkdModule": "pmetal.modules.rlkd",
    "OnlineDpoModule": "pmetal.modules.online_dpo",
    "XpoModule": "pmetal.modules.online_dpo",
    "DistillModule": "pmetal.modules.distill",
    "EmbedModule": "pmetal.modules.embed",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
