"""The survey's three training paradigms as recipes: ordered stages saying what trains, on what, how fast.

They are data, not code paths: the trainer runs any list of stages the same way, so a user can
override a recipe's stages in the run config, or write a new recipe without touching the loop.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .config import DataSpec, RunConfig, StageSpec
from .errors import ConfigError
from .registry import Registry

PARADIGMS: Registry = Registry("paradigm")


@dataclass(frozen=True)
class Paradigm:
    name: str
    title: str
    explanation: str
    follows: str
    stages: tuple[StageSpec, ...] = field(default_factory=tuple)

    def build_stages(self, run: RunConfig) -> list[StageSpec]:
        """The recipe's stages with the run's data filled in where a stage names none."""
        stages = [copy.deepcopy(s) for s in self.stages]
        for s in stages:
            if s.data is None:
                s.data = copy.deepcopy(run.data)
        return stages


def _register(p: Paradigm) -> None:
    PARADIGMS.register(p.name, title=p.title, explanation=p.explanation, follows=p.follows)(p)


_register(Paradigm(
    name="single-stage", title="Single-stage tuning", follows="Frozen, ClipCap, Flamingo, BLIP-2",
    explanation="Encoder and LLM stay frozen; only the integrator learns, on image–text pairs. "
                "The result is used zero- or few-shot.",
    stages=(StageSpec(name="align", train_integrator=True, llm="frozen", lr=1e-3, epochs=1.0),),
))
_register(Paradigm(
    name="two-stage", title="Two-stage tuning", follows="LLaVA, MiniGPT-4, TinyLLaVA, MobileVLM",
    explanation="Stage 1 aligns the integrator on captions with everything else frozen; stage 2 "
                "instruction-tunes the integrator together with the LLM (full, or its PEFT modules).",
    stages=(
        StageSpec(name="align", data=DataSpec(kind="emoji-captions"), train_integrator=True, llm="frozen",
                  lr=1e-3, epochs=1.0),
        StageSpec(name="instruct", train_integrator=True, llm="full", lr=2e-4, lr_llm=2e-5, epochs=1.0),
    ),
))
_register(Paradigm(
    name="direct", title="Direct adaptation", follows="LaVIN, LLaMA-Adapter, VL-Adapter",
    explanation="No pretraining stage: lightweight modules inside the frozen LLM (LoRA, adapters, "
                "prompts) and the integrator train directly on the downstream task.",
    stages=(StageSpec(name="adapt", train_integrator=True, llm="peft", lr=1e-3, lr_llm=1e-3, epochs=1.0),),
))


def resolve_stages(run: RunConfig) -> list[StageSpec]:
    """The stages a run will execute: its own if given, else its paradigm's recipe."""
    if run.stages:
        stages = [copy.deepcopy(s) for s in run.stages]
        for s in stages:
            if s.data is None:
                s.data = copy.deepcopy(run.data)
        return stages
    paradigm = PARADIGMS.get(run.paradigm)
    stages = paradigm.build_stages(run)
    if run.model.peft.method == "none" and _integrator_inside_llm(run):
        for s in stages:  # LaVIN / LLaMA-Adapter / Flamingo: the integrator *is* the lightweight module in the LLM
            if s.llm == "peft":
                s.llm = "frozen"
    if any(s.llm == "peft" for s in stages) and run.model.peft.method == "none":
        from .integrators import INTEGRATORS
        from .peft_modules import METHODS

        raise ConfigError(f"The {paradigm.title} paradigm trains lightweight modules inside the LLM: set "
                          f"model.peft.method ({', '.join(m for m in METHODS if m != 'none')}) or use an integrator "
                          f"that lives inside the LLM ({', '.join(INTEGRATORS.names(placement='in_llm'))})")
    return stages


def spread_budget(stages: list[StageSpec], minutes: float) -> None:
    """Give the stages `minutes` of training in all: in proportion to their own budgets when every stage has
    one (a recipe's 2 + 8 minutes stay 1 : 4), else evenly. The app, notebooks and benchmarks all scale a
    recipe's budget this way."""
    own = [s.max_minutes or 0.0 for s in stages]
    proportional = all(own)
    for s, mine in zip(stages, own):
        s.max_minutes = minutes * (mine / sum(own) if proportional else 1 / len(stages))


def _integrator_inside_llm(run: RunConfig) -> bool:
    """Read from the integrator's registration: the placement is declared there once."""
    from .integrators import INTEGRATORS

    return run.model.integrator.name in INTEGRATORS.names(placement="in_llm")
