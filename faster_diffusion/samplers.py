"""The samplers the project names: one table for the service, the benchmarks, the quality harness and the tests.

Each sampler is a diffusers scheduler class plus the config overrides that make it the sampler
its name says, built on a model's own scheduler config (its betas, prediction type and timestep
spacing) with ``make_scheduler(name, base_config)``. ``name`` is the service's ``scheduler``
input; the short aliases are what the benchmark and quality command lines (and their result
files) use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)


@dataclass(frozen=True)
class Sampler:
    name: str  # the service's `scheduler` input, and the canonical key of SAMPLERS
    label: str  # for tables, logs and figures
    scheduler_class: type
    overrides: dict = field(default_factory=dict)  # config entries that select the variant
    aliases: tuple[str, ...] = ()  # short names on the command lines of bench/ and the quality harness


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("DDIM", "DDIM", DDIMScheduler, {}, ("ddim",)),
        Sampler(
            "DPMSolverMultistep", "DPM-Solver++", DPMSolverMultistepScheduler,
            {"algorithm_type": "dpmsolver++"}, ("dpmpp", "dpm", "dpmsolver++"),
        ),
        Sampler(
            "DPMSolver", "DPM-Solver", DPMSolverMultistepScheduler,
            {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, ("dpmsolver",),
        ),
        Sampler("EulerDiscrete", "Euler", EulerDiscreteScheduler, {}, ("euler",)),
        Sampler("EulerAncestralDiscrete", "Euler ancestral", EulerAncestralDiscreteScheduler, {}, ("euler_ancestral", "euler_a")),
        Sampler("UniPC", "UniPC", UniPCMultistepScheduler, {}, ("unipc",)),
        Sampler("PNDM", "PNDM", PNDMScheduler, {"skip_prk_steps": True}, ("pndm",)),
        Sampler("LMSDiscrete", "LMS", LMSDiscreteScheduler, {}, ("lms",)),
    )
}
_BY_ALIAS = {alias: s for s in SAMPLERS.values() for alias in (s.name, *s.aliases)}


def sampler(name: str) -> Sampler:
    """The table's entry for ``name`` (its name or an alias); ValueError naming the known ones otherwise."""
    try:
        return _BY_ALIAS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(_BY_ALIAS)}") from None


def make_scheduler(name: str, base_config):
    """A fresh scheduler of sampler ``name`` on ``base_config`` (a model's scheduler config, or a dict)."""
    entry = sampler(name)
    return entry.scheduler_class.from_config(base_config, **entry.overrides)
