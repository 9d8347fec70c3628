"""Encoder propagation across the diffusers UNet family: SD2-style v-prediction, SDXL,
img2img, inpainting, ControlNet (tiny configs built here, random weights)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image
from conftest import difference, features_forecast_at, guidance_reused_at
from tiny_pipelines import (
    SD_SCHEDULER,
    tiny_controlnet_sd,
    tiny_controlnet_sdxl,
    tiny_img2img,
    tiny_inpaint,
    tiny_sd,
    tiny_sdxl,
    tiny_sdxl_img2img,
    tiny_sdxl_inpaint,
)

import faster_diffusion
from faster_diffusion.unet_split import LEVEL_LETTERS, forecast_module

SIZE = 32
IMAGE = Image.fromarray((np.random.RandomState(0).rand(SIZE, SIZE, 3) * 255).astype("uint8"))
MASK = Image.fromarray(np.where(np.arange(SIZE)[None, :] >= SIZE // 2, 255, 0).astype("uint8").repeat(SIZE, 0))


def tiny_sd2():
    pipe = tiny_sd(use_linear_projection=True, attention_head_dim=(2, 4, 8))
    pipe.scheduler = DDIMScheduler(**SD_SCHEDULER, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return pipe


CASES = {
    "sd2-v-prediction": (tiny_sd2, {}, 20),
    "sdxl": (tiny_sdxl, {}, 20),
    "sdxl-denoising-end": (tiny_sdxl, {"denoising_end": 0.6}, 12),
    "img2img": (tiny_img2img, {"image": IMAGE, "strength": 0.6}, 12),
    "inpainting": (tiny_inpaint, {"image": IMAGE, "mask_image": MASK}, 20),
    "controlnet": (tiny_controlnet_sd, {"image": IMAGE}, 20),
    "sdxl-img2img": (tiny_sdxl_img2img, {"image": IMAGE, "strength": 0.6}, 12),
    "sdxl-inpainting": (tiny_sdxl_inpaint, {"image": IMAGE, "mask_image": MASK, "strength": 0.99}, 19),
    "sdxl-controlnet": (tiny_controlnet_sdxl, {"image": IMAGE}, 20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_family(case):
    make, kwargs, loop_steps = CASES[case]
    pipe = make()
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(
            "a red square in the center", num_inference_steps=20, height=SIZE, width=SIZE,
            generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs,
        ).images

    stock = run()
    accel = faster_diffusion.enable(pipe, key_steps="all", noise_injection=0)
    assert difference(run(), stock) <= 1e-6

    accel = faster_diffusion.enable(pipe, key_steps="paper", parallel=False)
    sequential = run()
    sequential_stats = dict(accel.stats)
    accel = faster_diffusion.enable(pipe, key_steps="paper", parallel=True)
    parallel = run()
    assert difference(parallel, sequential) <= 1e-5
    assert difference(parallel, stock) > 1e-4

    # Key steps index the loop's own timesteps: the tail that img2img's strength keeps,
    # the head that SDXL's denoising_end keeps.
    keys = faster_diffusion.key_step_indices("paper", loop_steps)
    assert accel.stats["steps"] == loop_steps and accel.stats["key_steps"] == keys
    assert (accel.stats["encoder_passes"], accel.stats["decoder_passes"]) == (len(keys), loop_steps)
    assert accel.stats["unet_calls"] == len(keys)
    if "controlnet" in case:
        assert sequential_stats["controlnet_passes"] == accel.stats["controlnet_passes"] == len(keys)

    faster_diffusion.disable(pipe)
    assert torch.equal(run(), stock)


def test_controlnet_runs_only_at_key_steps():
    pipe = tiny_controlnet_sd()
    pipe.set_progress_bar_config(disable=True)
    calls = []
    # count executions of a ControlNet layer (a hook on the ControlNet itself sees every call)
    handle = pipe.controlnet.mid_block.register_forward_hook(lambda *a: calls.append(1))
    try:
        faster_diffusion.enable(pipe, key_steps="uniform:5", parallel=False)
        pipe("x", image=IMAGE, num_inference_steps=20, height=SIZE, width=SIZE, output_type="latent")
    finally:
        handle.remove()
    assert len(calls) == 4


def test_inpainting_unet_takes_nine_channels():
    pipe = tiny_inpaint()
    assert pipe.unet.config.in_channels == 9
    accel = faster_diffusion.enable(pipe, key_steps="uniform:4")
    pipe.set_progress_bar_config(disable=True)
    pipe("x", image=IMAGE, mask_image=MASK, num_inference_steps=8, height=SIZE, width=SIZE, output_type="latent")
    assert accel.stats["encoder_passes"] == 2


@pytest.mark.parametrize("letter", ["C", "Y"])
@pytest.mark.parametrize("case", list(CASES))
def test_deep_cfg_steps_in_every_pipeline_family(case, letter):
    """A deep_cfg step runs the prompt's rows alone (SDXL's added conditions, ControlNet residuals and the
    inpainting channels sliced with them) and equals a deep step whose unconditional output is replaced by
    the conditional one less the latest full step's guidance difference. A deep_cfg_forecast step (Y) is that
    with the deep features and the guidance difference extrapolated from the latest two full steps."""
    make, kwargs, loop_steps = CASES[case]
    pipe = make()
    pipe.set_progress_bar_config(disable=True)
    plan = "".join("F" if i % 4 == 0 else letter for i in range(loop_steps))
    def run():
        return pipe(
            "a red square in the center", num_inference_steps=20, height=SIZE, width=SIZE, guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs,
        ).images

    faster_diffusion.enable(pipe, plan=plan.replace(letter, "D"))
    handles = [pipe.unet.register_forward_hook(guidance_reused_at(plan), with_kwargs=True),
               forecast_module(pipe.unet).register_forward_hook(features_forecast_at(plan))]
    try:
        expected = run()
    finally:
        for handle in handles:
            handle.remove()
    accel = faster_diffusion.enable(pipe, plan=plan)
    assert difference(run(), expected) < 1e-4
    assert accel.stats["levels"] == {"full": plan.count("F"), LEVEL_LETTERS[letter]: plan.count(letter)}
    faster_diffusion.disable(pipe)
