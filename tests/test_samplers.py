"""The one sampler table: every name and alias builds the scheduler it says, on the model's own config."""

import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from faster_diffusion.samplers import SAMPLERS, make_scheduler, sampler
from service.schedulers import SCHEDULERS

BASE = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing").config


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_keeps_the_models_noise_schedule(name):
    scheduler = make_scheduler(name, BASE)
    assert isinstance(scheduler, SAMPLERS[name].scheduler_class)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.timestep_spacing == "trailing"
    for key, value in SAMPLERS[name].overrides.items():
        assert scheduler.config[key] == value


def test_aliases_name_the_same_sampler():
    assert sampler("dpmpp") is sampler("dpm") is sampler("DPMSolverMultistep")
    assert make_scheduler("dpmpp", BASE).config.algorithm_type == "dpmsolver++"
    assert make_scheduler("dpmsolver", BASE).config.algorithm_type == "dpmsolver"
    assert isinstance(make_scheduler("pndm", BASE), PNDMScheduler) and make_scheduler("pndm", BASE).config.skip_prk_steps
    assert isinstance(make_scheduler("DPMSolverMultistep", BASE), DPMSolverMultistepScheduler)


def test_unknown_sampler_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown sampler 'heun'; known: DDIM, ddim, DPMSolverMultistep"):
        make_scheduler("heun", BASE)


def test_service_choices_are_in_the_table():
    assert set(SCHEDULERS) <= set(SAMPLERS)
