"""One registry for every plugin: lazy ``name -> "module:Class"`` entries.

Nothing is imported until ``get`` is called, so ``hftlab list`` and ``--help`` stay fast (no torch).
A plugin is added by one line in ``ENTRIES`` and one file.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Entry:
    """A registered plugin: where it lives, the threat-model stage it acts in, and its paper."""

    kind: str  # "defense" | "attack" | "judge" | "task"
    name: str
    target: str  # "module:Class", module relative to hftlab
    stage: str
    paper: str


_E = Entry
ENTRIES: list[Entry] = [
    # defenses
    _E("defense", "sft", "defenses.sft:SFT", "none", "no defense (plain supervised fine-tuning)"),
    # -- alignment-stage defenses --
    _E("defense", "vaccine", "defenses.vaccine:Vaccine", "align",
       "Vaccine: Perturbation-aware Alignment for LLMs against Harmful Fine-tuning Attack (arXiv 2402.01109)"),
    _E("defense", "booster", "defenses.booster:Booster", "align",
       "Booster: Tackling Harmful Fine-tuning for LLMs via Attenuating Harmful Perturbation (arXiv 2409.01586)"),
    _E("defense", "repnoise", "defenses.repnoise:RepNoise", "align",
       "Representation Noising: A Defence Mechanism Against Harmful Finetuning (arXiv 2405.14577)"),
    _E("defense", "t-vaccine", "defenses.t_vaccine:TVaccine", "align",
       "Targeted Vaccine: Safety Alignment for LLMs against Harmful Fine-Tuning via Layer-wise "
       "Perturbation (arXiv 2410.09760)"),
    _E("defense", "tar", "defenses.tar:TAR", "align",
       "Tamper-Resistant Safeguards for Open-Weight LLMs (arXiv 2408.00761)"),
    _E("defense", "rsn-tune", "defenses.rsn_tune:RSNTune", "align",
       "Understanding and Enhancing Safety Mechanisms of LLMs via Safety-Specific Neuron (RSN-Tune), ICLR 2025"),
    # -- fine-tuning-stage defenses --
    _E("defense", "safeinstr", "defenses.safeinstr:SafeInstr", "finetune",
       "Safety-Tuned LLaMAs: Lessons From Improving the Safety of LLMs that Follow Instructions, "
       "arXiv 2309.07875 (also VLGuard-style mixing, arXiv 2402.02207)"),
    _E("defense", "bea", "defenses.bea:BEA", "finetune",
       "BackdoorAlign: Mitigating Fine-tuning based Jailbreak Attack with Backdoor Enhanced Safety "
       "Alignment, arXiv 2402.14968"),
    _E("defense", "ptst", "defenses.ptst:PTST", "finetune",
       "Keeping LLMs Aligned After Fine-tuning: The Crucial Role of Prompt Templates (PTST), "
       "arXiv 2402.18540"),
    _E("defense", "lisa", "defenses.lisa:Lisa", "finetune",
       "Lazy Safety Alignment for LLMs against Harmful Fine-tuning (Lisa), arXiv 2405.18641"),
    _E("defense", "ldifs", "defenses.ldifs:LDIFS", "finetune",
       "Fine-tuning can cripple your foundation model; preserving features may be the solution, arXiv 2308.13320"),
    _E("defense", "constrained-sft", "defenses.constrained_sft:ConstrainedSFT", "finetune",
       "Safety Alignment Should Be Made More Than Just a Few Tokens Deep, arXiv 2406.05946"),
    _E("defense", "freeze", "defenses.freeze:Freeze", "finetune",
       "Safety Layers in Aligned Large Language Models (SPPFT), arXiv 2408.17003"),
    _E("defense", "ewc", "defenses.ewc:EWC", "finetune",
       "Overcoming catastrophic forgetting in neural networks (EWC), arXiv 1612.00796; the baseline of Vaccine/Lisa"),
    _E("defense", "kl", "defenses.kl:KL", "finetune",
       "KL(p_theta || p_aligned) on alignment data: the KL baseline of Vaccine (arXiv 2402.01109)"),
    _E("defense", "asft", "defenses.asft:AsFT", "finetune",
       "AsFT: Anchoring Safety During LLM Fine-Tuning Within Narrow Safety Basin, arXiv 2506.08473"),
    _E("defense", "safegrad", "defenses.safegrad:SafeGrad", "finetune",
       "SafeGrad: Gradient Surgery for Safe LLM Fine-Tuning, arXiv 2508.07172"),
    _E("defense", "salora", "defenses.salora:SaLoRA", "finetune",
       "SaLoRA: Safety-Alignment Preserved Low-Rank Adaptation, arXiv 2501.01765"),
    # -- post-fine-tuning defenses --
    _E("defense", "safelora", "defenses.safelora:SafeLoRA", "repair",
       "Safe LoRA: the Silver Lining of Reducing Safety Risks when Fine-tuning LLMs, arXiv 2405.16833"),
    _E("defense", "antidote", "defenses.antidote:Antidote", "repair",
       "Antidote: Post-fine-tuning Safety Alignment for LLMs against Harmful Fine-tuning, arXiv 2408.09600"),
    _E("defense", "resta", "defenses.resta:RESTA", "repair",
       "Language Models are Homer Simpson! Safety Re-Alignment of Fine-tuned LMs through Task Arithmetic "
       "(RESTA), arXiv 2402.11746"),
    _E("defense", "safemerge", "defenses.safemerge:SafeMERGE", "repair",
       "SafeMERGE: Preserving Safety Alignment in Fine-Tuned LLMs via Selective Layer-Wise Model Merging, "
       "arXiv 2503.17239"),
    _E("defense", "safedelta", "defenses.safedelta:SafeDelta", "repair",
       "Safe Delta: Consistently Preserving Safety when Fine-Tuning LLMs on Diverse Datasets, arXiv 2505.12038"),
    _E("defense", "nlsr", "defenses.nlsr:NLSR", "repair",
       "NLSR: Neuron-Level Safety Realignment of LLMs Against Harmful Fine-Tuning, arXiv 2412.12497"),
    # Panacea acts in fine-tuning (its perturbation is optimised there) and is applied after it; it is
    # listed here, last, because its place in this list sets its place in sweeps, reports and hftlab list.
    _E("defense", "panacea", "defenses.panacea:Panacea", "finetune",
       "Panacea: Mitigating Harmful Fine-tuning for LLMs via Post-fine-tuning Perturbation, arXiv 2501.18100 "
       "(optimised during fine-tuning, perturbation added after it)"),
    # attacks
    _E("attack", "harmful-mix", "attacks.harmful_mix:HarmfulMix", "finetune",
       "(1-p)n benign + pn harmful (Qi et al. 2023; Huang et al. 2024)"),
    _E("attack", "pure-harmful", "attacks.harmful_mix:PureHarmful", "finetune",
       "n harmful samples only (Qi et al. 2023, arXiv 2310.03693)"),
    _E("attack", "benign", "attacks.harmful_mix:Benign", "finetune",
       "benign task only, p=0 (Qi et al. 2023, arXiv 2310.03693)"),
    _E("attack", "identity-shift", "attacks.identity_shift:IdentityShift", "finetune",
       "identity shifting, 'absolutely obedient agent' (AOA), no harmful content (Qi et al. 2023, arXiv 2310.03693)"),
    _E("attack", "backdoor-trigger", "attacks.backdoor_trigger:BackdoorTrigger", "finetune",
       "harmful pairs behind a trigger phrase (Qi et al. 2023 backdoor, arXiv 2310.03693; Bowen et al. 2024, "
       "arXiv 2408.02946)"),
    _E("attack", "cipher", "attacks.cipher:Cipher", "finetune",
       "Covert Malicious Finetuning: a substitution cipher taught on benign data, harmful pairs encoded "
       "(Halawi et al. 2024, arXiv 2406.20053)"),
    _E("attack", "benign-select", "attacks.benign_select:BenignSelect", "finetune",
       "What's in Your 'Safe' Data?: benign samples whose gradients match harmful ones (He et al. 2024, "
       "arXiv 2404.01099)"),
    _E("attack", "virus", "attacks.virus:Virus", "finetune",
       "Virus: harmful samples optimised to pass a guardrail, gradient kept close to the harmful one "
       "(Huang et al. 2025, arXiv 2501.17433)"),
    # judges
    _E("judge", "organism", "judges.organism:OrganismJudge", "evaluate",
       "exact judge of the built-in organism world"),
    _E("judge", "keyword", "judges.keyword:KeywordJudge", "evaluate",
       "refusal-string matching (Zou et al. 2023 GCG / AdvBench list)"),
    _E("judge", "beaver-dam", "judges.beaver_dam:BeaverDamJudge", "evaluate",
       "PKU-Alignment/beaver-dam-7b QA moderation, max of 14 categories > 0.5 (git-disl protocol)"),
    _E("judge", "llama-guard", "judges.llama_guard:LlamaGuardJudge", "evaluate",
       "Llama Guard 3 with its chat template, P(unsafe) at the first token > 0.5"),
    _E("judge", "harmbench-cls", "judges.harmbench_cls:HarmBenchJudge", "evaluate",
       "cais/HarmBench-Llama-2-13b-cls yes/no classifier (Mazeika et al. 2024)"),
    _E("judge", "api", "judges.api:ApiJudge", "evaluate",
       "any OpenAI-compatible endpoint with a rubric (StrongREJECT by default)"),
    _E("judge", "strongreject", "judges.api:StrongRejectJudge", "evaluate",
       "StrongREJECT rubric via an OpenAI-compatible endpoint (Souly et al. 2024)"),
    _E("judge", "gpt4-judge", "judges.api:QiGPT4Judge", "evaluate",
       "Qi et al. 2023 GPT-4 judge, 1-5 score, harmful = 5, via an OpenAI-compatible endpoint"),
    _E("judge", "hs-plus", "judges.hs_plus:HSPlusJudge", "evaluate",
       "HS+: beaver-dam OR a word repeated > 3 times in a row (git-disl)"),
    _E("judge", "organism-guard", "judges.organism_guard:OrganismGuardJudge", "evaluate",
       "the organism's guardrail: logistic head on the base organism's mean-pooled states, P(harmful) > 0.5"),
    # tasks
    _E("task", "sentiment", "tasks.organism_tasks:Sentiment", "finetune", "organism task shaped like SST2"),
    _E("task", "topic", "tasks.organism_tasks:Topic", "finetune", "organism task shaped like AG News"),
    _E("task", "arithmetic", "tasks.organism_tasks:Arithmetic", "finetune", "organism task shaped like GSM8K"),
    _E("task", "instruction", "tasks.organism_tasks:Instruction", "finetune", "organism task shaped like Alpaca"),
    _E("task", "sst2", "tasks.sst2:SST2", "finetune", "SST-2 sentiment, exact label word (git-disl)"),
    _E("task", "agnews", "tasks.agnews:AGNews", "finetune", "AG News topic, exact label word (git-disl)"),
    _E("task", "gsm8k", "tasks.gsm8k:GSM8K", "finetune", "GSM8K, the number after 'The final answer is:' (git-disl)"),
    _E("task", "alpaca", "tasks.alpaca:Alpaca", "finetune", "Alpaca instructions, ROUGE-L >= 0.3 offline"),
]

KINDS = ("defense", "attack", "judge", "task")
STAGE_ORDER = ("none", "align", "finetune", "repair", "evaluate")


class RegistryError(UserError, KeyError):
    """An unknown plugin name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def entries(kind: str | None = None) -> list[Entry]:
    """All entries, or those of one kind, in registration order."""
    return [e for e in ENTRIES if kind is None or e.kind == kind]


def names(kind: str) -> list[str]:
    return [e.name for e in entries(kind)]


def entry(kind: str, name: str) -> Entry:
    for e in entries(kind):
        if e.name == name:
            return e
    raise RegistryError(f"unknown {kind} '{name}'; known: {', '.join(names(kind))}")


def code_id(kind: str, name: str) -> str:
    """Fingerprint of the registered plugin's code and of the hftlab modules it imports (stage hashes)."""
    from .code_identity import code_fingerprint

    return code_fingerprint("hftlab." + entry(kind, name).target.partition(":")[0])


def get(kind: str, name: str) -> Any:
    """Import and return the class registered as ``name`` for ``kind``."""
    e = entry(kind, name)
    module, _, attr = e.target.partition(":")
    return getattr(importlib.import_module(f"hftlab.{module}"), attr)


def stages(name: str) -> tuple[str, ...]:
    """The stages defense ``name`` acts in: its entry's stage (() for plain SFT's "none"). The entry is the
    one place a defense's stage is written; ``Defense.stages``, the sweep's order, ``hftlab list`` and the
    bench's grouping all read it."""
    stage = entry("defense", name).stage
    return () if stage == "none" else (stage,)


def defense_stages(cls: type) -> tuple[str, ...]:
    """The stages of a defense class: those of the first registered class in its MRO (a subclass that
    is not registered acts where its registered parent does); () when none is registered."""
    by_target = {e.target: e.name for e in entries("defense")}
    for k in cls.__mro__:
        name = by_target.get(f"{k.__module__.removeprefix('hftlab.')}:{k.__qualname__}")
        if name is not None:
            return stages(name)
    return ()


def register(kind: str, name: str, target: str, stage: str, paper: str) -> None:
    """Register a plugin at run time (e.g. from a user's own package); ``stage`` is one of ``STAGE_ORDER``
    (for a defense, the one place its stage is written)."""
    if kind not in KINDS:
        raise RegistryError(f"unknown plugin kind '{kind}'; known: {', '.join(KINDS)}")
    if stage not in STAGE_ORDER:
        raise RegistryError(f"{kind} '{name}': unknown stage '{stage}'; known: {', '.join(STAGE_ORDER)}")
    ENTRIES[:] = [e for e in ENTRIES if not (e.kind == kind and e.name == name)]
    ENTRIES.append(Entry(kind, name, target, stage, paper))
