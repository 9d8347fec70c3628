"""Which reused steps turn the bundled model's red squares another colour under faster-diffusion?

16 seeds of "a red square in the center", DDIM-50, guidance 7.5, no noise injection; prints how
many come out red for schedules that reuse encoder features only in some steps. Then, on the
stock latents: how far (relative L2) the mid-block output has moved from the paper schedule's
last key step by the last step, and the PSNR of decoding them with Gaussian noise of 0.1 x
their std added (how strongly the VAE turns latent errors into pixel errors).

    .venv/bin/python docs/reference-model-training/colour_drift.py [MODEL_DIR]
"""

import sys

import torch
from diffusers import StableDiffusionPipeline

import faster_diffusion
from faster_diffusion.quality import shapes
from vae_sensitivity import latent_noise_psnr  # this folder (the script's own directory is on sys.path)

PROMPT, SEEDS, STEPS = "a red square in the center", 16, 50


def red_count(pipe, key_steps) -> int:
    faster_diffusion.enable(pipe, key_steps=key_steps, noise_injection=0)
    try:
        gens = [torch.Generator().manual_seed(s) for s in range(SEEDS)]
        images = pipe([PROMPT] * SEEDS, num_inference_steps=STEPS, guidance_scale=7.5, generator=gens, output_type="np").images
    finally:
        faster_diffusion.disable(pipe)
    return sum(shapes.detect(image).attributes.colour == "red" for image in images)


@torch.no_grad()
def staleness_and_vae_sensitivity(pipe, paper) -> tuple[float, float]:
    mid = []
    hook = pipe.unet.mid_block.register_forward_hook(lambda module, args, out: mid.append(out))
    gens = [torch.Generator().manual_seed(s) for s in range(SEEDS)]
    latents = pipe([PROMPT] * SEEDS, num_inference_steps=STEPS, guidance_scale=7.5, generator=gens, output_type="latent").images
    hook.remove()
    staleness = ((mid[-1] - mid[paper[-1]]).norm() / mid[-1].norm()).item()
    return staleness, latent_noise_psnr(pipe.vae, latents / pipe.vae.config.scaling_factor)[0]


def main() -> None:
    pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else "weights/tiny-shapes")
    pipe.set_progress_bar_config(disable=True)
    paper = faster_diffusion.key_step_indices("paper", STEPS)
    schedules = {
        "all steps (stock UNet calls)": list(range(STEPS)),
        "paper": paper,
        "paper before step 20, all from 20": [k for k in paper if k < 20] + list(range(20, STEPS)),
        "all before step 20, paper from 20": list(range(20)) + [k for k in paper if k >= 20],
        "reuse only in steps 6-9": [k for k in range(STEPS) if k not in (6, 7, 8, 9)],
        "reuse only in steps 36-49": list(range(36)),
    }
    for name, key_steps in schedules.items():
        print(f"{name:36s} red {red_count(pipe, key_steps):2d}/{SEEDS}", flush=True)
    staleness, psnr = staleness_and_vae_sensitivity(pipe, paper)
    print(f"mid-block output at step {STEPS - 1} vs step {paper[-1]}: relative L2 {staleness:.2f}")
    print(f"VAE decode with latent noise 0.1 x std: PSNR {psnr:.1f} dB vs the clean decode")


if __name__ == "__main__":
    main()
