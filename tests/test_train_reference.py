"""script/train-reference: the pure-noise training target, and a smoke run of its stages."""

import importlib.util
import json
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "script" / "train-reference"


def load_script():
    loader = SourceFileLoader("train_reference", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_pure_noise_samples_get_pure_noise_and_the_epsilon_that_maps_it_onto_the_image():
    train = load_script()
    gen = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    alpha_bar = torch.tensor([0.9, 0.3, 0.0047, 0.0047]).view(-1, 1, 1, 1)
    pure = torch.tensor([False, True, False, True])

    noisy, target = train.noisy_input_and_target(lat, noise, alpha_bar, pure)

    # pure samples see exactly the noise; the others the forward process
    torch.testing.assert_close(noisy[pure], noise[pure])
    torch.testing.assert_close(noisy[~pure], (alpha_bar.sqrt() * lat + (1 - alpha_bar).sqrt() * noise)[~pure])
    torch.testing.assert_close(target[~pure], noise[~pure])
    # either way, the sampler's x0 formula recovers the training image from (input, target)
    x0 = (noisy - (1 - alpha_bar).sqrt() * target) / alpha_bar.sqrt()
    torch.testing.assert_close(x0, lat, rtol=1e-4, atol=1e-4)


def test_v_prediction_target_recovers_the_image_even_from_pure_noise():
    train = load_script()
    gen = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    alpha_bar = torch.tensor([0.9, 0.3, 0.0]).view(-1, 1, 1, 1)  # 0: the last step of a zero-terminal-SNR schedule
    pure = torch.zeros(3, dtype=torch.bool)

    noisy, v = train.noisy_input_and_target(lat, noise, alpha_bar, pure, "v_prediction")

    torch.testing.assert_close(noisy, alpha_bar.sqrt() * lat + (1 - alpha_bar).sqrt() * noise)
    torch.testing.assert_close(noisy[2], noise[2])  # pure noise: nothing of the image leaks in
    # the samplers' v formulas: x0 = sqrt(a) x_t - sqrt(1 - a) v, eps = sqrt(1 - a) x_t + sqrt(a) v
    torch.testing.assert_close(alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * v, lat)
    torch.testing.assert_close((1 - alpha_bar).sqrt() * noisy + alpha_bar.sqrt() * v, noise)


def test_guided_loss_is_the_guided_prediction_error_on_selected_samples_only():
    from tiny_pipelines import tiny_text_encoder, tiny_tokenizer, tiny_unet

    train = load_script()
    unet, text_encoder, tok = tiny_unet(), tiny_text_encoder(), tiny_tokenizer()
    ids_null = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    ids_caption = tok(["a red square"] * 4, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(0)
    noisy, target = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 50, 150, 700])
    sel = torch.tensor([True, False, True, False])
    null = text_encoder(ids_null).last_hidden_state.expand(4, -1, -1)
    uncond = unet(noisy, t, null).sample
    cond = unet(noisy, t, text_encoder(ids_caption).last_hidden_state).sample

    loss = train.guided_loss(unet, text_encoder, ids_null, noisy, t, cond, target, sel, 7.5)

    assert loss.shape == (4,) and (loss[~sel] == 0).all()
    guided = uncond + 7.5 * (cond - uncond)
    torch.testing.assert_close(loss[sel], ((guided - target) ** 2).mean((1, 2, 3))[sel] / 7.5**2)
    # where the caption changes nothing, the guided prediction is the plain one (the optimum is unchanged)
    same = train.guided_loss(unet, text_encoder, ids_null, noisy, t, uncond, target, sel, 7.5)
    torch.testing.assert_close(same[sel], ((uncond - target) ** 2).mean((1, 2, 3))[sel] / 7.5**2)
    # and it trains the unconditional branch too, through the null caption
    loss.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in text_encoder.parameters())


def run_script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True, timeout=300)


def test_vae_stage_then_unet_stage_from_it(tmp_path):
    """The two-stage CPU recipe of weights/tiny-shapes, at toy size: VAE first, then --vae-from."""
    tiny = ["--num-images", "64", "--batch", "4", "--vae-batch", "4", "--unet-channels", "16", "16", "16"]
    run_script("--out", str(tmp_path / "vae"), "--minutes", "1", "--vae-steps", "2", "--steps", "1",
               "--vae-channels", "8", "8", "8", "8", *tiny)
    run_script("--out", str(tmp_path / "unet"), "--minutes", "1", "--vae-from", str(tmp_path / "vae"), "--steps", "2",
               "--high-t-frac", "0.5", "--pure-noise-frac", "1", "--pure-noise-min-t", "0", "--x0-weight-max", "5", *tiny)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "unet"))
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 8  # 64 px images, SD's 8x VAE
    vae_stage = StableDiffusionPipeline.from_pretrained(str(tmp_path / "vae"))
    for name, param in vae_stage.vae.state_dict().items():  # the VAE is frozen in the UNet stage
        torch.testing.assert_close(pipe.vae.state_dict()[name], param, rtol=0, atol=0)
    assert pipe.vae.config.scaling_factor == vae_stage.vae.config.scaling_factor
    info = json.loads((tmp_path / "unet" / "training.json").read_text())
    assert info["vae_steps"] == 0 and info["unet_steps"] == 2
    image = pipe("a red square in the center", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_v_prediction_zero_terminal_snr_fine_tune(tmp_path):
    """The last stage of the recipe at toy size: fine-tune to v-prediction on a zero-terminal-SNR schedule."""
    tiny = ["--num-images", "64", "--batch", "4", "--vae-batch", "4", "--unet-channels", "16", "16", "16",
            "--vae-channels", "8", "8", "8", "8"]
    run_script("--out", str(tmp_path / "eps"), "--minutes", "1", "--vae-steps", "1", "--steps", "1", *tiny)
    run_script("--out", str(tmp_path / "v"), "--minutes", "1", "--init-from", str(tmp_path / "eps"), "--steps", "2",
               "--prediction-type", "v_prediction", "--zero-terminal-snr", "--timestep-spacing", "trailing",
               "--low-t-frac", "0.5", "--low-t-max", "300", "--caption-dropout", "0.2", "--guided-weight", "1", *tiny)

    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "v"))
    s = pipe.scheduler.config
    assert (s.prediction_type, s.rescale_betas_zero_snr, s.timestep_spacing) == ("v_prediction", True, "trailing")
    assert pipe.scheduler.alphas_cumprod[-1] == 0  # x_999 is pure noise
    info = json.loads((tmp_path / "v" / "training.json").read_text())
    assert info["unet_steps"] == 2 and info["args"]["prediction_type"] == "v_prediction" and info["args"]["low_t_frac"] == 0.5
    assert info["args"]["guided_weight"] == 1 and info["args"]["guided_t_max"] == 200
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(s, algorithm_type="dpmsolver++")
    image = pipe("a red square in the center", num_inference_steps=3, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--zero-terminal-snr"], "--zero-terminal-snr needs --prediction-type v_prediction"),
        (["--prediction-type", "v_prediction", "--pure-noise-frac", "0.5"], "epsilon-prediction options"),
        (["--prediction-type", "v_prediction", "--x0-weight-max", "5"], "epsilon-prediction options"),
    ],
)
def test_bad_option_combinations_are_refused(tmp_path, args, message):
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x"), *args], capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr
    assert not (tmp_path / "x").exists()  # refused before anything is written
