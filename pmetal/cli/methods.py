"""The one table of training methods: name -> LightningModule, DataModule, default config.

Classes are named by import string and imported only when a method is used, so the core never
imports a module and `pmetal --help` stays fast. LoRA, DoRA and QLoRA are settings of a method
(`adapter`, `quantization`), with presets in configs/{lora,dora,qlora}.yaml.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pmetal.errors import PmetalError


@dataclass(frozen=True)
class Method:
    name: str
    module: str  # "package.module:Class"
    datamodule: str
    config: str  # file name under configs/
    summary: str
    data_kind: str  # a key of pmetal.data.check.KINDS: what its data files hold

    def module_class(self):
        return _load(self.module, self.name)

    def datamodule_class(self):
        return _load(self.datamodule, self.name)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("sft", "pmetal.modules.sft:SftModule", "pmetal.data.datamodule:SftDataModule", "sft.yaml",
               "supervised fine-tuning, full or LoRA/DoRA/QLoRA",
               "sft"),
        Method("dpo", "pmetal.modules.dpo:DpoModule", "pmetal.data.preference:PreferenceDataModule", "dpo.yaml",
               "Direct Preference Optimization (sigmoid, hinge, IPO, robust)",
               "preference"),
        Method("simpo", "pmetal.modules.simpo:SimpoModule", "pmetal.data.preference:PreferenceDataModule",
               "simpo.yaml", "SimPO: length-normalized, reference-free preference optimization",
               "preference"),
        Method("orpo", "pmetal.modules.orpo:OrpoModule", "pmetal.data.preference:PreferenceDataModule", "orpo.yaml",
               "ORPO: SFT plus an odds-ratio preference term",
               "preference"),
        Method("kto", "pmetal.modules.kto:KtoModule", "pmetal.data.kto:KtoDataModule", "kto.yaml",
               "KTO: unpaired desirable/undesirable feedback",
               "kto"),
        Method("grpo", "pmetal.modules.grpo:GrpoModule", "pmetal.data.prompts:PromptDataModule", "grpo.yaml",
               "GRPO: group-relative policy optimization with reward functions",
               "prompts"),
        Method("dapo", "pmetal.modules.grpo:DapoModule", "pmetal.data.prompts:PromptDataModule", "dapo.yaml",
               "DAPO: GRPO with clip-higher, token-level loss, overlong shaping, dynamic sampling",
               "prompts"),
        Method("agent", "pmetal.modules.agent:AgentGrpoModule", "pmetal.data.prompts:PromptDataModule", "agent.yaml",
               "GRPO with tools: multi-turn episodes calling tools or an environment",
               "prompts"),
        Method("rloo", "pmetal.modules.grpo:RlooModule", "pmetal.data.prompts:PromptDataModule", "rloo.yaml",
               "RLOO: REINFORCE with a leave-one-out baseline (GRPO's update with the RLOO estimator)",
               "prompts"),
        Method("online_dpo", "pmetal.modules.online_dpo:OnlineDpoModule", "pmetal.data.prompts:PromptDataModule",
               "online_dpo.yaml", "Online DPO: DPO on two policy completions per prompt ranked by the rewards",
               "prompts"),
        Method("xpo", "pmetal.modules.online_dpo:XpoModule", "pmetal.data.prompts:PromptDataModule", "xpo.yaml",
               "XPO: Online DPO on (policy, reference) completions plus an exploration term",
               "prompts"),
        Method("rlkd", "pmetal.modules.rlkd:RlkdModule", "pmetal.data.prompts:PromptDataModule", "rlkd.yaml",
               "RLKD: GRPO plus distillation from a frozen teacher",
               "prompts"),
        Method("distill", "pmetal.modules.distill:DistillModule", "pmetal.data.distill:DistillDataModule",
               "distill.yaml", "GKD: on-policy distillation from a frozen teacher (generalized JSD)", "sft"),
        Method("reward", "pmetal.modules.reward:RewardModule", "pmetal.data.preference:PreferenceDataModule",
               "reward.yaml", "reward model: Bradley-Terry scorer on preference pairs", "preference"),
        Method("embed", "pmetal.modules.embed:EmbedModule", "pmetal.data.embedding:EmbeddingDataModule", "embed.yaml",
               "sentence-embedding training (InfoNCE, Triplet, CoSENT)",
               "embedding"),
    ]
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PmetalError(f"unknown method {name!r}; available methods: {', '.join(METHODS)}")
    return METHODS[name]


def _load(target: str, method: str):
    module_name, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PmetalError(f"method {method!r} is not available in this installation ({target}: {exc})") from exc
