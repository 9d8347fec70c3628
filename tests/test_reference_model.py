"""The bundled reference model weights/tiny-shapes: offline loading, real SD classes, size, one sample."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from faster_diffusion.quality import shapes

MODEL = Path(__file__).resolve().parent.parent / "weights" / "tiny-shapes"
SEED = 0  # generator seed of the sample tests (DDIM-20 and DPM-Solver++-20, guidance 7.5)

pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="weights/tiny-shapes missing")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        p = StableDiffusionPipeline.from_pretrained(str(MODEL))
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    p.set_progress_bar_config(disable=True)
    return p


def test_folder_size_at_most_25mb():
    total = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert total <= 25 * 1024 * 1024, total
    assert list(MODEL.rglob("*.safetensors")) and not list(MODEL.rglob("*.bin"))


def test_real_classes_and_sd_layout(pipe):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    u = pipe.unet.config
    levels = len(u.block_out_channels)  # SD1.5's layout: attention at every level but the lowest
    assert levels >= 3
    assert tuple(u.down_block_types) == ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    assert u.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert tuple(u.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    assert u.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.latent_channels == u.in_channels == 4
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    s = pipe.scheduler.config
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)
    assert (s.steps_offset, s.clip_sample, s.set_alpha_to_one) == (1, False, False)
    # SD2.x-style v-prediction on a zero-terminal-SNR schedule sampled from t=999 (Lin et al. 2024)
    assert (s.prediction_type, s.rescale_betas_zero_snr, s.timestep_spacing) == ("v_prediction", True, "trailing")
    # the caption words are whole tokens of the CLIP-format BPE vocabulary
    ids = pipe.tokenizer("a red square in the center").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id and len(ids) == 8


@pytest.mark.parametrize("sampler", ["DDIM", "DPMSolverMultistep"])
def test_red_square_in_the_center(pipe, sampler):
    import diffusers

    scheduler = getattr(diffusers, f"{sampler}Scheduler").from_config(pipe.scheduler.config)
    stock = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        images = [
            pipe("a red square in the center", num_inference_steps=20, guidance_scale=7.5, output_type="np",
                 generator=torch.Generator().manual_seed(SEED)).images[0]
            for _ in range(2)
        ]
    finally:
        pipe.scheduler = stock
    assert images[0].shape == (64, 64, 3)
    assert shapes.detect(images[0]).attributes == ("red", "square", "center")
    assert np.array_equal(images[0], images[1])  # deterministic for a fixed generator


def test_service_defaults_draw_the_readme_prompt(pipe):
    """The README's first command at its defaults: DDIM-50, guidance 7.5, key_steps="auto" from the shipped
    calibration, parallel decoders, noise injection 0.003; seeds 0-9 must all draw what the prompt says."""
    import faster_diffusion

    prompt, seeds = "a blue circle on the left", range(10)
    accel = faster_diffusion.enable(pipe, key_steps="auto", parallel=True, noise_injection=0.003)
    try:
        images = pipe([prompt] * len(seeds), num_inference_steps=50, guidance_scale=7.5, output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images  # fmt: skip
    finally:
        faster_diffusion.disable(pipe)
    assert accel.stats["schedule_source"].startswith("auto from file") and accel.stats["encoder_passes"] <= 50 // 3  # a real speed-up
    read = [shapes.detect(image).attributes for image in images]
    assert read == [("blue", "circle", "left")] * len(seeds), read
