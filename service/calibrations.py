"""Calibrations for the service's ``key_steps="auto"``: the prompts, the files, and making one.

A model directory may ship ``calibration/*.json`` (``script/calibrate --weights DIR`` writes
them; the library reads them by itself) and ``calibration/prompts.txt``, one prompt a line,
the prompts to calibrate that model on. Without that file the generic prompts below are used.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

import faster_diffusion

from .schedulers import make_scheduler

#: for models without calibration/prompts.txt: varied subjects, as SD users write them
GENERIC_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a close-up portrait of an old fisherman, detailed skin, 85mm",
    "a cozy living room with a fireplace, interior design magazine",
)
CALIBRATION_SEED = 10_000  # prompt k uses seed CALIBRATION_SEED + k, apart from users' usual small seeds
GUIDANCE_SCALE = 7.5


def calibration_prompts(model_dir) -> list[str]:
    path = Path(model_dir) / faster_diffusion.accelerator.CALIBRATION_DIR / "prompts.txt"
    if path.is_file():
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if prompts:
            return prompts
    return list(GENERIC_PROMPTS)


def file_name(scheduler_name: str, calibration: faster_diffusion.Calibration) -> str:
    return f"{scheduler_name}-{calibration.num_steps}steps-{'x'.join(map(str, calibration.latent_size))}.json"


def seeds(prompts) -> list[int]:
    return [CALIBRATION_SEED + k for k in range(len(prompts))]


@contextlib.contextmanager
def service_scheduler(pipe, scheduler_name: str):
    """The pipeline with the service's scheduler ``scheduler_name``; its own is put back afterwards."""
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler_name, original.config)
    try:
        yield pipe
    finally:
        pipe.scheduler = original


def calibrate(pipe, scheduler_name: str, steps: int, height: int, width: int, prompts) -> faster_diffusion.Calibration:
    """One stock run of ``prompts`` with the service's scheduler ``scheduler_name``, seeds from CALIBRATION_SEED."""
    generators = [torch.Generator().manual_seed(s) for s in seeds(prompts)]
    with service_scheduler(pipe, scheduler_name):
        calibration = faster_diffusion.calibrate(
            pipe, prompts, steps, height=height, width=width, guidance_scale=GUIDANCE_SCALE, generator=generators
        )
    calibration.info["service_scheduler"] = scheduler_name
    calibration.info["seeds"] = seeds(prompts)
    return calibration


def refine(pipe, calibration, scheduler_name: str, budget: int, height: int, width: int, prompts):
    """``faster_diffusion.refine`` on the calibration prompts and seeds, with the service's scheduler."""
    with service_scheduler(pipe, scheduler_name):
        return faster_diffusion.refine(
            pipe, calibration, budget, prompts, seeds=seeds(prompts), height=height, width=width, guidance_scale=GUIDANCE_SCALE
        )


def validate(pipe, calibration, scheduler_name: str, height: int, width: int, prompts):
    """``faster_diffusion.validate`` on the calibration prompts and seeds, with the service's scheduler."""
    with service_scheduler(pipe, scheduler_name):
        return faster_diffusion.validate(
            pipe, calibration, prompts, seeds=seeds(prompts), height=height, width=width, guidance_scale=GUIDANCE_SCALE
        )
