"""The service's samplers: the names the `scheduler` input offers.

The table itself (name -> diffusers scheduler class and config overrides) is
``faster_diffusion.samplers``, shared with script/calibrate, bench/ and the quality
harness, so a shipped calibration is made with exactly the scheduler (and so the
timesteps) that the predictor runs. Stable Diffusion weights take ``SCHEDULERS``; flow-matching
weights (Flux, SD3) take ``FLOW_SCHEDULERS``, those of them their pipeline can drive (``flow_schedulers``).
"""

from faster_diffusion.samplers import FLOW_SAMPLERS, make_scheduler

#: the `scheduler` input's choices for Stable Diffusion weights, in the order the schema lists them
SCHEDULERS = ("DDIM", "DPMSolverMultistep", "EulerDiscrete", "EulerAncestralDiscrete", "UniPC", "PNDM")
#: the `scheduler` input's choices for flow-matching weights (FluxPipeline, StableDiffusion3Pipeline); the first is
#: their default, the weights' own FlowMatchEulerDiscreteScheduler
FLOW_SCHEDULERS = tuple(FLOW_SAMPLERS)


def flow_schedulers(pipe) -> dict:
    """name -> scheduler, for the flow samplers ``pipe`` can drive, built on its own scheduler's config.

    FluxPipeline passes ``mu`` (its resolution-dependent shift) to every scheduler's ``set_timesteps``, and
    StableDiffusion3Pipeline does where the weights' scheduler shifts dynamically; a solver that takes ``mu``
    only with dynamic shifting (DPM-Solver++) cannot run on weights without it, so it is left out."""
    from diffusers import FluxPipeline

    passes_mu = isinstance(pipe, FluxPipeline) or bool(pipe.scheduler.config.get("use_dynamic_shifting", False))
    usable = {}
    for name in FLOW_SCHEDULERS:
        scheduler = make_scheduler(name, pipe.scheduler.config)
        try:
            make_scheduler(name, pipe.scheduler.config).set_timesteps(4, **({"mu": 0.0} if passes_mu else {}))
        except (AssertionError, ValueError, TypeError):
            continue
        usable[name] = scheduler
    return usable


__all__ = ["SCHEDULERS", "FLOW_SCHEDULERS", "flow_schedulers", "make_scheduler"]
