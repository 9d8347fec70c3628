"""The service's samplers: name (the `scheduler` input) -> diffusers scheduler class and config overrides.

One table for the predictor and script/calibrate, so a shipped calibration is made with
exactly the scheduler (and so the timesteps) that the predictor runs.
"""

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

SCHEDULERS = {
    "DDIM": (DDIMScheduler, {}),
    "DPMSolverMultistep": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "EulerDiscrete": (EulerDiscreteScheduler, {}),
    "EulerAncestralDiscrete": (EulerAncestralDiscreteScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
}


def make_scheduler(name: str, base_config):
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)
