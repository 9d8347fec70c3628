"""Why DPM-Solver++-20 gets colours wrong on a small model where DDIM and Euler do not.

    .venv/bin/python docs/reference-model-training/dpm_colour.py [MODEL]      # default weights/tiny-shapes
    .venv/bin/python docs/reference-model-training/dpm_colour.py MODEL --variants --reuse --vae VAE_DIR [VAE_DIR ...]

1. Colour adherence of DPM-Solver++(2M)-20 at guidance 7.5, and the same run with the guidance
   lowered for the last steps only (a diagnostic, not a recipe): if the colour comes back,
   the damage is done in those steps.
2. On fresh renders noised to t, the x0 error of the conditional, unconditional and guided
   (7.5) predictions, and the RMS of cond - uncond, which guidance multiplies by 6.5.
3. ``--variants``: colour adherence of other samplers, step counts, guidance scales and
   DPM-Solver and UniPC options on the same 60 captions (the sweep in README.md).
   ``--reuse``: UniPC-20 under faster-diffusion with every step a key step but the ones named,
   to find the steps whose reused encoder features the corrector amplifies.
4. ``--vae DIR ...``: how far apart each VAE puts the six colours (RMS distance of scaled latents
   of the same shape and position, unjittered renders, 3 shapes x left and centre).
"""

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
import faster_diffusion  # noqa: E402
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: E402

from faster_diffusion.quality import shapes  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default=str(ROOT / "weights" / "tiny-shapes"))
parser.add_argument("--variants", action="store_true")
parser.add_argument("--reuse", action="store_true")
parser.add_argument("--vae", nargs="*", default=[])
args = parser.parse_args()
torch.set_num_threads(2)
pipe = StableDiffusionPipeline.from_pretrained(args.model)
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
    v_prediction = pipe.scheduler.config.prediction_type == "v_prediction"
    print("t    | x0 error: cond  uncond  guided 7.5 | RMS(cond - uncond)")
    for t in (49, 99, 149, 249, 499, 799):
        a = pipe.scheduler.alphas_cumprod[t]
        xt = a.sqrt() * latents + (1 - a).sqrt() * torch.randn(latents.shape, generator=gen)
        steps = torch.full((len(captions),), t)
        x0 = {}
        for name, emb in (("cond", cond), ("uncond", uncond)):
            out = pipe.unet(xt, steps, emb).sample
            x0[name] = a.sqrt() * xt - (1 - a).sqrt() * out if v_prediction else (xt - (1 - a).sqrt() * out) / a.sqrt()
        guided = x0["uncond"] + 7.5 * (x0["cond"] - x0["uncond"])
        print(f"{t:4d} |          {rms(x0['cond'] - latents):.3f}  {rms(x0['uncond'] - latents):.3f}   {rms(guided - latents):.3f}"
              f"      | {rms(x0['cond'] - x0['uncond']):.3f}")


def colour_right(scheduler: str, steps: int, guidance: float = 7.5, guidance_rescale: float = 0.0, key_steps=None, **config) -> str:
    """Colour adherence on the 60 captions (and how many images are not finite, if any); with
    ``key_steps``, under faster-diffusion as the service runs it (parallel, noise injection 0.003)."""
    pipe.scheduler = getattr(diffusers, f"{scheduler}Scheduler").from_config(base_config, **config)
    if key_steps is not None:
        faster_diffusion.enable(pipe, key_steps=key_steps, parallel=True, noise_injection=0.003)
    try:
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, guidance_rescale=guidance_rescale, output_type="np",
                      generator=[torch.Generator().manual_seed(500 + i) for i in range(len(prompts))]).images  # fmt: skip
    finally:
        faster_diffusion.disable(pipe)
    bad = int((~np.isfinite(images).reshape(len(images), -1).all(1)).sum())
    images = np.nan_to_num(images)
    right = np.mean([shapes.detect(im).attributes[0] == shapes.parse_caption(p)[0] for im, p in zip(images, prompts)])
    return f"colour {right:.3f}" + (f" ({bad} images not finite)" if bad else "")


base_config = pipe.scheduler.config
if args.variants:
    dpm = {"algorithm_type": "dpmsolver++"}
    for label, run in [
        ("DDIM-20", dict(scheduler="DDIM", steps=20)),
        ("Euler-20", dict(scheduler="EulerDiscrete", steps=20)),
        ("DPM-Solver++-20, first order", dict(scheduler="DPMSolverMultistep", steps=20, solver_order=1, **dpm)),
        ("DPM-Solver++-20, guidance 5", dict(scheduler="DPMSolverMultistep", steps=20, guidance=5.0, **dpm)),
        ("DPM-Solver++-20, guidance 6", dict(scheduler="DPMSolverMultistep", steps=20, guidance=6.0, **dpm)),
        ("DPM-Solver++-20", dict(scheduler="DPMSolverMultistep", steps=20, **dpm)),
        ("DPM-Solver++-20, guidance_rescale 0.7", dict(scheduler="DPMSolverMultistep", steps=20, guidance_rescale=0.7, **dpm)),
        ("DPM-Solver++-20, solver_type heun", dict(scheduler="DPMSolverMultistep", steps=20, solver_type="heun", **dpm)),
        ("DPM-Solver++-20, final_sigmas_type sigma_min", dict(scheduler="DPMSolverMultistep", steps=20, final_sigmas_type="sigma_min", **dpm)),
        ("DPM-Solver++-25", dict(scheduler="DPMSolverMultistep", steps=25, **dpm)),
        ("DPM-Solver++-30", dict(scheduler="DPMSolverMultistep", steps=30, **dpm)),
        ("DPM-Solver++-40", dict(scheduler="DPMSolverMultistep", steps=40, **dpm)),
        ("UniPC-20", dict(scheduler="UniPCMultistep", steps=20)),
        ("UniPC-20, no corrector", dict(scheduler="UniPCMultistep", steps=20, disable_corrector=list(range(20)))),
        ("UniPC-20, no corrector at steps 17-18", dict(scheduler="UniPCMultistep", steps=20, disable_corrector=[17, 18])),
        ("UniPC-20, guidance 5", dict(scheduler="UniPCMultistep", steps=20, guidance=5.0)),
        ("UniPC-30", dict(scheduler="UniPCMultistep", steps=30)),
        ("UniPC-20, solver_type bh1", dict(scheduler="UniPCMultistep", steps=20, solver_type="bh1")),
        ("UniPC-20, solver_type bh1, final_sigmas_type sigma_min",
         dict(scheduler="UniPCMultistep", steps=20, solver_type="bh1", final_sigmas_type="sigma_min")),
    ]:
        print(f"{label}: {colour_right(**run)}", flush=True)
if args.reuse:
    for reused in ([1], [4], [18], [19], [18, 19], [1, 4, 19]):
        keys = [k for k in range(20) if k not in reused]
        print(f"UniPC-20, encoder reused at steps {reused}: {colour_right('UniPCMultistep', 20, key_steps=keys)}", flush=True)

for path in args.vae:
    vae = AutoencoderKL.from_pretrained(path)
    distances = {}
    for shape, position in itertools.product(shapes.SHAPES, ("left", "center")):
        latents = {}
        for colour in shapes.COLOURS:
            x = torch.from_numpy(shapes.render(colour, shape, position, rng=0, jitter=False)).permute(2, 0, 1)[None].float() / 127.5 - 1
            with torch.no_grad():
                latents[colour] = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        for a, b in itertools.combinations(shapes.COLOURS, 2):
            distances.setdefault(f"{a}-{b}", []).append((latents[a] - latents[b]).pow(2).mean().sqrt().item())
    mean = sorted((float(np.mean(d)), pair) for pair, d in distances.items())
    print(f"VAE {path}: closest colours " + ", ".join(f"{pair} {d:.3f}" for d, pair in mean[:3])
          + f"; median pair {float(np.median([d for d, _ in mean])):.3f}")
