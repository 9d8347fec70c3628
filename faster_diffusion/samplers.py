"""The samplers the project names: one table for the service, the benchmarks, the quality harness and the tests.

Each sampler is a diffusers scheduler class plus the config overrides that make it the sampler
its name says, built on a model's own scheduler config (its betas, prediction type and timestep
spacing) with ``make_scheduler(name, base_config)``. ``name`` is the service's ``scheduler``
input; the short aliases are what the benchmark and quality command lines (and their result
files) use.

Flow-matching models (Flux, SD3) have their own table, ``FLOW_SAMPLERS``, built with
``make_flow_scheduler(name, base_config)`` on the model's ``FlowMatchEulerDiscreteScheduler`` config:
its short aliases (``euler``, ``unipc``, ``dpm``) are the quality harness's for FluxPipeline models
and would clash with the table above, so they are looked up there only (``flow_sampler``). Its
canonical names also work with ``make_scheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
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
    """A fresh scheduler of sampler ``name`` on ``base_config`` (a model's scheduler config, or a dict); a flow
    sampler's canonical name (``FLOW_SAMPLERS``) builds it with ``make_flow_scheduler``."""
    if name in FLOW_SAMPLERS:
        return make_flow_scheduler(name, base_config)
    entry = sampler(name)
    return entry.scheduler_class.from_config(base_config, **entry.overrides)


#: Flow-matching samplers FluxPipeline and StableDiffusion3Pipeline can drive, on the model's sigmas.
#: ``FlowMatchEuler`` is the model's own ``FlowMatchEulerDiscreteScheduler``; the multistep solvers are configured
#: for flow by ``make_flow_scheduler`` (their ``overrides`` pick the variant). FlowMatchHeunDiscreteScheduler is
#: not offered: its ``set_timesteps`` takes no ``sigmas``, which FluxPipeline always passes.
FLOW_SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("FlowMatchEuler", "FlowMatch Euler", FlowMatchEulerDiscreteScheduler, {}, ("euler",)),
        Sampler("FlowUniPC", "UniPC (flow)", UniPCMultistepScheduler, {}, ("unipc",)),
        Sampler(
            "FlowDPMSolverMultistep", "DPM-Solver++ (flow)", DPMSolverMultistepScheduler,
            {"algorithm_type": "dpmsolver++", "solver_order": 2}, ("dpm",),
        ),
    )
}
_FLOW_BY_ALIAS = {alias: s for s in FLOW_SAMPLERS.values() for alias in (s.name, *s.aliases)}
#: the model's dynamic-shifting entries, copied onto a flow solver's config (FluxPipeline computes ``mu`` from them)
_SHIFT_KEYS = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")


def flow_sampler(name: str) -> Sampler:
    """``FLOW_SAMPLERS``' entry for ``name`` (its name or an alias); ValueError naming the known ones otherwise."""
    try:
        return _FLOW_BY_ALIAS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown flow sampler {name!r}; known: {', '.join(_FLOW_BY_ALIAS)}") from None


def make_flow_scheduler(name: str, base_config):
    """A fresh flow-matching scheduler of sampler ``name`` on ``base_config``, a flow model's scheduler config.

    ``FlowMatchEuler`` is built from the config itself. The multistep solvers are configured for flow
    (``use_flow_sigmas``, ``prediction_type="flow_prediction"``; FluxPipeline then lets them space their own
    sigmas) with the model's shift and dynamic shifting: FluxPipeline computes ``mu`` from the scheduler's
    ``base_image_seq_len`` / ``max_image_seq_len`` / ``base_shift`` / ``max_shift`` (Flux's defaults when absent),
    so the model's values are registered on the new scheduler's config too, and the shift is the model's own
    (exp(mu) = 1 at 64 px for weights/tiny-shapes-flux). A FluxPipeline model without dynamic shifting cannot run
    ``FlowDPMSolverMultistep``: FluxPipeline always passes ``mu``, which that solver takes only with it.
    """
    entry = flow_sampler(name)
    if entry.scheduler_class is FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler.from_config(base_config)
    own = base_config
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=float(own.get("shift", 1.0)),
                use_dynamic_shifting=bool(own.get("use_dynamic_shifting", False)), time_shift_type="exponential",
                num_train_timesteps=1000)
    scheduler = entry.scheduler_class(**entry.overrides, **flow)
    scheduler.register_to_config(**{k: own[k] for k in _SHIFT_KEYS if k in own})
    return scheduler
