"""Why DPM-Solver++-20 gets colours wrong on a small model where DDIM and Euler do not.

    .venv/bin/python docs/reference-model-training/dpm_colour.py [MODEL]      # default weights/tiny-shapes

1. Colour adherence of DPM-Solver++(2M)-20 at guidance 7.5, and the same run with the guidance
   lowered for the last steps only (a diagnostic, not a recipe): if the colour comes back,
   the damage is done in those steps.
2. On fresh renders noised to t, the x0 error of the conditional, unconditional and guided
   (7.5) predictions, and the RMS of cond - uncond, which guidance multiplies by 6.5.
"""

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: E402

from faster_diffusion.quality import shapes  # noqa: E402

torch.set_num_threads(2)
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "weights" / "tiny-shapes"))
pipe.set_progress_bar_config(disable=True)
order = np.random.default_rng(1).permutation(90)
prompts = [shapes.all_captions()[i] for i in order[:60]]


def dpm_colour(late_from: int | None = None, late_guidance: float = 7.5) -> float:
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")

    def lower_guidance(p, i, t, kw):
        if late_from is not None and i + 1 == late_from:
            p._guidance_scale = late_guidance
        return kw

    images = pipe(prompts, num_inference_steps=20, guidance_scale=7.5, output_type="np", callback_on_step_end=lower_guidance,
                  generator=[torch.Generator().manual_seed(500 + i) for i in range(len(prompts))]).images  # fmt: skip
    return float(np.mean([shapes.detect(im).attributes[0] == shapes.parse_caption(p)[0] for im, p in zip(images, prompts)]))


print(f"DPM-Solver++-20, guidance 7.5: colour {dpm_colour():.3f}")
for start, g in ((17, 4.0), (10, 4.0)):
    t = pipe.scheduler.timesteps[start].item()
    print(f"  guidance 7.5, then {g} from step {start} (t={t}): colour {dpm_colour(start, g):.3f}")

rng = np.random.default_rng(3)
images, captions = zip(*[shapes.sample(rng)[:2] for _ in range(64)])
x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
with torch.no_grad():
    latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    cond, uncond = pipe.encode_prompt(list(captions), "cpu", 1, True, [""] * len(captions))
    gen = torch.Generator().manual_seed(0)
    rms = lambda z: z.pow(2).mean().sqrt().item()  # noqa: E731
    print("t    | x0 error: cond  uncond  guided 7.5 | RMS(cond - uncond)")
    for t in (49, 99, 149, 249, 499, 799):
        a = pipe.scheduler.alphas_cumprod[t]
        xt = a.sqrt() * latents + (1 - a).sqrt() * torch.randn(latents.shape, generator=gen)
        steps = torch.full((len(captions),), t)
        x0 = {}
        for name, emb in (("cond", cond), ("uncond", uncond)):
            out = pipe.unet(xt, steps, emb).sample
            v = pipe.scheduler.config.prediction_type == "v_prediction"
            x0[name] = a.sqrt() * xt - (1 - a).sqrt() * out if v else (xt - (1 - a).sqrt() * out) / a.sqrt()
        guided = x0["uncond"] + 7.5 * (x0["cond"] - x0["uncond"])
        print(f"{t:4d} |          {rms(x0['cond'] - latents):.3f}  {rms(x0['uncond'] - latents):.3f}   {rms(guided - latents):.3f}"
              f"      | {rms(x0['cond'] - x0['uncond']):.3f}")
