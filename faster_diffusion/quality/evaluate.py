"""Quality harness: prompt adherence and fidelity of faster-diffusion on the bundled tiny-shapes model.

    python -m faster_diffusion.quality.evaluate                       # full run (200 images) -> docs/quality.{json,md}
    python -m faster_diffusion.quality.evaluate --num-prompts 10 --seeds 1 --settings ddim,ddim-paper-par --out /tmp/q

A fixed prompt x seed set (captions of ``faster_diffusion.quality.shapes`` in a fixed shuffled
order, cycled; image ``k`` of seed index ``s`` uses ``torch.Generator().manual_seed(1000 * s + k)``
so every setting starts from the same initial noise) is sampled with classifier-free
guidance 7.5 under each setting. For each setting it reports

* adherence: the fraction of images whose detected colour / shape / position / all
  three match the caption (``faster_diffusion.quality.shapes.detect``);
* fidelity to the stock (unaccelerated) images of the same sampler, step count and
  seed: mean PSNR and SSIM (scikit-image, data range 1); identical images give
  PSNR ``inf`` (written as the string ``"inf"`` in the JSON) and SSIM 1;
* wall time of all the pipeline calls, and the speed-up over the stock sampler.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from ..samplers import FLOW_SAMPLERS, make_flow_scheduler
from . import shapes

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "weights" / "tiny-shapes"
GUIDANCE = 7.5

#: name -> (sampler, faster_diffusion.enable kwargs or None for stock)
SETTINGS: dict[str, tuple[str, dict | None]] = {
    "ddim": ("ddim", None),
    "ddim-paper-seq": ("ddim", dict(key_steps="paper", parallel=False, noise_injection=0.0)),
    "ddim-paper-par": ("ddim", dict(key_steps="paper", parallel=True, noise_injection=0.0)),
    "ddim-paper-seq-ni": ("ddim", dict(key_steps="paper", parallel=False, noise_injection=0.003)),
    "ddim-paper-par-ni": ("ddim", dict(key_steps="paper", parallel=True, noise_injection=0.003)),
    "ddim-uniform2": ("ddim", dict(key_steps="uniform:2", parallel=True, noise_injection=0.003)),
    "ddim-uniform5": ("ddim", dict(key_steps="uniform:5", parallel=True, noise_injection=0.003)),
    "ddim-uniform10": ("ddim", dict(key_steps="uniform:10", parallel=True, noise_injection=0.003)),
    # calibrated: the model directory's calibration/*.json (script/calibrate, on prompts none of these images
    # uses); "cost:B" is the least-reuse-cost schedule of B passes without the output-based refinement
    "ddim-auto": ("ddim", dict(key_steps="auto", parallel=True, noise_injection=0.003)),
    "ddim-auto-no-ni": ("ddim", dict(key_steps="auto", parallel=True, noise_injection=0.0)),
    "ddim-auto16": ("ddim", dict(key_steps="auto:16", parallel=True, noise_injection=0.003)),
    "ddim-auto12": ("ddim", dict(key_steps="auto:12", parallel=True, noise_injection=0.003)),
    "ddim-auto10": ("ddim", dict(key_steps="auto:10", parallel=True, noise_injection=0.003)),
    "ddim-cost9": ("ddim", dict(key_steps="cost:9", parallel=True, noise_injection=0.003)),
    "ddim-auto9": ("ddim", dict(key_steps="auto:9", parallel=True, noise_injection=0.003)),
    "dpm": ("dpm", None),
    "dpm-paper": ("dpm", dict(key_steps="paper", parallel=True, noise_injection=0.003)),
    "dpm-uniform2": ("dpm", dict(key_steps="uniform:2", parallel=True, noise_injection=0.003)),
    "dpm-uniform5": ("dpm", dict(key_steps="uniform:5", parallel=True, noise_injection=0.003)),
    "dpm-auto": ("dpm", dict(key_steps="auto", parallel=True, noise_injection=0.003)),
    "dpm-cost7": ("dpm", dict(key_steps="cost:7", parallel=True, noise_injection=0.003)),
    "dpm-auto7": ("dpm", dict(key_steps="auto:7", parallel=True, noise_injection=0.003)),
    # plans: a level of reuse per step, chosen from the shipped calibration's error model and this machine's
    # cost model at the harness's batch size (no noise injection)
    "ddim-plan-auto": ("ddim", dict(plan="auto")),
    "ddim-plan-auto2.5": ("ddim", dict(plan="auto:2.5")),
    "dpm-plan-auto": ("dpm", dict(plan="auto")),
    "euler": ("euler", None),
    "euler-auto": ("euler", dict(key_steps="auto", parallel=True, noise_injection=0.003)),
    "unipc": ("unipc", None),
    "unipc-auto": ("unipc", dict(key_steps="auto", parallel=True, noise_injection=0.003)),
}
#: sampler (an alias in faster_diffusion.samplers) -> (display name, default steps)
SAMPLERS = {
    "ddim": ("DDIM", 50),
    "dpm": ("DPM-Solver++", 20),
    "euler": ("Euler", 30),
    "unipc": ("UniPC", 20),
}
SAMPLER_NAMES = {k: v[0] for k, v in SAMPLERS.items()}
DEFAULT_STEPS = {k: v[1] for k, v in SAMPLERS.items()}

#: FluxPipeline models (weights/tiny-shapes-flux, script/train-flux-reference): name -> (sampler, steps[, plan]),
#: each sampled with true classifier-free guidance FLUX_TRUE_CFG and an empty negative prompt (the model's default
#: call), stock or with ``faster_diffusion.enable(pipe, plan=...)`` (the calibrations the model ships); "flux-euler"
#: (the model's own scheduler at its default 28 steps) is the fidelity reference
FLUX_SETTINGS: dict[str, tuple] = {
    "flux-euler": ("euler", 28),
    "flux-euler14": ("euler", 14),
    "flux-euler10": ("euler", 10),
    "flux-unipc": ("unipc", 20),
    "flux-dpm": ("dpm", 20),
    "flux-euler-plan-auto": ("euler", 28, "auto"),
    "flux-euler-plan-auto2": ("euler", 28, "auto:2"),
}
#: flow sampler (an alias in faster_diffusion.samplers.FLOW_SAMPLERS) -> display name
FLUX_SAMPLER_NAMES = {s.aliases[0]: s.label for s in FLOW_SAMPLERS.values()}
FLUX_TRUE_CFG = 4.0
FLUX_CALL = dict(negative_prompt="", true_cfg_scale=FLUX_TRUE_CFG, height=64, width=64, max_sequence_length=32)


def prompt_set(num_prompts: int, seeds: int) -> list[tuple[str, int]]:
    """The fixed (caption, generator seed) list: ``num_prompts`` captions x ``seeds`` seeds."""
    caps = shapes.all_captions()
    order = np.random.default_rng(0).permutation(len(caps))
    prompts = [caps[order[k % len(caps)]] for k in range(num_prompts)]
    return [(p, 1000 * s + k) for s in range(seeds) for k, p in enumerate(prompts)]


def _label(name: str, steps: dict[str, int]) -> str:
    sampler, kw = SETTINGS[name]
    base = f"{SAMPLER_NAMES[sampler]}-{steps[sampler]}"
    if kw is None:
        return f"{base} stock"
    if "plan" in kw:
        return f"{base} plan={kw['plan']}"
    mode = "parallel" if kw["parallel"] else "sequential"
    ni = f", noise inj. {kw['noise_injection']:g}" if kw["noise_injection"] else ""
    return f"{base} {kw['key_steps']} {mode}{ni}"


def _scheduler(pipe, sampler: str):
    """The sampler's scheduler on the model's own config (prediction type, betas, timestep spacing)."""
    from faster_diffusion.samplers import make_scheduler

    return make_scheduler(sampler, pipe.scheduler.config)


def _shipped_calibration(pipe, num_steps: int):
    """The model directory's calibration for the pipeline's scheduler at ``num_steps`` (None if none)."""
    from faster_diffusion.calibration import shipped_calibrations

    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_steps)
    latent = pipe.unet.config.sample_size
    for calibration in shipped_calibrations(pipe.name_or_path):
        if calibration.matches(type(scheduler).__name__, scheduler.timesteps, (latent, latent)):
            return calibration
    return None


def _enable(pipe, kw: dict, num_steps: int):
    """faster_diffusion.enable, with "cost:B" read as the shipped calibration's unrefined B-pass schedule.
    Returns the accelerator and whether its schedule is a refined one."""
    import faster_diffusion
    from faster_diffusion.schedules import auto_budget

    kw = dict(kw)
    if "plan" in kw:
        return faster_diffusion.enable(pipe, calibration=_shipped_calibration(pipe, num_steps), **kw), False
    spec = str(kw["key_steps"])
    calibration = _shipped_calibration(pipe, num_steps) if spec.startswith(("cost:", "auto")) else None
    if spec.startswith("cost:"):
        if calibration is None:
            raise ValueError(f"{spec}: no calibration for {type(pipe.scheduler).__name__}-{num_steps} in {pipe.name_or_path}")
        kw["key_steps"] = calibration.least_cost_schedule(int(spec.split(":")[1]))
        return faster_diffusion.enable(pipe, **kw), False
    refined = calibration is not None and spec.startswith("auto:") and auto_budget(spec) in calibration.refined
    return faster_diffusion.enable(pipe, **kw), refined


def fidelity(ref: np.ndarray, imgs: np.ndarray) -> tuple[float, float | None, int]:
    """Mean PSNR, mean SSIM (None without scikit-image) and the number of identical images."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:  # e.g. a bare GPU machine running bench/peers.py
        structural_similarity = None
    psnrs, ssims, same = [], [], 0
    for a, b in zip(ref, imgs):
        mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
        if mse == 0.0:
            same += 1
            psnrs.append(math.inf)
            ssims.append(1.0)
        else:
            psnrs.append(10.0 * math.log10(1.0 / mse))
            if structural_similarity is not None:
                ssims.append(float(structural_similarity(a, b, channel_axis=-1, data_range=1.0)))
    ssim = float(np.mean(ssims)) if structural_similarity is not None else None
    return float(np.mean(psnrs)), ssim, same


def _hardware(device: str, threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hw = f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} with {threads} threads"
    if device.startswith("cuda"):
        hw += f", {torch.cuda.get_device_name()}"
    return hw


def _jsonable(x):
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def evaluate(
    model=DEFAULT_MODEL,
    settings=tuple(SETTINGS),
    num_prompts: int = 100,
    seeds: int = 2,
    steps: dict[str, int] | None = None,
    batch_size: int = 100,
    threads: int = 2,
    device: str = "cpu",
    log=print,
    cache_dir=None,
    cache_only: bool = False,
) -> dict:
    """Runs the settings (plus each sampler's stock reference) and returns the results dict.

    With ``cache_dir`` each setting's images, wall time and stats are stored there
    (``{name}-{key}.npz``) and reused when present, so several processes can sample
    disjoint settings (``cache_only``: no references, no report) and a last call
    assembles the report. ``steps`` maps a sampler to its step count (default ``DEFAULT_STEPS``).
    Each stock sampler other than DDIM is also compared with stock DDIM on the same seeds
    (``psnr_to_ddim``): how far the sampler's images are from the 50-step reference.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    import faster_diffusion

    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    torch.set_num_threads(threads)
    steps = {**DEFAULT_STEPS, **(steps or {})}
    # each sampler's stock run first: it is the fidelity reference
    needed = []
    for s in settings:
        ref = SETTINGS[s][0]
        if ref not in needed:
            needed.append(ref)
    order = needed + [s for s in settings if s not in needed]
    if cache_only:
        order = list(settings)

    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    items = prompt_set(num_prompts, seeds)
    targets = [shapes.parse_caption(p) for p, _ in items]
    log(f"{len(items)} images ({num_prompts} prompts x {seeds} seeds), guidance {GUIDANCE}, model {model}")

    images: dict[str, np.ndarray] = {}
    results = []
    for name in order:
        sampler, kw = SETTINGS[name]
        cache = None
        if cache_dir is not None:
            key = f"{Path(str(model)).name}-{num_prompts}x{seeds}-{steps[sampler]}steps"
            cache = Path(cache_dir) / f"{name}-{key}.npz"
            if cache.exists():
                z = np.load(cache, allow_pickle=False)
                images[name] = z["images"]
                cached = json.loads(str(z["meta"]))
                results.append(_row(name, steps, images, targets, cached["seconds"], cached["stats"], len(items), results))
                log(_line(results[-1]) + " (cached)")
                continue
        pipe.scheduler = _scheduler(pipe, sampler)
        accel, refined = _enable(pipe, kw, steps[sampler]) if kw is not None else (None, False)
        out, stats = [], None
        t0 = time.perf_counter()
        try:
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                gens = [torch.Generator(device).manual_seed(seed) for _, seed in chunk]
                res = pipe(
                    [p for p, _ in chunk],
                    num_inference_steps=steps[sampler],
                    guidance_scale=GUIDANCE,
                    generator=gens,
                    output_type="np",
                )
                out.append(np.asarray(res.images, dtype=np.float32))
                if accel is not None:
                    stats = dict(accel.stats, refined=refined)
        finally:
            if accel is not None:
                faster_diffusion.disable(pipe)
        seconds = time.perf_counter() - t0
        imgs = np.concatenate(out)
        images[name] = imgs
        if stats is None:
            stats = {"steps": steps[sampler], "key_steps": list(range(steps[sampler])), "encoder_passes": steps[sampler],
                     "decoder_passes": steps[sampler], "unet_calls": steps[sampler]}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, images=imgs, meta=json.dumps({"seconds": seconds, "stats": stats}))
            tmp.replace(cache)
        if cache_only:
            log(f"{_label(name, steps)}: cached in {seconds:.1f}s")
            continue
        results.append(_row(name, steps, images, targets, seconds, stats, len(items), results))
        log(_line(results[-1]))
    import diffusers

    for row in results:
        if not row["accelerated"] and row["name"] != "ddim" and "ddim" in images:
            row["psnr_to_ddim"], row["ssim_to_ddim"], _ = fidelity(images["ddim"], images[row["name"]])
    results.sort(key=lambda r: list(SETTINGS).index(r["name"]))
    return {
        "model": str(model),
        "hardware": _hardware(device, threads),
        "device": device,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "num_images": len(items),
        "num_prompts": num_prompts,
        "seeds": seeds,
        "guidance_scale": GUIDANCE,
        "settings": results,
    }


def is_flux(model) -> bool:
    """Whether the model folder is a FluxPipeline (its model_index.json says so)."""
    index = Path(str(model)) / "model_index.json"
    return index.exists() and json.loads(index.read_text()).get("_class_name") == "FluxPipeline"


def flux_scheduler(pipe, sampler: str):
    """A flow-matching sampler FluxPipeline can drive, on the model's sigmas: ``euler`` (the model's own
    ``FlowMatchEulerDiscreteScheduler``), ``unipc`` or ``dpm``, as ``faster_diffusion.samplers.make_flow_scheduler``
    builds them (the one table of flow samplers, shared with the service)."""
    return make_flow_scheduler(sampler, pipe.scheduler.config)


def evaluate_flux(
    model,
    settings=tuple(FLUX_SETTINGS),
    num_prompts: int = 100,
    seeds: int = 2,
    batch_size: int = 100,
    threads: int = 2,
    device: str = "cpu",
    log=print,
) -> dict:
    """The harness for a FluxPipeline model: the same prompt x seed set and detector as :func:`evaluate`,
    each setting sampled stock at the model's default call (true CFG 4, negative prompt ""), fidelity against
    "flux-euler" (sampled first). Returns a report :func:`to_markdown` and :func:`write_report` take."""
    import torch
    from diffusers import FluxPipeline

    unknown = [s for s in settings if s not in FLUX_SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; known for FluxPipeline models: {list(FLUX_SETTINGS)}")
    torch.set_num_threads(threads)
    order = ["flux-euler"] + [s for s in settings if s != "flux-euler"]
    pipe = FluxPipeline.from_pretrained(str(model), local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    own = pipe.scheduler
    items = prompt_set(num_prompts, seeds)
    targets = [shapes.parse_caption(p) for p, _ in items]
    log(f"{len(items)} images ({num_prompts} prompts x {seeds} seeds), true CFG {FLUX_TRUE_CFG}, model {model}")
    images: dict[str, np.ndarray] = {}
    results = []
    import faster_diffusion

    for name in order:
        sampler, n_steps, *plan = FLUX_SETTINGS[name]
        pipe.scheduler = own if sampler == "euler" else flux_scheduler(pipe, sampler)
        accel = faster_diffusion.enable(pipe, plan=plan[0]) if plan else None
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            gens = [torch.Generator(device).manual_seed(seed) for _, seed in chunk]
            res = pipe([p for p, _ in chunk], num_inference_steps=n_steps, generator=gens, output_type="np", **FLUX_CALL)
            out.append(np.asarray(res.images, dtype=np.float32))
        seconds = time.perf_counter() - t0
        stats = dict(accel.stats) if accel is not None else {"steps": n_steps, "encoder_passes": n_steps, "transformer_calls": 2 * n_steps}
        faster_diffusion.disable(pipe)
        images[name] = imgs = np.concatenate(out)
        detections = [shapes.detect(im) for im in imgs]
        psnr, ssim, same = fidelity(images["flux-euler"], imgs)
        ref = next((r for r in results if r["name"] == "flux-euler"), None)
        results.append({
            "name": name,
            "label": f"{FLUX_SAMPLER_NAMES[sampler]}-{n_steps} " + (f"plan={plan[0]} ({stats.get('plan')})" if plan else "stock"),
            "sampler": FLUX_SAMPLER_NAMES[sampler],
            "steps": n_steps,
            "reference": "flux-euler",
            "accelerated": bool(plan),
            "stats": stats,
            "adherence": shapes.score(detections, targets),
            "position_confusion": shapes.position_confusion(detections, targets),
            "psnr": psnr,
            "ssim": ssim,
            "identical_images": same,
            "seconds": seconds,
            "seconds_per_image": seconds / len(items),
            "speedup": 1.0 if ref is None else ref["seconds"] / seconds,
        })
        a = results[-1]["adherence"]
        log(f"{results[-1]['label']:<32} colour {a['colour']:.3f} shape {a['shape']:.3f} position {a['position']:.3f} "
            f"all {a['all']:.3f} | PSNR to Euler-28 {psnr:6.2f} | {seconds:6.1f}s")
    import diffusers

    return {
        "model": str(model),
        "title": f"Adherence of the bundled FluxPipeline model {Path(str(model)).name}",
        "passes": "steps (2 transformer calls each)",
        "hardware": _hardware(device, threads),
        "device": device,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "num_images": len(items),
        "num_prompts": num_prompts,
        "seeds": seeds,
        "guidance_scale": FLUX_TRUE_CFG,
        "settings": results,
    }


def _line(row: dict) -> str:
    a = row["adherence"]
    return (
        f"{row['label']:<45} colour {a['colour']:.3f} shape {a['shape']:.3f} "
        f"position {a['position']:.3f} all {a['all']:.3f} | PSNR {row['psnr']:6.2f} SSIM {row['ssim']:.4f} | "
        f"{row['seconds']:7.1f}s ({row['speedup']:.2f}x) enc {row['stats']['encoder_passes']} unet calls {row['stats']['unet_calls']}"
    )


def _row(name, steps, images, targets, seconds, stats, n, results) -> dict:
    sampler, kw = SETTINGS[name]
    imgs = images[name]
    detections = [shapes.detect(im) for im in imgs]
    adherence = shapes.score(detections, targets)
    psnr, ssim, same = fidelity(images[sampler], imgs)
    row = {
        "name": name,
        "label": _label(name, steps),
        "sampler": SAMPLER_NAMES[sampler],
        "steps": steps[sampler],
        "reference": sampler,
        "accelerated": kw is not None,
        "key_steps": None if kw is None else kw.get("key_steps"),
        "plan": None if kw is None else kw.get("plan"),
        "schedule_source": stats.get("schedule_source"),
        "refined": bool(stats.get("refined")),
        "parallel": None if kw is None else kw.get("parallel", True),
        "noise_injection": None if kw is None else kw.get("noise_injection", 0.0),
        "stats": {k: stats.get(k) for k in ("steps", "key_steps", "encoder_passes", "decoder_passes", "unet_calls", "plan",
                                            "predicted_speedup", "measured_speedup", "unet_flops", "stock_unet_flops")},
        "adherence": adherence,
        "position_confusion": shapes.position_confusion(detections, targets),
        "psnr": psnr,
        "ssim": ssim,
        "identical_images": same,
        "seconds": seconds,
        "seconds_per_image": seconds / n,
    }
    ref_row = next((r for r in results if r["name"] == sampler), None)
    row["speedup"] = 1.0 if ref_row is None else ref_row["seconds"] / seconds
    return row


def _fmt(x: float, nd: int) -> str:
    return "inf" if math.isinf(x) else f"{x:.{nd}f}"


def to_markdown(report: dict, command: str) -> str:
    lines = [
        "# " + report.get("title", "Quality of faster-diffusion on the bundled tiny-shapes model"),
        "",
        f"- model: `{report['model']}`",
        f"- hardware: {report['hardware']}",
        f"- date: {report['date']}",
        f"- command: `{command}`",
        f"- set: {report['num_images']} images = {report['num_prompts']} captions x {report['seeds']} seeds, "
        f"guidance {report['guidance_scale']}, one `torch.Generator` per image (same initial noise in every setting)",
        "- adherence: fraction of images whose colour / shape / position read by `faster_diffusion.quality.shapes.detect` "
        "match the caption; fidelity: mean PSNR (dB) / SSIM against the stock images of the same sampler and seed",
    ]
    lines += [f"- note: {n}" for n in report.get("notes", [])]
    lines += [
        "",
        f"| setting | {report.get('passes', 'encoder passes')} | colour | shape | position | all three | PSNR | SSIM | time (s) | speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["settings"]:
        a = r["adherence"]
        lines.append(
            f"| {r['label']} | {r['stats']['encoder_passes']}/{r['steps']} | {a['colour']:.1%} | {a['shape']:.1%} | "
            f"{a['position']:.1%} | {a['all']:.1%} | {_fmt(r['psnr'], 2)} | {_fmt(r['ssim'], 4)} | "
            f"{r['seconds']:.1f} | {r['speedup']:.2f}x |"
        )
    cross = [r for r in report["settings"] if "psnr_to_ddim" in r]
    if cross and any(r["name"] == "ddim" for r in report["settings"]):
        ddim = next(r for r in report["settings"] if r["name"] == "ddim")
        lines += ["", f"Stock samplers against stock {ddim['label'].removesuffix(' stock')} on the same seeds "
                  "(how close a shorter solver comes to the 50-step images):", "",
                  "| sampler | PSNR | SSIM |", "| --- | ---: | ---: |"]
        lines += [f"| {r['label']} | {_fmt(r['psnr_to_ddim'], 2)} | {_fmt(r['ssim_to_ddim'], 4)} |" for r in cross]
    for r in report["settings"]:
        if r["accelerated"]:
            continue
        lines += [
            "",
            f"Position read by the detector (columns) per caption position (rows), {r['label']}:",
            "",
            "| caption | " + " | ".join([*shapes.POSITIONS, "none"]) + " |",
            "| --- |" + " ---: |" * (len(shapes.POSITIONS) + 1),
        ]
        for want, got in r["position_confusion"].items():
            lines.append(f"| {shapes.POSITIONS[want]} | " + " | ".join(str(n) for n in got.values()) + " |")
    lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out: str | Path, command: str) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(report, command=command)
    jpath, mpath = out.with_suffix(".json"), out.with_suffix(".md")
    jpath.write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    mpath.write_text(to_markdown(report, command))
    return jpath, mpath


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m faster_diffusion.quality.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL.relative_to(ROOT)) if Path.cwd() == ROOT else str(DEFAULT_MODEL))
    ap.add_argument("--num-prompts", type=int, default=100, help="captions (of the 90, in a fixed shuffled order, cycled)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per caption")
    ap.add_argument("--settings", default="all", help=f"comma-separated subset of: {', '.join(SETTINGS)}; for a "
                    f"FluxPipeline --model (e.g. weights/tiny-shapes-flux): {', '.join(FLUX_SETTINGS)}")
    for sampler, (name, default) in SAMPLERS.items():
        ap.add_argument(f"--{sampler}-steps", type=int, default=default, help=f"{name} steps")
    ap.add_argument("--batch-size", type=int, default=100, help="prompts per pipeline call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="docs/quality", help="writes OUT.json and OUT.md")
    ap.add_argument("--cache-dir", default=None, help="store / reuse each setting's images here")
    ap.add_argument("--cache-only", action="store_true", help="only sample the given settings into --cache-dir")
    ap.add_argument("--note", action="append", default=[], help="a line for the report (repeatable)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    flux = is_flux(args.model)
    known = FLUX_SETTINGS if flux else SETTINGS
    settings = list(known) if args.settings == "all" else [s.strip() for s in args.settings.split(",") if s.strip()]
    command = "python -m faster_diffusion.quality.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    if args.cache_only and not args.cache_dir:
        ap.error("--cache-only needs --cache-dir")
    steps = {sampler: getattr(args, f"{sampler}_steps") for sampler in SAMPLERS}
    if flux and args.cache_dir:
        ap.error("--cache-dir is not supported for FluxPipeline models")
    if flux:
        report = evaluate_flux(args.model, settings, args.num_prompts, args.seeds, args.batch_size, args.threads, args.device)
    else:
        report = evaluate(args.model, settings, args.num_prompts, args.seeds, steps, args.batch_size, args.threads, args.device, cache_dir=args.cache_dir, cache_only=args.cache_only)
    if args.cache_only:
        return 0
    report["total_seconds"] = time.perf_counter() - t0
    report["notes"] = list(args.note)
    jpath, mpath = write_report(report, args.out, command.strip())
    print(f"wrote {jpath} and {mpath} in {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
