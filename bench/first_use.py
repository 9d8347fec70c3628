"""First use of a setting: is a derived calibration as faithful as a dedicated one? (the service's key_steps=auto or plan=auto)

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

With ``--plan``, the same for ``plan="auto"`` (the service's default): the derived calibration is the
one the service plans with (``service.calibrations.nearest`` among the calibrations with an error
model, then ``derive``: the error model resampled by timestep, or kept at another size); the dedicated
one is made with ``plans=True`` and ``validate_plan``; a setting shipped without an error model also
runs ``shipped`` (that calibration: encoder propagation at its ``auto`` key steps). Batch 1 (the plan is
chosen for the call's batch), with each row's plan, predicted and FLOP speed-up.

    python bench/first_use.py --plan --batch-size 1 --threads 1 --out bench/results/first_use_plans_cpu_tiny_shapes.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

def percent(share) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


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
PLAN_EXAMPLES = ("DDIM:35:64", "DPMSolverMultistep:15:64", "EulerDiscrete:40:64", "UniPC:30:64", "DDIM:50:96", "DPMSolverMultistep:20:96")
EXAMPLES = ("DDIM:35:64", "DPMSolverMultistep:15:64", "EulerDiscrete:40:64", "UniPC:30:64", "DDIM:50:96")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=common.ROOT / "weights" / "tiny-shapes")
    ap.add_argument("--examples", default=None, help="comma-separated SAMPLER:STEPS:SIZE (default: a set for each mode)")
    ap.add_argument("--plan", action="store_true", help='plan="auto" instead of key_steps="auto"')
    ap.add_argument("--num-prompts", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the results here (JSON) and a .md beside it")
    ap.add_argument("--variants", default="nearest", help="comma-separated derivations to compare: " + ", ".join(VARIANTS))
    ap.add_argument("--dedicated-dir", type=Path, default=None, help="keep / reuse the dedicated calibrations here")
    args = ap.parse_args(argv)
    args.examples = args.examples or ",".join(PLAN_EXAMPLES if args.plan else EXAMPLES)

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
        """Images of ``items``, seconds, and the accelerator's stats of the last call (None for stock)."""
        pipe.scheduler = make_scheduler(name, base)
        schedule = {"plan": "auto"} if args.plan else {"key_steps": "auto"}
        accel = None if calibration is None else faster_diffusion.enable(pipe, **schedule, calibration=[calibration])

        def call(chunk):
            return pipe(
                [p for p, _ in chunk], num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
                generator=[torch.Generator().manual_seed(s) for _, s in chunk], output_type="np",
            ).images

        call(items[: args.batch_size])  # untimed: a plan's first call at a size measures the device's cost model
        out, started = [], time.perf_counter()
        for i in range(0, len(items), args.batch_size):
            out.append(call(items[i : i + args.batch_size]))
        stats = None if accel is None else dict(accel.stats)
        faster_diffusion.disable(pipe)
        return np.concatenate(out).astype(np.float32), time.perf_counter() - started, stats

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
        exact = [c for c in shipped if c.matches(cls, scheduler.timesteps, latent)]
        if exact and (not args.plan or exact[0].error_model is not None):
            print(f"{spec}: shipped, skipped")
            continue
        sources = [c for c in shipped if c.error_model is not None] if args.plan else shipped  # what the service plans from
        variants = {v: VARIANTS[v](calibrations, sources, cls, scheduler.timesteps, latent) for v in args.variants.split(",")}
        derived = variants[args.variants.split(",")[0]]
        if exact:  # shipped without an error model: the plan falls back to encoder propagation on it
            variants["shipped"] = exact[0]
        t0 = time.perf_counter()
        saved = None if args.dedicated_dir is None else args.dedicated_dir / f"{name}-{steps}-{size}{'-plans' if args.plan else ''}.json"
        if saved is not None and saved.is_file():
            dedicated = faster_diffusion.Calibration.load(saved)
        else:
            dedicated = calibrations.calibrate(pipe, name, steps, size, size, prompts, base, plans=args.plan)
            calibrations.validate(pipe, dedicated, name, size, size, prompts, base)
            if saved is not None:
                dedicated.save(saved)
        dedicated_s = time.perf_counter() - t0
        stock, stock_s, _ = sample(name, steps, size, None)
        row = {"setting": spec, "derived_from": derived.info["derived_from"],
               "dedicated_calibration_s": round(dedicated_s, 1), "stock_s": round(stock_s, 1),
               "stock_adherence": adherence(stock, size)}  # fmt: skip
        for label, calibration in (*variants.items(), ("dedicated", dedicated)):
            images, seconds, stats = sample(name, steps, size, calibration)
            psnr, ssim, same = fidelity(stock, images)
            row[label] = {"key_steps": calibration.schedule(), "encoder_passes": len(calibration.schedule()),
                          "psnr_to_stock": round(psnr, 2), "ssim": None if ssim is None else round(ssim, 4),
                          "adherence": adherence(images, size), "seconds": round(seconds, 1)}  # fmt: skip
            if args.plan:
                flops = stats.get("unet_flops")  # with a cost model (a plan chosen by the planner)
                row[label].update(plan=stats["plan"], full_steps=stats["plan"].count("F"), schedule_source=stats["schedule_source"],
                                  predicted_speedup=stats.get("predicted_speedup"), measured_speedup=stats.get("measured_speedup"),
                                  unet_flop_speedup=round(stats["stock_unet_flops"] / flops, 2) if flops else None,
                                  time_speedup=round(stock_s / seconds, 2))  # fmt: skip
            print(spec, label, row[label], flush=True)
        row["derived"] = row[args.variants.split(",")[0]]
        row["psnr_gap_db"] = round(row["dedicated"]["psnr_to_stock"] - row["derived"]["psnr_to_stock"], 2)
        print(row, flush=True)
        rows.append(row)

    result = {"environment": common.environment(), "num_images": len(items), "weights": str(args.weights),
              "examples": rows}  # fmt: skip
    if args.out is not None:
        common.write_json(args.out, result)
        if args.plan:
            def cells(r, label):
                if label == "stock":
                    return [r["setting"], "stock", "", "", "1×", "1×", "", percent(r["stock_adherence"])]
                c = r[label]
                name = f"derived from {r['derived_from']}" if label == "derived" else label
                return ["", name, f"`{c['plan']}`", c["full_steps"], f"{c['unet_flop_speedup']}×" if c["unet_flop_speedup"] else "-",
                        f"{c['time_speedup']}×", c["psnr_to_stock"], percent(c["adherence"])]

            table = common.markdown_table(
                ["setting", "calibration", "plan", "full steps", "UNet FLOP speed-up", "time speed-up", "PSNR to stock (dB)", "adherence"],
                [cells(r, label) for r in rows for label in ("stock", "derived", "shipped", "dedicated") if label in r or label == "stock"],
            )  # fmt: skip
        else:
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
