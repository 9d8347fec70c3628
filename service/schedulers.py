"""The service's samplers: the names the `scheduler` input offers.

The table itself (name -> diffusers scheduler class and config overrides) is
``faster_diffusion.samplers``, shared with script/calibrate, bench/ and the quality
harness, so a shipped calibration is made with exactly the scheduler (and so the
timesteps) that the predictor runs.
"""

from faster_diffusion.samplers import make_scheduler

#: the `scheduler` input's choices, in the order the schema lists them
SCHEDULERS = ("DDIM", "DPMSolverMultistep", "EulerDiscrete", "EulerAncestralDiscrete", "UniPC", "PNDM")

__all__ = ["SCHEDULERS", "make_scheduler"]
