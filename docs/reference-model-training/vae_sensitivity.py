"""How strongly a VAE turns latent errors into pixel errors, on 64 fresh renders.

Prints each VAE's reconstruction error and the PSNR between the decodes of clean latents and
latents with Gaussian noise of 0.1 x their std added.

    .venv/bin/python docs/reference-model-training/vae_sensitivity.py MODEL_DIR [MODEL_DIR ...]
"""

import sys

import numpy as np
import torch
from diffusers import AutoencoderKL

from faster_diffusion.quality import shapes


@torch.no_grad()
def latent_noise_psnr(vae, latents) -> tuple[float, torch.Tensor]:
    """Mean PSNR (images in [0, 1]) of decoding ``latents`` (unscaled) with noise 0.1 x their std
    added, against decoding them clean; also returns the clean decode, in [-1, 1]."""
    clean = vae.decode(latents).sample.clamp(-1, 1)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    noisy = vae.decode(latents + 0.1 * latents.std() * noise).sample.clamp(-1, 1)
    return (10 * torch.log10(1 / ((noisy - clean) / 2).pow(2).mean((1, 2, 3)))).mean().item(), clean


@torch.no_grad()
def main() -> None:
    rng = np.random.default_rng(123)
    renders = np.stack([shapes.sample(rng)[0] for _ in range(64)])
    x = torch.from_numpy(renders).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    for path in sys.argv[1:]:
        vae = AutoencoderKL.from_pretrained(f"{path}/vae")
        psnr, clean = latent_noise_psnr(vae, vae.encode(x).latent_dist.mode())
        mae = ((clean - x).abs().mean() * 127.5).item()
        print(f"{path}: reconstruction MAE {mae:.2f}/255, latent noise 0.1 x std -> PSNR {psnr:.1f} dB")


if __name__ == "__main__":
    main()
