"""First use of a setting: is a derived calibration as faithful as a dedicated one? (the service's key_steps=auto)

For each (sampler, steps, size) that the model does not ship a calibration for, on the quality
harness's prompt set and seeds (``faster_diffusion.quality.evaluate.prompt_set``), this samples

* stock (the fidelity reference),
* ``auto`` from the calibration the service derives on first use (``service.calibrations.derive``
  from the nearest shipped calibration: no stock run),
* ``auto`` from a dedicated calibration of that setting (``service.calibrations.calibrate`` +
  ``validate`` on the model's calibration prompts, what ``script/calibrate`` would ship),

and reports each one's PSNR to stock (``evaluate.fidelity``), adherence (``shapes.detect``, at the
model's native size) and encoder passes.

    python bench/first_use.py --num-prompts 50 --seeds 1 --out bench/results/first_use_cpu_tiny_shapes.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

def _nearest(calibrations, shipped, cls, timesteps, latent):
    """What the service does: derive from the nearest calibrated run."""
    return calibrations.derive(calibrations.nearest(shipped, cls, timesteps, latent), timesteps, latent)


def _finer(calibrations, shipped, cls, timesteps, latent):
    """Derive from the nearest calibrated run with at least as many steps (else the nearest)."""
    finer = [c for c in shipped if c.num_steps >= len(timesteps)]
    source = calibrations.nearest(finer, cls, timesteps, latent) or calibrations.nearest(shipped, cls, timesteps, latent)
    return calibrations.derive(source, timesteps, latent)


def _scaled(calibrations, shipped, cls, timesteps, latent):
    """The nearest run's share of encoder passes, placed at the least interpolated reuse cost."""
    import math

    source = calibrations.nearest(shipped, cls, timesteps, latent)
    derived = calibrations.derive(source, timesteps, latent)
    budget = min(len(timesteps), math.ceil(len(source.schedule()) * len(timesteps) / source.num_steps))
    derived.validated = derived.least_cost_schedule(budget)
    return derived


def _from_ddim(calibrations, shipped, cls, timesteps, latent):
    """Another sampler's calibration: the nearest DDIM run's, mapped by timestep."""
    ddim = [c for c in shipped if c.scheduler == "DDIMScheduler"]
    source = calibrations.nearest(ddim, "DDIMScheduler", timesteps, latent)
    derived = calibrations.derive(source, timesteps, latent)
    derived.scheduler = cls
    return derived


VARIANTS = {"nearest": _nearest, "finer": _finer, "scaled": _scaled, "from-ddim": _from_ddim}
EXAMPLES = ("DDIM:35:64", "DPMSolverMultistep:15:64", "EulerDiscrete:40:64", "UniPC:30:64", "DDIM:50:96")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=common.ROOT / "weights" / "tiny-shapes")
    ap.add_argument("--examples", default=",".join(EXAMPLES), help="comma-separated SAMPLER:STEPS:SIZE")
    ap.add_argument("--num-prompts", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the results here (JSON) and a .md beside it")
    ap.add_argument("--variants", default="nearest", help="comma-separated derivations to compare: " + ", ".join(VARIANTS))
    ap.add_argument("--dedicated-dir", type=Path, default=None, help="keep / reuse the dedicated calibrations here")
    args = ap.parse_args(argv)

    import torch

    import faster_diffusion
    from faster_diffusion.calibration import shipped_calibrations
    from faster_diffusion.quality import shapes
    from faster_diffusion.quality.evaluate import GUIDANCE, fidelity, prompt_set
    from service import calibrations
    from service.schedulers import make_scheduler
    from service.weights import load_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.weights)
    base = pipe.scheduler.config
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    shipped = shipped_calibrations(args.weights)
    prompts = calibrations.calibration_prompts(args.weights)
    items = prompt_set(args.num_prompts, args.seeds)
    targets = [shapes.parse_caption(p) for p, _ in items]

    def sample(name, steps, size, calibration):
        pipe.scheduler = make_scheduler(name, base)
        if calibration is None:
            faster_diffusion.disable(pipe)
        else:
            faster_diffusion.enable(pipe, key_steps="auto", calibration=[calibration])
        out, started = [], time.perf_counter()
        for i in range(0, len(items), args.batch_size):
            chunk = items[i : i + args.batch_size]
            images = pipe(
                [p for p, _ in chunk], num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                generator=[torch.Generator().manual_seed(s) for _, s in chunk], output_type="np",
            ).images
            out.append(images)
        faster_diffusion.disable(pipe)
        return np.concatenate(out).astype(np.float32), time.perf_counter() - started

    def adherence(images, size):
        if size != native:
            return None
        return shapes.score([shapes.detect(img) for img in images], targets)["all"]

    rows = []
    for spec in args.examples.split(","):
        name, steps, size = spec.split(":")
        steps, size = int(steps), int(size)
        scheduler = make_scheduler(name, base)
        scheduler.set_timesteps(steps)
        latent = (size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        cls = type(scheduler).__name__
        if any(c.matches(cls, scheduler.timesteps, latent) for c in shipped):
            print(f"{spec}: shipped, skipped")
            continue
        variants = {v: VARIANTS[v](calibrations, shipped, cls, scheduler.timesteps, latent) for v in args.variants.split(",")}
        derived = variants[args.variants.split(",")[0]]
        t0 = time.perf_counter()
        saved = None if args.dedicated_dir is None else args.dedicated_dir / f"{name}-{steps}-{size}.json"
        if saved is not None and saved.is_file():
            dedicated = faster_diffusion.Calibration.load(saved)
        else:
            dedicated = calibrations.calibrate(pipe, name, steps, size, size, prompts, base)
            calibrations.validate(pipe, dedicated, name, size, size, prompts, base)
            if saved is not None:
                dedicated.save(saved)
        dedicated_s = time.perf_counter() - t0
        stock, stock_s = sample(name, steps, size, None)
        row = {"setting": spec, "derived_from": derived.info["derived_from"],
               "dedicated_calibration_s": round(dedicated_s, 1), "stock_s": round(stock_s, 1),
               "stock_adherence": adherence(stock, size)}  # fmt: skip
        for label, calibration in (*variants.items(), ("dedicated", dedicated)):
            images, seconds = sample(name, steps, size, calibration)
            psnr, ssim, same = fidelity(stock, images)
            row[label] = {"key_steps": calibration.schedule(), "encoder_passes": len(calibration.schedule()),
                          "psnr_to_stock": round(psnr, 2), "ssim": None if ssim is None else round(ssim, 4),
                          "adherence": adherence(images, size), "seconds": round(seconds, 1)}  # fmt: skip
        row["derived"] = row[args.variants.split(",")[0]]
        row["psnr_gap_db"] = round(row["dedicated"]["psnr_to_stock"] - row["derived"]["psnr_to_stock"], 2)
        print(row, flush=True)
        rows.append(row)

    result = {"environment": common.environment(), "num_images": len(items), "weights": str(args.weights),
              "examples": rows}  # fmt: skip
    if args.out is not None:
        common.write_json(args.out, result)
        table = common.markdown_table(
            ["setting", "derived from", "passes derived / dedicated", "PSNR to stock derived / dedicated (dB)", "gap (dB)",
             "adherence stock / derived / dedicated"],
            [[r["setting"], r["derived_from"], f"{r['derived']['encoder_passes']} / {r['dedicated']['encoder_passes']}",
              f"{r['derived']['psnr_to_stock']} / {r['dedicated']['psnr_to_stock']}", r["psnr_gap_db"],
              " / ".join("-" if a is None else f"{100 * a:.0f}%" for a in
                         (r["stock_adherence"], r["derived"]["adherence"], r["dedicated"]["adherence"]))]
             for r in rows],
        )  # fmt: skip
        args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
