"""Calibrations for the service's ``key_steps="auto"``: the prompts, the files, and making one.

A model directory may ship ``calibration/*.json`` (``script/calibrate --weights DIR`` writes
them; the library reads them by itself) and ``calibration/prompts.txt``, one prompt a line,
the prompts to calibrate that model on. Without that file the generic prompts below are used.
"""

from __future__ import annotations

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
    h, w = calibration.latent_size
    return f"{scheduler_name}-{calibration.num_steps}steps-{h}x{w}.json"


def calibrate(pipe, scheduler_name: str, steps: int, height: int, width: int, prompts) -> faster_diffusion.Calibration:
    """One stock run of ``prompts`` with the service's scheduler ``scheduler_name`` (the pipeline's own
    scheduler is put back afterwards)."""
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler_name, original.config)
    try:
        generators = [torch.Generator().manual_seed(CALIBRATION_SEED + k) for k in range(len(prompts))]
        calibration = faster_diffusion.calibrate(
            pipe, prompts, steps, height=height, width=width, guidance_scale=GUIDANCE_SCALE, generator=generators
        )
    finally:
        pipe.scheduler = original
    calibration.info["service_scheduler"] = scheduler_name
    calibration.info["seeds"] = [CALIBRATION_SEED + k for k in range(len(prompts))]
    return calibration


def refine(pipe, calibration, scheduler_name: str, budget: int, height: int, width: int, prompts):
    """``faster_diffusion.refine`` on the calibration prompts and seeds, with the service's scheduler."""
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(scheduler_name, original.config)
    try:
        return faster_diffusion.refine(
            pipe, calibration, budget, prompts, seeds=[CALIBRATION_SEED + k for k in range(len(prompts))],
            height=height, width=width, guidance_scale=GUIDANCE_SCALE,
        )
    finally:
        pipe.scheduler = original
