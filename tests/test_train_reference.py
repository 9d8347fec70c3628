"""script/train-reference: the pure-noise training target, and a smoke run of its stages."""

import importlib.util
import json
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path

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
